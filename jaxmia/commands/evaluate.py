"""``jaxmia evaluate``: an inversion run's clones judged by the evaluation recognizer R_E.

    jaxmia evaluate --inversions RUN --evaluator CKPT --workdir OUT

Writes OUT/evaluation.json, clones.csv, identities.csv, grid_<name>.png, cmc.png,
scores_hist.png, judges.png and report.html (``jaxmia.stages.evaluate.run``): R_E's verdict and,
beside it, the judges of ``jaxmia.judges.panel`` on the clones, their seeds, held-out real photos
and PGD controls (fitted in seconds; no retraining).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ml_collections

from jaxmia.judges import panel
from jaxmia.stages import evaluate as evaluate_lib


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
        "--other-evaluator",
        default="auto",
        metavar="CKPT",
        help="a second R_E of another architecture; 'auto' (default): evaluation_other beside "
        "the evaluator's folder (jaxmia experiment writes it) if there; 'none'",
    )
    parser.add_argument(
        "--no-judges",
        action="store_true",
        help="R_E alone: skip the judges beside it (config.judges: eigenface and pixel "
        "neighbours, R_E under transforms, PGD controls)",
    )
    parser.add_argument(
        "--faces",
        default=None,
        metavar="SOURCE",
        help="data source of the real faces (folder:PATH, att, tfds:NAME, synthetic); default: "
        "R_E's training data as its checkpoint records; 'none' to skip KNN distances and judges",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per compiled call"
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    summary = evaluate_lib.run(
        config,
        args.workdir,
        inversions=args.inversions,
        evaluator=args.evaluator,
        target=args.target,
        other=args.other_evaluator,
        faces=args.faces,
        judges=not args.no_judges,
        batch_size=args.batch_size,
    )
    o, s = summary["overall"], summary["overall"]["seed"]
    print(
        f"top-1 by R_E {100 * o['top1']:.1f}% (top-5 {100 * o['top5']:.1f}%) over {o['count']} "
        f"clones of {summary['num_identities']} identities; seed {100 * s['top1']:.1f}% "
        f"(top-5 {100 * s['top5']:.1f}%); chance {100 * summary['chance_top1']:.1f}%"
    )
    for line in panel.lines(summary.get("judges")):
        print(line)
    print(f"report: {Path(args.workdir) / 'report.html'}")
