"""``jaxmia defend``: training-time defences, leak against utility (``jaxmia.stages.defend``).

jaxmia defend --config configs/defences.py --workdir OUT
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import defend as defend_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-plots", action="store_true", help="write the table only")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    defend_lib.run(config, args.workdir, plots=not args.no_plots)
