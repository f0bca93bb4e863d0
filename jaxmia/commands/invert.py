"""``jaxmia invert``: clone faces of a checkpoint's identities by model inversion.

jaxmia invert --checkpoint RUN/target --identities 0,3,s5 --clones 100 --steps 300 --workdir OUT
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia import sharding
from jaxmia.stages import invert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="recognizer folder (from jaxmia train)")
    parser.add_argument(
        "--identities",
        default=None,
        help="comma-separated label indices or names (default: the split's attacked identities "
        "recorded in the checkpoint, else all)",
    )
    parser.add_argument(
        "--clones", type=int, default=None, help="per identity (config: inversion.clones)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="most steps (config: inversion.steps)"
    )
    group = parser.add_argument_group(
        "multi-host", "run the same command in every process; process 0 writes the outputs"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process JAX run (jax.distributed.initialize) and shard the clones "
        "over every process's devices; where the coordinator is comes from the cluster "
        "(Slurm, Open MPI, Cloud TPU) or the three options below (which imply it)",
    )
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    group.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    invert.check_settings(config, args.clones, args.steps)  # bad settings fail before joining
    where = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in where):
        sharding.initialize(*where)
    invert.run(
        config,
        args.workdir,
        checkpoint_dir=args.checkpoint,
        identities=args.identities,
        clones=args.clones,
        steps=args.steps,
    )
