import jax
import numpy as np
import pytest

from jaxmia import checkpoint, config, files, models, train
from jaxmia.errors import JaxmiaError


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
    with pytest.raises(JaxmiaError, match="do not fit the model config"):
        train.fit(other, _config(epochs=3), x, y, key=jax.random.key(0), workdir=tmp_path)


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("schedule", train.SCHEDULES)
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


@pytest.mark.parametrize("field,value", [("optimizer", "rmsprop"), ("schedule", "step")])
def test_unknown_optimizer_or_schedule(field, value):
    with pytest.raises(JaxmiaError, match=f"train.{field}: expected one of"):
        train.make_optimizer(_config(**{field: value}), 4)


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
