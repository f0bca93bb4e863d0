"""A face recognition service: images in, answers out, with the defences as its own policy.

The service wraps a trained recognizer. Clients send batches of images under a name; the service
counts their queries against a budget, answers with a label, the top-k labels or the full
probabilities, and keeps a history of every query with the ground truth the attacker never sees
(the true top-1 identity and whether the answer was altered on purpose).

Defences (Kinbara et al. 2020):
- intentional misrecognition: with probability p the answer is a wrong identity (uniform among
  the others, or the runner-up). The coin is drawn from a key folded with a per-query token: the
  query counter (fresh randomness per query, the paper's naive defence, so two near-duplicates
  can get different answers) or a perturbation-robust fingerprint (low-frequency hash bits), which
  makes the answer a deterministic function of the image's fingerprint.
- near-duplicate detection: a DCT-hash Hamming-radius search or a cosine search on the
  recognizer's penultimate features, over the client's own history or a global one. A detected
  near-duplicate gets the earlier query's token, so it is answered consistently with that query
  (altered or not alike) and the client is marked suspicious.

In hash mode the token of a fresh query is its own hash and a near-duplicate's is the matched
stored hash (salted with the client in "client" scope), so the index needs nothing stored besides
the hashes (16 bytes per query).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia import batching
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models
from jaxmia.service import dedup

ANSWERS = ("label", "topk", "probs")
WRONG = ("uniform", "runner_up")
KEYED = ("query", "fingerprint")
DETECTORS = ("none", "hash", "embedding")
SCOPES = ("client", "global")


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the service answers and how it defends itself.

    Attributes:
      answer: "label", "topk" or "probs".
      top_k: labels (and probabilities) per answer in "topk" mode.
      budget: queries allowed per client; 0 means unlimited.
      misrecognition: p, the probability that an answer is altered on purpose.
      wrong: "uniform" (any other identity) or "runner_up" (the second most likely).
      keyed: "query" (a fresh coin per query) or "fingerprint" (a coin per hash fingerprint).
      fingerprint_bits: how many lowest-frequency hash bits make the fingerprint.
      detector: "none", "hash" or "embedding".
      scope: near-duplicates are searched in the "client"'s own history or the "global" one.
      radius: Hamming radius of a hash match.
      cosine: cosine similarity threshold of an embedding match.
      chunks: the hash index's chunk tables (see ``dedup.HashIndex``).
      buckets: batch sizes the model is compiled for; a batch is padded to the next one
        (``batching.map_batches``).
      decimals: answered probabilities rounded to this many decimals (an output-side defence:
        less signal for a score-based attacker); -1: unrounded.
    """

    answer: str = "label"
    top_k: int = 3
    budget: int = 0
    misrecognition: float = 0.0
    wrong: str = "uniform"
    keyed: str = "query"
    fingerprint_bits: int = 16
    detector: str = "none"
    scope: str = "client"
    radius: int = 4
    cosine: float = 0.98
    chunks: int = 2
    buckets: tuple[int, ...] = (8, 64, 256)
    decimals: int = -1

    def __post_init__(self):
        _choice("answer", self.answer, ANSWERS)
        _choice("wrong", self.wrong, WRONG)
        _choice("keyed", self.keyed, KEYED)
        _choice("detector", self.detector, DETECTORS)
        _choice("scope", self.scope, SCOPES)
        p = self.misrecognition
        if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise JaxmiaError(
                f"service policy misrecognition: expected a probability in [0, 1], got {p!r}"
            )
        if self.top_k < 1:
            raise JaxmiaError(f"service policy top_k: expected >= 1, got {self.top_k}")
        if self.budget < 0:
            raise JaxmiaError(
                f"service policy budget: expected >= 0 (0: unlimited), got {self.budget}"
            )
        if not 1 <= self.fingerprint_bits <= dedup.HASH_BITS:
            raise JaxmiaError(
                f"service policy fingerprint_bits: expected 1..64, got {self.fingerprint_bits}"
            )
        if not self.buckets or any(b < 1 for b in self.buckets):
            raise JaxmiaError(
                f"service policy buckets: expected positive batch sizes, got {self.buckets}"
            )
        if self.detector == "hash":
            dedup.HashIndex(self.radius, self.chunks)  # validates radius and chunks
        if self.detector == "embedding":
            dedup.EmbeddingIndex(self.cosine)
        if (
            isinstance(self.decimals, bool)
            or not isinstance(self.decimals, int)
            or not (-1 <= self.decimals <= 8)
        ):
            raise JaxmiaError(
                "service policy decimals: expected 0..8, or -1 for unrounded; "
                f"got {self.decimals!r}"
            )


class BudgetError(JaxmiaError):
    """A query that would overrun its client's budget."""


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise JaxmiaError(f"service policy {field}: expected one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Answers:
    """The service's reply to a batch. # b = batch size

    Attributes:
      labels: the answered identity. # [b]
      top_labels: "topk" mode: the k answered identities, most likely first. # [b, k]
      probabilities: "topk": their probabilities # [b, k]; "probs": all of them # [b, n]
      indices: the queries' places in the service's history. # [b]
    """

    labels: np.ndarray
    top_labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    indices: np.ndarray | None = None


@dataclasses.dataclass
class Client:
    """One client's account: queries used, near-duplicates detected, suspicion."""

    queries: int = 0
    duplicates: int = 0

    @property
    def suspicious(self) -> bool:
        return self.duplicates > 0


@functools.partial(jax.jit, static_argnames=("graphdef", "with_features"))
def _infer(graphdef, params, x, *, with_features):
    """Probabilities, hash words and (optionally) features of a padded batch. # [B, h, w, c]"""
    model = nnx.merge(graphdef, params)
    feats = model.features(x)  # [B, d]
    probs = jax.nn.softmax(model.classify(feats)[0], axis=-1)  # [B, n]
    return probs, dedup.hash_words(x), feats if with_features else None


@functools.partial(jax.jit, static_argnames=("wrong",))
def misrecognize(probs, tokens, key, p, *, wrong):
    """Alters answers with probability p, each coin keyed by its query's token.

    Args:
      probs: the recognizer's probabilities. # [b, n]
      tokens: two uint32 words per query that key its coin. # [b, 2]
      key: the service's misrecognition key.
      p: the alteration probability.
      wrong: "uniform" or "runner_up".

    Returns:
      (answered probabilities with the true top-1 and the wrong identity swapped where altered
      # [b, n], true label # [b], answered label # [b], altered # [b]).
    """
    n = probs.shape[-1]
    order = jnp.argsort(-probs, axis=-1)  # [b, n]
    true, runner_up = order[:, 0], order[:, 1 % n]

    def coin(token):
        k = jax.random.fold_in(jax.random.fold_in(key, token[0]), token[1])
        k_alter, k_wrong = jax.random.split(k)
        offset = jax.random.randint(k_wrong, (), 1, max(n, 2))
        return jax.random.uniform(k_alter) < p, offset

    altered, offset = jax.vmap(coin)(tokens)
    target = runner_up if wrong == "runner_up" else (true + offset) % n
    altered = altered & (n > 1)
    answer = jnp.where(altered, target, true)
    rows = jnp.arange(probs.shape[0])
    p_true, p_answer = probs[rows, true], probs[rows, answer]
    swapped = probs.at[rows, answer].set(p_true).at[rows, true].set(p_answer)
    return swapped, true, answer, altered


def _words(tokens: np.ndarray) -> np.ndarray:
    """uint64 tokens as [b, 2] uint32 words (low first)."""
    tokens = np.asarray(tokens, np.uint64)
    return np.stack([tokens & np.uint64(0xFFFFFFFF), tokens >> np.uint64(32)], -1).astype(np.uint32)


class Service:
    """A recognition service around a recognizer; see the module docstring.

    Args:
      graphdef, params: the recognizer (``models.init`` / ``train.fit`` / a checkpoint).
      policy: answers, budget and defences.
      key: the service's secret PRNG key (misrecognition coins).
      image_shape: (h, w, c) every query must have.
      store: where every answered query and account is written before the answer is returned
        (``jaxmia.service.store.Store``); the service starts from what it holds (accounts, budgets,
        history, near-duplicate index). None: in memory only.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        *,
        policy: Policy,
        key: jax.Array,
        image_shape: tuple[int, int, int],
        store: Any = None,
    ):
        self.graphdef, self.params, self.policy = graphdef, params, policy
        self.key = key
        self.image_shape = tuple(int(s) for s in image_shape)
        probe = jax.ShapeDtypeStruct((1, *self.image_shape), jnp.float32)
        self.num_classes = int(
            jax.eval_shape(functools.partial(models.logits, graphdef), params, probe).shape[-1]
        )
        self.clients: dict[str, Client] = {}
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in HISTORY_COLUMNS}
        self._client_ids: dict[str, int] = {}
        self._count = 0
        self._indexes: dict[str, dedup.HashIndex | dedup.EmbeddingIndex] = {}
        self._tokens: dict[str, list[np.ndarray]] = {}  # embedding mode: token of each stored entry
        self.budgets: dict[str, int] = {}  # clients' own budgets, in place of the policy's
        self.store = store
        if store is not None:
            self._load(store)

    def _load(self, store) -> None:
        """Accounts, history and near-duplicate index as the store holds them."""
        for c in store.clients():
            if c["budget"] is not None:
                self.budgets[c["name"]] = int(c["budget"])
        embedding = self.policy.detector == "embedding"
        h = store.history(features=embedding)
        n = len(h["idx"])
        if not np.array_equal(h["idx"], np.arange(n)):
            raise JaxmiaError(f"service store {store.path}: query indexes are not 0..n-1")
        names = list(h["client_names"])
        self._client_ids = {name: cid for cid, name in enumerate(names)}
        cid = h["cid"].astype(np.int32)
        dup = h["duplicate"].astype(bool)
        if n:
            for col, v in (
                ("client", cid), ("index", h["idx"]), ("true_label", h["true_label"]),
                ("answer", h["answer"]), ("altered", h["altered"]), ("duplicate", dup),
                ("hash", h["hash"]),
            ):  # fmt: skip
                self._columns[col].append(v.astype(_DTYPES[col]))
        self._count = n
        for c, name in enumerate(names):
            mine = cid == c
            self.clients[name] = Client(queries=int(mine.sum()), duplicates=int(dup[mine].sum()))
        if self.policy.detector == "none" or not n:
            return
        scopes = np.array([self._scope_key(names[c]) for c in cid], dtype=object)
        for scope in dict.fromkeys(scopes[~dup]):
            fresh = ~dup & (scopes == scope)
            if self.policy.detector == "hash":
                index = self._indexes.setdefault(
                    scope, dedup.HashIndex(self.policy.radius, self.policy.chunks)
                )
                index.add(h["hash"][fresh])
            else:
                index = self._indexes.setdefault(scope, dedup.EmbeddingIndex(self.policy.cosine))
                index.add(h["features"][fresh])
                self._tokens.setdefault(scope, []).append(h["token"][fresh])

    @classmethod
    def from_checkpoint(cls, path: str, *, policy: Policy, key: jax.Array) -> Service:
        """A service around a recognizer saved by ``jaxmia train``."""
        from jaxmia import checkpoint

        rec = checkpoint.load_recognizer(path)
        cfg = rec.config
        return cls(
            rec.graphdef,
            rec.params,
            policy=policy,
            key=key,
            image_shape=(*cfg.image_size, cfg.channels),
        )

    # -- queries -------------------------------------------------------------------------------

    def query(self, client: str, images: np.ndarray) -> Answers:
        """Answers a batch of images for a client.

        Args:
          client: the client's account name.
          images: float images in [0, 1]. # [b, h, w, c]

        Raises:
          JaxmiaError: bad images (``BudgetError``: the batch would overrun the client's
            budget). Nothing is recorded then: the history and the accounts stay as they were.
        """
        (out,) = self.query_many([(client, images)])
        if isinstance(out, Exception):
            raise out
        return out

    def query_many(self, requests: list[tuple[str, Any]]) -> list[Answers | Exception]:
        """Answers several clients' batches with one pass of the recognizer (dynamic batching).

        The same answers and records as ``query`` on each request in order: the recognizer
        runs once over every accepted image, then each request's policy (budget, near-duplicate
        search, coins, store) in order. A refused request gets its error in its place and
        changes nothing; the others are answered. So does a request whose store write failed
        (``store.StoreError``): a query is charged and recorded exactly when it is answered.

        Args:
          requests: (client, images # [b, h, w, c]) each.

        Returns:
          Per request, its ``Answers`` or the exception that refused it (a ``JaxmiaError``
          for bad input or a spent budget).
        """
        out: list[Answers | JaxmiaError | None] = [None] * len(requests)
        accepted, pending = [], {}
        for i, (client, images) in enumerate(requests):
            try:
                x = self._validate(client, images)
                used = self.clients.get(client, Client()).queries + pending.get(client, 0)
                budget = self.budget_of(client)
                if budget and used + len(x) > budget:
                    raise BudgetError(
                        f"client {client!r}: query budget {budget} exceeded "
                        f"({used} used, {len(x)} more asked)"
                    )
            except JaxmiaError as e:
                out[i] = e
                continue
            pending[client] = pending.get(client, 0) + len(x)
            accepted.append((i, client, x))
        if accepted:
            probs, words, feats = self._run_model(np.concatenate([x for _, _, x in accepted]))
            start = 0
            for i, client, x in accepted:
                part = slice(start, start + len(x))
                start += len(x)
                try:
                    out[i] = self._answer(
                        client, probs[part], words[part], None if feats is None else feats[part]
                    )
                except Exception as e:  # noqa: BLE001 - its own failure; the others go on
                    # _answer changes nothing before its store write succeeds, so a request
                    # the store refused (a full disk) is neither charged nor answered.
                    out[i] = e
        return out

    def budget_of(self, client: str) -> int:
        """The client's query budget (0: unlimited): its own if set, else the policy's."""
        return self.budgets.get(client, self.policy.budget)

    def _answer(self, client, probs, words, feats) -> Answers:
        """The policy's part of a query whose recognizer outputs are known; records it."""
        b = len(probs)
        hashes = dedup.words_to_uint64(words)  # [b]
        tokens, duplicate, fresh_keys = self._tokens_for(client, hashes, feats)
        answered, true, answer, altered = self._misrecognize(probs, tokens)
        cid = self._client_ids.get(client, len(self._client_ids))
        row = {
            "client": np.full(b, cid, np.int32),
            "index": np.arange(self._count, self._count + b),
            "true_label": true.astype(np.int32),
            "answer": answer.astype(np.int32),
            "altered": altered.astype(bool),
            "duplicate": duplicate,
            "hash": hashes,
        }
        if self.store is not None:
            # Written before anything changes here or is answered: a crash after it loses
            # nothing the client saw; a crash before it, nothing recorded.
            self.store.append(
                client,
                cid,
                {**row, "idx": row["index"], "token": np.asarray(tokens, np.uint64)},
                feats if self.policy.detector == "embedding" else None,
            )
        # Commit: nothing above changed the service's state.
        self._store(client, hashes, feats, tokens, duplicate, fresh_keys)
        account = self.clients.setdefault(client, Client())
        account.queries += b
        account.duplicates += int(duplicate.sum())
        self._client_ids.setdefault(client, cid)
        for name, values in row.items():
            self._columns[name].append(values)
        self._count += b
        return dataclasses.replace(self._reply(answered, answer), indices=row["index"])

    def _validate(self, client: str, images: Any) -> np.ndarray:
        if not isinstance(client, str) or not client:
            raise JaxmiaError(f"client name: expected a non-empty string, got {client!r}")
        arr = np.asarray(images) if isinstance(images, np.ndarray | jax.Array) else None
        if arr is None:
            raise JaxmiaError(f"query images: expected a numpy array, got {type(images).__name__}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise JaxmiaError(
                f"query images: expected a float dtype with values in [0, 1], got {arr.dtype}"
            )
        if arr.ndim != 4 or arr.shape[1:] != self.image_shape:
            raise JaxmiaError(
                f"query images: expected shape [batch, {', '.join(map(str, self.image_shape))}], "
                f"got {list(arr.shape)}"
            )
        if len(arr) == 0:
            raise JaxmiaError("query images: expected at least one image, got an empty batch")
        if not np.isfinite(arr).all():
            raise JaxmiaError("query images: NaN or infinite pixel values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise JaxmiaError(
                f"query images: expected values in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]"
            )
        return arr.astype(np.float32)

    def _run_model(self, images: np.ndarray):
        """(probabilities # [b, n], hash words # [b, 2], features # [b, d] or None)."""
        with_features = self.policy.detector == "embedding"
        return batching.map_batches(
            lambda x: _infer(self.graphdef, self.params, x, with_features=with_features),
            images,
            sizes=self.policy.buckets,
        )

    def _misrecognize(self, probs: np.ndarray, tokens: np.ndarray):
        p, wrong = float(self.policy.misrecognition), self.policy.wrong
        return batching.map_batches(
            lambda pr, w: misrecognize(pr, w, self.key, p, wrong=wrong),
            probs,
            _words(tokens),
            sizes=self.policy.buckets,
        )

    def _scope_key(self, client: str) -> str:
        return client if self.policy.scope == "client" else ""

    def _tokens_for(self, client: str, hashes: np.ndarray, feats: np.ndarray | None):
        """The coin token of each query, which queries are near-duplicates, and what to store.

        Reads the history but does not change it. Queries earlier in the same batch count as
        history: an attacker's near-duplicates often travel together.
        """
        pol, b = self.policy, len(hashes)
        if pol.keyed == "fingerprint":
            shift = np.uint64(dedup.HASH_BITS - pol.fingerprint_bits)
            keyed = lambda h: (h << shift) >> shift  # noqa: E731 - the low (lowest-frequency) bits
        else:
            keyed = lambda h: h  # noqa: E731
        duplicate = np.zeros(b, bool)
        if pol.detector == "none":
            if pol.keyed == "fingerprint":
                return keyed(hashes), duplicate, None
            return np.arange(self._count, self._count + b, dtype=np.uint64), duplicate, None
        index = self._indexes.get(self._scope_key(client))
        if pol.detector == "hash":
            canon = hashes.copy()
            if index is not None:
                dist, match = index.search(hashes)
                hit = dist != dedup.NO_MATCH
                canon[hit], duplicate[hit] = match[hit], True
            d = dedup.hamming(hashes[:, None], hashes[None, :])  # within the batch # [b, b]
            for i in range(b):
                if duplicate[i]:
                    continue
                earlier = np.nonzero((d[i, :i] <= pol.radius) & ~duplicate[:i])[0]
                if len(earlier):
                    j = earlier[np.argmin(d[i, earlier])]
                    canon[i], duplicate[i] = hashes[j], True
            # A client-scoped service remembers nothing across clients, so its coins differ
            # between clients even for one hash; a global one keys them by the hash alone.
            return keyed(canon) ^ self._salt(client), duplicate, ~duplicate
        # Embedding mode: tokens are the fresh query's counter (or fingerprint), stored per entry.
        own = (
            keyed(hashes)
            if pol.keyed == "fingerprint"
            else np.arange(self._count, self._count + b, dtype=np.uint64)
        )
        tokens = own.copy()
        if index is not None:
            sim, match = index.search(feats)
            hit = match != dedup.NO_MATCH
            stored = np.concatenate(self._tokens[self._scope_key(client)])
            tokens[hit], duplicate[hit] = stored[match[hit]], True
        f = dedup.normalise(feats)
        sims = f @ f.T  # [b, b]
        for i in range(b):
            if duplicate[i]:
                continue
            earlier = np.nonzero((sims[i, :i] >= pol.cosine) & ~duplicate[:i])[0]
            if len(earlier):
                j = earlier[np.argmax(sims[i, earlier])]
                tokens[i], duplicate[i] = tokens[j], True
        return tokens, duplicate, ~duplicate

    def _salt(self, client: str) -> np.uint64:
        if self.policy.scope == "global":
            return np.uint64(0)
        cid = self._client_ids.get(client, len(self._client_ids))
        # splitmix64 of the client id: spreads the ids over all 64 bits.
        mask = (1 << 64) - 1
        z = ((cid + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        return np.uint64(z ^ (z >> 31))

    def _store(self, client, hashes, feats, tokens, duplicate, fresh):
        """Adds the fresh (non-duplicate) queries to the near-duplicate history."""
        pol = self.policy
        if pol.detector == "none":
            return
        scope = self._scope_key(client)
        if pol.detector == "hash":
            index = self._indexes.setdefault(scope, dedup.HashIndex(pol.radius, pol.chunks))
            index.add(hashes[fresh])
        else:
            index = self._indexes.setdefault(scope, dedup.EmbeddingIndex(pol.cosine))
            index.add(feats[fresh])
            self._tokens.setdefault(scope, []).append(tokens[fresh])

    def _reply(self, answered: np.ndarray, answer: np.ndarray) -> Answers:
        if self.policy.decimals >= 0:
            answered = np.round(answered, self.policy.decimals)
        if self.policy.answer == "label":
            return Answers(labels=answer.astype(np.int32))
        if self.policy.answer == "probs":
            return Answers(
                labels=answer.astype(np.int32), probabilities=answered.astype(np.float32)
            )
        k = min(self.policy.top_k, answered.shape[-1])
        # The answered label leads even on a probability tie.
        not_answer = np.arange(answered.shape[-1])[None, :] != answer[:, None]
        top = np.lexsort((not_answer, -answered), axis=-1)[:, :k]
        return Answers(
            labels=answer.astype(np.int32),
            top_labels=top.astype(np.int32),
            probabilities=np.take_along_axis(answered, top, -1).astype(np.float32),
        )

    # -- ground truth (the service's own records, never shown to clients) ----------------------

    def history(self) -> dict[str, np.ndarray]:
        """Every query so far, in order: client id, index, true_label, answer, altered, duplicate,
        hash; plus ``client_names`` in client-id order. # each [queries]"""
        out = {
            name: np.concatenate(cols) if cols else np.zeros(0, _DTYPES[name])
            for name, cols in self._columns.items()
        }
        out["client_names"] = np.array(list(self._client_ids), dtype=object)
        return out

    def true_labels(self, images: np.ndarray) -> np.ndarray:
        """The recognizer's unaltered top-1 on images, unrecorded (for scoring fidelity). # [b]"""
        images = self._validate("scorer", images)
        probs, _, _ = self._run_model(images)
        return probs.argmax(-1).astype(np.int32)

    @property
    def queries(self) -> int:
        """Queries answered so far (stored ones included)."""
        return self._count

    def warm_up(self) -> None:
        """Compiles the recognizer and the coins for every bucket (a server's first requests
        would otherwise wait for it); records nothing."""
        for size in self.policy.buckets:
            x = np.zeros((size, *self.image_shape), np.float32)
            probs, _, _ = self._run_model(x)
            self._misrecognize(probs, np.zeros(size, np.uint64))

    def detector_size(self) -> tuple[int, int]:
        """(stored entries, bytes) over all near-duplicate histories."""
        return sum(len(i) for i in self._indexes.values()), sum(
            i.nbytes for i in self._indexes.values()
        )


HISTORY_COLUMNS = ("client", "index", "true_label", "answer", "altered", "duplicate", "hash")
_DTYPES = {
    "client": np.int32,
    "index": np.int64,
    "true_label": np.int32,
    "answer": np.int32,
    "altered": bool,
    "duplicate": bool,
    "hash": np.uint64,
}
