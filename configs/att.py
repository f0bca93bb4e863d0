"""The README's main command: the paper's protocol on the embedded AT&T faces, 64x64 grey.

  jaxmia experiment --config configs/att.py --workdir runs/att

As many attacked identities as the split allows: 33 of the 40 people are known to both R_T and
R_E, which train on different photos of them (2 test photos per person, the other 8 split 4 and
4), and the other 7 are the auxiliary pool (70 faces) the seeds are made from. R_T is inverted
into 20 clones per attacked identity, each from the mean of its own 35 auxiliary faces, by the
best attack of benchmarks/attack_levers.md: Adam at 0.05 on the max-margin loss (R_T's target
logit over the runner-up, flat beyond 20), with a Gaussian blur (sigma 1 pixel) after the first
step and every 10th, 200 steps. R_E then judges the clones (chance: 1/33).

Chosen on one split, reported on another: the attack's settings were picked on split.seed 0
(benchmarks/attack_levers.md, and compared on seed 1); this config draws split.seed 2, which no
setting was chosen or compared on. Measured on the 2-core CPU (fresh workdir, 10 min with every
stage, the cores shared with another run: training R_T and R_E 96 s, inversion 205 s, the second
R_E 165 s, report and judges 137 s): top-1 attack accuracy by R_E 39.4% (top-5 75.2%) over the
660 clones, the seeds 1.7% (top-5 15.0%), chance 3.0%; R_T 97.0% and R_E 97.0% test accuracy.
On split.seed 0, the split the settings were chosen on (--config.split.seed=0), the code of 2
December gave 49.4% (top-5 88.2%): choosing and reporting on one split flatters a figure. The
clones are not photographs: R_E recognises them, a person mostly would not (see the report's
grids), and R_E is R_T's twin architecture.

The judges beside R_E (README, "Judges beside R_E"; benchmarks/results/att_judges.json), same
run: the clones' top-1 is 55.8% by the nearest eigenface photo, 59.4% by the nearest class mean,
55.5% by the nearest pixel photo, 41.4% by R_E under transforms (4 an image), but 13.0% by a
ResNet R_E (89.4% on held-out real photos); PGD controls that R_T accepts (97.0%) are rejected
by every judge (<= 6.1%). The judges took 39 s of the 808 s the stages took (runs/att-now).

The paper's own settings (least squares, SGD 0.1, 600 steps, 5 attacked identities at
128x128 RGB) are configs/paper.py. The same attack with the paper's 5 attacked identities:
  jaxmia experiment --config configs/att.py --workdir runs/att-k5 --config.split.num_attacked=5 \\
    --config.split.num_target_only=-1 --config.split.num_evaluation_only=-1 \\
    --config.split.num_aux=-1 --config.split.test_per_identity=5
"""

from jaxmia.config import default_config


def get_config():
    c = default_config()
    s = c.split
    # The attack below was chosen on split.seed 0 (benchmarks/attack_levers.md, also compared on
    # seed 1); its figures are reported on a draw no setting was chosen or compared on.
    s.seed = 2
    s.num_attacked = 33
    s.num_target_only = 0
    s.num_evaluation_only = 0
    s.num_aux = 7
    s.test_per_identity = 2
    inv = c.inversion
    inv.clones = 20
    inv.steps = 200
    inv.seed = "subset_mean"
    inv.loss = "max_margin"
    inv.margin = 20.0
    inv.optimizer = "adam"
    inv.learning_rate = 0.05
    inv.denoise = "gaussian"
    inv.denoise_sigma = 1.0
    inv.denoise_every = 10
    c.experiment.restarts = 1
    return c
