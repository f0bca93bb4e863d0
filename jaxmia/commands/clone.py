"""``jaxmia clone``: the cloning attack vs intentional misrecognition and near-duplicate detection.

jaxmia clone --workdir OUT
jaxmia clone --workdir OUT --config.data.source=synthetic
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import clone as clone_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-plots", action="store_true", help="write the table only")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    clone_lib.run(config, args.workdir, plots=not args.no_plots)
