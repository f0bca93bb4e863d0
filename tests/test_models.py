import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmia import models


@pytest.mark.parametrize(
    "size,channels,classes,flat",
    [
        ((128, 128), 3, 2041, 8 * 8 * 64),
        ((64, 64), 1, 40, 4 * 4 * 64),
        ((112, 92), 1, 7, 7 * 5 * 64),
    ],
)
def test_shapes(size, channels, classes, flat):
    cfg = models.ModelConfig(num_classes=classes, image_size=size, channels=channels)
    assert cfg.flat_features == flat
    graphdef, params = models.init(cfg, jax.random.key(0))
    x = jnp.zeros((3, *size, channels))
    assert models.logits(graphdef, params, x).shape == (3, classes)
    assert models.features(graphdef, params, x).shape == (3, 1024)


def test_paper_architecture():
    cfg = models.ModelConfig(num_classes=2041, image_size=(128, 128), channels=3)
    _, params = models.init(cfg, jax.random.key(0))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(params))
    assert [shapes["convs"][i]["kernel"] for i in range(4)] == [
        (5, 5, 3, 5),
        (5, 5, 5, 16),
        (3, 3, 16, 32),
        (3, 3, 32, 64),
    ]
    assert [shapes["dense"][i]["kernel"] for i in range(2)] == [(4096, 1024), (1024, 1024)]
    assert shapes["head"]["kernel"] == (1024, 2041)


def test_flops_match_hand_count():
    # 128x128x3: convs 12.29M + 16.38M + 9.44M + 9.44M, dense 8.39M + 2.10M + 4.18M.
    cfg = models.ModelConfig(num_classes=2041, image_size=(128, 128), channels=3)
    hand = 2 * (
        128 * 128 * 25 * 3 * 5
        + 64 * 64 * 25 * 5 * 16
        + 32 * 32 * 9 * 16 * 32
        + 16 * 16 * 9 * 32 * 64
        + 4096 * 1024
        + 1024 * 1024
        + 1024 * 2041
    )
    assert cfg.flops_per_image() == hand
    assert 62e6 < hand < 62.5e6


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_reshape_max_pool_equals_nnx_max_pool(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    ours = models.max_pool_2x2(x)
    ref = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(ours, ref)
    g_ours = jax.grad(lambda v: (models.max_pool_2x2(v) ** 2).sum())(x)
    g_ref = jax.grad(lambda v: (nnx.max_pool(v, (2, 2), strides=(2, 2)) ** 2).sum())(x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6)


def test_jit_equals_eager_and_normalisation():
    cfg = models.ModelConfig(num_classes=5, image_size=(32, 32), mean=0.25, std=2.0)
    graphdef, params = models.init(cfg, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 1))
    eager = models.logits(graphdef, params, x)
    jitted = jax.jit(models.logits, static_argnums=0)(graphdef, params, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)
    # The model normalises itself: a config with mean 0, std 1 fed (x - 0.25) / 2 gives the same.
    plain = models.ModelConfig(num_classes=5, image_size=(32, 32), mean=0.0, std=1.0)
    other = nnx.merge(nnx.split(models.Recognizer(plain, rngs=nnx.Rngs(0)))[0], params)
    np.testing.assert_allclose(other((x - 0.25) / 2.0), eager, rtol=1e-5, atol=1e-6)


def test_dropout_needs_key_and_is_deterministic():
    cfg = models.ModelConfig(num_classes=5, image_size=(32, 32), dropout=0.5)
    graphdef, params = models.init(cfg, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 1))
    a = models.logits(graphdef, params, x, jax.random.key(3))
    b = models.logits(graphdef, params, x, jax.random.key(3))
    c = models.logits(graphdef, params, x, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, models.logits(graphdef, params, x))


def test_config_round_trip_and_validation():
    cfg = models.ModelConfig(num_classes=3, image_size=(48, 40), channels=3)
    assert models.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        models.ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="too small"):
        models.ModelConfig(num_classes=3, image_size=(8, 8))
