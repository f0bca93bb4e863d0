"""Restarts ranked by R_T: the attacker keeps the clones its own recognizer is surest of.

The attacker of the gray-box scenario can ask R_T but never R_E, so with several restarts per
clone it keeps the best by R_T's judgement (``experiment.select``):

- "confidence": R_T's softmax score of the target, as the inversion recorded it (it rounds to 1.0
  for most clones of a long run, and ties keep the first clones);
- "margin": R_T's logit of the target minus its highest other logit (``inversion.logit_margin``),
  which keeps ordering clones the softmax has saturated;
- "robust": that margin's mean over random shifts and flips (``inversion.random_transform``),
  favouring clones that are not adversarial pixel patterns tied to exact positions.

The recognizer runs on the device in fixed-size batches (``jaxmia.batching``); the ranking is
NumPy on the host.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmia import batching, checkpoint, files
from jaxmia.attacks import inversion as inv
from jaxmia.attacks import inversions_file
from jaxmia.attacks.inversions_file import SUMMARY_FILE
from jaxmia.recognizers import models

SELECT = ("confidence", "margin", "robust")
BATCH = 256
SELECTED = "selected"  # the folder of the kept clones, inside the inversion run's


@functools.partial(jax.jit, static_argnames=("jitter", "flip"))
def _transform(x: jax.Array, keys: jax.Array, *, jitter: int, flip: bool) -> jax.Array:
    """Each image shifted and flipped as the inversion's jitter does. # [n, h, w, c]"""
    return jax.vmap(lambda xi, k: inv.random_transform(xi, k, jitter, flip))(x, keys)


@functools.partial(jax.jit, static_argnums=0)
def _margin_batch(graphdef, params, x: jax.Array, labels: jax.Array) -> jax.Array:
    z = models.logits(graphdef, params, x)  # [b, k]
    return jax.vmap(inv.logit_margin)(z, labels)


def logit_margins(
    rec: checkpoint.LoadedRecognizer, images: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Each image's logit for its label minus its highest other logit. # [n]

    Unlike the softmax score, which rounds to 1.0 for most clones of a long inversion, the
    margin keeps ordering them.
    """
    margins = batching.map_batches(
        lambda x, y: _margin_batch(rec.graphdef, rec.params, x, y),
        np.asarray(images, np.float32),
        np.asarray(labels, np.int32),
        sizes=batching.sizes_for(len(images), BATCH),
    )
    return margins.astype(np.float64)


def robust_margins(
    rec: checkpoint.LoadedRecognizer,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    jitter: int,
    flip: bool,
    samples: int,
    key: jax.Array,
) -> np.ndarray:
    """The mean ``logit_margins`` of each image over random shifts and flips.

    Args:
      rec: the recognizer (R_T: the attacker's only judge).
      images: in [0, 1]. # [n, h, w, c]
      labels: the recognizer's label of each image's identity. # [n]
      jitter: largest shift in pixels (edges replicated).
      flip: also flip at random.
      samples: transforms per image; sample s uses ``fold_in(key, s)`` split over the images.
      key: PRNG key.

    Returns:
      Mean margins. # [n]
    """
    total = np.zeros(len(images))
    for s in range(samples):
        keys = jax.random.split(jax.random.fold_in(key, s), len(images))
        moved = np.asarray(_transform(jnp.asarray(images), keys, jitter=jitter, flip=flip))
        total += logit_margins(rec, moved, labels)
    return total / samples


def select_clones(
    run_dir: Path,
    out_dir: Path,
    rec_t: checkpoint.LoadedRecognizer,
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Keeps the ``inversion.clones`` best clones per identity of a run by R_T's judgement.

    Writes ``out_dir/inversions.npz`` in ``jaxmia invert``'s format (the kept clones, best
    first) plus ``selected`` (indices into the run's clones) and ``select_score`` [ids, keep],
    and ``out_dir/summary.json`` (the run's summary with a ``selection`` entry). A diverged clone
    is never preferred to a finite one.
    """
    keep, exp = config.inversion.clones, config.experiment
    arrays = inversions_file.load_arrays(run_dir)
    clones = arrays["clones"]  # [ids, n, h, w, c]
    ids, n = clones.shape[:2]
    flat = clones.reshape(ids * n, *clones.shape[2:])
    labels = np.repeat(arrays["labels"], n)
    if exp.select == "confidence":
        score = arrays["confidence"].astype(np.float64)
    elif exp.select == "margin":
        score = logit_margins(rec_t, flat, labels).reshape(ids, n)
    else:
        score = robust_margins(
            rec_t,
            flat,
            labels,
            jitter=exp.select_jitter,
            flip=exp.select_flip,
            samples=exp.select_samples,
            key=jax.random.fold_in(jax.random.key(config.inversion.rng_seed), 2),
        ).reshape(ids, n)
    score = np.where(arrays["diverged"] | ~np.isfinite(score), -np.inf, score)
    order = np.argsort(-score, axis=1, kind="stable")[:, :keep]  # [ids, keep]
    out = dict(arrays)
    for k, v in arrays.items():
        if v.shape[:2] == (ids, n):
            out[k] = np.take_along_axis(v, order.reshape(ids, keep, *[1] * (v.ndim - 2)), axis=1)
    out["selected"] = order.astype(np.int32)
    out["select_score"] = np.take_along_axis(score, order, axis=1)
    inversions_file.save_inversions(out_dir, **out)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    summary["clones"] = keep
    summary["selection"] = {
        "from": str(run_dir),
        "inverted_per_identity": n,
        "kept_per_identity": keep,
        **{k: v for k, v in exp.to_dict().items() if k.startswith("select")},
        "mean_score_kept": float(np.mean(out["select_score"][np.isfinite(out["select_score"])]))
        if np.isfinite(out["select_score"]).any()
        else None,
        "mean_score_all": float(np.mean(score[np.isfinite(score)]))
        if np.isfinite(score).any()
        else None,
    }
    files.write_json(out_dir / SUMMARY_FILE, summary)
    return summary["selection"]
