"""``jaxmia blackbox``: inversion without R_T's weights, through a clone
(``jaxmia.stages.blackbox``).

jaxmia blackbox --config configs/att.py --workdir OUT --config.blackbox.experiment=RUN
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import blackbox


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-plots", action="store_true", help="write the table only")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    blackbox.run(config, args.workdir, plots=not args.no_plots)
