"""configs/att_gan.py's attack through the face generator tuned on the public photos first.

  jaxmia experiment --config configs/att_gan_tuned.py --workdir runs/att-gan-tuned

GMI (Zhang et al., CVPR 2020) trains its GAN on public photos of the target's domain, and
PPDG-MI (Peng et al. 2024) tunes a pretrained one towards them; PPA (Struppek et al., ICML 2022)
attacks through a pretrained generator as it is (configs/att_gan.py). Here the experiment's
``prior`` stage (``prior.tune_gan``) fine-tunes the DCGAN of ``gan-face-generate`` together with
a new DCGAN discriminator on the auxiliary pool only, the 70 photos of the 7 people neither R_T
nor R_E knows (jaxmia/attacks/gan_tuning.py: the non-saturating GAN loss, Adam with beta1 0.5 at
``prior.gan_learning_rate``, ``prior.gan_steps`` steps of ``prior.batch_size`` photos, the
discriminator judging G's faces turned grey at R_T's input), so that G makes grey studio faces
like AT&T's rather than DigiFace-1M's coloured renders. The inversion is then
configs/att_gan.py's (PPA's recipe) on the tuned G. WORKDIR/prior/samples.png shows G of the
same latents before and after tuning.

The tuning's recipe was chosen on split seed 0 by looking at WORKDIR/prior/samples.png: the
DCGAN's own Adam 2e-4 for 200 steps turned G's faces into grey blobs with checkerboard textures,
2e-5 for 60 steps keeps faces (with faint grid textures and glasses the pool's people wear):
4 min 47 s of tuning on the 2-core CPU (load ~10), the rest as configs/att_gan.py.

**It does not help.** Measured on split seed 0 (33 people x 4 clones, 100 steps; `jaxmia invert`
with ``--config.inversion.prior_checkpoint`` the tuned prior's folder, then `jaxmia evaluate`;
2026-12-08, load 4-6): dlib 8.3% top-1 (centroid 8.3%), faceres 6.8%, R_E 20.5%, a face
detected in 13.6% of the clones (27.3% of their seeds), against the untuned generator's 8.3%
(9.1%), 7.6%, 18.9% and 45.5% (59.1%) with the same settings: the same leak by the face judges
and fewer faces. 70 grey photos of 7 people are too few to move a face generator towards AT&T's
studio photos without damaging it. So configs/att_gan.py keeps the pretrained generator as it is.
docs/results.md#the-generator-attack has the table.
"""

from common import base


def get_config():
    c = base("att_gan.py")
    c.prior.tune_gan = True
    c.prior.gan_steps = 60
    c.prior.gan_learning_rate = 2e-5
    c.prior.batch_size = 32
    c.prior.flip = True
    return c
