"""Seed images: where each clone's inversion starts.

The paper starts every clone from the mean of 256 faces of the auxiliary pool (people the
recognizer never saw). Clones of one identity differ only if their seeds or keys differ, so there
are per-clone seeds too: the mean of a random subset of the pool, the mean plus Gaussian noise,
uniform noise, a constant grey, or image files the user supplies. Every random choice takes an
explicit key; ``make_seeds`` gives clone ``i`` the key ``keys[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxmia.errors import JaxmiaError

KINDS = ("mean", "subset_mean", "mean_noise", "grey", "uniform", "files")
POOL_KINDS = ("mean", "subset_mean", "mean_noise")


def mean_face(pool: jax.Array, key: jax.Array, size: int = 256) -> jax.Array:
    """The mean of ``size`` faces drawn without replacement (all when the pool is smaller).

    Args:
      pool: the auxiliary faces in [0, 1]. # [m, h, w, c]
      key: chooses the faces.
      size: how many (the paper: 256).

    Returns:
      The mean face. # [h, w, c]
    """
    m = pool.shape[0]
    if size >= m:
        return jnp.mean(pool, axis=0)
    pick = jax.random.choice(key, m, (size,), replace=False)
    return jnp.mean(pool[pick], axis=0)


def make_seeds(
    kind: str,
    keys: jax.Array,
    shape: tuple[int, int, int],
    *,
    pool: jax.Array | None = None,
    pool_size: int = 256,
    subset_size: int = 16,
    noise_scale: float = 0.1,
    grey: float = 0.5,
    images: jax.Array | None = None,
) -> jax.Array:
    """One seed per key.

    Args:
      kind: "mean" (the paper: one mean of ``pool_size`` pool faces for every clone, drawn with
        ``keys[0]``), "subset_mean" (each clone the mean of its own ``subset_size`` pool faces,
        at most half the pool so that the clones differ),
        "mean_noise" (the paper's mean plus N(0, noise_scale^2) per pixel), "grey" (constant
        ``grey``), "uniform" (U[0, 1) per pixel) or "files" (``images``, cycled over clones).
      keys: one PRNG key per clone. # [n]
      shape: (h, w, c) of a seed.
      pool: auxiliary faces for the pool kinds. # [m, h, w, c]
      images: the user's images for "files" (see ``load_images``). # [k, h, w, c]

    Returns:
      Seeds in [0, 1]. # [n, h, w, c] float32
    """
    n = keys.shape[0]
    if kind not in KINDS:
        raise JaxmiaError(f"inversion.seed={kind!r}: expected one of {KINDS}")
    if kind in POOL_KINDS:
        if pool is None or pool.shape[0] == 0:
            raise JaxmiaError(f"inversion.seed={kind!r}: needs an auxiliary face pool, none given")
        if tuple(pool.shape[1:]) != tuple(shape):
            raise JaxmiaError(
                f"seed pool: images of shape {tuple(pool.shape[1:])}, expected {tuple(shape)}"
            )
        pool = jnp.asarray(pool, jnp.float32)
    if kind == "mean":
        return jnp.broadcast_to(mean_face(pool, keys[0], pool_size), (n, *shape))
    if kind == "subset_mean":
        size = max(1, min(subset_size, pool.shape[0] // 2))
        return jax.vmap(lambda k: mean_face(pool, k, size))(keys)
    if kind == "mean_noise":
        mean = mean_face(pool, keys[0], pool_size)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)
        return jnp.clip(mean + noise_scale * noise, 0.0, 1.0)
    if kind == "grey":
        return jnp.full((n, *shape), grey, jnp.float32)
    if kind == "uniform":
        return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)
    if images is None or images.shape[0] == 0:
        raise JaxmiaError(
            "inversion.seed='files': no seed image files given (inversion.seed_files)"
        )
    return jnp.asarray(images, jnp.float32)[jnp.arange(n) % images.shape[0]]


def load_images(paths: Sequence[str | Path], shape: tuple[int, int, int]) -> np.ndarray:
    """User-supplied seed images, converted to grey or RGB as ``shape`` says, values in [0, 1].

    A file whose size differs from (h, w) is an error rather than silently resized: the seed is
    part of the attack's definition.

    Returns:
      The images. # [k, h, w, c] float32
    """
    h, w, c = shape
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                if im.size != (w, h):
                    got = f"{im.size[1]}x{im.size[0]}"
                    raise JaxmiaError(f"seed image {path}: size {got} (h x w), expected {h}x{w}")
                a = np.asarray(im.convert("L" if c == 1 else "RGB"), np.float32) / 255.0
        except FileNotFoundError as e:
            raise JaxmiaError(f"seed image {path}: not found") from e
        except (UnidentifiedImageError, OSError) as e:
            raise JaxmiaError(f"seed image {path}: not a readable image ({e})") from e
        out.append(a.reshape(h, w, c))
    return np.stack(out)
