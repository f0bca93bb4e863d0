"""``jaxmia train``: the paper's recognizer, or R_T and R_E of the split, into checkpoints."""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recognizer",
        choices=train.RECOGNIZERS,
        default=None,
        help="which recognizer(s) to train (overrides config.train.recognizer)",
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    train.run(config, args.workdir, recognizer=args.recognizer)
