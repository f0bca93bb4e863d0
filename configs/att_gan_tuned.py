"""configs/att_gan.py's attack through the face generator tuned on the public photos first.

  jaxmia experiment --config configs/att_gan_tuned.py --workdir runs/att-gan-tuned

GMI (Zhang et al., CVPR 2020) trains its GAN on public photos of the target's domain, and
PPDG-MI (Peng et al. 2024) tunes a pretrained one towards them; PPA (Struppek et al., ICML 2022)
attacks through a pretrained generator as it is (configs/att_gan.py). Here the experiment's
``prior`` stage (``prior.tune_gan``) fine-tunes the DCGAN of ``gan-face-generate`` together with
a new DCGAN discriminator on the auxiliary pool only, the 70 photos of the 7 people neither R_T
nor R_E knows (jaxmia/attacks/gan_tuning.py: the non-saturating GAN loss, Adam 2e-4 with beta1
0.5, ``prior.gan_steps`` steps of ``prior.batch_size`` photos, the discriminator judging G's
faces turned grey at R_T's input), so that G makes grey studio faces like AT&T's rather than
DigiFace-1M's coloured renders. The inversion is then configs/att_gan.py's (PPA's recipe) on
the tuned G. WORKDIR/prior/samples.png shows G of the same latents before and after tuning.

The tuning's settings are the DCGAN's own and a step count sized for a CPU, not chosen on any
split's results. Expected time on the 2-core CPU: the tuning alone took 15 min (907 s for 200
steps of 32 photos, on split seed 0, the cores shared with other jobs: load ~10), the rest as
configs/att_gan.py. Not yet a good prior: on split seed 0 these settings turned G's faces into
grey blobs with checkerboard textures (samples.png); at gan_learning_rate 2e-5 for 60 steps the
faces survive but gain faint grid textures. The tuning's settings are still to be chosen.
"""

from common import base


def get_config():
    c = base("att_gan.py")
    c.prior.tune_gan = True
    c.prior.gan_steps = 200
    c.prior.batch_size = 32
    c.prior.flip = True
    return c
