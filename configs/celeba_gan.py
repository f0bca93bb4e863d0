"""configs/celeba_pretrained.py's R_T attacked through the pretrained face generator.

  jaxmia experiment --config configs/celeba_gan.py --workdir runs/celeba-gan

The clone is G(z), the DCGAN of ``gan-face-generate`` (64x64 RGB, DigiFace-1M's synthetic
faces: nobody of any data set; ``jaxmia models fetch dcgan_face``), which is R_T's input as it
is; the inversion optimises z (``inversion.prior="gan"``) with PPA's recipe as in
configs/att_gan.py. The ``baseline`` stage runs celeba_pretrained.py's pixel attack on the same
identities (``experiment.baseline_overrides``). The face judge is dlib's (faceres is R_T's
backbone).

Settings: configs/att_gan.py's (chosen on AT&T split seed 0), then on CelebA split seed 2 (the
seed-2 R_T of configs/celeba_pretrained.py, 10 people x 2 clones, jaxmia invert + evaluate;
2026-12-08) 300 steps instead of 100 and the best of 64 latents instead of 16: R_T's mean
target confidence 0.53 -> 0.80 -> 0.89, dlib top-1 30% -> 35% -> 40% (20 clones a try, so one
clone is 5 points: the choice rests on R_T's confidence, which the attacker sees). A look at 600
steps after the choice: confidence 0.95, dlib 30% (no gain by the face judge).

Measured on split seed 3 (never chosen on), shared 2-core CPU:

  jaxmia experiment --config configs/celeba_gan.py --workdir runs/celeba-gan300 \
    --config.experiment.reuse=runs/celeba-gan

(R_T, R_E and the pixel baseline taken over from the first run of this config, at 100 steps:
25 min from scratch, R_T 6 min, R_E 4; then 30 min for the GAN inversion, 19 min, and the
judges, 10 min, at load 4-7). R_T 86.8%, R_E 35.6%. Clones top-1 by dlib (nearest real photo)
over 50: 18.0% through the GAN (100 steps and 16 latents: 14.0%), 2.0% for the pixel baseline,
0.0% for the GAN's seeds, chance 0.9%; a face detected in 72% of the GAN clones. With 20 clones
a person (--config.inversion.clones=20 --config.experiment.reuse=runs/celeba-gan20, a run of the
settings before with 20 clones: 79 min, the inversion 67 of them): 20.5% over 200 clones (9.0%
with the settings before), pixels 1.0%, seeds 0.0%, a face detected in 67%.
docs/results.md#the-generator-attack has every judge and what limits it.
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
    inv.init_candidates = 64  # chosen on CelebA split seed 2 (docstring)
    inv.jitter = 2
    inv.flip = True
    # For the 2-core CPU: 5 clones per person, the pixel attack 100 steps (R_T's input is
    # resized to 224 inside faceres: 2.7 GFLOP an image-gradient, about 6 a second here), and
    # no second R_E (the paper CNN, 20 min to train); the face judge and R_E stay.
    for cfg in (c, pixels):
        cfg.inversion.clones = 5
        cfg.inversion.steps = 100
    inv.steps = 300  # chosen on CelebA split seed 2 (docstring)
    c.judges.other_arch = ""
    c.experiment.baseline_overrides = pixel_overrides(c, pixels)
    return c
