"""configs/att.py's attack in the codes of a generator prior, beside the pixel attack.

  jaxmia experiment --config configs/att_prior.py --workdir runs/att-prior

The setting benchmarks/prior_levers.md chose on AT&T split seed 0 by the judges beside R_E:
the clone is a VAE's decoded code plus a pixel residual (penalised by its mean square, weight
1, and blurred as the pixel attack's clones are). The experiment's ``prior`` stage trains the VAE
(config ``prior``: 100 epochs) on the auxiliary pool only, the 70 faces of the 7 people that
neither R_T nor R_E knows; the ``baseline`` stage runs configs/att.py's pixel attack from the
same seeds, and the report judges both: report/comparison.{json,csv} and
report/prior_vs_pixels.png (the same identities and seeds side by side).

Measured on the 2-core CPU (split seed 2, no setting chosen on it; R_T, R_E and the second R_E
those of configs/att.py's run, so new stage time 23 min on cores shared with 2-3 runs: VAE 3
min, inversion 13, pixel baseline 4, report 3; about 30 min from scratch): top-1 by R_E 45.5%
against 39.4% for the pixel attack, the robust judges' mean 52.9% against 53.0%, the Fréchet
distance 52.9 against 52.2, over 660 clones each (benchmarks/prior_levers.md): the prior gains by
R_E and nothing by the judges beside it.
"""

from common import base


def get_config():
    c = base("att.py")
    c.inversion.prior = "generator"
    c.inversion.prior_residual = True
    c.inversion.residual_weight = 1.0
    return c
