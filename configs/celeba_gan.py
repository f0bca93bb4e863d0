"""configs/celeba_pretrained.py's R_T attacked through the pretrained face generator.

  jaxmia experiment --config configs/celeba_gan.py --workdir runs/celeba-gan

The clone is G(z), the DCGAN of ``gan-face-generate`` (64x64 RGB, DigiFace-1M's synthetic
faces: nobody of any data set; ``jaxmia models fetch dcgan_face``), which is R_T's input as it
is; the inversion optimises z (``inversion.prior="gan"``) with PPA's recipe as in
configs/att_gan.py. The ``baseline`` stage runs celeba_pretrained.py's pixel attack on the same
identities (``experiment.baseline_overrides``). The face judge is dlib's (faceres is R_T's
backbone).

Measured on the shared 2-core CPU (2026-12-07, load 4-8), split seed 3 (never chosen on; the
settings are configs/att_gan.py's, chosen on AT&T split seed 0): 25 min from scratch at 5 clones
(R_T 6 min, R_E 4, each attack 3-4, the judges 8), then 47 min more for 20 clones
(--config.inversion.clones=20 --config.experiment.reuse=runs/celeba-gan). R_T 86.8%, R_E 35.6%.
Clones top-1 by dlib (nearest real photo) over 200: 9.0% through the GAN, 1.0% for the pixel
baseline, 4.0% for the GAN's seeds, chance 0.9%; a face detected in 69% of the GAN clones. With
5 clones: 14.0% / 2.0%. docs/results.md#the-generator-attack has every judge and what limits it.
"""

from common import base, pixel_overrides


def get_config():
    pixels = base("celeba_pretrained.py")
    c = base("celeba_pretrained.py")
    inv = c.inversion
    inv.prior = "gan"
    inv.denoise = "none"
    inv.learning_rate = 0.02
    inv.coef_weight = 1.0
    inv.init_candidates = 16
    inv.jitter = 2
    inv.flip = True
    # For the 2-core CPU: 5 clones of 100 steps per person for both attacks (R_T's input is
    # resized to 224 inside faceres: 2.7 GFLOP an image-gradient, about 6 a second here), and
    # no second R_E (the paper CNN, 20 min to train); the face judge and R_E stay.
    for cfg in (c, pixels):
        cfg.inversion.clones = 5
        cfg.inversion.steps = 100
    c.judges.other_arch = ""
    c.experiment.baseline_overrides = pixel_overrides(c, pixels)
    return c
