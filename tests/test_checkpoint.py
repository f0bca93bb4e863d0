import jax
import numpy as np
import pytest

from jaxmia import checkpoint
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models


def _model(classes=3):
    cfg = models.ModelConfig(num_classes=classes, image_size=(32, 32), channels=1)
    graphdef, params = models.init(cfg, jax.random.key(7))
    return cfg, graphdef, params


def test_round_trip_bit_identical(tmp_path):
    cfg, graphdef, params = _model()
    checkpoint.save_recognizer(tmp_path / "r", params, cfg, ["a", "b", "c"], {"role": "all"})
    rec = checkpoint.load_recognizer(tmp_path / "r")
    assert rec.config == cfg and rec.names == ("a", "b", "c") and rec.meta["role"] == "all"
    x = jax.random.uniform(jax.random.key(1), (5, 32, 32, 1))
    np.testing.assert_array_equal(
        rec.logits(x), jax.jit(models.logits, static_argnums=0)(graphdef, params, x)
    )
    np.testing.assert_array_equal(
        rec.features(x), jax.jit(models.features, static_argnums=0)(graphdef, params, x)
    )


def test_latest_step_is_loaded(tmp_path):
    cfg, _, p0 = _model()
    _, p1 = models.init(cfg, jax.random.key(8))
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, 1, p0, {"model": cfg.to_dict(), "names": ["a", "b", "c"]})
    checkpoint.save(mngr, 2, p1, {"model": cfg.to_dict(), "names": ["a", "b", "c"]})
    rec = checkpoint.load_recognizer(tmp_path)
    assert rec.step == 2
    x = np.full((1, 32, 32, 1), 0.3, np.float32)
    np.testing.assert_array_equal(
        rec.logits(x), models.logits(*models.init(cfg, jax.random.key(8)), x)
    )
    assert checkpoint.load_recognizer(tmp_path, step=1).step == 1


def test_missing_checkpoint(tmp_path):
    with pytest.raises(JaxmiaError, match=r"checkpoint .*nowhere: not found"):
        checkpoint.load_recognizer(tmp_path / "nowhere")


def test_shapes_that_do_not_fit(tmp_path):
    cfg, _, params = _model(classes=3)
    mngr = checkpoint.manager(tmp_path)
    # The meta claims 4 classes but the stored head has 3.
    wrong = models.ModelConfig(num_classes=4, image_size=(32, 32))
    checkpoint.save(mngr, 1, params, {"model": wrong.to_dict(), "names": list("abcd")})
    with pytest.raises(JaxmiaError, match=r"do not fit the model config \(num_classes=4"):
        checkpoint.load_recognizer(tmp_path)


def test_meta_without_model(tmp_path):
    _, _, params = _model()
    checkpoint.save(checkpoint.manager(tmp_path), 1, params, {"names": ["a"]})
    with pytest.raises(JaxmiaError, match="meta lacks a valid model config"):
        checkpoint.load_recognizer(tmp_path)
