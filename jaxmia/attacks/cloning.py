"""The cloning attack (Kinbara et al. 2020) and the attacker's answer to intentional misrecognition.

The attacker owns unlabeled faces (by default of people the service was not trained on), asks
the service for their identities within a query budget, and trains a clone recognizer on the
answers. Against a service that alters answers at random it sends m near-duplicates of each
image and trusts only answers the variants agree on (``estimate``). Adaptive variants spread the
near-duplicates over several accounts, or push them just outside the service's hash radius.

Scores: the clone's accuracy on the service's held-out test faces, its fidelity (agreement with
the service's true, unaltered answers there), and the precision/recall of the attacker's guess of
which answers were altered, against the service's ground truth.

``run_scenario`` runs one cell of the ``jaxmia clone`` table; ``detector_roc`` measures the
near-duplicate detectors on near-duplicates vs different photos of the same person.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmia import batching, transforms
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models, train
from jaxmia.service import dedup
from jaxmia.service import policy as service_lib

ATTACKS = ("plain", "estimate", "outside")
ESTIMATES = ("relabel", "drop")
POOLS = ("disjoint", "same")
_JPEG_BLOCK = 8
MAX_SHIFT = 8  # pixels: a near-duplicate's largest translation
_CHUNK = 64  # images per compiled near-duplicate call

# name -> how the service defends itself and how the attacker plays. Policy fields set here
# override the config's; "p": False means no misrecognition at all.
SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {"attack": "plain", "p": False},
    "misrec": {"attack": "plain"},
    "estimate": {"attack": "estimate"},
    "countermeasure": {"attack": "estimate", "detect": True},
    "accounts_client": {
        "attack": "estimate",
        "accounts": True,
        "detector": "hash",
        "scope": "client",
    },
    "accounts_global": {
        "attack": "estimate",
        "accounts": True,
        "detector": "hash",
        "scope": "global",
    },
    "accounts_fingerprint": {"attack": "estimate", "accounts": True, "keyed": "fingerprint"},
    "outside_hash": {"attack": "outside", "detector": "hash"},
    "outside_embedding": {"attack": "outside", "detector": "embedding"},
    "outside_fingerprint": {"attack": "outside", "keyed": "fingerprint"},
}


# -- near-duplicates --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """Strengths of the near-duplicate transforms (0 switches one off).

    Attributes:
      shift: largest translation in pixels (each axis, edge-padded; at most MAX_SHIFT).
      crop: largest fraction of the side cut off before resizing back.
      noise: standard deviation of Gaussian pixel noise.
      brightness: largest brightness offset.
      jpeg: quantisation step of 8x8 block DCT coefficients (JPEG-like; grows with frequency).
    """

    shift: int = 0
    crop: float = 0.0
    noise: float = 0.02
    brightness: float = 0.05
    jpeg: float = 0.02

    def as_array(self) -> jax.Array:
        return jnp.array(
            [self.shift, self.crop, self.noise, self.brightness, self.jpeg], jnp.float32
        )

    def scaled(self, strength: float) -> Perturbation:
        return Perturbation(
            shift=int(round(self.shift * strength)),
            crop=min(0.5, self.crop * strength),
            noise=self.noise * strength,
            brightness=self.brightness * strength,
            jpeg=self.jpeg * strength,
        )


def _jpeg_like(x: jax.Array, step: jax.Array) -> jax.Array:
    """Quantises 8x8 block DCT coefficients with a step that grows with frequency. # [h, w, c]"""
    h, w, c = x.shape
    ph, pw = -h % _JPEG_BLOCK, -w % _JPEG_BLOCK
    xp = jnp.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hb, wb = xp.shape[0] // _JPEG_BLOCK, xp.shape[1] // _JPEG_BLOCK
    blocks = xp.reshape(hb, _JPEG_BLOCK, wb, _JPEG_BLOCK, c)
    d = jnp.asarray(dedup._dct_matrix(_JPEG_BLOCK))
    coeffs = jnp.einsum("ki,aibjc,lj->akblc", d, blocks, d)
    freq = jnp.arange(_JPEG_BLOCK)
    q = jnp.maximum(step, 1e-6) * (1.0 + freq[:, None] + freq[None, :])[None, :, None, :, None]
    coeffs = jnp.round(coeffs / q) * q
    out = jnp.einsum("ki,akblc,lj->aibjc", d, coeffs, d).reshape(xp.shape)
    return out[:h, :w]


def perturb(x: jax.Array, key: jax.Array, p: jax.Array) -> jax.Array:
    """One random near-duplicate of an image in [0, 1].

    Args:
      x: # [h, w, c]
      key: PRNG key.
      p: ``Perturbation.as_array()``: strengths are data, so one compile serves every strength.
    """
    shift, crop, noise, brightness, jpeg = p[0], p[1], p[2], p[3], p[4]
    k_uniform, k_noise = jax.random.split(key)
    # One draw for every scalar choice: fewer PRNG calls compile much faster on CPU.
    u = jax.random.uniform(k_uniform, (6,))
    h, w, _ = x.shape
    s = jnp.clip(jnp.round(shift), 0, MAX_SHIFT)
    dy, dx = (jnp.floor(u[:2] * (2 * s + 1)) - s).astype(jnp.int32)
    x = transforms.shift(x, dy, dx, MAX_SHIFT)
    keep = 1.0 - u[2] * crop
    oy, ox = u[3:5] * (1.0 - keep)
    scale = jnp.array([1.0 / keep, 1.0 / keep])
    cropped = jax.image.scale_and_translate(
        x, x.shape, (0, 1), scale, jnp.array([-oy * h, -ox * w]) * scale, "linear"
    )
    # Switched-off transforms leave the image bit-exact.
    x = jnp.where(crop > 0, cropped, x)
    x = jnp.where(jpeg > 0, _jpeg_like(x, jpeg), x)
    x = x + noise * jax.random.normal(k_noise, x.shape)
    x = x + (2.0 * u[5] - 1.0) * brightness
    return jnp.clip(x, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("m",))
def _near_duplicates(images, index, key, p, *, m):
    """Variants 1..m-1 of a batch of images; ``index`` is each image's index in the whole set."""
    n = images.shape[0]
    i = jnp.repeat(jnp.arange(n), m - 1)  # [n * (m - 1)]
    j = jnp.tile(jnp.arange(1, m), n)
    keys = jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(key, index[a]), b))(i, j)
    # One flat vmap (not one per axis): XLA compiles it several times faster on CPU.
    others = jax.vmap(lambda x, k: perturb(x, k, p))(images[i], keys)
    return jnp.concatenate([images[:, None], others.reshape(n, m - 1, *images.shape[1:])], axis=1)


def near_duplicates(
    images: np.ndarray | jax.Array, key: jax.Array, *, m: int, p: Perturbation
) -> np.ndarray:
    """m variants of each image: the image itself, then m - 1 random near-duplicates.

    Runs in padded batches of ``_CHUNK`` images, so one compile serves every batch size.

    Args:
      images: # [n, h, w, c]
      key: PRNG key; variant j of image i uses fold_in(fold_in(key, i), j).

    Returns:
      # [n, m, h, w, c]
    """
    images = np.asarray(images, np.float32)
    strengths = p.as_array()
    return batching.map_batches(
        lambda x, index: _near_duplicates(x, index, key, strengths, m=m),
        images,
        np.arange(len(images), dtype=np.int32),
        sizes=(_CHUNK,),
    )


def outside_radius(
    images: np.ndarray,
    key: jax.Array,
    *,
    m: int,
    p: Perturbation,
    radius: int,
    ladder: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicates tuned to sit just outside a hash radius (the adaptive attacker).

    For each image and variant, the weakest strength on the ladder whose hash is more than
    ``radius`` bits from every variant chosen before (the image itself first); the strongest
    rung if none is.

    Returns:
      (variants # [n, m, h, w, c], the chosen strength of each # [n, m]; 0 for the original).
    """
    n = len(images)
    rungs = [
        np.asarray(near_duplicates(images, jax.random.fold_in(key, r), m=m, p=p.scaled(s)))
        for r, s in enumerate(ladder)
    ]  # each [n, m, ...]
    hashes = np.stack(
        [dedup.dct_hash(v.reshape(-1, *v.shape[2:])).reshape(n, m) for v in rungs]
    )  # [L, n, m]
    chosen = np.zeros((n, m), np.int64)
    strength = np.zeros((n, m), np.float32)
    out = rungs[0].copy()
    for i in range(n):
        kept = [hashes[0, i, 0]]
        for j in range(1, m):
            r = next(
                (
                    r
                    for r in range(len(ladder))
                    if dedup.hamming(np.array(kept), hashes[r, i, j]).min() > radius
                ),
                len(ladder) - 1,
            )
            chosen[i, j], strength[i, j] = r, ladder[r]
            out[i, j] = rungs[r][i, j]
            kept.append(hashes[r, i, j])
    return out, strength


# -- estimating the altered answers -----------------------------------------------------------


def estimate(
    answers: np.ndarray, rule: str = "relabel"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The attacker's guess of which answers were altered, from the answers to m variants.

    Args:
      answers: the service's answers to the m variants of each image. # [n, m]
      rule: "relabel": keep an image under its strict-majority answer; "drop": keep only
        images whose answers all agree.

    Returns:
      (label # [n], keep # [n], flagged # [n, m]): the label the clone trains on, whether the
      image is kept, and the answers guessed altered (those off the strict majority; all of an
      image's answers when there is none).
    """
    if rule not in ESTIMATES:
        raise JaxmiaError(
            f"config field cloning.estimate: expected one of {ESTIMATES}, got {rule!r}"
        )
    answers = np.asarray(answers)
    n, m = answers.shape
    votes = (answers[:, :, None] == answers[:, None, :]).sum(-1)  # [n, m]: agreeing variants
    best = votes.argmax(1)
    label = answers[np.arange(n), best]
    majority = votes[np.arange(n), best] * 2 > m
    flagged = np.where(majority[:, None], answers != label[:, None], True)
    keep = majority if rule == "relabel" else ~flagged.any(1)
    return label, keep, flagged


def precision_recall(flagged: np.ndarray, altered: np.ndarray) -> tuple[float, float]:
    """Precision and recall of flagged answers against the truly altered ones (nan if 0/0)."""
    flagged, altered = np.asarray(flagged, bool).ravel(), np.asarray(altered, bool).ravel()
    hit = (flagged & altered).sum()
    precision = hit / flagged.sum() if flagged.sum() else float("nan")
    recall = hit / altered.sum() if altered.sum() else float("nan")
    return float(precision), float(recall)


# -- data split -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CloneSplit:
    """Image indices: the service's training and held-out test faces, and the attacker's pool."""

    service_train: np.ndarray
    service_test: np.ndarray
    pool: np.ndarray
    service_identities: np.ndarray  # original labels of the service's identities, in class order


def clone_split(labels: np.ndarray, cfg: ml_collections.ConfigDict, seed: int) -> CloneSplit:
    """Splits a labelled face set for the cloning attack, deterministically by seed.

    The service gets ``service_identities`` people with ``train_per_identity`` training and
    ``test_per_identity`` test photos each. The attacker's pool is every photo of the other
    people ("disjoint") or the service people's remaining photos ("same").
    """
    if cfg.pool not in POOLS:
        raise JaxmiaError(f"config field cloning.pool: expected one of {POOLS}, got {cfg.pool!r}")
    labels = np.asarray(labels)
    ids = np.unique(labels)
    rng = np.random.default_rng(seed)
    k = cfg.service_identities if cfg.service_identities > 0 else len(ids) // 2
    need = cfg.train_per_identity + cfg.test_per_identity + (1 if cfg.pool == "same" else 0)
    if k < 2 or k > len(ids) - (1 if cfg.pool == "disjoint" else 0):
        raise JaxmiaError(
            f"config field cloning.service_identities: {k} does not fit {len(ids)} identities "
            f"(need at least 2, and one more for a disjoint pool)"
        )
    service_ids = np.sort(rng.permutation(ids)[:k])
    train_idx, test_idx, pool_idx = [], [], []
    for i in service_ids:
        photos = rng.permutation(np.nonzero(labels == i)[0])
        if len(photos) < need:
            raise JaxmiaError(
                f"identity {i}: has {len(photos)} photos, the cloning split needs {need} "
                f"(cloning.train_per_identity + cloning.test_per_identity"
                f"{' + 1 for the pool' if cfg.pool == 'same' else ''})"
            )
        a, b = cfg.train_per_identity, cfg.train_per_identity + cfg.test_per_identity
        train_idx.append(photos[:a])
        test_idx.append(photos[a:b])
        pool_idx.append(photos[b:])
    if cfg.pool == "disjoint":
        pool = np.nonzero(~np.isin(labels, service_ids))[0]
    else:
        pool = np.concatenate(pool_idx)
    return CloneSplit(
        service_train=np.concatenate(train_idx),
        service_test=np.concatenate(test_idx),
        pool=rng.permutation(pool),
        service_identities=service_ids,
    )


# -- the attack -------------------------------------------------------------------------------


def ask(
    service: service_lib.Service, accounts: np.ndarray, images: np.ndarray, batch_size: int
) -> np.ndarray:
    """The service's labels for images, image i asked from account ``accounts[i]``, in order.

    Consecutive images of one account travel in one batch of at most ``batch_size``. # [n]
    """
    out = np.zeros(len(images), np.int32)
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and accounts[end] == accounts[start]:
            end += 1
        out[start:end] = service.query(str(accounts[start]), images[start:end]).labels
        start = end
    return out


@dataclasses.dataclass
class AttackResult:
    """What the attacker trains on, and the ground truth to score its estimate."""

    images: np.ndarray  # training images # [t, h, w, c]
    labels: np.ndarray  # their labels # [t]
    queries: int
    distinct: int  # distinct pool images asked about
    kept: int  # images kept after estimation
    label_accuracy: float  # kept labels equal to the service's true answer
    precision: float
    recall: float
    detected: float  # near-duplicate variants the service flagged, of those sent
    altered: float  # fraction of answers the service altered
    strength: float  # mean near-duplicate strength (1 unless adaptive)


def attack(
    service: service_lib.Service,
    pool: np.ndarray,
    *,
    budget: int,
    kind: str,
    m: int,
    accounts: int,
    perturbation: Perturbation,
    rule: str,
    key: jax.Array,
    batch_size: int = 64,
    ladder: tuple[float, ...] = (1.0,),
    train_on_variants: bool = True,
) -> AttackResult:
    """Queries the service about pool images within ``budget`` queries and builds a training set.

    "plain" asks once per image; "estimate" asks about m variants of each image (the image and
    m - 1 near-duplicates) and keeps labels by ``estimate``; "outside" does the same with
    near-duplicates pushed outside the service's hash radius (``outside_radius``).
    """
    if kind not in ATTACKS:
        raise JaxmiaError(f"attack: expected one of {ATTACKS}, got {kind!r}")
    per_image = 1 if kind == "plain" else m
    n = min(len(pool), budget // per_image)
    if n == 0:
        raise JaxmiaError(
            f"query budget {budget}: too small for one image with {per_image} queries each"
        )
    images = pool[:n]
    if kind == "plain":
        variants = images[:, None]
        strength = np.ones((n, 1), np.float32)
    elif kind == "estimate":
        variants = np.asarray(near_duplicates(images, key, m=m, p=perturbation))
        strength = np.ones((n, m), np.float32)
    else:
        variants, strength = outside_radius(
            images, key, m=m, p=perturbation, radius=service.policy.radius, ladder=ladder
        )
    flat = variants.reshape(-1, *variants.shape[2:])  # [n * per_image, h, w, c]
    # Variant j of every image goes to account j (mod accounts): no account sees two variants.
    account_of = np.tile(np.arange(per_image) % accounts, n)
    order = np.argsort(account_of, kind="stable") if accounts > 1 else np.arange(len(flat))
    first = len(service.history()["index"])
    answers = np.empty(len(flat), np.int32)
    answers[order] = ask(
        service, np.array([f"attacker-{a}" for a in account_of[order]]), flat[order], batch_size
    )
    hist = service.history()
    rows = np.empty(len(flat), np.int64)
    rows[order] = np.arange(first, first + len(flat))
    altered = hist["altered"][rows].reshape(n, per_image)
    true = hist["true_label"][rows].reshape(n, per_image)
    duplicate = hist["duplicate"][rows].reshape(n, per_image)
    answers = answers.reshape(n, per_image)
    if kind == "plain":
        label, keep, flagged = answers[:, 0], np.ones(n, bool), np.zeros_like(altered)
    else:
        label, keep, flagged = estimate(answers, rule)
    precision, recall = (
        precision_recall(flagged, altered) if kind != "plain" else (float("nan"),) * 2
    )
    if train_on_variants:
        # Every attacker trains on m variants per image; the plain one makes its own without
        # asking (labelled with the image's answer), so all attackers see the same augmentation
        # and differ only in how much they can trust their labels.
        local = variants if kind != "plain" else near_duplicates(images, key, m=m, p=perturbation)
        x = local[keep].reshape(-1, *local.shape[2:])
        y = np.repeat(label[keep], local.shape[1])
    else:
        x, y = images[keep], label[keep]
    return AttackResult(
        images=x,
        labels=y.astype(np.int32),
        queries=len(flat),
        distinct=n,
        kept=int(keep.sum()),
        label_accuracy=float((label[keep] == true[keep, 0]).mean()) if keep.any() else float("nan"),
        precision=precision,
        recall=recall,
        detected=float(duplicate[:, 1:].mean()) if per_image > 1 else float("nan"),
        altered=float(altered.mean()),
        strength=float(strength[:, 1:].mean()) if per_image > 1 else float("nan"),
    )


def clone_scores(
    graphdef, params, service: service_lib.Service, test_images: np.ndarray, test_labels: np.ndarray
) -> tuple[float, float]:
    """(accuracy on the service's test faces, fidelity to the service's unaltered answers)."""
    pred = train.predict(graphdef, params, test_images)
    return float((pred == test_labels).mean()), float(
        (pred == service.true_labels(test_images)).mean()
    )


# -- detector ROC -----------------------------------------------------------------------------


def detector_roc(
    service: service_lib.Service,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    m: int,
    perturbation: Perturbation,
    key: jax.Array,
) -> dict[str, Any]:
    """Detection rate on near-duplicates vs false positives on other photos of the same person.

    Positives: each image against each of its m - 1 near-duplicates. Hard negatives: each pair
    of different photos of one person. Both the hash (Hamming distance, radius 0..64) and the
    embedding (cosine similarity of the service's penultimate features) are swept.

    Returns:
      {"hash": {"radius", "tpr", "fpr"}, "embedding": {"threshold", "tpr", "fpr"}} as lists.
    """
    variants = np.asarray(near_duplicates(images, key, m=m, p=perturbation))  # [n, m, ...]
    n = len(images)
    h = dedup.dct_hash(variants.reshape(-1, *images.shape[1:])).reshape(n, m)
    pos_d = dedup.hamming(h[:, :1], h[:, 1:]).ravel()
    same = (labels[:, None] == labels[None, :]) & np.triu(np.ones((n, n), bool), 1)
    neg_d = dedup.hamming(h[:, 0][:, None], h[:, 0][None, :])[same]
    radii = np.arange(dedup.HASH_BITS + 1)
    feats = dedup.normalise(_features(service, variants.reshape(-1, *images.shape[1:]))).reshape(
        n, m, -1
    )
    pos_s = np.einsum("nd,nmd->nm", feats[:, 0], feats[:, 1:]).ravel()
    neg_s = (feats[:, 0] @ feats[:, 0].T)[same]
    # Penultimate features of one face are very alike: resolve the thresholds near 1 finely.
    fine = 1.0 - np.geomspace(1e-5, 0.5, 60)
    common = [0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]
    thresholds = np.round(np.unique(np.concatenate([[1.0], fine, common]))[::-1], 6)
    return {
        "positives": int(len(pos_d)),
        "negatives": int(len(neg_d)),
        "hash": {
            "radius": radii.tolist(),
            "tpr": [float((pos_d <= r).mean()) for r in radii],
            "fpr": [float((neg_d <= r).mean()) for r in radii],
        },
        "embedding": {
            "threshold": thresholds.tolist(),
            "tpr": [float((pos_s >= t).mean()) for t in thresholds],
            "fpr": [float((neg_s >= t).mean()) for t in thresholds],
        },
    }


_features_fn = jax.jit(models.features, static_argnums=0)


def _features(service: service_lib.Service, images: np.ndarray) -> np.ndarray:
    """The service recognizer's penultimate features. # [n, h, w, c] -> [n, d]"""
    return batching.map_batches(
        lambda x: _features_fn(service.graphdef, service.params, x),
        images,
        sizes=batching.sizes_for(len(images), train.EVAL_BATCH),
    )


# -- one cell of the table --------------------------------------------------------------------


def policy_for(scenario: str, p: float, cfg: ml_collections.ConfigDict) -> service_lib.Policy:
    """The service policy of a scenario at misrecognition rate p."""
    spec = SCENARIOS[scenario]
    detector = spec.get("detector", cfg.detector if spec.get("detect") else "none")
    return service_lib.Policy(
        answer=cfg.answer,
        top_k=cfg.top_k,
        budget=0,
        misrecognition=0.0 if spec.get("p", True) is False else float(p),
        wrong=cfg.wrong,
        keyed=spec.get("keyed", "query"),
        fingerprint_bits=cfg.fingerprint_bits,
        detector=detector,
        scope=spec.get("scope", cfg.scope),
        radius=cfg.radius,
        cosine=cfg.cosine,
        chunks=cfg.chunks,
    )


def _attack_and_clone(
    svc,
    kind: str,
    accounts: int,
    budget: int,
    *,
    cfg,
    pool,
    test,
    clone_model,
    clone_train,
    k_attack: jax.Array,
    k_clone: jax.Array,
) -> dict[str, Any]:
    """One attacker against one service (in process or served), then its clone, scored."""
    res = attack(
        svc,
        pool,
        budget=budget,
        kind=kind,
        m=cfg.near_duplicates,
        accounts=accounts,
        perturbation=Perturbation(
            **(cfg.outside_perturb if kind == "outside" else cfg.perturb).to_dict()
        ),
        rule=cfg.estimate,
        key=k_attack,
        ladder=tuple(cfg.ladder),
        train_on_variants=cfg.train_on_variants,
    )
    c_graphdef, c_params, _ = train.fit(
        clone_model, clone_train, res.images, res.labels, key=k_clone
    )
    accuracy, fidelity = clone_scores(c_graphdef, c_params, svc, *test)
    return {
        "queries": res.queries,
        "images": res.distinct,
        "clone_accuracy": accuracy,
        "fidelity": fidelity,
        "kept": res.kept,
        "train_size": len(res.labels),
        "label_accuracy": res.label_accuracy,
        "altered": res.altered,
        "precision": res.precision,
        "recall": res.recall,
        "detected": res.detected,
        "suspicious_accounts": sum(c.suspicious for c in svc.clients.values()),
        "strength": res.strength,
    }


def remote_attacker(scenario: str, cfg: ml_collections.ConfigDict) -> tuple[str, str, int]:
    """(name, attack, accounts) of a scenario's attacker: against a live server only the
    attacker is the study's to choose, the policy is the server's."""
    spec = SCENARIOS[scenario]
    accounts = cfg.accounts if spec.get("accounts") else 1
    name = spec["attack"] + ("_accounts" if accounts > 1 else "")
    return name, spec["attack"], accounts


def run_remote(
    scenario: str,
    budget: int,
    *,
    cfg: ml_collections.ConfigDict,
    url: str,
    admin_key: str,
    pool: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    clone_model,
    clone_train: ml_collections.ConfigDict,
    key: jax.Array,
) -> dict[str, Any]:
    """One cell against a served service: the scenario's attacker on fresh accounts (each
    with ``budget`` queries), its clone; the row as ``run_scenario``'s, the policy the server's.

    The ground truth (true labels, altered answers, flagged near-duplicates) is read from the
    server's store with the administrator's key. Not bit-reproducible: a global-scope server's
    answers depend on everything it was asked before.
    """
    from jaxmia.service import client as client_lib

    t0 = time.perf_counter()
    name, kind, accounts = remote_attacker(scenario, cfg)
    _, k_attack, k_clone = jax.random.split(key, 3)
    runs, policy = [], None
    for r in range(max(1, int(cfg.repeats))):
        svc = client_lib.RemoteService(url, admin_key, budget=budget)
        try:
            policy = svc.policy
            runs.append(
                _attack_and_clone(
                    svc, kind, accounts, budget,
                    cfg=cfg, pool=pool, test=test, clone_model=clone_model,
                    clone_train=clone_train, k_attack=jax.random.fold_in(k_attack, r),
                    k_clone=jax.random.fold_in(k_clone, r),
                )
            )  # fmt: skip
        finally:
            svc.close()
    row = {
        "scenario": name,
        "budget": budget,
        "p": float(policy.misrecognition),
        "attack": kind,
        "detector": policy.detector,
        "scope": policy.scope if policy.detector != "none" else "",
        "keyed": policy.keyed,
        "accounts": accounts,
        "queries": runs[0]["queries"],
        "images": runs[0]["images"],
        "repeats": len(runs),
        "service": url,
    }
    return _with_runs(row, runs, t0)


def _with_runs(row: dict[str, Any], runs: list[dict], t0: float) -> dict[str, Any]:
    """A cell's row with its repeats' means, the spread of clone accuracy and fidelity, and
    every repeat under "runs"."""
    for run in runs:
        run.pop("queries"), run.pop("images")
    for name in runs[0]:
        row[name] = float(np.mean([run[name] for run in runs]))
    row["clone_accuracy_std"] = float(np.std([run["clone_accuracy"] for run in runs]))
    row["fidelity_std"] = float(np.std([run["fidelity"] for run in runs]))
    row["runs"] = runs
    row["seconds"] = time.perf_counter() - t0
    return row


def run_scenario(
    scenario: str,
    budget: int,
    p: float,
    *,
    cfg: ml_collections.ConfigDict,
    recognizer: tuple[Any, Any],
    image_shape: tuple[int, int, int],
    pool: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    clone_model,
    clone_train: ml_collections.ConfigDict,
    key: jax.Array,
    service_key: jax.Array | None = None,
) -> dict[str, Any]:
    """One cell: a service with the scenario's policy, an attacker, a clone; its table row.

    Repeated ``cfg.repeats`` times (new near-duplicates and clone each time); the row holds the
    means, the spread of clone accuracy and fidelity, and every repeat under "runs".
    ``service_key`` (default: from ``key``) keys the service's coins; sharing it across cells of
    one rate gives their queries the same coins, which makes the scenarios' differences less noisy.
    """
    if scenario not in SCENARIOS:
        raise JaxmiaError(
            f"config field cloning.scenarios: unknown scenario {scenario!r}; "
            f"expected some of {tuple(SCENARIOS)}"
        )
    t0 = time.perf_counter()
    spec = SCENARIOS[scenario]
    policy = policy_for(scenario, p, cfg)
    # Every account gets the whole budget: the multi-account attacker is after the near-duplicate
    # history, not more queries (it still sends ``budget`` in all).
    accounts = cfg.accounts if spec.get("accounts") else 1
    policy = dataclasses.replace(policy, budget=budget)
    k_service, k_attack, k_clone = jax.random.split(key, 3)
    k_service = k_service if service_key is None else service_key
    graphdef, params = recognizer
    runs = []
    for r in range(max(1, int(cfg.repeats))):
        # Each repeat: new service coins, near-duplicates and clone; repeat r is keyed alike in
        # every cell, so the scenarios differ by their policy, not by luck.
        svc = service_lib.Service(
            graphdef,
            params,
            policy=policy,
            key=jax.random.fold_in(k_service, r),
            image_shape=image_shape,
        )
        runs.append(
            _attack_and_clone(
                svc, spec["attack"], accounts, budget,
                cfg=cfg, pool=pool, test=test, clone_model=clone_model, clone_train=clone_train,
                k_attack=jax.random.fold_in(k_attack, r), k_clone=jax.random.fold_in(k_clone, r),
            )
        )  # fmt: skip
    row = {
        "scenario": scenario,
        "budget": budget,
        "p": 0.0 if spec.get("p", True) is False else float(p),
        "attack": spec["attack"],
        "detector": policy.detector,
        "scope": policy.scope if policy.detector != "none" else "",
        "keyed": policy.keyed,
        "accounts": accounts,
        "queries": runs[0]["queries"],
        "images": runs[0]["images"],
        "repeats": len(runs),
    }
    return _with_runs(row, runs, t0)
