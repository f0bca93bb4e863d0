"""The tuned GAN prior: the discriminator, a tuning step against a hand-written one, the
checkpoint, and GMI's realism term in the inversion's program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from attacks.test_inversion import TINY  # a 16x16 grey R_T
from attacks.test_priors import reference  # the per-clone loop the engine must equal
from flax import nnx

from jaxmia import checkpoint, transforms
from jaxmia.attacks import gan_tuning, priors
from jaxmia.attacks import inversion as inv
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dcgan
from jaxmia.recognizers import models

SHAPE = (16, 16, 1)  # TINY's input: what D judges
D_CFG = gan_tuning.DiscriminatorConfig(SHAPE)
# A GMI-style objective: the realism term beside the identity loss (no checkpoint is read here).
GMI = inv.InversionConfig(
    prior="gan", prior_checkpoint="tuned", loss="cross_entropy", optimizer="adam",
    learning_rate=0.1, coef_weight=0.1, realism_weight=0.5, jitter=1, flip=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def gan():
    """A randomly initialised G (the architecture is what matters here) and a D for TINY."""
    g = dcgan.DCGANGenerator(rngs=nnx.Rngs(3))
    # a last layer strong enough that G's faces vary with z (images' std 0.15, not 0.0006)
    g.convs[-1].kernel.set_value(g.convs[-1].kernel[...] * 300)
    # non-trivial running averages, so eval and train mode differ
    for i, norm in enumerate(g.norms):
        norm.mean.set_value(jnp.full(norm.mean.shape, 0.01 * i))
        norm.var.set_value(jnp.full(norm.var.shape, 1.5))
    d = gan_tuning.Discriminator(D_CFG, rngs=nnx.Rngs(4))
    # and a D whose verdict matters beside R_T's loss (logits ~0.2, not ~2e-4)
    d.head.kernel.set_value(d.head.kernel[...] * 1000)
    return g, d


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = models.init(TINY, jax.random.key(0))
    return inv.recognizer_apply(graphdef), params


def test_discriminator_is_dcgans():
    d = gan_tuning.Discriminator(gan_tuning.DiscriminatorConfig((64, 64, 1)), rngs=nnx.Rngs(0))
    kernels = [c.kernel[...].shape for c in d.convs]
    assert kernels == [(4, 4, 1, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512)]
    assert d.head.kernel[...].shape == (4 * 4 * 512, 1)  # DCGAN's last 4x4 valid convolution
    assert d(jnp.zeros((3, 64, 64, 1))).shape == (3,)
    rgb = gan_tuning.Discriminator(gan_tuning.DiscriminatorConfig((32, 48, 3)), rngs=nnx.Rngs(0))
    assert rgb(jnp.zeros((2, 32, 48, 3))).shape == (2,)
    assert rgb.head.kernel[...].shape == (2 * 3 * 512, 1)
    with pytest.raises(JaxmiaError, match=r"shape \(24, 24, 1\).*divisible by 16"):
        gan_tuning.DiscriminatorConfig((24, 24, 1))


def test_the_phase_transposed_convolution_is_the_generators(gan):
    g, _ = gan
    z = jax.random.normal(jax.random.key(0), (3, dcgan.LATENT))
    # to float32 rounding, which the fixture's last layer (x 300 before tanh) magnifies
    np.testing.assert_allclose(gan_tuning.generate_fast(g, z), g(z), atol=1e-3)
    train = nnx.view(g, use_running_average=False)  # batch statistics: other images
    assert float(jnp.abs(train(z) - g(z)).max()) > 0.1
    np.testing.assert_allclose(gan_tuning.generate_fast(train, z), train(z), atol=1e-3)


def _reference_step(g, d, real, key, lr):
    """One DCGAN iteration written plainly (G's own forward, SGD at ``lr``): D's loss before
    and after its step, and the gradients of D's and of G's step."""
    k_z, k_flip = jax.random.split(key)
    real = jax.vmap(transforms.random_flip)(real, jax.random.split(k_flip, len(real)))
    z = jax.random.normal(k_z, (len(real), dcgan.LATENT))
    g = nnx.view(nnx.clone(g), use_running_average=False)  # its statistics change below
    g_def, g_params, g_stats = nnx.split(g, nnx.Param, nnx.BatchStat)
    d_def, d_params = nnx.split(d)
    model = nnx.merge(g_def, g_params, g_stats)
    fake = priors.to_recognizer(model(z), SHAPE)
    new_stats = nnx.state(model, nnx.BatchStat)

    def d_loss(p):
        dm = nnx.merge(d_def, p)
        return jnp.mean(jax.nn.softplus(-dm(real))) + jnp.mean(jax.nn.softplus(dm(fake)))

    before, d_grad = jax.value_and_grad(d_loss)(d_params)
    d_params = jax.tree.map(lambda p, g: p - lr * g, d_params, d_grad)

    def g_loss(p, stats):  # the statistics as an argument: nnx updates them in this trace
        image = priors.to_recognizer(nnx.merge(g_def, p, stats)(z), SHAPE)
        return jnp.mean(jax.nn.softplus(-nnx.merge(d_def, d_params)(image)))

    g_grad = jax.grad(g_loss, argnums=(0, 1))(g_params, g_stats)[0]
    return before, d_loss(d_params), d_grad, g_grad, new_stats


def _close(got, want, scale):
    """Trees equal to float32 rounding relative to ``scale``, their largest entry."""
    top = max(float(jnp.abs(v).max()) for v in jax.tree.leaves(want)) * scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=top), got, want)


@pytest.mark.slow
def test_a_tuning_step_is_dcgans_and_its_gradient_lowers_ds_loss(gan):
    """With SGD (the step takes its optimizer) the parameters move by the reference's gradients
    (Adam's first step, +-lr per weight, would hide them)."""
    g, d = gan
    real = jnp.asarray(np.random.default_rng(0).random((2, *SHAPE)) * 0.2 + 0.7, jnp.float32)
    key, lr = jax.random.key(5), 0.01
    g_def, d_def, state = gan_tuning.init(g, D_CFG, jax.random.key(4), 2e-4)
    state = state._replace(d_params=nnx.state(d))  # the fixture's D, as the reference's
    tx = optax.sgd(lr)
    state = state._replace(g_opt=tx.init(state.g_params), d_opt=tx.init(state.d_params))
    new, metrics = gan_tuning.train_step(g_def, d_def, state, real, key, tx=tx, flip=True)
    before, after, d_grad, g_grad, g_stats = _reference_step(g, d, real, key, lr)
    np.testing.assert_allclose(metrics[0], before, rtol=1e-5)
    del after  # at lr 0.01 (what makes the moves readable) D's logits ~x1000 may overshoot
    # D's gradient points downhill: a small step along it lowers D's loss on this batch
    assert _reference_step(g, d, real, key, 1e-6)[1] < before
    moved = lambda new, old: jax.tree.map(lambda a, b: (b - a) / lr, new, old)  # noqa: E731
    _close(moved(new.d_params, state.d_params), d_grad, 1e-3)
    _close(moved(new.g_params, state.g_params), g_grad, 1e-3)
    _close(new.g_stats, g_stats, 1e-5)
    # G's running averages moved towards the batch's statistics
    pairs = zip(jax.tree.leaves(new.g_stats), jax.tree.leaves(state.g_stats), strict=True)
    assert max(float(jnp.abs(a - b).max()) for a, b in pairs) > 1e-3


@pytest.mark.slow
def test_tuning_is_keyed_and_leaves_the_generator_in_eval_mode(gan):
    g, _ = gan
    pool = np.random.default_rng(1).random((6, *SHAPE)).astype(np.float32)
    cfg = gan_tuning.TuneConfig(gan_steps=2)
    run = lambda k: gan_tuning.tune(g, pool, cfg, batch_size=4, flip=True, key=k)  # noqa: E731
    (t1, history), (t2, _), (t3, _) = (
        run(jax.random.key(0)),
        run(jax.random.key(0)),
        run(jax.random.key(1)),
    )
    assert [h["step"] for h in history] == [1, 2]
    z = jax.random.normal(jax.random.key(9), (2, dcgan.LATENT))
    np.testing.assert_array_equal(t1.generator(z), t2.generator(z))
    assert not np.allclose(t1.generator(z), t3.generator(z))
    assert all(n.use_running_average for n in t1.generator.norms)
    assert not np.allclose(t1.generator(z), g(z))  # tuned
    with pytest.raises(JaxmiaError, match="prior.gan_steps=0: expected >= 1"):
        gan_tuning.TuneConfig(gan_steps=0)


def test_checkpoint_round_trip_and_other_generators_refused(gan, tmp_path):
    g, d = gan
    checkpoint.save_gan(tmp_path / "gan", 7, g, d, {"note": "x"})
    loaded = checkpoint.load_gan(tmp_path / "gan")
    assert loaded.step == 7 and loaded.meta["note"] == "x"
    assert loaded.meta["gan"]["latent"] == 100 and loaded.meta["gan"]["image_size"] == 64
    assert loaded.discriminator.config == D_CFG
    for a, b in ((loaded.generator, g), (loaded.discriminator, d)):
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a)),
                     nnx.to_pure_dict(nnx.state(b)))  # fmt: skip
    z = jax.random.normal(jax.random.key(0), (2, dcgan.LATENT))
    np.testing.assert_array_equal(loaded.generator(z), g(z))  # eval mode, as saved

    other = dcgan.DCGANGenerator(rngs=nnx.Rngs(0))
    other.convs[0] = dcgan.ConvTranspose(128, 512, 1, 0, rngs=nnx.Rngs(0))  # latents of 128
    checkpoint.save_gan(tmp_path / "z128", 1, other, d, {})
    with pytest.raises(JaxmiaError, match="latents of size 128 .* expected .* 100") as e:
        checkpoint.load_gan(tmp_path / "z128")
    assert "\n" not in str(e.value)
    _, params = models.init(TINY, jax.random.key(0))
    checkpoint.save_recognizer(tmp_path / "rt", params, TINY, ("a", "b", "c"))
    with pytest.raises(JaxmiaError, match="lacks a tuned GAN's description"):
        checkpoint.load_gan(tmp_path / "rt")


def test_the_realism_term_is_weight_times_softplus_of_minus_d(gan, tiny):
    g, d = gan
    apply_fn, params = tiny
    prior = priors.gan_prior(g, SHAPE, d)
    z = jax.random.normal(jax.random.key(2), (dcgan.LATENT,))
    label = jnp.int32(1)
    args = (apply_fn, params, {"coef": z}, None, label, prior.decoder, prior.params)
    with_d, _ = inv.objective(GMI, *args)
    without, _ = inv.objective(GMI.__class__(**{**GMI.__dict__, "realism_weight": 0.0}), *args)
    # by hand: G's image turned grey and shrunk as the recognizer sees it, D's logit, log1p(e^-l)
    x = np.clip(np.asarray(priors.to_recognizer(g(z[None]), SHAPE)), 0, 1)
    logit = float(d(jnp.asarray(x))[0])
    np.testing.assert_allclose(with_d - without, 0.5 * np.log1p(np.exp(-logit)), rtol=1e-5)


@pytest.mark.slow
def test_vmapped_realism_equals_reference_loop(gan, tiny):
    g, d = gan
    apply_fn, params = tiny
    prior = priors.gan_prior(g, SHAPE, d)
    seeds, labels = jnp.zeros((2, *SHAPE)), jnp.arange(2)
    keys = jax.random.split(jax.random.key(1), 2)
    got = inv.invert_batch(apply_fn, params, seeds, labels, keys, GMI, 3, prior=prior)
    plain = GMI.__class__(**{**GMI.__dict__, "realism_weight": 0.0})
    without = inv.invert_batch(apply_fn, params, seeds, labels, keys, plain, 3, prior=prior)
    for i in range(2):
        want = reference(GMI, apply_fn, params, prior, seeds[i], keys[i], labels[i], 3)
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
    assert float(np.abs(got.clones - without.clones).max()) > 1e-4  # the term moved the clones


def test_a_realism_weight_without_a_discriminator_is_refused(gan, tiny):
    g, _ = gan
    apply_fn, params = tiny
    with pytest.raises(JaxmiaError, match="realism_weight=0.5 needs a discriminator"):
        inv.InversionConfig(prior="linear", realism_weight=0.5)
    with pytest.raises(JaxmiaError, match="realism_weight=0.5 needs a discriminator"):
        inv.InversionConfig(prior="gan", realism_weight=0.5)  # no tuned GAN to read D from
    bare = priors.gan_prior(g, SHAPE)  # the pretrained G alone
    with pytest.raises(JaxmiaError, match="the prior has no discriminator"):
        inv.invert_batch(apply_fn, params, jnp.zeros((1, *SHAPE)), jnp.zeros(1, jnp.int32),
                         jax.random.split(jax.random.key(0), 1), GMI, 1, prior=bare)  # fmt: skip
    other = gan_tuning.Discriminator(gan_tuning.DiscriminatorConfig((32, 32, 1)), rngs=nnx.Rngs(0))
    with pytest.raises(JaxmiaError, match=r"judges images of shape \(32, 32, 1\)"):
        priors.gan_prior(g, SHAPE, other)
