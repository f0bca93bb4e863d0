"""Inversion by queries alone: the service's answers, no weights, in a generative prior's codes.

Each clone is a code of the VAE that ``jaxmia prior`` trains on the public auxiliary faces
(``image = decoder(code)``). Every step draws proposals around every clone's code at once
(one compiled, vmapped program per shape), asks the service about all of them in one call
(``service.query``: an in-process ``Service`` or a live server through ``RemoteService``),
and moves the codes by what the answers show (one more compiled program):

- ``nes`` (score-based; natural evolution strategies, Wierstra et al. 2014, as black-box
  attacks use them): antithetic Gaussian proposals, the code moved along the rank-weighted
  mean of the directions. A proposal's score is what the answer shows of the target: its
  probability ("probs", as rounded as the service rounds it), its probability if the target is
  among the top k ("topk"; 0 otherwise), or 1/0 for the label ("label": no gradient anywhere
  but at the class boundary). So the output-side defences act on it directly.
- ``brep`` (label-only; boundary-repulsion, Kahla et al. 2022, BREP-MI): the code starts at a
  random code the service labels as the target (random codes are drawn and asked once for all
  identities; an identity none of them hits gets no clone); each step asks about points on a
  sphere around the code: those labelled otherwise push the code away, and the sphere grows
  when every point is the target's.

Queries are counted per clone, the shared draw apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmia.errors import JaxmiaError

ATTACKS = ("nes", "brep")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One query attack's budget and step sizes (``config.blackbox.query``)."""

    attack: str = "nes"
    steps: int = 40
    samples: int = 16  # proposals (sphere points) per clone per step: queries per step
    sigma: float = 0.5  # nes: the proposals' spread in code units
    learning_rate: float = 0.5  # nes: code units per step for a full rank-weighted direction
    init_codes: int = 2000  # brep: random codes asked once, to find a start for each target
    radius: float = 1.0  # brep: the first sphere's radius
    growth: float = 1.3  # brep: the sphere's growth when every point is the target's
    step_size: float = 0.5  # brep: a step, in radii

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise JaxmiaError(f"query attack: expected one of {ATTACKS}, got {self.attack!r}")
        if self.steps < 1 or self.samples < 2 or self.samples % 2:
            raise JaxmiaError(
                f"query attack: expected steps >= 1 and an even samples >= 2, got "
                f"{self.steps}, {self.samples}"
            )
        for name in ("sigma", "learning_rate", "radius", "step_size"):
            if not getattr(self, name) > 0:
                raise JaxmiaError(f"query attack {name}: expected > 0, got {getattr(self, name)}")
        if self.growth <= 1:
            raise JaxmiaError(f"query attack growth: expected > 1, got {self.growth}")


def score(answers, targets: np.ndarray) -> np.ndarray:
    """What an answer shows of its target: probability, top-k probability or 1/0. # [b]"""
    if answers.probabilities is not None and answers.top_labels is None:
        return answers.probabilities[np.arange(len(targets)), targets].astype(np.float32)
    if answers.top_labels is not None:
        hit = answers.top_labels == targets[:, None]  # [b, k]
        return np.where(hit, answers.probabilities, 0.0).sum(-1).astype(np.float32)
    return (answers.labels == targets).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("decode", "samples", "sphere"))
def propose(decode, params, codes, key, spread, *, samples, sphere):
    """Proposals around each clone's code and their images.

    Args:
      codes: # [c, d]
      spread: the Gaussian's std (nes) or the sphere's radius per clone # [c] (brep).
      sphere: points on the sphere (brep) or antithetic Gaussian pairs (nes).

    Returns:
      (directions # [c, n, d], images # [c * n, h, w, ch]).
    """
    c, d = codes.shape
    if sphere:
        u = jax.random.normal(key, (c, samples, d))
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        points = codes[:, None] + spread[:, None, None] * u
    else:
        half = jax.random.normal(key, (c, samples // 2, d))
        u = jnp.concatenate([half, -half], axis=1)
        points = codes[:, None] + spread * u
    images = jax.vmap(functools.partial(decode, params))(points.reshape(c * samples, d))
    return u, images


@jax.jit
def nes_update(codes, u, scores, learning_rate):
    """Codes moved along the rank-weighted mean direction. # [c, d]

    Ranks in [-0.5, 0.5] (Wierstra et al.'s fitness shaping): the step does not depend on the
    scores' scale, so a rounded or tiny probability moves the code as far as its order allows;
    all-equal scores (nothing visible) do not move it.
    """
    n = scores.shape[1]
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1).astype(jnp.float32)
    weights = ranks / (n - 1) - 0.5
    flat = jnp.all(scores == scores[:, :1], axis=1, keepdims=True)
    weights = jnp.where(flat, 0.0, weights)
    return codes + learning_rate * jnp.mean(weights[..., None] * u, axis=1)


@jax.jit
def brep_update(codes, u, is_target, radius, step_size, growth):
    """Repelled by the sphere's points of other labels; the sphere grows where there are none.

    Returns:
      (codes # [c, d], radius # [c]).
    """
    other = (~is_target).astype(codes.dtype)  # [c, n]
    count = other.sum(1)
    away = -(other[..., None] * u).sum(1) / jnp.maximum(count, 1.0)[:, None]  # [c, d]
    away = away / jnp.maximum(jnp.linalg.norm(away, axis=-1, keepdims=True), 1e-12)
    moved = codes + step_size * radius[:, None] * away
    any_other = count > 0
    return (
        jnp.where(any_other[:, None], moved, codes),
        jnp.where(any_other, radius, radius * growth),
    )


@functools.partial(jax.jit, static_argnames=("decode",))
def _decode_all(decode, params, codes):
    return jax.vmap(functools.partial(decode, params))(codes)


def invert(
    service: Any,
    decode,
    params: Any,
    targets: np.ndarray,
    latent_dim: int,
    settings: Settings,
    key: jax.Array,
    *,
    account: str = "attacker",
    progress: bool = True,
) -> dict[str, Any]:
    """One clone per target by queries alone.

    Args:
      service: anything with ``query(account, images)`` answering ``service.Answers``.
      decode: (params, code # [d]) -> image # [h, w, ch] (``priors.Decoder.decode``).
      targets: the service's label of each clone's target. # [c]
      latent_dim: d.

    Returns:
      {"clones": # [c, h, w, ch], "starts": the start images # [c, h, w, ch],
       "found": which targets got a start (brep; all for nes) # [c],
       "queries": per clone, "shared_queries": the brep start draw's}.
    """
    import tqdm

    s = settings
    targets = np.asarray(targets, np.int32)
    c = len(targets)
    k_init, k_steps = jax.random.split(key)
    shared, found = 0, np.ones(c, bool)
    if s.attack == "nes":
        codes = jnp.zeros((c, latent_dim), jnp.float32)  # the prior's mean face
    else:
        pool = jax.random.normal(k_init, (s.init_codes, latent_dim))
        labels = np.concatenate(
            [
                service.query(
                    account, np.asarray(_decode_all(decode, params, pool[i : i + 256]))
                ).labels
                for i in range(0, s.init_codes, 256)
            ]
        )
        shared = s.init_codes
        first = {}
        for i, label in enumerate(labels):
            first.setdefault(int(label), i)
        found = np.array([int(t) in first for t in targets])
        codes = jnp.asarray(
            np.stack([np.asarray(pool[first.get(int(t), 0)]) for t in targets]), jnp.float32
        )
    starts = np.asarray(_decode_all(decode, params, codes))
    radius = jnp.full((c,), s.radius, jnp.float32)
    repeated = np.repeat(targets, s.samples)
    live = np.repeat(found, s.samples)
    for step in tqdm.trange(s.steps, desc=f"query attack ({s.attack})", disable=not progress,
                            leave=False):  # fmt: skip
        k = jax.random.fold_in(k_steps, step)
        spread = radius if s.attack == "brep" else s.sigma
        u, images = propose(
            decode, params, codes, k, spread, samples=s.samples, sphere=s.attack == "brep"
        )
        images = np.asarray(images)
        answers = service.query(account, images[live]) if live.any() else None
        if s.attack == "nes":
            got = score(answers, repeated[live])
            scores = np.zeros(len(repeated), np.float32)
            scores[live] = got
            codes = nes_update(codes, u, scores.reshape(c, s.samples), s.learning_rate)
        else:
            is_target = np.ones(len(repeated), bool)
            is_target[live] = answers.labels == repeated[live]
            codes, radius = brep_update(
                codes, u, is_target.reshape(c, s.samples), radius, s.step_size, s.growth
            )
    return {
        "clones": np.asarray(_decode_all(decode, params, codes)),
        "starts": starts,
        "found": found,
        "queries": s.steps * s.samples,
        "shared_queries": shared,
    }
