"""Random shifts and flips of one image: pure per-image functions to vmap and jit.

An image is ``[h, w, c]``. Offsets and coin flips may be traced values, so one compiled program
serves every draw; only ``max_shift`` (the padding's width) is static. Edges are replicated, so a
shifted image has no black border for a recognizer to key on.

Sign convention of ``shift``: the output is the ``[h, w]`` window of the edge-padded image whose
top-left corner sits at ``(dy, dx)`` relative to the image's own, i.e.
``out[i, j] = x[clip(i + dy, 0, h - 1), clip(j + dx, 0, w - 1)]``: the content moves up by
``dy`` and left by ``dx``. The random draws are symmetric in sign, so only ``shift``'s callers
with fixed offsets see the convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift(x: jax.Array, dy: jax.Array, dx: jax.Array, max_shift: int) -> jax.Array:
    """The image seen through a window moved by (dy, dx) pixels, edges replicated.

    Args:
      x: the image. # [h, w, c]
      dy: vertical offset, int scalar in [-max_shift, max_shift] (may be traced); positive
        moves the content up (``out[i] = x[i + dy]``). Beyond the range it is clamped to it
        (``lax.dynamic_slice`` keeps the window inside the padded image).
      dx: horizontal offset, likewise; positive moves the content left.
      max_shift: the largest offset, static int >= 0 (the padding's width).

    Returns:
      The shifted image. # [h, w, c]
    """
    if max_shift < 0:
        raise ValueError(f"max_shift={max_shift}: expected >= 0")
    h, w, c = x.shape
    m = max_shift
    xp = jnp.pad(x, ((m, m), (m, m), (0, 0)), mode="edge")  # [h + 2m, w + 2m, c]
    return jax.lax.dynamic_slice(xp, (dy + m, dx + m, 0), (h, w, c))


def random_shift(x: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """``shift`` by offsets drawn uniformly from [-max_shift, max_shift], each axis.

    One ``randint`` of two values in [0, 2 max_shift] (dy first), less max_shift: the draw the
    inversion's jitter has always made, so its clones do not change. # [h, w, c] -> [h, w, c]
    """
    if max_shift == 0:
        return x
    dy, dx = jax.random.randint(key, (2,), 0, 2 * max_shift + 1) - max_shift
    return shift(x, dy, dx, max_shift)


def random_flip(x: jax.Array, key: jax.Array) -> jax.Array:
    """A horizontal (left-right) flip with probability 1/2. # [h, w, c] -> [h, w, c]"""
    return jnp.where(jax.random.bernoulli(key), x[:, ::-1], x)
