"""The space-to-depth convolution computes the same function as the plain layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmia.recognizers import fastconv, models


def _plain(x, kernel, bias):
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return models.max_pool_2x2(jax.nn.relu(y + bias))


def _layer(h, w, cin, cout, k, seed=0):
    key = jax.random.key(seed)
    x = jax.random.uniform(key, (3, h, w, cin))
    kernel = jax.random.normal(jax.random.fold_in(key, 1), (k, k, cin, cout)) / k
    bias = 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (cout,))
    return x, kernel, bias


def _conv_inputs(fn, *args):
    """The lhs shapes of every convolution in ``fn``'s jaxpr."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.invars[0].aval.shape for e in eqns if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize(
    "h,w,cin,cout,k",
    [(16, 16, 1, 5, 5), (12, 20, 3, 5, 5), (8, 8, 5, 16, 5), (10, 6, 2, 4, 3), (8, 8, 1, 3, 7)],
)
def test_rewrite_equals_plain_layer_values_and_gradients(h, w, cin, cout, k):
    x, kernel, bias = _layer(h, w, cin, cout, k)
    assert _conv_inputs(fastconv.conv_relu_pool, x, kernel, bias) == [(3, h // 2, w // 2, 4 * cin)]
    fast = jax.jit(fastconv.conv_relu_pool)(x, kernel, bias)
    np.testing.assert_allclose(fast, _plain(x, kernel, bias), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    g_fast = jax.jit(jax.grad(loss(fastconv.conv_relu_pool), argnums=(0, 1, 2)))(x, kernel, bias)
    g_plain = jax.jit(jax.grad(loss(_plain), argnums=(0, 1, 2)))(x, kernel, bias)
    for a, b in zip(g_fast, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 8, 1, 5, 5), (8, 8, 16, 32, 3), (8, 8, 1, 5, 4)])
def test_odd_sizes_wide_channels_and_even_kernels_keep_the_plain_layer(shape):
    h, w, cin, cout, k = shape
    x, kernel, bias = _layer(h, w, cin, cout, k)
    assert _conv_inputs(fastconv.conv_relu_pool, x, kernel, bias) == [(3, h, w, cin)]
    np.testing.assert_array_equal(fastconv.conv_relu_pool(x, kernel, bias), _plain(x, kernel, bias))


@pytest.mark.parametrize(
    "mc",
    [
        models.ModelConfig(num_classes=40, image_size=(64, 64), channels=1),
        models.ModelConfig(num_classes=7, image_size=(128, 128), channels=3),
    ],
    ids=["64x64x1", "128x128x3"],
)
def test_logits_and_image_gradient_equal_the_model(mc):
    graphdef, params = models.init(mc, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, *mc.image_size, mc.channels))
    z_fast = jax.jit(fastconv.logits, static_argnums=0)(graphdef, params, x)
    z = jax.jit(models.logits, static_argnums=0)(graphdef, params, x)
    np.testing.assert_allclose(z_fast, z, rtol=1e-4, atol=1e-5)

    def grad(f):  # jitted like the model's own use: one compile, not one per operation
        return jax.jit(jax.grad(lambda v: jnp.sum(jax.nn.softmax(f(graphdef, params, v))[:, 1])))

    g_fast, g = grad(fastconv.logits)(x), grad(models.logits)(x)
    assert np.abs(g).max() > 0
    np.testing.assert_allclose(g_fast, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
