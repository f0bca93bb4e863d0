"""``jaxmia experiment``: the paper's protocol end to end (``jaxmia.stages.experiment``).

jaxmia experiment --config configs/att.py --workdir OUT
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redo",
        action="store_true",
        help="redo a stage whose settings changed, and every stage after it (their outputs in "
        "the workdir are deleted); without it such a change is an error",
    )
    parser.add_argument(
        "--until",
        choices=experiment.STAGES,
        default=experiment.STAGES[-1],
        help="run the stages up to this one and stop (e.g. target: train R_T alone); a rerun "
        "without it goes on from there",
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    experiment.run(config, args.workdir, redo=args.redo, until=args.until)
