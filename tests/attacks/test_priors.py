"""The face priors: the linear prior's fit against NumPy, its clones against a per-clone loop,
its span; the generator prior's clones against a per-clone loop and its one compilation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from attacks.test_inversion import TINY, TINY_RESNET  # the pixel attack tests' tiny R_Ts
from flax import nnx

from jaxmia import checkpoint, cli
from jaxmia.attacks import generator, priors
from jaxmia.attacks import inversion as inv
from jaxmia.data import synthetic
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models


@pytest.fixture(scope="module")
def pool():
    images, _, _ = synthetic.make_faces(6, 5, (16, 16), 1, seed=3)
    return np.asarray(images, np.float32)  # [30, 16, 16, 1]


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = models.init(TINY, jax.random.key(0))
    return inv.recognizer_apply(graphdef), params


def test_fit_linear_against_numpy(pool):
    k = 8
    fitted = priors.fit_linear(pool, k)
    rows = pool.reshape(len(pool), -1).astype(np.float64)
    centred = rows - rows.mean(0)
    # The basis spans the pool's top-k principal directions: NumPy's covariance eigenvectors.
    w, v = np.linalg.eigh(centred.T @ centred / (len(pool) - 1))
    top = v[:, ::-1][:, :k]  # [d, k]
    basis = np.asarray(fitted.basis, np.float64).reshape(k, -1)
    np.testing.assert_allclose(np.linalg.norm(basis, axis=1) ** 2, w[::-1][:k], rtol=1e-3)
    np.testing.assert_allclose(np.abs(top.T @ (basis / np.linalg.norm(basis, axis=1)[:, None]).T),
                               np.eye(k), atol=1e-3)  # fmt: skip
    # The pool's own faces have coefficients of zero mean and unit variance along each component.
    coef = np.stack([priors.LINEAR.encode(fitted, jnp.asarray(f), None) for f in pool])  # [m, k]
    np.testing.assert_allclose(coef.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(coef.var(0, ddof=1), 1, rtol=1e-3)


def test_every_component_reproduces_each_pool_face(pool):
    fitted = priors.fit_linear(pool, len(pool) - 1)  # m faces span m - 1 directions
    for face in pool[:3]:
        coef = priors.LINEAR.encode(fitted, jnp.asarray(face), None)
        back = priors.image(priors.LINEAR, fitted, {"coef": coef})
        np.testing.assert_allclose(back, face, atol=1e-4)


@pytest.mark.parametrize("components", [0, 30])
def test_too_many_components_for_the_pool(pool, components):
    with pytest.raises(JaxmiaError, match="the auxiliary pool has 30 faces, so expected 1 .. 29"):
        priors.fit_linear(pool, components)


def reference(cfg, apply_fn, params, prior, seed, key, label, steps):
    """A plain per-clone loop of the linear prior (fixed steps): the final image."""
    opt = inv.make_optimizer(cfg)
    w = priors.start(prior.decoder, prior.params, seed, key, cfg.prior_residual)
    state = opt.init(w)
    grad_fn = jax.jit(
        jax.grad(
            lambda v, k: inv.objective(
                cfg, apply_fn, params, v, k, label, prior.decoder, prior.params
            )[0]
        )
    )
    for t in range(steps):
        updates, state = opt.update(grad_fn(w, jax.random.fold_in(key, t)), state, w)
        w = optax.apply_updates(w, updates)
        if cfg.denoise == "gaussian" and t % cfg.denoise_every == 0:
            w = {**w, "pixels": inv.gaussian_filter(w["pixels"], cfg.denoise_sigma)}
    return priors.image(prior.decoder, prior.params, w)


@pytest.mark.parametrize(
    "cfg",
    [
        inv.InversionConfig(prior="linear", loss="max_margin", optimizer="adam",
                            learning_rate=0.1, margin=0.5, coef_weight=0.1),
        inv.InversionConfig(prior="linear", prior_residual=True, residual_weight=1.0,
                            loss="cross_entropy", optimizer="adam", learning_rate=0.05,
                            denoise="gaussian", denoise_every=2, jitter=1, flip=True),
    ],
    ids=["coefficients", "residual-levers"],
)  # fmt: skip
@pytest.mark.slow
def test_vmapped_linear_prior_equals_reference_loop(tiny, pool, cfg):
    apply_fn, params = tiny
    prior = priors.Prior(priors.LINEAR, priors.fit_linear(pool, 8))
    seeds = jnp.asarray(pool[:3].mean(0, keepdims=True).repeat(3, 0) * 0.9)
    labels, keys = jnp.arange(3), jax.random.split(jax.random.key(1), 3)
    got = inv.invert_batch(apply_fn, params, seeds, labels, keys, cfg, 6, prior=prior)
    first = priors.start(prior.decoder, prior.params, seeds[0], keys[0], False)
    start = priors.image(prior.decoder, prior.params, first)  # the seeds' projection
    moved = 0.0
    for i in range(3):
        want = reference(cfg, apply_fn, params, prior, seeds[i], keys[i], labels[i], 6)
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
        moved = max(moved, float(jnp.abs(want - start).max()))
    assert moved > 1e-3  # the clones moved from their start


GEN = generator.GeneratorConfig(image_size=(16, 16), channels=1, latent_dim=8, widths=(8, 16))


GEN_CODES = inv.InversionConfig(
    prior="generator",
    prior_checkpoint="-",
    loss="max_margin",
    optimizer="adam",
    learning_rate=0.1,
    margin=0.5,
    coef_weight=0.1,
)
GEN_LEVERS = inv.InversionConfig(
    prior="generator",
    prior_checkpoint="-",
    prior_residual=True,
    residual_weight=1.0,
    loss="cross_entropy",
    optimizer="adam",
    learning_rate=0.05,
    denoise="gaussian",
    denoise_every=2,
    jitter=1,
)


@pytest.mark.slow
def test_vmapped_generator_prior_equals_reference_loop(tiny, pool):
    """An (untrained) VAE's decoder as the prior, with a residual, blur and jitter: clones
    vmapped as one by one (the codes' penalty takes the linear prior's tested path)."""
    apply_fn, params, cfg = *tiny, GEN_LEVERS
    prior = priors.generator_prior(GEN, generator.init(GEN, jax.random.key(4))[1])
    seeds = jnp.asarray(pool[:2])
    labels, keys = jnp.arange(2), jax.random.split(jax.random.key(1), 2)
    got = inv.invert_batch(apply_fn, params, seeds, labels, keys, cfg, 6, prior=prior)
    for i in range(2):
        want = reference(cfg, apply_fn, params, prior, seeds[i], keys[i], labels[i], 6)
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
        code = generator.encode_mean(GEN, prior.params, seeds[i])  # the start: the seed's code
        start = generator.decode(GEN, prior.params, code)
        assert float(jnp.abs(want - start).max()) > 1e-3  # the clone moved from its start


@pytest.mark.slow
def test_one_generator_architecture_compiles_one_program(tiny, pool):
    """Equal generator configs give the same decoder; other weights compile nothing new."""
    apply_fn, params = tiny
    assert priors.generator_decoder(GEN) is priors.generator_decoder(
        generator.GeneratorConfig(**GEN.to_dict())
    )
    seeds, labels = jnp.asarray(pool[:2]), jnp.arange(2)
    keys = jax.random.split(jax.random.key(0), 2)
    program = inv.make_program(apply_fn, GEN_CODES, priors.generator_decoder(GEN))
    compiled = []
    for seed in (5, 6):
        prior = priors.generator_prior(GEN, generator.init(GEN, jax.random.key(seed))[1])
        inv.invert_batch(apply_fn, params, seeds, labels, keys, GEN_CODES, 2, prior=prior)
        compiled.append(dict(program.compiled))
    assert compiled[0] == compiled[1] and len(compiled[1]) == 4  # init, steps, decode, evaluate


def _outside_span(fitted: priors.LinearParams, images: np.ndarray) -> np.ndarray:
    """Each image's share of its energy about the pool mean outside the basis' span. # [n]"""
    k = fitted.basis.shape[0]
    q, _ = np.linalg.qr(np.asarray(fitted.basis, np.float64).reshape(k, -1).T)  # [d, k]
    d = images.reshape(len(images), -1) - np.asarray(fitted.mean, np.float64).reshape(1, -1)
    rest = d - (d @ q) @ q.T
    return (rest**2).sum(1) / (d**2).sum(1)


@pytest.mark.slow
def test_linear_clones_lie_in_the_pool_span_and_pixel_clones_do_not(tiny, pool):
    apply_fn, params = tiny
    fitted = priors.fit_linear(pool, 8)
    seeds = jnp.asarray(np.repeat(pool[:10].mean(0, keepdims=True), 6, 0))
    labels, keys = jnp.arange(6) % 3, jax.random.split(jax.random.key(2), 6)
    base = dict(loss="max_margin", optimizer="adam", learning_rate=0.05, margin=2.0)
    linear = inv.invert_batch(
        apply_fn, params, seeds, labels, keys, inv.InversionConfig(prior="linear", **base), 30,
        prior=priors.Prior(priors.LINEAR, fitted),
    )  # fmt: skip
    pixels = inv.invert_batch(
        apply_fn, params, seeds, labels, keys, inv.InversionConfig(**base), 30
    )
    # Clipping to [0, 1] is the only way out of the span; these clones stay inside the range.
    assert np.all(_outside_span(fitted, linear.clones) < 1e-3)
    assert np.all(_outside_span(fitted, pixels.clones) > 0.1)
    assert np.abs(linear.clones - seeds).max() > 0.05  # and they did move


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prior="vae"), "inversion.prior='vae'"),
        (dict(prior="generator"), "expected inversion.prior_checkpoint=DIR"),
        (dict(prior="linear", prior_components=0), "inversion.prior_components=0"),
        (dict(prior="linear", denoise="gaussian"), "inversion.prior_residual=True"),
        (dict(prior="linear", coef_weight=-1.0), "inversion.coef_weight=-1.0"),
        (dict(prior="linear", residual_weight=float("inf")), "inversion.residual_weight=inf"),
    ],
)
def test_bad_prior_settings(kwargs, words):
    with pytest.raises(JaxmiaError, match=words.replace("(", r"\(").replace("[", r"\[")):
        inv.InversionConfig(**kwargs)


def test_a_prior_config_needs_its_fitted_prior(tiny):
    apply_fn, params = tiny
    x = jnp.full((1, 16, 16, 1), 0.5)
    with pytest.raises(JaxmiaError, match="expected its fitted prior, got none"):
        inv.invert_batch(apply_fn, params, x, jnp.zeros(1, jnp.int32),
                         jax.random.split(jax.random.key(0), 1),
                         inv.InversionConfig(prior="linear"), 2)  # fmt: skip


def test_jaxmia_invert_with_the_linear_prior(tmp_path):
    """The command fits the prior on the checkpoint's auxiliary faces and records it."""
    names = ("synthetic_0000", "synthetic_0001", "synthetic_0002")
    # the pool fixture's shape (6 x 5 faces): the renderer compiled for it already
    synth = {"num_identities": 6, "images_per_identity": 5, "seed": 7}
    aux = ["synthetic_0004", "synthetic_0005"]
    meta = {
        "data": {"source": "synthetic", "synthetic": synth},
        "split": {"attacked": ["synthetic_0002"], "aux_identities": aux},
    }
    _, params = models.init(TINY, jax.random.key(0))
    path = str(tmp_path / "rt")
    checkpoint.save_recognizer(path, params, TINY, names, meta)
    out = tmp_path / "out"
    argv = ["invert", "--checkpoint", path, "--workdir", str(out), "--clones", "2", "--steps", "3"]
    argv += [f"--config.data.cache_dir={tmp_path}", "--config.inversion.seed_subset_size=4"]
    argv += ["--config.inversion.prior=linear", "--config.inversion.prior_components=5"]
    assert cli.main(argv) == 0
    with np.load(out / "inversions.npz") as z:
        clones = z["clones"].reshape(2, -1)
    images, labels, _ = synthetic.make_faces(6, 5, (16, 16), 1, seed=7)
    fitted = priors.fit_linear(images[labels >= 4], 5)  # the 10 auxiliary faces
    assert np.all(_outside_span(fitted, clones.reshape(2, 16, 16, 1)) < 1e-3)
    assert json.loads((out / "summary.json").read_text())["config"]["prior"] == "linear"
    # 10 faces allow 9 components: more is a one-line error before anything is written
    assert cli.main(argv[:-1] + ["--config.inversion.prior_components=10", "--workdir",
                                 str(tmp_path / "bad")]) == 2  # fmt: skip
    assert not (tmp_path / "bad").exists()


# --- DeepInversion's feature-statistics prior ------------------------------------------------


def _resnet_with_statistics():
    """A tiny ResNet R_T whose running statistics are not the identity (as after training)."""
    graphdef, state = models.init(TINY_RESNET, jax.random.key(0))
    params, rest = models.split_trainable(graphdef, state)
    keys = iter(jax.random.split(jax.random.key(7), 64))
    rest = jax.tree.map(lambda v: v + 0.5 * jax.random.uniform(next(keys), v.shape), rest)
    return graphdef, models.join(graphdef, params, rest)


def test_feature_statistics_by_hand():
    graphdef, state = _resnet_with_statistics()
    model = nnx.merge(graphdef, state)
    x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
    z, distance = models.logits_and_statistics(graphdef, state, x)
    np.testing.assert_allclose(z, models.logits(graphdef, state, x), atol=1e-6)
    taps = []
    model.features(x, None, taps)
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    assert len(taps) == len(norms) == 6  # stem, 2 + 2 in the blocks, the 2nd one's shortcut
    np.testing.assert_allclose(distance, sum(taps), rtol=1e-6)
    # The stem's term from its convolution by hand: per image, the Euclidean distances of the
    # channel means and variances over positions from the running ones.
    cfg = TINY_RESNET
    h = (np.asarray(x) - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    pre = jax.lax.conv_general_dilated(
        h, model.stem.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    pre = np.asarray(pre, np.float64).reshape(3, -1, pre.shape[-1])  # [b, positions, c]
    mean_run = np.asarray(model.stem_norm.mean[...], np.float64)
    var_run = np.asarray(model.stem_norm.var[...], np.float64)
    for i in range(3):
        want = np.sqrt(((pre[i].mean(0) - mean_run) ** 2).sum()) + np.sqrt(
            ((pre[i].var(0) - var_run) ** 2).sum()
        )
        np.testing.assert_allclose(taps[0][i], want, rtol=1e-4)


def test_feature_statistics_descent_pulls_them_to_the_running_ones():
    graphdef, state = _resnet_with_statistics()
    x = jax.random.uniform(jax.random.key(2), (1, 16, 16, 1))
    cfg = inv.InversionConfig(optimizer="adam", learning_rate=0.1, feature_weight=1.0,
                              loss="max_margin", margin=-1e9)  # fmt: skip  # data loss flat
    apply_fn = inv.recognizer_apply(graphdef, statistics=True)
    before = models.logits_and_statistics(graphdef, state, x)[1]
    got = inv.invert_batch(apply_fn, state, x, jnp.zeros(1, jnp.int32),
                           jax.random.split(jax.random.key(3), 1), cfg, 40)  # fmt: skip
    after = models.logits_and_statistics(graphdef, state, jnp.asarray(got.clones))[1]
    assert float(after[0]) < 0.9 * float(before[0])  # measured 22.9 -> 18.7 (images in [0, 1])


def test_feature_statistics_need_batch_norm(tiny):
    graphdef, params = models.init(TINY, jax.random.key(0))
    with pytest.raises(JaxmiaError, match="no batch normalisation; expected model.arch='resnet'"):
        models.logits_and_statistics(graphdef, params, jnp.zeros((1, 16, 16, 1)))
    apply_fn, params = tiny  # logits alone: the weight has no distance to weigh
    cfg = inv.InversionConfig(feature_weight=0.1)
    with pytest.raises(JaxmiaError, match="expected an apply_fn that returns"):
        inv.objective(cfg, apply_fn, params, jnp.zeros((16, 16, 1)), None, jnp.int32(0))
