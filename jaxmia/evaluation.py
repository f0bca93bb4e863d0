"""Scores clones as the paper does: by what a *different* recognizer, R_E, says of them.

For every clone (and, as the baseline a clone must beat, for its seed image): R_T's and R_E's
softmax score for the target identity, R_E's rank of the target (1 = top), and the distance in
R_E's penultimate features to the nearest real training image of the identity (the KNN distance
later papers report). Per identity and overall: top-1 and top-5 attack accuracy by R_E, the CMC
curve (rank-k identification rate, k = 1..R_E's classes) and the best clone by R_E score.

The recognizers run on the device in JAX (fixed-size batches, one compile per shape); the
statistics of attack success are NumPy on the host. ``evaluate`` scores arrays in memory;
``evaluate_run`` does it for a folder written by ``jaxmia invert`` and writes the report
(``jaxmia.report``); ``run`` is the ``jaxmia evaluate`` stage, which also loads the recognizers
and the real faces.

Identities are matched by name: R_T's and R_E's label orders differ.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmia import batching, models
from jaxmia.errors import JaxmiaError

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer
    from jaxmia.data import FaceSet

INVERSIONS_FILE = "inversions.npz"
SUMMARY_FILE = "summary.json"
_REQUIRED = ("clones", "seeds", "identities")


@dataclasses.dataclass(frozen=True)
class Inversions:
    """The clones of one inversion run."""

    clones: np.ndarray  # [ids, clones, h, w, c] in [0, 1]
    seeds: np.ndarray  # [ids, clones, h, w, c]: the image each clone started from
    identities: tuple[str, ...]  # [ids] target identity names
    target_confidence: np.ndarray | None  # [ids, clones] R_T's softmax score, as the run recorded
    seed_target_confidence: np.ndarray | None  # [ids, clones] the same of each clone's seed
    diverged: np.ndarray  # [ids, clones] bool
    steps: np.ndarray | None  # [ids, clones]
    summary: dict[str, Any]
    source: str  # where it was read from, for messages


@dataclasses.dataclass(frozen=True)
class Scores:
    """One recognizer's verdict on a batch of images, each with its own target class."""

    score: np.ndarray  # [n] softmax probability of the target
    rank: np.ndarray  # [n] int, 1 = target has the highest logit
    features: np.ndarray | None  # [n, d] penultimate features (R_E only)


def load_inversions(folder: str | Path) -> Inversions:
    """Reads ``inversions.npz`` (and ``summary.json`` if present) of a ``jaxmia invert`` folder.

    Raises:
      JaxmiaError: the folder, the file or a required array is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise JaxmiaError(
            f"inversions folder {folder}: not found (expected a jaxmia invert workdir)"
        )
    path = folder / INVERSIONS_FILE
    if not path.is_file():
        raise JaxmiaError(f"{path}: not found (expected the clones written by jaxmia invert)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise JaxmiaError(f"{path}: not a readable .npz file ({e})") from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise JaxmiaError(f"{path}: lacks the array(s) {', '.join(missing)}")
    clones = arrays["clones"]
    if clones.ndim != 5 or clones.shape[0] == 0 or clones.shape[1] == 0:
        raise JaxmiaError(
            f"{path}: clones has shape {clones.shape}, expected [ids, clones, h, w, c]"
        )
    ids, n = clones.shape[:2]
    identities = tuple(str(s) for s in np.asarray(arrays["identities"]).reshape(-1))
    if len(identities) != ids:
        raise JaxmiaError(f"{path}: {len(identities)} identities for {ids} rows of clones")
    try:
        seeds = np.broadcast_to(arrays["seeds"], clones.shape)
    except ValueError as e:
        raise JaxmiaError(
            f"{path}: seeds of shape {arrays['seeds'].shape} do not fit clones {clones.shape}"
        ) from e

    def per_clone(key: str) -> np.ndarray | None:
        if key not in arrays:
            return None
        a = arrays[key]
        if a.shape != (ids, n):
            raise JaxmiaError(f"{path}: {key} has shape {a.shape}, expected {(ids, n)}")
        return a

    diverged = per_clone("diverged")
    summary = {}
    if (folder / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((folder / SUMMARY_FILE).read_text())
        except json.JSONDecodeError as e:
            raise JaxmiaError(f"{folder / SUMMARY_FILE}: not valid JSON ({e})") from e
    return Inversions(
        clones=clones.astype(np.float32),
        seeds=seeds.astype(np.float32),
        identities=identities,
        target_confidence=per_clone("confidence"),
        seed_target_confidence=per_clone("seed_confidence"),
        diverged=np.zeros((ids, n), bool) if diverged is None else diverged.astype(bool),
        steps=per_clone("steps"),
        summary=summary,
        source=str(path),
    )


def labels_by_name(
    identities: tuple[str, ...] | list[str], recognizer: LoadedRecognizer, role: str
) -> np.ndarray:
    """The recognizer's label index of each identity name. # [ids]

    Raises:
      JaxmiaError: naming the first identity the recognizer does not know.
    """
    index = {name: i for i, name in enumerate(recognizer.names)}
    for name in identities:
        if name not in index:
            where = getattr(recognizer, "path", "")
            raise JaxmiaError(
                f"identity {name!r}: not known to the {role} {where} "
                f"({len(index)} identities, e.g. {', '.join(map(repr, recognizer.names[:3]))})"
            )
    return np.array([index[name] for name in identities], np.int32)


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
    z = models.logits(graphdef, params, x)  # [b, k]
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


# ---------------------------------------------------------------------------------------------
# Host: statistics of attack success.


def topk_accuracy(ranks: np.ndarray, k: int) -> float:
    """Fraction of images whose target is among the recognizer's top k. # [...] -> scalar"""
    return float(np.mean(np.asarray(ranks) <= k))


def cmc_curve(ranks: np.ndarray, num_classes: int) -> np.ndarray:
    """Cumulative match characteristic: rank-k identification rate for k = 1..num_classes.

    # [...] -> [num_classes], non-decreasing, last value 1 when every rank is valid.
    """
    ks = np.arange(1, num_classes + 1)
    return (np.ravel(ranks)[:, None] <= ks[None, :]).mean(axis=0)


def best_index(scores: np.ndarray) -> int | None:
    """Index of the highest score (first of ties), ignoring NaN; None if all are NaN."""
    scores = np.asarray(scores, np.float64)
    if not np.any(np.isfinite(scores)):
        return None
    return int(np.nanargmax(np.where(np.isnan(scores), -np.inf, scores)))


def knn_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query to its nearest reference. # [n, d], [m, d] -> [n]

    Differences rather than the |a|^2 + |b|^2 - 2ab expansion: exact for near-duplicates, and
    an identity has few enough real images that memory is no concern.
    """
    queries = np.asarray(queries, np.float64)
    references = np.asarray(references, np.float64)
    if len(references) == 0:
        return np.full(len(queries), np.nan)
    d = np.sqrt(((queries[:, None, :] - references[None, :, :]) ** 2).sum(-1))  # [n, m]
    return d.min(axis=1)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _group_stats(
    rank: np.ndarray, score_e: np.ndarray, score_t: np.ndarray, knn: np.ndarray, k: int
) -> dict[str, Any]:
    """The summary of one group of images (one identity's clones, its seeds, or all)."""

    def mean(a):
        a = np.asarray(a, np.float64)
        return None if a.size == 0 or np.all(np.isnan(a)) else float(np.nanmean(a))

    def low(a):
        a = np.asarray(a, np.float64)
        return None if a.size == 0 or np.all(np.isnan(a)) else float(np.nanmin(a))

    return {
        "count": int(rank.size),
        "top1": topk_accuracy(rank, 1),
        "top5": topk_accuracy(rank, 5),
        "mean_rank": float(np.mean(rank)),
        "mean_score_E": mean(score_e),
        "mean_score_T": mean(score_t),
        "knn_mean": mean(knn),
        "knn_min": low(knn),
        "cmc": cmc_curve(rank, k).tolist(),
    }


def real_faces_from(
    faces: FaceSet, identities: tuple[str, ...] | list[str], train_files: list[str] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Each identity's real faces in a face set, and a note of what they are.

    Args:
      faces: a face set at R_E's input shape (``data.load_faces``).
      identities: the names wanted; one the set lacks gets no entry (and is named in the note).
      train_files: R_E's training images (``meta["train_files"]`` of its checkpoint): only those
        count, since the KNN distance is to what R_E learned the identity from. Without it, or
        when none of the set's files is in it (another source), every photo counts.

    Returns:
      (name -> images [m, h, w, c], note).
    """
    wanted = set(train_files or ())
    use = np.array([f in wanted for f in faces.files], bool) if faces.files else None
    if use is not None and use.any():
        which = "R_E's training images"
    else:
        use, which = np.ones(len(faces.labels), bool), "all images of each identity"
    index = {name: i for i, name in enumerate(faces.names)}
    out = {
        name: faces.images[use & (faces.labels == index[name])]
        for name in identities
        if name in index
    }
    out = {name: images for name, images in out.items() if len(images)}
    note = f"{which} in {faces.source}" + (" (SYNTHETIC)" if faces.synthetic else "")
    missing = [name for name in identities if name not in out]
    if missing:
        note += f"; none for {', '.join(missing)}"
    return out, note


# ---------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` found: the JSON-ready summary and the per-clone arrays behind it."""

    summary: dict[str, Any]
    clones: dict[str, np.ndarray]  # name -> [ids, clones] (see report.CLONE_COLUMNS)
    real_face: dict[str, np.ndarray]  # identity name -> one real image [h, w, c] (for pictures)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, *a.shape[2:])


def evaluate(
    inv: Inversions,
    evaluator: LoadedRecognizer,
    *,
    real_faces: Mapping[str, np.ndarray] | None = None,
    target: LoadedRecognizer | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> Evaluation:
    """Scores an inversion run's clones and seeds with R_E (and R_T).

    Args:
      inv: the run's clones.
      evaluator: R_E, the recognizer that judges the clones.
      real_faces: identity name -> R_E's real training images of it [m, h, w, c]; the KNN
        distances are None for an identity without any (or all, if None).
      target: R_T, to recompute its scores; if None they are the run's recorded confidences
        (None where it recorded none).
      batch_size: images per compiled call.
      progress: show progress bars.

    Raises:
      JaxmiaError: an identity R_E (or R_T) does not know, or images of the wrong size.
    """
    ids, n = inv.clones.shape[:2]
    k = evaluator.config.num_classes
    check_image_shape(inv.clones, evaluator, inv.source, "evaluator")
    labels_e = labels_by_name(inv.identities, evaluator, "evaluator")  # [ids]
    targets_e = np.repeat(labels_e, n)  # [ids * clones]

    def judge(rec, images, targets, feats, desc):
        return score_images(
            rec,
            _flat(images),
            targets,
            with_features=feats,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
        )

    want_feats = real_faces is not None
    clone_e = judge(evaluator, inv.clones, targets_e, want_feats, "R_E clones")
    seed_e = judge(evaluator, inv.seeds, targets_e, want_feats, "R_E seeds")
    nan = np.full((ids, n), np.nan)
    if target is not None:
        check_image_shape(inv.clones, target, inv.source, "target")
        targets_t = np.repeat(labels_by_name(inv.identities, target, "target"), n)
        score_t = judge(target, inv.clones, targets_t, False, "R_T clones").score.reshape(ids, n)
        seed_t = judge(target, inv.seeds, targets_t, False, "R_T seeds").score.reshape(ids, n)
        t_source = str(getattr(target, "path", "target recognizer"))
    elif inv.target_confidence is not None:
        score_t = inv.target_confidence.astype(np.float64)
        seed_t = nan if inv.seed_target_confidence is None else inv.seed_target_confidence
        t_source = f"{inv.source} (confidence recorded by the inversion)"
    else:
        score_t, seed_t, t_source = nan, nan, None

    reals = {
        name: np.asarray(real_faces[name], np.float32)
        for name in inv.identities
        if real_faces is not None and len(real_faces.get(name, ())) > 0
    }
    for name, images in reals.items():
        check_image_shape(images, evaluator, f"real faces of {name!r}", "evaluator")
    knn, seed_knn = nan.copy(), nan.copy()
    if reals:
        # all identities' real faces in one pass: one compiled shape, not one per identity
        stacked = np.concatenate(list(reals.values()))  # [m, h, w, c]
        ref = score_images(
            evaluator, stacked, np.zeros(len(stacked), np.int32), with_features=True,
            batch_size=batch_size, progress=progress, desc="R_E real faces",
        ).features  # fmt: skip
        ends = np.cumsum([len(v) for v in reals.values()])
        ref_of = {
            name: ref[end - len(images) : end]
            for (name, images), end in zip(reals.items(), ends, strict=True)
        }
        for i, name in enumerate(inv.identities):
            if name in ref_of:
                rows = slice(i * n, (i + 1) * n)
                knn[i] = knn_distances(clone_e.features[rows], ref_of[name])
                seed_knn[i] = knn_distances(seed_e.features[rows], ref_of[name])
    real_face = {name: images[0] for name, images in reals.items()}
    real_counts = {name: len(reals.get(name, ())) for name in inv.identities}

    per = {
        "score_T": score_t,
        "score_E": clone_e.score.reshape(ids, n),
        "rank_E": clone_e.rank.reshape(ids, n),
        "knn_distance": knn,
        "seed_score_T": seed_t,
        "seed_score_E": seed_e.score.reshape(ids, n),
        "seed_rank_E": seed_e.rank.reshape(ids, n),
        "seed_knn_distance": seed_knn,
        "diverged": inv.diverged,
    }

    def stats(sel, prefix=""):
        keys = ("rank_E", "score_E", "score_T", "knn_distance")
        return _group_stats(*(per[prefix + key][sel] for key in keys), k)

    identities = []
    for i, name in enumerate(inv.identities):
        best = best_index(per["score_E"][i])
        identities.append(
            {
                "name": name,
                "label_E": int(labels_e[i]),
                "real_faces": real_counts[name],
                **stats(i),
                "diverged": int(per["diverged"][i].sum()),
                "best_clone": best,
                "best_score_E": None if best is None else float(per["score_E"][i, best]),
                "best_score_T": None if best is None else _finite(per["score_T"][i, best]),
                "best_rank_E": None if best is None else int(per["rank_E"][i, best]),
                "seed": stats(i, "seed_"),
            }
        )
    overall = {
        **stats(np.s_[:]),
        "diverged": int(per["diverged"].sum()),
        "seed": stats(np.s_[:], "seed_"),
    }
    summary = {
        "inversions": inv.source,
        "evaluator": {
            "path": str(getattr(evaluator, "path", "")),
            "num_classes": k,
            "image_size": list(evaluator.config.image_size),
            "channels": evaluator.config.channels,
        },
        "target_scores": t_source,
        "num_identities": ids,
        "clones_per_identity": n,
        "chance_top1": 1 / k,
        "chance_top5": min(5, k) / k,
        "identities": identities,
        "overall": overall,
    }
    return Evaluation(summary=summary, clones=per, real_face=real_face)


def evaluate_run(
    inversions: str | Path | Inversions,
    evaluator: LoadedRecognizer,
    out_dir: str | Path,
    *,
    real_faces: Mapping[str, np.ndarray] | None = None,
    target: LoadedRecognizer | None = None,
    real_faces_note: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a ``jaxmia invert`` folder and writes the JSON, CSVs, pictures and HTML report.

    Writes (atomically) into out_dir: ``evaluation.json``, ``clones.csv``, ``identities.csv``,
    ``grid_<name>.png`` per identity, ``cmc.png``, ``scores_hist.png`` and ``report.html``.

    Args:
      inversions: the folder holding ``inversions.npz``, or what ``load_inversions`` read of it.
      evaluator: R_E.
      out_dir: where the outputs go.
      real_faces: identity name -> R_E's real training images of it [m, h, w, c].
      target: R_T to recompute its scores (else the run's recorded confidences).
      real_faces_note: where the real faces came from, shown in the report.
      batch_size: images per compiled call.
      progress: show progress bars.

    Returns:
      The summary written to ``evaluation.json``.
    """
    from jaxmia import report  # matplotlib is slow to import; only the full job needs it

    inv = inversions if isinstance(inversions, Inversions) else load_inversions(inversions)
    ev = evaluate(
        inv, evaluator, real_faces=real_faces, target=target, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    summary = dict(ev.summary, real_faces_note=real_faces_note)
    if inv.summary:
        summary["inversion_summary"] = inv.summary
    return report.write_all(
        out_dir, summary, ev.clones, inv.clones, inv.seeds, ev.real_face, inv.steps
    )


# ---------------------------------------------------------------------------------------------
# The stage.


def resolve_target(arg: str, inversions_dir: Path) -> LoadedRecognizer | None:
    """R_T as ``--target`` asks: a path, 'none', or 'auto': the checkpoint the run recorded (as
    given in summary.json, else resolved in run.json), if it is still there."""
    from jaxmia import checkpoint

    if arg == "none":
        return None
    if arg != "auto":
        return checkpoint.load_recognizer(arg)
    for record in (SUMMARY_FILE, "run.json"):
        try:
            found = json.loads((inversions_dir / record).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        path = found.get("checkpoint") if isinstance(found, dict) else None
        if path is None and isinstance(found, dict):
            path = (found.get("settings") or {}).get("checkpoint")
        if isinstance(path, str) and (Path(path) / "checkpoints").is_dir():
            return checkpoint.load_recognizer(path)
    return None


def real_faces_for(
    evaluator: LoadedRecognizer,
    identities: tuple[str, ...],
    source: str | None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """Each attacked identity's real faces among R_E's training images, and where they came from.

    The face set (the one R_E's checkpoint records, or ``source``; "none" skips them) is loaded
    at R_E's input size, from the cache ``cache_dir`` (else the one recorded); see
    ``real_faces_from`` for which of its photos count.
    """
    if source == "none":
        return None, "none (--faces none)"
    from jaxmia import data  # tensorflow_datasets is slow to import; only this path needs it

    recorded = evaluator.meta.get("data") or {}
    src = source or recorded.get("source")
    if not src:
        return None, "none: the evaluator's checkpoint records no data source (use --faces)"
    cfg = evaluator.config
    faces = data.load_faces(
        src,
        image_size=tuple(cfg.image_size),
        channels=cfg.channels,
        cache_dir=cache_dir or recorded.get("cache_dir") or None,
        synthetic=recorded.get("synthetic"),
        progress=progress,
        # Another source (--faces) is cropped like the recognizer's own data only if it is it.
        crop=recorded.get("crop", 1.0) if src == recorded.get("source") else 1.0,
    )
    return real_faces_from(faces, identities, evaluator.meta.get("train_files"))


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    inversions: str | Path,
    evaluator: str | Path,
    target: str = "auto",
    faces: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``jaxmia evaluate`` stage: an inversion run's clones judged by R_E into ``workdir``.

    Args:
      config: the jaxmia config (its ``data.cache_dir`` locates the real faces' cache).
      workdir: where the report goes.
      inversions: a ``jaxmia invert`` folder.
      evaluator: R_E's checkpoint folder.
      target: R_T's checkpoint, "auto" (the one the run recorded, if still there) or "none"
        (the confidences the run recorded).
      faces: the real faces' data source (default: R_E's training data as its checkpoint
        records; "none": no KNN distances).
      batch_size: images per compiled call.
      progress: show progress bars.

    Returns:
      The summary written to ``workdir/evaluation.json``.
    """
    from jaxmia import checkpoint

    if batch_size < 1:
        raise JaxmiaError(f"--batch-size {batch_size}: expected a positive integer")
    inv = load_inversions(inversions)  # fail fast, before loading any model
    rec_e = checkpoint.load_recognizer(evaluator)
    labels_by_name(inv.identities, rec_e, "evaluator")
    check_image_shape(inv.clones, rec_e, inv.source, "evaluator")
    rec_t = resolve_target(target, Path(inversions))
    real, note = real_faces_for(
        rec_e, inv.identities, faces, cache_dir=config.data.cache_dir, progress=progress
    )
    return evaluate_run(
        inv,
        rec_e,
        workdir,
        real_faces=real,
        target=rec_t,
        real_faces_note=note,
        batch_size=batch_size,
        progress=progress,
    )
