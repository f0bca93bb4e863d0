"""Recognizers over pretrained backbones (jaxmia/recognizers/models.py ``Pretrained``): faceres's
weights, frozen or fine-tuned heads, checkpoints, grey input, the judge refusal, and real
learning."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxmia import checkpoint, config
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch
from jaxmia.recognizers import models, train
from jaxmia.stages import experiment

CELEBA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "celeba128"
CFG = models.ModelConfig(num_classes=5, image_size=(32, 32), channels=3, arch="faceres")


@pytest.fixture(scope="module")
def faceres():
    """faceres's tfjs weights, loaded once: (its network, an initialised R_T of CFG)."""
    try:
        fetch.model_files("faceres")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("faceres is not fetched and no registry is reachable: "
                        "jaxmia models fetch faceres")  # fmt: skip
        raise
    from jaxmia.pretrained import faceres as faceres_lib  # noqa: PLC0415 - after the skip

    return faceres_lib.load_faceres(), models.init(CFG, jax.random.key(0))


def _images(n: int, channels: int = 3, seed: int = 1) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, 32, 32, channels))


@pytest.mark.slow
def test_init_puts_the_fetched_weights_in_the_backbone_and_a_fresh_head(faceres):
    net, (graphdef, state) = faceres
    state = nnx.to_pure_dict(state)
    want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(net)))
    got = jax.tree.leaves(state["backbone"])
    assert len(got) == len(want) > 50
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert state["head"]["kernel"].shape == (1024, 5)
    # The features are faceres's own descriptors: the model adds nothing before the head.
    x = _images(2)
    np.testing.assert_allclose(models.features(graphdef, state, x), net(x), rtol=1e-5, atol=1e-5)


def test_logits_and_a_finite_input_gradient_under_jit(faceres):
    _, (graphdef, state) = faceres
    x = _images(2)
    logits = jax.jit(functools.partial(models.logits, graphdef))(state, x)
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    grad = jax.jit(jax.grad(lambda v: models.logits(graphdef, state, v)[:, 3].sum()))(x)
    assert grad.shape == x.shape and np.isfinite(grad).all() and float(jnp.abs(grad).max()) > 0


def test_grey_images_are_tiled_to_rgb(faceres):
    _, (graphdef, state) = faceres
    grey = _images(2, channels=1)
    np.testing.assert_allclose(
        models.logits(graphdef, state, grey),
        models.logits(graphdef, state, jnp.repeat(grey, 3, axis=-1)),
        rtol=1e-6,
        atol=1e-6,
    )
    # A grey config (AT&T) builds the same network and takes [b, h, w, 1].
    grey_cfg = dataclasses.replace(CFG, channels=1)
    g, s = models.init(grey_cfg, jax.random.key(0))
    assert models.logits(g, s, grey).shape == (2, 5)


def _steps(graphdef, state, x, y, steps=2):
    # copies: train_step donates its inputs, and the fixture's state serves every test
    params, rest = jax.tree.map(jnp.array, models.split_trainable(graphdef, state))
    tx = train._optimizer("adam", "constant", 1e-2, 0, 10, 0.0, 0.0, False)
    opt = tx.init(params)
    for i in range(steps):
        params, rest, opt, _ = train.train_step(
            graphdef, params, rest, opt, x, y, jax.random.key(i), tx=tx, aug=None
        )
    return params, rest


@pytest.mark.slow
def test_a_frozen_backbone_is_bit_identical_after_training_and_finetuning_moves_it(faceres):
    _, (graphdef, state) = faceres
    before = nnx.to_pure_dict(state)
    x, y = _images(4), jnp.array([0, 1, 2, 3])
    params, rest = _steps(graphdef, state, x, y)
    assert set(params) == {"head"}  # the optimizer never sees the backbone
    after = models.join(graphdef, params, rest)
    jax.tree.map(np.testing.assert_array_equal, after["backbone"], before["backbone"])
    assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])
    # Fine-tuning: the same state, every weight trainable; the backbone's change.
    tuned = dataclasses.replace(CFG, tune="finetune")
    g = nnx.split(models.Pretrained(tuned, rngs=nnx.Rngs(0), backbone=faceres[0]))[0]
    params, rest = _steps(g, before, x[:2], y[:2], steps=1)
    assert "backbone" in params
    moved = params["backbone"]["backbone"]["conv1_kernel"]
    assert not np.array_equal(moved, before["backbone"]["backbone"]["conv1_kernel"])


def test_training_on_cached_features_is_training_on_images(faceres):
    _, (graphdef, state) = faceres
    x, y = _images(4), jnp.array([0, 1, 2, 3])
    on_images, _ = _steps(graphdef, state, x, y)
    params, rest = jax.tree.map(jnp.array, models.split_trainable(graphdef, state))
    tx = train._optimizer("adam", "constant", 1e-2, 0, 10, 0.0, 0.0, False)
    opt = tx.init(params)
    h = train.features(graphdef, state, np.asarray(x))
    for i in range(2):
        params, rest, opt, _ = train.train_step(
            graphdef, params, rest, opt, h, y, jax.random.key(i), tx=tx, aug=None,
            on_features=True,
        )  # fmt: skip
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), params, on_images)


def test_checkpoint_round_trip_gives_identical_logits(faceres, tmp_path):
    _, (graphdef, state) = faceres
    names = [f"p{i}" for i in range(5)]
    checkpoint.save_recognizer(tmp_path / "rt", state, CFG, names)
    rec = checkpoint.load_recognizer(tmp_path / "rt")
    assert rec.config == CFG and rec.config.to_dict()["tune"] == "linear"
    assert "widths" not in rec.config.to_dict() and "mean" not in rec.config.to_dict()
    x = _images(3)
    np.testing.assert_array_equal(rec.logits(x), jax.jit(models.logits, static_argnums=0)(
        graphdef, state, x))  # fmt: skip


def test_flops_count_the_backbone(faceres):
    # MobileNet-v1 at 224 is 569 M multiply-adds (Howard et al. 2017, table 8).
    flops = CFG.flops_per_image()
    assert 0.98 < flops / (2 * 569e6 + 2 * 1024 * 5) < 1.08


def test_an_rt_on_a_face_judge_backbone_is_refused():
    c = config.default_config()
    c.model.arch = "dlib_resnet"
    assert "dlib" in c.judges.face
    with pytest.raises(JaxmiaError, match=r"model.arch='dlib_resnet': the face judge 'dlib'"):
        train.check_target(c)
    with pytest.raises(JaxmiaError, match="the face judge 'dlib'"):
        experiment.check_config(c)  # before any work
    c.judges.face = ("faceres",)
    train.check_target(c)  # dlib is no judge here: allowed
    c.model.arch = "faceres"
    with pytest.raises(JaxmiaError, match="judges.face without 'faceres'"):
        train.check_target(c)
    c.model.evaluation_arch = "resnet50"
    with pytest.raises(JaxmiaError, match="model.evaluation_arch"):
        train.model_config_for(c, 3, "evaluation")
    c.model.evaluation_arch = "efficientnet_lite0"
    assert train.model_config_for(c, 3, "evaluation").arch == "efficientnet_lite0"
    assert train.model_config_for(c, 3, "target").arch == "faceres"


def _celeba_people(n_people: int, per_person: int) -> tuple[np.ndarray, np.ndarray]:
    """The first people with enough photos, their central 75% resized to 32x32 (celeba.py's)."""
    images, labels = [], []
    folders = [d for d in sorted(CELEBA.iterdir()) if len(list(d.glob("*.jpg"))) >= per_person]
    for label, folder in enumerate(folders[:n_people]):
        for path in sorted(folder.glob("*.jpg"))[:per_person]:
            with Image.open(path) as im:
                im = im.convert("RGB").crop((16, 16, 112, 112)).resize((32, 32), Image.BILINEAR)
            images.append(np.asarray(im, np.float32) / 255)
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)


@pytest.mark.skipif(not CELEBA.is_dir(), reason="../shared/datasets/celeba128 is absent")
@pytest.mark.slow
def test_a_linear_head_learns_real_faces(faceres):
    x, y = _celeba_people(5, 12)
    test = np.arange(len(y)) % 12 >= 9  # 3 held-out photos a person
    t = config.default_config().train
    t.augment, t.epochs, t.batch_size, t.learning_rate = False, 40, 16, 1e-2
    _, _, history = train.fit(
        CFG, t, x[~test], y[~test], key=jax.random.key(0), test=(x[test], y[test])
    )
    # chance is 20%; faceres's features separate five people almost perfectly
    assert history[-1]["test_accuracy"] >= 0.8
