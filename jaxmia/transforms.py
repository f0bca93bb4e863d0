"""Random shifts, flips, resized crops and colour changes of one image: pure per-image
functions to vmap and jit.

An image is ``[h, w, c]``. Offsets and coin flips may be traced values, so one compiled program
serves every draw; only ``max_shift`` (the padding's width), a zoom's largest factor and a blur's
kernel radius are static. Edges are replicated, so a
shifted image has no black border for a recognizer to key on.

Sign convention of ``shift``: the output is the ``[h, w]`` window of the edge-padded image whose
top-left corner sits at ``(dy, dx)`` relative to the image's own, i.e.
``out[i, j] = x[clip(i + dy, 0, h - 1), clip(j + dx, 0, w - 1)]``: the content moves up by
``dy`` and left by ``dx``. The random draws are symmetric in sign, so only ``shift``'s callers
with fixed offsets see the convention.
"""

from __future__ import annotations

import math

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


def random_resized_crop(
    x: jax.Array, key: jax.Array, min_scale: float, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> jax.Array:
    """A random box of the image resized back to its size (torchvision's RandomResizedCrop).

    The box covers a fraction of the area drawn uniformly from [min_scale, 1], with an aspect
    ratio drawn log-uniformly from ``ratio`` (then clipped to fit), at a uniform position;
    bilinear resampling. # [h, w, c] -> [h, w, c]
    """
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale={min_scale}: expected in (0, 1]")
    h, w, _ = x.shape
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=min_scale, maxval=1.0)
    log_r = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(log_r)
    ch = jnp.clip(jnp.sqrt(area / r) * h, 1.0, h)  # box height, pixels
    cw = jnp.clip(jnp.sqrt(area * r) * w, 1.0, w)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    scale = jnp.stack([h / ch, w / cw])
    # Output pixel o samples input (o + 0.5) / scale - 0.5 + offset: translation = -offset*scale.
    return jax.image.scale_and_translate(
        x, x.shape, (0, 1), scale, -jnp.stack([y0, x0]) * scale, "linear", antialias=False
    )


def saturate(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Blends an RGB image with its grey version: 0 grey, 1 unchanged (ITU-R 601 luma).

    # [h, w, 3] -> [h, w, 3]; grey images are returned unchanged.
    """
    if x.shape[-1] != 3:
        return x
    grey = x @ jnp.asarray([0.299, 0.587, 0.114], x.dtype)
    return grey[..., None] + factor * (x - grey[..., None])


def zoom(x: jax.Array, factor: jax.Array, max_scale: float) -> jax.Array:
    """The image magnified by ``factor`` about its centre, bilinear, edges replicated.

    ``jax.image.scale_and_translate`` gives zero weight to samples beyond the input, which would
    frame a shrunk image in black; the image is edge-padded first by as much as the smallest
    factor, ``1 - max_scale``, can reveal, so the border repeats the edge instead.

    Args:
      x: the image. # [h, w, c]
      factor: > 1 magnifies, < 1 shrinks; a traced scalar in [1 - max_scale, 1 + max_scale].
      max_scale: static, in [0, 1): sets the padding.

    Returns:
      The zoomed image. # [h, w, c]
    """
    h, w, _ = x.shape
    # Output pixel o samples the padded input at (o + 0.5 - t) / factor - 0.5; the centre stays
    # put when t = size / 2 - factor (size / 2 + pad).
    pad = math.ceil(max(h, w) * (1 / (1 - max_scale) - 1) / 2) + 1
    xp = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    half = jnp.asarray([h / 2, w / 2])
    scale = jnp.stack([factor, factor])
    return jax.image.scale_and_translate(
        xp, x.shape, (0, 1), scale, half - scale * (half + pad), "linear", antialias=False
    )


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Per-channel Gaussian blur, separable, kernel radius ``radius``, edges replicated.

    Sigma may be traced (one program serves every draw); sigma 0 is the identity, exactly: the
    kernel is then 1 at its centre and 0 elsewhere, not 0 / 0.

    Args:
      x: the image. # [h, w, c]
      sigma: the blur's standard deviation in pixels, scalar >= 0.
      radius: static int >= 1.

    Returns:
      The blurred image. # [h, w, c]
    """
    h, w, _ = x.shape
    t = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    k = jnp.exp(-0.5 * (t / jnp.maximum(sigma, 1e-6)) ** 2)  # [2r + 1]; exp(-inf) = 0
    k = k / k.sum()
    xp = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    xp = sum(k[i] * xp[i : i + h] for i in range(2 * radius + 1))  # [h, w + 2r, c]
    return sum(k[j] * xp[:, j : j + w] for j in range(2 * radius + 1))
