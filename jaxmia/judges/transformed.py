"""R_E's verdict averaged over small random transforms: a judge that adversarial patterns fool less.

A face keeps its identity under a small shift, flip, zoom, blur or noise; an adversarial pixel
pattern (``jaxmia.judges.pgd``) mostly does not, since it is tuned to the exact pixels. So the
robust score of an image is the recognizer's softmax probability of the target averaged over
``samples`` random transforms of it, and its rank is the target's rank in those mean
probabilities.

Each image draws its transforms from its own key, ``fold_in(key, i)`` for the image at index
``i``, so its verdict does not depend on the batch size or on the other images. The transforms
and the recognizer run on the device, one jitted program per batch shape (``jaxmia.batching``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia import batching, transforms
from jaxmia.errors import JaxmiaError
from jaxmia.judges import scores
from jaxmia.recognizers import fastconv

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer


@dataclasses.dataclass(frozen=True)
class TransformSettings:
    """The ranges of the random transforms (hashable: the jitted scoring takes it as static).

    A range of 0 (or ``flip=False``) leaves that transform out, exactly.

    Attributes:
      max_shift: shift in pixels, uniform in [-max_shift, max_shift] per axis, edges replicated
        (``transforms.shift``).
      flip: a horizontal flip with probability 1/2.
      scale: zoom about the centre by a factor uniform in [1 - scale, 1 + scale], bilinear, edges
        replicated; in [0, 1) (a factor must stay positive).
      blur_sigma: Gaussian blur of a sigma uniform in [0, blur_sigma] pixels, edges replicated.
      noise_std: standard deviation of additive Gaussian noise (then clipped to [0, 1]).
      samples: transforms per image, >= 1.

    The defaults are the ``judges.transforms`` config section's. 4 samples: the judges' largest
    cost is the recognizers' passes over the draws (AT&T: 8 draws made the judges 14% of an
    experiment's time, over the 10% they may cost).
    """

    max_shift: int = 4  # pixels
    flip: bool = True
    scale: float = 0.1  # zoom factor in 1 +- scale
    blur_sigma: float = 1.0  # pixels, uniform in [0, blur_sigma]
    noise_std: float = 0.02
    samples: int = 4

    def __post_init__(self):
        for name in ("max_shift", "samples"):
            value, low = getattr(self, name), 1 if name == "samples" else 0
            if not isinstance(value, int) or value < low:
                raise JaxmiaError(f"robust {name}={value!r}: expected an integer >= {low}")
        if not 0 <= self.scale < 1:
            raise JaxmiaError(f"robust scale={self.scale}: expected in [0, 1)")
        for name in ("blur_sigma", "noise_std"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise JaxmiaError(f"robust {name}={value}: expected finite >= 0")


def random_transform(x: jax.Array, key: jax.Array, settings: TransformSettings) -> jax.Array:
    """A random shift, flip, zoom, blur and noise of one image, in that order.

    The key is split in five, one part per transform, so leaving one out does not change the
    draws of the others. # [h, w, c] -> [h, w, c]
    """
    k_shift, k_flip, k_zoom, k_blur, k_noise = jax.random.split(key, 5)
    x = transforms.random_shift(x, k_shift, settings.max_shift)
    if settings.flip:
        x = transforms.random_flip(x, k_flip)
    if settings.scale > 0:
        s = settings.scale
        x = transforms.zoom(x, jax.random.uniform(k_zoom, (), minval=1 - s, maxval=1 + s), s)
    if settings.blur_sigma > 0:
        sigma = jax.random.uniform(k_blur, (), maxval=settings.blur_sigma)
        x = transforms.gaussian_blur(x, sigma, math.ceil(3 * settings.blur_sigma))
    if settings.noise_std > 0:
        noise = settings.noise_std * jax.random.normal(k_noise, x.shape, x.dtype)
        x = jnp.clip(x + noise, 0.0, 1.0)
    return x


def image_keys(key: jax.Array, index: jax.Array, samples: int) -> jax.Array:
    """The transform keys of the images at ``index``: ``split(fold_in(key, i), samples)``.

    # [b] -> [b, samples]
    """
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), samples))(index)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _robust_batch(
    graphdefs: tuple[nnx.GraphDef, ...],
    params: tuple[nnx.State | dict, ...],
    x: jax.Array,
    targets: tuple[jax.Array, ...],
    index: jax.Array,
    settings: TransformSettings,
    key: jax.Array,
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Per recognizer (mean target probability [b], target rank in the mean probabilities [b])
    of one batch; the transforms are drawn and applied once for all recognizers."""
    b, s = x.shape[0], settings.samples
    keys = image_keys(key, index, s)  # [b, s]
    each = jax.vmap(lambda xi, ki: random_transform(xi, ki, settings), (None, 0))
    moved = jax.vmap(each)(x, keys).reshape(b * s, *x.shape[1:])  # [b s, h, w, c]
    out = []
    for graphdef, p, t in zip(graphdefs, params, targets, strict=True):
        z = fastconv.logits(graphdef, p, moved)  # [b s, k]
        probs = jax.nn.softmax(z).reshape(b, s, -1).mean(axis=1)  # [b, k]
        score = jnp.take_along_axis(probs, t[:, None], axis=1)[:, 0]
        out.append((score, scores.target_ranks(probs, t)))
    return tuple(out)


def robust_scores_each(
    recognizers: Sequence[LoadedRecognizer],
    images: np.ndarray,
    targets: Sequence[np.ndarray],
    settings: TransformSettings,
    key: jax.Array,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "robust",
) -> list[scores.Scores]:
    """``robust_scores`` of several recognizers on the same transformed images.

    The transforms cost as much as a small recognizer's forward pass (the noise's random
    numbers most of it), so they are drawn and applied once per batch for every judge.

    Args:
      recognizers: the judges; they take the same image shape.
      images: values in [0, 1]. # [n, h, w, c]
      targets: per recognizer, its label of each image's identity. # each [n]
      settings, key, batch_size, progress, desc: as ``robust_scores``.

    Returns:
      One ``Scores`` per recognizer, in their order.
    """
    images = np.asarray(images, np.float32)
    graphdefs = tuple(r.graphdef for r in recognizers)
    params = tuple(r.params for r in recognizers)
    found = batching.map_batches(
        lambda x, i, *t: _robust_batch(graphdefs, params, x, t, i, settings, key),
        images,
        np.arange(len(images), dtype=np.int32),  # padding repeats an index: its row is dropped
        *(np.asarray(t, np.int32) for t in targets),
        # One size for every call: the caller's number of images varies, and this program
        # takes seconds to compile.
        sizes=(batch_size,),
        progress=progress,
        desc=desc,
    )
    return [scores.Scores(score=score, rank=rank, features=None) for score, rank in found]


def robust_scores(
    recognizer: LoadedRecognizer,
    images: np.ndarray,
    targets: np.ndarray,
    settings: TransformSettings,
    key: jax.Array,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "robust",
) -> scores.Scores:
    """Each image's target probability averaged over random transforms, and the target's rank.

    Args:
      recognizer: the judge (graphdef, params, config), usually R_E.
      images: values in [0, 1]. # [n, h, w, c]
      targets: the recognizer's label of each image's identity. # [n]
      settings: the transforms' ranges and how many per image.
      key: PRNG key; image i's transforms use ``image_keys(key, i, samples)``.
      batch_size: images per compiled call (the recognizer sees ``batch_size * samples``); every
        batch is padded to it, so there is one compile whatever the number of images.
      progress: show a progress bar.
      desc: the progress bar's label.

    Returns:
      Scores: the mean probability of the target, its rank in the mean probabilities (1 = top;
      ties count against the target, a non-finite row ranks last, as
      ``scores.target_ranks``), and no features.
    """
    return robust_scores_each(
        (recognizer,), images, (targets,), settings, key,
        batch_size=batch_size, progress=progress, desc=desc,
    )[0]  # fmt: skip
