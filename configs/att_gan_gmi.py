"""GMI's attack (Zhang et al., CVPR 2020) on configs/att.py's recognizers: an identity loss and
the realism term of a discriminator trained on public photos.

  jaxmia experiment --config configs/att_gan_gmi.py --workdir runs/att-gan-gmi

GMI trains a GAN on public photos, then optimises the latent z of each clone for
``L_prior + lambda_i * L_id``: ``L_prior = -D(G(z))`` the realism of the clone by the GAN's
discriminator, ``L_id`` the target's cross-entropy by R_T, ``lambda_i = 100``. Here the GAN is
configs/att_gan_tuned.py's (the pretrained DCGAN tuned with a new discriminator on the 70
auxiliary photos, stage ``prior``), the identity loss R_T's cross-entropy and the realism term
``inversion.realism_weight * softplus(-D(x))`` (the non-saturating form of D's verdict) with
weight 0.01: GMI's 1 : 100 between the two. The optimisation around it stays
configs/att_gan.py's (PPA's initial selection of 16 latents, random shifts and flips, Adam at
0.02, the unit Gaussian penalty on z, 200 steps), so the comparison with
configs/att_gan_tuned.py is the objective alone. The realism weight is GMI's ratio, not chosen on
any split's results.

Expected time on the 2-core CPU: configs/att_gan_tuned.py's (5 min of tuning), the inversion
slower (the discriminator's forward and backward pass per clone and step: 51 image-gradients/s
against 118 for configs/att_gan_tuned.py's inversion just before it, at the same load).

**It does not help.** Measured on split seed 0 with configs/att_gan_tuned.py's tuned prior (33
people x 4 clones, 100 steps; 2026-12-08): dlib 3.8% top-1 (centroid 4.5%), faceres 6.8%,
R_E 18.2%, a face detected in 25.0% of the clones, against 8.3%, 6.8%, 20.5% and 13.6% on the
same tuned generator without the realism term and 8.3%, 7.6%, 18.9% and 45.5% on the untuned
one (their seeds: dlib 4.5%). A discriminator trained on 70 photos for 60 steps is no judge of
realism. Not run on the reported split for that reason.
"""

from common import base, pixel_overrides


def get_config():
    c = base("att_gan_tuned.py")
    c.inversion.loss = "cross_entropy"  # GMI's identity loss
    c.inversion.realism_weight = 0.01  # GMI's lambda_i = 100 on the identity loss
    # the baseline stays configs/att.py's pixel attack (its max-margin loss included)
    c.experiment.baseline_overrides = pixel_overrides(c, base("att.py"))
    return c
