"""One recognizer's verdict on images, each with its own target: scores, ranks, features.

The device half of judging: fixed-size batches through a jitted function (one compile per
shape, ``jaxmia.batching``). ``jaxmia.stages.evaluate`` (R_E on clones) and the judges beside it
(``jaxmia.judges.transformed``, ``jaxmia.judges.pgd``, ``jaxmia.judges.panel``) share it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxmia import batching
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import fastconv, models

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer


@dataclasses.dataclass(frozen=True)
class Scores:
    """One recognizer's verdict on a batch of images, each with its own target class."""

    score: np.ndarray  # [n] softmax probability of the target
    rank: np.ndarray  # [n] int, 1 = target has the highest logit
    features: np.ndarray | None  # [n, d] penultimate features (R_E only)


def check_image_shape(
    images: np.ndarray, recognizer: LoadedRecognizer, what: str, role: str
) -> None:
    """Raises a JaxmiaError if images are not the size and channels the recognizer takes.

    R_T and R_E of one experiment share the image size, so a mismatch is a mix-up of runs or
    checkpoints; resizing would hide it.
    """
    cfg = recognizer.config
    want = (*cfg.image_size, cfg.channels)
    got = tuple(images.shape[-3:])
    if got != want:
        raise JaxmiaError(
            f"{what}: images are {got[0]}x{got[1]}x{got[2]} but the {role} "
            f"{getattr(recognizer, 'path', '')} expects {want[0]}x{want[1]}x{want[2]} "
            "(R_T and R_E of one experiment share the image size: wrong checkpoint or run?)"
        )


# ---------------------------------------------------------------------------------------------
# Device: scores, ranks and features in fixed-size batches.


def target_ranks(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Rank of each row's target class, 1 = top. # [n, k], [n] -> [n] int32

    Ties count against the target (a row of equal logits ranks it last), so an attack is never
    credited for a recognizer that cannot tell classes apart. A row with a NaN or Inf ranks last.
    """
    t = jnp.take_along_axis(logits, targets[:, None], axis=1)  # [n, 1]
    rank = jnp.sum(logits >= t, axis=1, dtype=jnp.int32)
    finite = jnp.all(jnp.isfinite(logits), axis=1)
    return jnp.where(finite, rank, logits.shape[1])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score_batch(graphdef, params, x, targets, with_features: bool):
    z = fastconv.logits(graphdef, params, x)  # [b, k]
    score = jnp.take_along_axis(jax.nn.softmax(z), targets[:, None], axis=1)[:, 0]
    feats = models.features(graphdef, params, x) if with_features else None  # [b, d]
    return score, target_ranks(z, targets), feats


def score_images(
    recognizer: LoadedRecognizer,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    with_features: bool = False,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "scoring",
) -> Scores:
    """Softmax score and rank of each image's target class (and features), batch by batch.

    Args:
      recognizer: the model (graphdef, params, config).
      images: values in [0, 1]. # [n, h, w, c]
      targets: the recognizer's label of each image's identity. # [n]
      with_features: also return the penultimate features (for KNN distances).
      batch_size: images per compiled call; the last batch is padded so there is one compile.
      progress: show a progress bar.
      desc: the progress bar's label.
    """
    score, rank, feats = batching.map_batches(
        lambda x, t: _score_batch(recognizer.graphdef, recognizer.params, x, t, with_features),
        np.asarray(images),
        np.asarray(targets),
        sizes=batching.sizes_for(len(images), batch_size),
        progress=progress,
        desc=desc,
    )
    return Scores(score=score, rank=rank, features=feats)
