"""``jaxmia prior``: the generator prior trained on the auxiliary pool of a recognizer: a VAE, or
the pretrained face GAN tuned with a new discriminator (``inversion.prior="gan"``).

jaxmia prior --checkpoint RUN/target --workdir PRIOR
jaxmia invert ... --config.inversion.prior=generator --config.inversion.prior_checkpoint=PRIOR
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.stages import prior as prior_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="recognizer folder (R_T, from jaxmia train) whose auxiliary identities make the pool",
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    prior_lib.run(config, args.workdir, checkpoint_dir=args.checkpoint)
