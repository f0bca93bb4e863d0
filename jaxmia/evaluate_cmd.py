"""``jaxmia evaluate``: judge an inversion run's clones with the evaluation recognizer R_E.

    jaxmia evaluate --inversions RUN --evaluator CKPT --workdir OUT

Writes OUT/evaluation.json, clones.csv, identities.csv, grid_<name>.png, cmc.png,
scores_hist.png and report.html. R_T's scores are recomputed with ``--target`` (by default the
checkpoint the run's summary.json names, if it is still there), else taken from the run. The real
faces (KNN distance, the grids' real face) are R_E's training images, reloaded from the data
source its checkpoint records, or from ``--faces SOURCE``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_collections
import numpy as np

from jaxmia import checkpoint, evaluation
from jaxmia.errors import JaxmiaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inversions",
        required=True,
        metavar="DIR",
        help="folder of a jaxmia invert run (with inversions.npz)",
    )
    parser.add_argument(
        "--evaluator",
        required=True,
        metavar="CKPT",
        help="checkpoint folder of the evaluation recognizer R_E",
    )
    parser.add_argument(
        "--target",
        default="auto",
        metavar="CKPT",
        help="checkpoint of R_T to recompute its scores; 'auto' (default): the one the run's "
        "summary.json names if it exists; 'none': the confidences the run recorded",
    )
    parser.add_argument(
        "--faces",
        default=None,
        metavar="SOURCE",
        help="data source of the real faces (folder:PATH, att, tfds:NAME, synthetic); default: "
        "R_E's training data as its checkpoint records; 'none' to skip KNN distances",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per compiled call"
    )


def resolve_target(arg: str, inversions_dir: Path) -> checkpoint.LoadedRecognizer | None:
    """R_T as ``--target`` asks: a path, 'none', or 'auto': the checkpoint the run recorded (as
    given in summary.json, else resolved in run.json), if it is still there."""
    if arg == "none":
        return None
    if arg != "auto":
        return checkpoint.load_recognizer(arg)
    for record in ("summary.json", "run.json"):
        try:
            path = json.loads((inversions_dir / record).read_text()).get("checkpoint")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(path, str) and (Path(path) / "checkpoints").is_dir():
            return checkpoint.load_recognizer(path)
    return None


def real_faces_for(
    evaluator: checkpoint.LoadedRecognizer,
    identities: tuple[str, ...],
    source: str | None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """Each attacked identity's real faces among R_E's training images, and where they came from.

    The face set (the one R_E's checkpoint records, or ``source``) is loaded at R_E's input size,
    from the cache ``cache_dir`` (else the one recorded); see ``evaluation.real_faces_from`` for
    which of its photos count. Everything else comes from the run folder and the checkpoints.
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
    )
    return evaluation.real_faces_from(faces, identities, evaluator.meta.get("train_files"))


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    if args.batch_size < 1:
        raise JaxmiaError(f"--batch-size {args.batch_size}: expected a positive integer")
    inv = evaluation.load_inversions(args.inversions)  # fail fast, before loading any model
    evaluator = checkpoint.load_recognizer(args.evaluator)
    evaluation.labels_by_name(inv.identities, evaluator, "evaluator")
    evaluation.check_image_shape(inv.clones, evaluator, inv.source, "evaluator")
    target = resolve_target(args.target, Path(args.inversions))
    real, note = real_faces_for(
        evaluator, inv.identities, args.faces, cache_dir=config.data.cache_dir
    )
    summary = evaluation.evaluate_run(
        inv,
        evaluator,
        args.workdir,
        real_faces=real,
        target=target,
        real_faces_note=note,
        batch_size=args.batch_size,
    )
    o, s = summary["overall"], summary["overall"]["seed"]
    print(
        f"top-1 by R_E {100 * o['top1']:.1f}% (top-5 {100 * o['top5']:.1f}%) over {o['count']} "
        f"clones of {summary['num_identities']} identities; seed {100 * s['top1']:.1f}% "
        f"(top-5 {100 * s['top5']:.1f}%); chance {100 * summary['chance_top1']:.1f}%"
    )
    print(f"report: {Path(args.workdir) / 'report.html'}")
