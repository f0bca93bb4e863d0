"""Partial fine-tuning of a pretrained backbone (models.ModelConfig tune="top"): faceres's last
``tune_blocks`` blocks train with the head over the cached output of its frozen lower part, and
the result is the ordinary recognizer (forward on images, checkpoints)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmia import checkpoint, config
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch
from jaxmia.recognizers import models, train

TOP = models.ModelConfig(
    num_classes=4, image_size=(32, 32), channels=3, arch="faceres", tune="top", tune_blocks=2
)


@pytest.fixture(scope="module")
def net():
    """faceres's network with its fetched weights, loaded once."""
    try:
        fetch.model_files("faceres")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("faceres is not fetched and no registry is reachable: "
                        "jaxmia models fetch faceres")  # fmt: skip
        raise
    from jaxmia.pretrained import faceres  # noqa: PLC0415 - after the skip

    return faceres.load_faceres()


def _init(net, cfg=TOP, seed=0):
    return nnx.split(models.Pretrained(cfg, rngs=nnx.Rngs(seed), backbone=net))


def _images(n: int, seed: int = 1) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3))


def _reference_logits(net, state: dict, x: jax.Array) -> jax.Array:
    """faceres's own forward (FaceRes.__call__, never split) with the state's backbone weights,
    then the head by hand: the network the recognizer must be. # [b, 32, 32, 3] -> [b, 4]"""
    graphdef, _ = nnx.split(net)
    descriptor = nnx.merge(graphdef, state["backbone"])(x)  # [b, 1024]
    return descriptor @ state["head"]["kernel"] + state["head"]["bias"]


def _train(graphdef, state, inputs, y, *, on_features, steps=2):
    params, rest = jax.tree.map(jnp.array, models.split_trainable(graphdef, state))
    tx = train._optimizer("adam", "constant", 1e-2, 0, 10, 0.0, 0.0, False)
    opt = tx.init(params)
    for i in range(steps):
        params, rest, opt, _ = train.train_step(
            graphdef, params, rest, opt, inputs, y, jax.random.key(i), tx=tx, aug=None,
            on_features=on_features,
        )  # fmt: skip
    return params, rest


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tune": "top", "tune_blocks": 0}, "tune_blocks: expected 1 to 13"),
        ({"tune": "top", "tune_blocks": 14}, "tune_blocks: expected 1 to 13"),
        ({"tune": "top", "tune_blocks": True}, "tune_blocks: expected 1 to 13"),
        ({"tune": "linear", "tune_blocks": 2}, "applies to tune='top' only"),
        ({"tune": "top", "tune_blocks": 2, "arch": "efficientnet_lite0"}, "expected arch in"),
        ({"tune": "top", "tune_blocks": 2, "arch": "paper", "channels": 1}, "expected arch in"),
    ],
)
def test_config_validation(kw, match):
    base = dict(num_classes=4, image_size=(32, 32), channels=3, arch="faceres")
    with pytest.raises(ValueError, match=match):
        models.ModelConfig(**{**base, **kw})
    # through a jaxmia config: a one-line JaxmiaError naming the fields
    c = config.default_config()
    for k, v in kw.items():
        if k == "channels":
            c.data.channels = v
        else:
            c.model[k] = v
    c.model.arch = kw.get("arch", "faceres")
    c.data.channels = kw.get("channels", 3)
    with pytest.raises(JaxmiaError, match=match) as e:
        train.model_config_for(c, 4)
    assert "\n" not in str(e.value)


def test_config_round_trip_and_records():
    assert models.ModelConfig.from_dict(TOP.to_dict()) == TOP
    assert TOP.to_dict()["tune_blocks"] == 2 and TOP.cached and not TOP.frozen
    assert TOP.first_tuned == 11
    # Other tunes' records (and every checkpoint of before tune_blocks) do not carry it.
    linear = models.ModelConfig(num_classes=4, channels=3, arch="faceres")
    assert "tune_blocks" not in linear.to_dict() and linear.cached
    assert not models.ModelConfig(num_classes=4, channels=3, arch="faceres", tune="finetune").cached
    # R_E of another arch (model.evaluation_arch) stays a linear head: the blocks are faceres's.
    c = config.default_config()
    c.data.channels, c.model.arch, c.model.tune, c.model.tune_blocks = 3, "faceres", "top", 3
    c.model.evaluation_arch = "efficientnet_lite0"
    assert train.model_config_for(c, 4, "target").tune_blocks == 3
    re_cfg = train.model_config_for(c, 4, "evaluation")
    assert (re_cfg.arch, re_cfg.tune, re_cfg.tune_blocks) == ("efficientnet_lite0", "linear", 0)


def test_trainable_weights_are_the_top_blocks_and_the_head(net):
    graphdef, state = _init(net)
    params, rest = models.split_trainable(graphdef, state)
    assert set(params) == {"backbone", "head"}
    assert set(params["backbone"]) == {"backbone"}  # not faceres's age and gender heads
    assert set(params["backbone"]["backbone"]) == {"blocks"}
    assert sorted(params["backbone"]["backbone"]["blocks"]) == [11, 12]
    assert sorted(rest["backbone"]["backbone"]["blocks"]) == list(range(11))
    assert "conv1_kernel" in rest["backbone"]["backbone"]


@pytest.mark.slow
def test_cached_path_equals_the_full_forward(net):
    graphdef, state = _init(net)
    state = nnx.to_pure_dict(state)
    x = _images(3)
    h = jax.jit(functools.partial(models.frozen_part, graphdef))(state, x)
    assert h.shape == (3, 14, 14, 512)  # the map entering block 11 (0-based)
    cached = jax.jit(functools.partial(models.head_logits, graphdef))(state, h)
    full = jax.jit(functools.partial(models.logits, graphdef))(state, x)
    want = _reference_logits(net, state, x)
    assert float(jnp.abs(want).max()) > 0.1  # a real signal
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_moves_the_top_blocks_alone_and_equals_training_on_images(net):
    graphdef, state = _init(net)
    before = nnx.to_pure_dict(state)
    x, y = _images(4), jnp.array([0, 1, 2, 3])
    h = train.frozen_outputs(graphdef, before, np.asarray(x))
    params, rest = _train(graphdef, before, h, y, on_features=True)
    on_images, _ = _train(graphdef, before, x, y, on_features=False)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), params, on_images)
    after = models.join(graphdef, params, rest)
    blocks_before = before["backbone"]["backbone"]["blocks"]
    blocks_after = after["backbone"]["backbone"]["blocks"]
    for i in range(11):  # the frozen blocks, bit for bit
        jax.tree.map(np.testing.assert_array_equal, blocks_after[i], blocks_before[i])
    trunk_after, trunk_before = after["backbone"]["backbone"], before["backbone"]["backbone"]
    np.testing.assert_array_equal(trunk_after["conv1_kernel"], trunk_before["conv1_kernel"])
    for i in (11, 12):
        assert not np.array_equal(blocks_after[i]["pw_kernel"], blocks_before[i]["pw_kernel"])
    # The trained recognizer is faceres with its new top blocks under the head.
    x2 = _images(2, seed=5)
    np.testing.assert_allclose(
        models.logits(graphdef, after, x2), _reference_logits(net, after, x2), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_fit_on_cached_maps_checkpoints_a_recognizer_that_runs_on_images(tmp_path):
    cfg = models.ModelConfig(
        num_classes=2, image_size=(32, 32), channels=3, arch="faceres", tune="top", tune_blocks=1
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    x[4:, 8:24, 8:24] = 1.0  # class 1: a bright square
    y = np.array([0] * 4 + [1] * 4, np.int32)
    c = config.default_config().train
    c.augment, c.epochs, c.batch_size, c.learning_rate = False, 2, 4, 1e-3
    graphdef, state, history = train.fit(
        cfg, c, x, y, key=jax.random.key(0), test=(x, y), workdir=tmp_path / "rt"
    )
    assert len(history) == 2
    rec = checkpoint.load_recognizer(tmp_path / "rt")
    assert rec.config == cfg
    got = np.asarray(rec.logits(jnp.asarray(x)))
    np.testing.assert_allclose(got, models.logits(graphdef, state, x), rtol=1e-5, atol=1e-5)
    # the epoch's test accuracy (on cached maps) is that of the images through the whole net
    assert history[-1]["test_accuracy"] == pytest.approx(np.mean(got.argmax(-1) == y))
    # the top block trained (AdamW's first steps move every weight they see)
    fetched = models.init(cfg, jax.random.key(0))[1]
    top = nnx.to_pure_dict(fetched)["backbone"]["backbone"]["blocks"][12]["pw_kernel"]
    assert not np.array_equal(state["backbone"]["backbone"]["blocks"][12]["pw_kernel"], top)
