import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxmia import checkpoint, config, files
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models, train


def _blobs(classes=4, per_class=16, size=32, seed=0):
    """Classes that differ by mean brightness and a bright square's position: learnable fast."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class).astype(np.int32)
    x = rng.normal(0.3, 0.1, (len(y), size, size, 1))
    for c in range(classes):
        x[y == c, 4 + 5 * c : 10 + 5 * c, 8:20] += 0.6
    return np.clip(x, 0, 1).astype(np.float32), y


def _config(epochs=6, **kw):
    c = config.default_config().train
    c.epochs = epochs
    c.batch_size = 16
    c.checkpoint_every = 2
    c.learning_rate = 3e-3
    for k, v in kw.items():
        c[k] = v
    return c


MODEL = models.ModelConfig(num_classes=4, image_size=(32, 32), dense_features=(64, 64), dropout=0.2)


@pytest.mark.slow
def test_fit_learns():
    x, y = _blobs()
    graphdef, params, history = train.fit(
        MODEL, _config(epochs=8), x, y, key=jax.random.key(0), test=(x, y)
    )
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["test_accuracy"] == pytest.approx(train.accuracy(graphdef, params, x, y))
    assert history[-1]["test_accuracy"] >= 0.9


def test_same_seed_same_params():
    x, y = _blobs()
    _, a, _ = train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(1))
    _, b, _ = train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_interrupted_training_resumes_to_identical_params(tmp_path, monkeypatch):
    x, y = _blobs()
    _, straight, _ = train.fit(
        MODEL, _config(), x, y, key=jax.random.key(2), workdir=tmp_path / "a"
    )

    # Interrupt during epoch 4: the checkpoint of epoch 2 survives, epoch 3's metrics line too.
    real_step, calls = train.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3 * 4:  # 4 steps per epoch (64 images / 16)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.fit(MODEL, _config(), x, y, key=jax.random.key(2), workdir=tmp_path / "b")
    assert checkpoint.manager(tmp_path / "b").latest_step() == 2
    assert [m["epoch"] for m in files.read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]

    monkeypatch.setattr(train, "train_step", real_step)
    _, resumed, history = train.fit(
        MODEL, _config(), x, y, key=jax.random.key(2), workdir=tmp_path / "b"
    )
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in files.read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    rec = checkpoint.load_recognizer(tmp_path / "b")
    assert rec.step == 6 and rec.meta["epoch"] == 6


def test_resume_with_other_model_config_is_an_error(tmp_path):
    x, y = _blobs()
    train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(0), workdir=tmp_path)
    other = models.ModelConfig(num_classes=5, image_size=(32, 32), dense_features=(64, 64))
    with pytest.raises(JaxmiaError, match=r"other settings \(.*model.num_classes: 4 -> 5"):
        train.fit(other, _config(epochs=2), x, y, key=jax.random.key(0), workdir=tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run in a workdir, and the data it trained on."""
    x, y = _blobs(per_class=4)
    work = tmp_path_factory.mktemp("trained")
    train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(0), workdir=work)
    return work, x, y


@pytest.mark.parametrize(
    "change,field",
    [
        ({"learning_rate": 1e-2}, "train.learning_rate: 0.003 -> 0.01"),
        ({"augment": False}, "train.augment: True -> False"),
        ({"epochs": 4}, "train.epochs: 2 -> 4"),
        ({"key": 1}, "key"),
        ({"data": True}, "data.images"),
    ],
)
def test_resume_with_other_settings_is_refused_and_keeps_the_old_run(
    trained, tmp_path, change, field
):
    """A rerun in a finished workdir with other settings neither trains 0 epochs and returns the
    old weights, nor rewrites the record: it is an error naming the field."""
    base, x, y = trained
    work = tmp_path / "w"
    shutil.copytree(base, work)
    record = (work / train.RECORD).read_bytes()
    cfg = _config(**{"epochs": 2, **{k: v for k, v in change.items() if k not in ("key", "data")}})
    key = jax.random.key(change.get("key", 0))
    x2 = np.clip(x + 0.01, 0, 1) if "data" in change else x
    with pytest.raises(JaxmiaError, match=re.escape(field)):
        train.fit(MODEL, cfg, x2, y, key=key, workdir=work)
    assert (work / train.RECORD).read_bytes() == record


def test_bookkeeping_fields_are_not_settings(trained, tmp_path):
    """checkpoint_every and keep_checkpoints may change: the same run resumes (here: is done)."""
    base, x, y = trained
    work = tmp_path / "w"
    shutil.copytree(base, work)
    cfg = _config(epochs=2, checkpoint_every=1, keep_checkpoints=5)
    _, _, history = train.fit(MODEL, cfg, x, y, key=jax.random.key(0), workdir=work)
    assert [h["epoch"] for h in history] == [1, 2]


def test_checkpoints_without_a_record_are_not_resumed(tmp_path):
    x, y = _blobs(per_class=4)
    train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(0), workdir=tmp_path)
    (tmp_path / train.RECORD).unlink()
    with pytest.raises(JaxmiaError, match="without a settings record"):
        train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(0), workdir=tmp_path)


def test_optimizer_state_that_does_not_fit_is_named(tmp_path):
    """Restoring another optimizer's state says so, not "arrays do not fit the model config"."""
    x, y = _blobs(per_class=4)
    train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(0), workdir=tmp_path)
    mngr = checkpoint.manager(tmp_path)
    sgd = train.make_optimizer(_config(optimizer="sgd", momentum=0.9), 4)
    params = nnx.to_pure_dict(models.init(MODEL, jax.random.key(0))[1])
    abstract = jax.eval_shape(lambda: sgd.init(params))
    with pytest.raises(JaxmiaError) as e:
        checkpoint.restore(mngr, 2, MODEL, abstract)
    assert "optimizer state" in str(e.value) and "train.optimizer='adam'" in str(e.value)
    assert "model config" not in str(e.value)


# Every optimizer and every schedule in a fit (each pair compiles a step of its own, so not the
# whole product: test_every_optimizer_and_schedule_updates takes that). (adam, cosine) is the
# step test_equal_settings_do_not_recompile compiles too.
FIT_PAIRS = [("adam", "cosine"), ("adamw", "constant"), ("sgd", "cosine")]


@pytest.mark.parametrize("optimizer,schedule", FIT_PAIRS)
def test_optimizers_step(optimizer, schedule):
    x, y = _blobs(per_class=4)
    _, _, history = train.fit(
        MODEL,
        _config(epochs=1, optimizer=optimizer, schedule=schedule, warmup_epochs=0),
        x,
        y,
        key=jax.random.key(0),
    )
    assert np.isfinite(history[0]["loss"])


def test_every_optimizer_and_schedule_updates():
    assert {o for o, _ in FIT_PAIRS} == set(train.OPTIMIZERS)
    assert {s for _, s in FIT_PAIRS} == set(train.SCHEDULES)
    for optimizer in train.OPTIMIZERS:
        for schedule in train.SCHEDULES:
            cfg = _config(epochs=2, optimizer=optimizer, schedule=schedule, warmup_epochs=0)
            out = _one_update(cfg, {"w": jnp.full(3, 0.5)}, {"w": jnp.ones(3)})["w"]
            # two steps down the positive gradient, finite
            assert np.all(np.isfinite(out)) and np.all(out < 1), (optimizer, schedule, out)


@pytest.mark.parametrize("field,value", [("optimizer", "rmsprop"), ("schedule", "step")])
def test_unknown_optimizer_or_schedule(field, value):
    with pytest.raises(JaxmiaError, match=f"train.{field}: expected one of"):
        train.make_optimizer(_config(**{field: value}), 4)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"optimizer": "adam", "weight_decay": 0.05}, "adam has no weight decay"),
        ({"optimizer": "adam", "momentum": 0.9}, "train.momentum/nesterov"),
        ({"optimizer": "adamw", "nesterov": True}, "train.momentum/nesterov"),
        ({"optimizer": "sgd", "nesterov": True}, "needs train.momentum > 0"),
        ({"optimizer": "sgd", "momentum": 1.0}, "train.momentum"),
        ({"weight_decay": -1.0}, "train.weight_decay"),
        ({"learning_rate": 0.0}, "train.learning_rate"),
    ],
)
def test_settings_without_effect_are_refused(settings, match):
    with pytest.raises(JaxmiaError, match=match):
        train.make_optimizer(_config(**settings), 4)


def _one_update(cfg, grads, params):
    tx = train.make_optimizer(cfg, 1)
    state = tx.init(params)
    for _ in range(2):  # the second step shows momentum
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "settings,want",
    [
        # sgd: p - lr * g twice (warm-up off, constant rate)
        ({"optimizer": "sgd"}, 1.0 - 2 * 0.1 * 0.5),
        # heavy ball: v1 = g, v2 = g + m g; p - lr (v1 + v2)
        ({"optimizer": "sgd", "momentum": 0.9}, 1.0 - 0.1 * (0.5 + 0.5 * 1.9)),
        # L2 weight decay adds wd * p to the gradient: step 1 g' = 0.5 + 0.1 * 1.0
        ({"optimizer": "sgd", "weight_decay": 0.1}, None),
    ],
)
def test_momentum_and_weight_decay_take_effect(settings, want):
    cfg = _config(epochs=1, schedule="constant", warmup_epochs=0, learning_rate=0.1, **settings)
    params = {"w": jnp.ones(3)}
    out = _one_update(cfg, {"w": jnp.full(3, 0.5)}, params)["w"]
    if want is None:  # by hand: p1 = 1 - 0.1 (0.5 + 0.1); p2 = p1 - 0.1 (0.5 + 0.1 p1)
        p1 = 1 - 0.1 * (0.5 + 0.1)
        want = p1 - 0.1 * (0.5 + 0.1 * p1)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_adamw_weight_decay_takes_effect():
    base = _config(epochs=1, optimizer="adamw", schedule="constant", warmup_epochs=0)
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    # zero gradients: adamw moves weights by the decay alone, lr * wd * p per step
    none = _one_update(base, grads, params)["w"]
    base.weight_decay = 0.5
    decayed = _one_update(base, grads, params)["w"]
    np.testing.assert_allclose(none, 1.0)
    lr = base.learning_rate
    np.testing.assert_allclose(decayed, (1 - lr * 0.5) ** 2, rtol=1e-6)


def test_augment_keeps_range_and_shape():
    x = jax.random.uniform(jax.random.key(0), (32, 32, 1))
    out = train.augment(x, jax.random.key(1))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not np.allclose(out, train.augment(x, jax.random.key(2)))


def test_equal_settings_do_not_recompile():
    x, y = _blobs(per_class=4)
    train.fit(MODEL, _config(epochs=1), x, y, key=jax.random.key(0))
    before = train.train_step._cache_size()
    train.fit(MODEL, _config(epochs=1), x, y, key=jax.random.key(1))
    assert train.train_step._cache_size() == before


def _squares(classes=4, per_class=16, size=32, seed=0):
    """Classes that differ by a bright square's size, anywhere in the image: learnable by a
    globally pooled network (``_blobs`` differ by position, which pooling discards)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class).astype(np.int32)
    x = rng.normal(0.3, 0.1, (len(y), size, size, 1))
    for i, c in enumerate(y):
        side = 3 + 4 * c
        r, q = rng.integers(0, size - side, 2)
        x[i, r : r + side, q : q + side] += 0.6
    return np.clip(x, 0, 1).astype(np.float32), y


RESNET = models.ModelConfig(
    num_classes=4,
    image_size=(16, 16),
    arch="resnet",
    widths=(8, 16),
    blocks=(1, 1),
    stem_kernel=3,
    stem_stride=1,
)


@pytest.mark.slow
def test_resnet_trains_checkpoints_and_resumes_to_identical_state(tmp_path, monkeypatch):
    x, y = _squares(size=16)
    cfg = _config(
        epochs=4, batch_size=8, optimizer="sgd", learning_rate=0.1, momentum=0.9, crop_scale=0.8
    )
    graphdef, straight, history = train.fit(
        RESNET, cfg, x, y, key=jax.random.key(2), test=(x, y), workdir=tmp_path / "a"
    )
    assert history[-1]["test_accuracy"] >= 0.9  # chance: 0.25
    # The running statistics moved from their initial (0, 1) and are part of the state.
    assert float(np.abs(straight["stem_norm"]["mean"]).max()) > 1e-3
    real_step, calls = train.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3 * 8:  # in epoch 4 (8 steps per epoch); the checkpoint of 2 survives
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train.fit(RESNET, cfg, x, y, key=jax.random.key(2), workdir=tmp_path / "b")
    monkeypatch.setattr(train, "train_step", real_step)
    _, resumed, _ = train.fit(RESNET, cfg, x, y, key=jax.random.key(2), workdir=tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    rec = checkpoint.load_recognizer(tmp_path / "b")
    assert rec.config == RESNET
    np.testing.assert_allclose(
        rec.logits(x[:8]), models.logits(graphdef, straight, x[:8]), rtol=1e-5, atol=1e-5
    )


def test_label_smoothing_is_optax_smoothed_cross_entropy():
    graphdef, state = models.init(MODEL, jax.random.key(0))
    params, rest = models.split_trainable(graphdef, state)
    x, y = _blobs(per_class=2)
    key = jax.random.key(3)
    loss, _ = train._loss(graphdef, params, rest, x, y, key, 0.2)
    z, _ = models.train_logits(graphdef, params, rest, x, key)
    # By hand: targets 0.8 on the label plus 0.2 / 4 everywhere.
    t = 0.2 / 4 + 0.8 * np.eye(4)[y]
    want = -(t * jax.nn.log_softmax(z)).sum(-1).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("label_smoothing", 1.0, "label_smoothing"),
        ("crop_scale", 0.0, "crop_scale"),
        ("saturation", 1.5, "saturation"),
    ],
)
def test_recipe_fields_are_checked(field, value, match):
    with pytest.raises(JaxmiaError, match=match):
        train.check_train_config(_config(**{field: value}))


def test_flip_copies_are_the_mirrored_photos_as_more_examples():
    x, y = _blobs(per_class=4)
    x[:, :, :6] += 0.3  # a left-right asymmetry, so the mirror images differ
    cfg = _config(epochs=2, flip_copies=True)
    _, flipped, history = train.fit(MODEL, cfg, x, y, key=jax.random.key(2))
    # by hand: the training set and its mirror images, no flag
    both = np.concatenate([x, x[:, :, ::-1]]), np.concatenate([y, y])
    _, by_hand, _ = train.fit(MODEL, _config(epochs=2), *both, key=jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, flipped, by_hand)
    _, plain, _ = train.fit(MODEL, _config(epochs=2), x, y, key=jax.random.key(2))
    assert not np.allclose(plain["head"]["kernel"], flipped["head"]["kernel"])
    assert len(history) == 2


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"flip_copies": True, "stream": True}, "train.flip_copies: applies to images in memory"),
        ({"flip_copies": True, "defence.dp": True}, "train.flip_copies: DP-SGD"),
    ],
)
def test_flip_copies_are_refused_where_they_would_mislead(settings, match):
    c = _config()
    for k, v in settings.items():
        section, _, field = k.rpartition(".")
        (c[section] if section else c)[field] = v
    with pytest.raises(JaxmiaError, match=match) as e:
        train.check_train_config(c)
    assert "\n" not in str(e.value)
