"""The paper's protocol on the CelebA faces (../shared/datasets/celeba128), 64x64 RGB.

  jaxmia experiment --config configs/celeba.py --workdir runs/celeba
  jaxmia experiment --config configs/celeba.py --workdir runs/celeba128 \\
    --config.data.image_size='(128,128)'        # the paper's size: about 4x the time, not measured

273 CelebA people (5,710 photos, 5-30 each); the 22 with fewer than 10 photos are left out with a
note. Of the other 251: 10 attacked (known to R_T and R_E, which train on disjoint halves of
their photos), 97 R_T-only, 96 R_E-only, and 48 in the public auxiliary pool (1,034 faces) the
seeds are made from; 3 test photos per person. R_T and R_E are the paper's CNN trained by the
recipe of benchmarks/train_levers.md (AdamW 1e-3, weight decay 0.05, random resized crops,
flips, colour jitter, label smoothing 0.1, 100 epochs), chosen there on split.seed 2; this
config reports on split.seed 3. The attack is configs/att.py's, chosen on AT&T and never on
these faces: 20 clones per attacked person, Adam 0.05 on the max-margin loss, a blur every 10
steps, 200 steps. R_E judges the clones (chance 1/106).

Measured on the 2-core CPU (fresh workdir, 2026-12-07; 83 min, the cores shared with other
runs for most of it: R_T 19 min, R_E 21 min, the second R_E (a ResNet, judges.other_arch) 36
min, inversion 61 s, report and every judge 5 min): R_T 42.4% and R_E 52.7% test accuracy (the
ResNet R_E 41.9%); R_T's confidence in the target 0.000 (seeds) -> 1.000 (clones); top-1 attack
accuracy by R_E 12.0% (top-5 26.0%) over the 200 clones, the seeds 0.0% (top-5 0.0%), chance
0.9%. The judges beside R_E (README; benchmarks/results/celeba_judges.json): R_E under
transforms 9.5% (4 transforms an image), the ResNet R_E 3.0%, the nearest class mean in
eigenface space 6.0%, the nearest pixel photo 0.0%; PGD controls rejected by all. R_T is below
the 50% the real-scale issue asks for: the crop recipe reached 50.2% on split.seed 2, where it
was chosen, and 42.4% here (benchmarks/train_levers.md says what held it back); the clones are
coloured patterns, not faces (benchmarks/results/celeba_grid_7231.png).

A ResNet instead of the paper CNN (slow on this CPU; see the lever table):
  --config.model.arch=resnet --config.model.widths='(16,32,64,128)' \\
  --config.model.blocks='(1,1,1,1)' --config.model.stem_kernel=3 --config.model.stem_pool=False \\
  --config.model.dropout=0.0
"""

from common import base

from jaxmia.config import default_config

CELEBA = "../shared/datasets/celeba128"


def get_config(source: str = CELEBA):
    c = default_config()
    c.data.source = f"folder:{source}"
    c.data.channels = 3
    c.data.image_size = (64, 64)
    # The central 75% of each 128x128 photo (the face, less hair and background), resized:
    # 41.8% -> 50.2% test accuracy on split.seed 2 (benchmarks/train_levers.md).
    c.data.crop = 0.75
    s = c.split
    # The training recipe was chosen on split.seed 2 (benchmarks/train_levers.py); the figures
    # are reported on a draw it was not chosen on.
    s.seed = 3
    s.num_attacked = 10
    s.test_per_identity = 3
    s.min_photos = 10
    c.model.arch = "paper"
    c.model.dropout = 0.5
    t = c.train
    t.epochs = 100
    t.batch_size = 64
    t.optimizer = "adamw"
    t.learning_rate = 1e-3
    t.weight_decay = 0.05
    t.warmup_epochs = 3
    t.crop_scale = 0.6
    t.saturation = 0.3
    t.label_smoothing = 0.1
    # The attack of configs/att.py (chosen on AT&T, never on these faces).
    att = base("att.py")
    c.inversion = att.inversion
    c.experiment = att.experiment
    return c
