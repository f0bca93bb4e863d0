"""configs/celeba.py's attack in the codes of a generator prior, beside the pixel attack.

  jaxmia experiment --config configs/celeba_prior.py --workdir runs/celeba-prior

The setting of configs/att_prior.py (chosen on AT&T split seed 0, never on these faces): a VAE
code plus a blurred pixel residual of weight 1. The ``prior`` stage trains the VAE for 40 epochs
on the auxiliary pool, the 1,034 faces of the 48 people neither R_T nor R_E knows; the
``baseline`` stage runs configs/celeba.py's pixel attack from the same seeds; the report judges
both (report/comparison.{json,csv}, report/prior_vs_pixels.png).

Measured on the 2-core CPU (split seed 3; R_T, R_E and the second R_E those of
configs/celeba.py's run, so new stage time 20 min on shared cores: VAE 12 min, inversion 4,
pixel baseline 2, report 3; about 1.8 h from scratch): top-1 by R_E 3.5% against 12.0% for the
pixel attack, the robust judges' mean 9.8% against 4.0% (nearest pixel photo 14.0% against 0.0%),
the Fréchet distance 295 against 321, over 200 clones each (benchmarks/prior_levers.md): the
clones move towards faces and away from what R_T's CNN twin recognises.
"""

from common import base


def get_config():
    c = base("celeba.py")
    c.inversion.prior = "generator"
    c.inversion.prior_residual = True
    c.inversion.residual_weight = 1.0
    c.prior.epochs = 40  # 6.5 min on 2 cores; the loss flattens by then
    return c
