"""Scores clones as the paper does: by what a *different* recognizer, R_E, says of them.

For every clone (and, as the baseline a clone must beat, for its seed image): R_T's and R_E's
softmax score for the target identity, R_E's rank of the target (1 = top), and the distance in
R_E's penultimate features to the nearest real training image of the identity (the KNN distance
later papers report). Per identity and overall: top-1 and top-5 attack accuracy by R_E, the CMC
curve (rank-k identification rate, k = 1..R_E's classes) and the best clone by R_E score.

The recognizers run on the device in JAX (fixed-size batches, one compile per shape); the
statistics of attack success are NumPy on the host. ``evaluate`` scores arrays in memory;
``judge_run`` does it for a folder written by ``jaxmia invert``, writes the report
(``jaxmia.report.html``) and returns the per-clone arrays too; ``run`` is
the ``jaxmia evaluate`` stage, which also loads the recognizers and the real faces.

Identities are matched by name: R_T's and R_E's label orders differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from jaxmia.attacks.inversions_file import (
    SUMMARY_FILE,
    Inversions,
    load_inversions,
)
from jaxmia.errors import JaxmiaError

# Scores and target_ranks are re-exported: jaxmia.stages.evaluate is where users find them.
from jaxmia.judges.scores import Scores, check_image_shape, score_images, target_ranks  # noqa: F401

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer
    from jaxmia.data.faces import FaceSet
    from jaxmia.judges import panel as panel_lib


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
      faces: a face set at R_E's input shape (``faces_lib.load_faces``).
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
    clones: dict[str, np.ndarray]  # name -> [ids, clones] (see html_lib.CLONE_COLUMNS)
    real_face: dict[str, np.ndarray]  # identity name -> one real image [h, w, c] (for pictures)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, *a.shape[2:])


def evaluate(
    inv: Inversions,
    evaluator: LoadedRecognizer,
    *,
    real_faces: Mapping[str, np.ndarray] | None = None,
    target: LoadedRecognizer | None = None,
    panel: panel_lib.Panel | None = None,
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
      panel: the judges beside R_E (``jaxmia.judges.panel``); their table goes into the summary's
        ``judges`` and each clone's rank by each of them into ``rank_<judge>``.
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
    if panel is not None:
        from jaxmia.judges import panel as panel_lib  # the judges score images with this module

        # R_E's ranks of the clones and seeds are those above: the panel does not score them again
        judged, ranks = panel_lib.run(
            panel, inv.clones, inv.seeds, inv.identities, batch_size=batch_size,
            progress=progress, rank_e=(per["rank_E"], per["seed_rank_E"]),
        )  # fmt: skip
        summary["judges"] = judged
        per |= {(f"rank_{j}" if j in panel_lib.JUDGE_TITLES else j): r for j, r in ranks.items()}
    return Evaluation(summary=summary, clones=per, real_face=real_face)


def judge_run(
    inversions: str | Path | Inversions,
    evaluator: LoadedRecognizer,
    out_dir: str | Path,
    *,
    real_faces: Mapping[str, np.ndarray] | None = None,
    target: LoadedRecognizer | None = None,
    real_faces_note: str | None = None,
    panel: panel_lib.Panel | None = None,
    sort_by: str = "",
    batch_size: int = 256,
    progress: bool = True,
    with_html: bool = True,
) -> Evaluation:
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
      panel: the judges beside R_E, or None.
      sort_by: order each identity's grid by this judge's rank of the target ("": clone order;
        "R_E" or a judge of the panel).
      batch_size: images per compiled call.
      progress: show progress bars.
      with_html: write ``report.html`` (False where the caller writes it once with more in it,
        as the experiment's comparison).

    Returns:
      The summary as written to ``evaluation.json``, the per-clone arrays (as in ``clones.csv``)
      and one real face per identity.

    Raises:
      JaxmiaError: ``sort_by`` names no judge of this evaluation.
    """
    # matplotlib is slow to import; only the full job needs it
    from jaxmia.report import html as html_lib

    inv = inversions if isinstance(inversions, Inversions) else load_inversions(inversions)
    from jaxmia.judges import panel as panel_lib  # the judges score images with this module

    judges = ("R_E", *(panel_lib.JUDGE_TITLES if panel is not None else ()))
    if sort_by and sort_by not in judges:
        raise JaxmiaError(
            f"config field judges.sort_by: {sort_by!r} is no judge of this evaluation "
            f"(expected '' or one of {', '.join(judges)})"
        )
    ev = evaluate(
        inv, evaluator, real_faces=real_faces, target=target, panel=panel,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    key = {"": None, "R_E": "rank_E"}.get(sort_by, f"rank_{sort_by}")
    if key is not None and key not in ev.clones:
        raise JaxmiaError(f"config field judges.sort_by: {sort_by!r} judged no clone here")
    summary = dict(ev.summary, real_faces_note=real_faces_note, grid_order=sort_by or "clone")
    if inv.summary:
        summary["inversion_summary"] = inv.summary
    summary = html_lib.write_all(
        out_dir, summary, ev.clones, inv.clones, inv.seeds, ev.real_face, inv.steps,
        order_key=key, with_html=with_html,
    )  # fmt: skip
    return dataclasses.replace(ev, summary=summary)


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


def load_real_faces(
    evaluator: LoadedRecognizer,
    source: str | None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[FaceSet | None, str]:
    """The face set R_E's checkpoint records (or ``source``; "none": None) at R_E's input size,
    from the cache ``cache_dir`` (else the one recorded), and a note of where it came from."""
    if source == "none":
        return None, "none (--faces none)"
    # tensorflow_datasets is slow to import; only this path needs it
    from jaxmia.data import faces as faces_lib

    recorded = evaluator.meta.get("data") or {}
    src = source or recorded.get("source")
    if not src:
        return None, "none: the evaluator's checkpoint records no data source (use --faces)"
    cfg = evaluator.config
    faces = faces_lib.load_faces(
        src,
        image_size=tuple(cfg.image_size),
        channels=cfg.channels,
        cache_dir=cache_dir or recorded.get("cache_dir") or None,
        synthetic=recorded.get("synthetic"),
        progress=progress,
        # Another source (--faces) is cropped like the recognizer's own data only if it is it.
        crop=recorded.get("crop", 1.0) if src == recorded.get("source") else 1.0,
    )
    return faces, src


def real_faces_for(
    evaluator: LoadedRecognizer,
    identities: tuple[str, ...],
    source: str | None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """Each attacked identity's real faces among R_E's training images, and where they came from.

    The face set is ``load_real_faces``'; see ``real_faces_from`` for which of its photos count.
    """
    faces, note = load_real_faces(evaluator, source, cache_dir=cache_dir, progress=progress)
    if faces is None:
        return None, note
    return real_faces_from(faces, identities, evaluator.meta.get("train_files"))


def resolve_other(arg: str, evaluator_dir: Path) -> LoadedRecognizer | None:
    """The second R_E as ``--other-evaluator`` asks: a path, 'none', or 'auto': the
    ``evaluation_other`` folder beside R_E's (as ``jaxmia experiment`` writes), if there."""
    from jaxmia import checkpoint

    if arg == "none":
        return None
    path = evaluator_dir.parent / "evaluation_other" if arg == "auto" else Path(arg)
    if arg == "auto" and not (path / "checkpoints").is_dir():
        return None
    return checkpoint.load_recognizer(path)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    inversions: str | Path,
    evaluator: str | Path,
    target: str = "auto",
    other: str = "auto",
    faces: str | None = None,
    judges: bool = True,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``jaxmia evaluate`` stage: an inversion run's clones judged by R_E into ``workdir``.

    Args:
      config: the jaxmia config (its ``data.cache_dir`` locates the real faces' cache; its
        ``judges`` section sets the judges beside R_E).
      workdir: where the report goes.
      inversions: a ``jaxmia invert`` folder.
      evaluator: R_E's checkpoint folder.
      target: R_T's checkpoint, "auto" (the one the run recorded, if still there) or "none"
        (the confidences the run recorded).
      other: a second R_E of another architecture: a checkpoint, "auto" (``evaluation_other``
        beside R_E's folder, if there) or "none".
      faces: the real faces' data source (default: R_E's training data as its checkpoint
        records; "none": no KNN distances and no judges).
      judges: run the judges beside R_E (they need the real faces).
      batch_size: images per compiled call.
      progress: show progress bars.

    Returns:
      The summary written to ``workdir/evaluation.json``.
    """
    from jaxmia import checkpoint
    from jaxmia.judges import panel as panel_lib

    if batch_size < 1:
        raise JaxmiaError(f"--batch-size {batch_size}: expected a positive integer")
    settings = panel_lib.Settings.from_config(config.judges) if judges else None
    inv = load_inversions(inversions)  # fail fast, before loading any model
    rec_e = checkpoint.load_recognizer(evaluator)
    labels_by_name(inv.identities, rec_e, "evaluator")
    check_image_shape(inv.clones, rec_e, inv.source, "evaluator")
    rec_t = resolve_target(target, Path(inversions))
    rec_o = resolve_other(other, Path(evaluator)) if judges else None
    if rec_o is not None:
        labels_by_name(inv.identities, rec_o, "second evaluator")
        check_image_shape(inv.clones, rec_o, inv.source, "second evaluator")
    face_set, src = load_real_faces(
        rec_e, faces, cache_dir=config.data.cache_dir, progress=progress
    )
    real, note = (None, src) if face_set is None else real_faces_from(
        face_set, inv.identities, rec_e.meta.get("train_files")
    )  # fmt: skip
    panel = None
    if settings is not None and face_set is not None:
        panel = panel_lib.panel_from_faces(
            rec_e, face_set, inv.identities, settings, other=rec_o, target=rec_t
        )
    return judge_run(
        inv,
        rec_e,
        workdir,
        real_faces=real,
        target=rec_t,
        real_faces_note=note,
        panel=panel,
        sort_by=config.judges.sort_by,
        batch_size=batch_size,
        progress=progress,
    ).summary
