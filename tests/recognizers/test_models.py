import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmia.recognizers import models


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
    # Traced, not run (shapes only; test_jit_equals_eager_and_normalisation runs the model).
    graphdef, params = models.abstract(cfg)
    x = jax.ShapeDtypeStruct((3, *size, channels), jnp.float32)
    logits = jax.eval_shape(functools.partial(models.logits, graphdef), params, x)
    features = jax.eval_shape(functools.partial(models.features, graphdef), params, x)
    assert logits.shape == (3, classes) and features.shape == (3, 1024)


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
    params, rest = models.split_trainable(graphdef, params)
    assert rest == {}  # the paper CNN has no statistics
    a, _ = models.train_logits(graphdef, params, rest, x, jax.random.key(3))
    b, _ = models.train_logits(graphdef, params, rest, x, jax.random.key(3))
    c, _ = models.train_logits(graphdef, params, rest, x, jax.random.key(4))
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


RESNET = dict(arch="resnet", widths=(8, 16), blocks=(1, 1), stem_kernel=3, stem_stride=1)


@pytest.mark.parametrize(
    "kw,feature_size",
    [
        ({**RESNET, "block": "bottleneck"}, 64),  # stride-1 stem, no downsampling conv at 1
        ({"arch": "resnet", "blocks": (1, 1, 1, 1), "widths": (4, 8, 8, 8)}, 8),  # torchvision's
    ],
)
def test_resnet_shapes_and_flops_match_xla(kw, feature_size):
    cfg = models.ModelConfig(num_classes=7, image_size=(32, 32), channels=3, **kw)
    graphdef, state = models.abstract(cfg)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(functools.partial(models.logits, graphdef), state, x).shape == (2, 7)
    feats = jax.eval_shape(functools.partial(models.features, graphdef), state, x)
    assert feats.shape == (2, feature_size) == (2, cfg.feature_size)
    # XLA's own count of one image's forward pass: it skips the padding's taps (ours counts
    # every tap, the usual convention) and adds the elementwise work ours leaves out.
    one = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    xla = jax.jit(functools.partial(models.logits, graphdef)).lower(state, one).compile()
    counted = xla.cost_analysis()["flops"]
    assert 0.9 < counted / cfg.flops_per_image() < 1.1


@pytest.mark.slow
def test_resnet_batch_norm_trains_on_batch_statistics_and_infers_on_running_ones():
    cfg = models.ModelConfig(num_classes=4, image_size=(16, 16), channels=1, **RESNET)
    graphdef, state = models.init(cfg, jax.random.key(0))
    params, rest = models.split_trainable(graphdef, state)
    assert set(rest) == {"stem_norm", "stages"}
    np.testing.assert_array_equal(rest["stem_norm"]["mean"], 0)
    x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
    train_logits = jax.jit(functools.partial(models.train_logits, graphdef))
    logits = jax.jit(functools.partial(models.logits, graphdef))
    _, new = train_logits(params, rest, x, jax.random.key(2))
    # Running mean after one batch: 0.9 * 0 + 0.1 * the stem's batch mean (PyTorch's update).
    stem = nnx.merge(graphdef, state).stem
    h = stem((x - 0.5) / 0.5)
    np.testing.assert_allclose(new["stem_norm"]["mean"], 0.1 * h.mean((0, 1, 2)), atol=1e-6)
    # Inference: each image's logits do not depend on the rest of its batch.
    full = models.join(graphdef, params, new)
    both = logits(full, x)
    np.testing.assert_allclose(logits(full, x[:1]), both[:1], atol=1e-5)
    # Training mode normalises by the batch: the same image in another batch scores otherwise.
    a, _ = train_logits(params, rest, x, jax.random.key(2))
    b, _ = train_logits(params, rest, x[:3], jax.random.key(2))
    assert not np.allclose(a[:3], b, atol=1e-4)


def test_resnet_config_round_trip_and_validation():
    cfg = models.ModelConfig(
        num_classes=3, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **RESNET
    )
    back = models.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    # A record holds what fixes the function: not the other architecture's fields.
    assert "conv_features" not in cfg.to_dict() and "widths" in cfg.to_dict()
    assert "widths" not in models.ModelConfig(num_classes=3).to_dict()
    old = {k: v for k, v in models.ModelConfig(num_classes=3).to_dict().items() if k != "arch"}
    assert models.ModelConfig.from_dict(old).arch == "paper"  # checkpoints before arch existed
    with pytest.raises(ValueError, match="arch"):
        models.ModelConfig(num_classes=3, arch="vit")
    with pytest.raises(ValueError, match="too small"):
        models.ModelConfig(num_classes=3, image_size=(16, 16), arch="resnet")  # stride 32
    with pytest.raises(ValueError, match="3 channels"):
        models.ModelConfig(num_classes=3, channels=3, mean=(0.5,))
