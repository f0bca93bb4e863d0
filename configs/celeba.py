"""The paper's protocol on the CelebA faces (273 people, ../shared/datasets/celeba128), 64x64 RGB.

  jaxmia experiment --config configs/celeba.py --workdir runs/celeba
  jaxmia experiment --config configs/celeba.py --workdir runs/celeba128 \\
    --config.data.image_size=(128,128)

DRAFT: the measured figures are filled in below once the run is done.
"""

from jaxmia.config import default_config

CELEBA = "../shared/datasets/celeba128"


def get_config(source: str = CELEBA):
    c = default_config()
    c.data.source = f"folder:{source}"
    c.data.channels = 3
    c.data.image_size = (64, 64)
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
