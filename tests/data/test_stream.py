"""Streamed training: the grain pipeline's order, labels and shards; streamed, data-parallel fit."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import xla_flags

from jaxmia import config as config_lib
from jaxmia.data import faces as faces_lib
from jaxmia.data import stream, synthetic
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models, train
from jaxmia.stages import train as train_stage


def _indexed(n: int, classes: int = 3) -> stream.Source:
    """Records whose one pixel is their own position, labelled position % classes."""
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return stream.Source.from_arrays(images, np.arange(n) % classes)


def _seen(ds) -> list[list[int]]:
    return [b["image"].ravel().astype(int).tolist() for b in ds]


def test_every_index_once_per_epoch_in_full_batches():
    n, b = 10, 4
    batches = _seen(stream.dataset(_indexed(n), batch_size=b, seed=3, epoch=0))
    assert [len(x) for x in batches] == [b] * stream.steps_per_epoch(n, b)
    flat = sum(batches, [])
    assert sorted(flat[:n]) == list(range(n))
    assert flat[n:] == flat[: len(flat) - n]  # wrapped round to the epoch's start


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return _seen(stream.dataset(_indexed(50), batch_size=10, seed=seed, epoch=epoch))

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_labels_are_mapped_into_the_recognizers_order():
    names = ("ann", "bob", "cy")
    records = [
        {"image": np.full((2, 2, 1), i, np.uint8), "identity": names[i % 3]} for i in range(9)
    ]
    label_of = {"cy": 0, "ann": 1}  # a part that knows two of the identities
    source = stream.Source(records, np.array([0, 2, 3, 5, 6]), label_of, "test")
    (batch,) = stream.dataset(source, batch_size=5, shuffle=False, wrap=False)
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], np.array([0, 2, 3, 5, 6]) / 255)
    assert batch["image"].dtype == np.float32
    assert batch["label"].tolist() == [1, 0, 1, 0, 1]


def test_processes_read_disjoint_shards_of_each_global_batch():
    n, b = 24, 8
    whole = _seen(stream.dataset(_indexed(n), batch_size=b, seed=5, epoch=2))
    shards = [
        _seen(
            stream.dataset(_indexed(n), batch_size=b, seed=5, epoch=2, shard_index=p, shard_count=2)
        )
        for p in range(2)
    ]
    for step, global_batch in enumerate(whole):
        a, c = shards[0][step], shards[1][step]
        assert len(a) == len(c) == b // 2 and not set(a) & set(c)
        assert sorted(a + c) == sorted(global_batch)  # the same images as one process
    with pytest.raises(JaxmiaError, match="multiple of the 3 processes"):
        stream.dataset(_indexed(n), batch_size=8, shard_index=0, shard_count=3)


def _cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = config_lib.default_config().train
    # One setting for every fit here (and 3 steps an epoch): one compiled step for all of them.
    settings = {"epochs": 5, "batch_size": 16, "learning_rate": 3e-3, "warmup_epochs": 1}
    cfg.update({**settings, "stream": True, "checkpoint_every": 2, **overrides})
    return cfg


MC = models.ModelConfig(
    num_classes=6, image_size=(16, 16), channels=1, conv_features=(8, 16),
    kernel_sizes=(3, 3), dense_features=(64,), dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def faces():
    # The shape test_streamed_run_reads_the_cache renders too: one compile of the renderer.
    images, labels, _ = synthetic.make_faces(6, 8, (16, 16), 1, seed=0)
    return images, labels


@pytest.fixture(scope="module")
def straight(faces, tmp_path_factory):
    return train.fit(
        MC, _cfg(), *faces, key=jax.random.key(1), workdir=tmp_path_factory.mktemp("a")
    )


@pytest.mark.slow
def test_streamed_fit_learns(straight):
    history = straight[2]
    assert history[-1]["train_accuracy"] > max(0.4, history[0]["train_accuracy"] + 0.15)  # 1/6
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.slow
def test_streamed_fit_resumes_to_identical_params(faces, straight, tmp_path, monkeypatch):
    straight = straight[1]
    calls = {"n": 0}
    real = train.train_step

    def dies_in_epoch_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 3 + 1:  # 3 steps per epoch: a checkpoint after epoch 2, then die
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dies_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train.fit(MC, _cfg(), *faces, key=jax.random.key(1), workdir=tmp_path / "b")
    monkeypatch.setattr(train, "train_step", real)
    _, resumed, history = train.fit(
        MC, _cfg(), *faces, key=jax.random.key(1), workdir=tmp_path / "b"
    )
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_streamed_run_reads_the_cache(tmp_path):
    """``jaxmia train`` with train.stream: synthetic faces written to the cache and streamed."""
    cfg = config_lib.default_config()
    cfg.data.update(source="synthetic", image_size=(16, 16), cache_dir=str(tmp_path / "cache"))
    cfg.data.synthetic.update(num_identities=6, images_per_identity=8)
    cfg.model.update(conv_features=(8, 16), kernel_sizes=(3, 3), dense_features=(64,), dropout=0.0)
    cfg.split.test_per_identity = 2
    cfg.train = _cfg()  # 36 training images: 3 steps an epoch, MC's model: no new compile
    summary = train_stage.run(cfg, tmp_path / "run", progress=False)["all"]
    assert summary["train_images"] == 36 and summary["test_images"] == 12
    assert 0 <= summary["test_accuracy"] <= 1
    records = faces_lib.faces_from_config(cfg, progress=False, stream=True)
    assert isinstance(records, faces_lib.FaceRecords) and len(records) == 48
    memory = faces_lib.faces_from_config(cfg, progress=False)
    first = records.records[9]
    assert faces_lib._text(first["identity"]) == memory.names[memory.labels[9]]
    np.testing.assert_allclose(first["image"] / 255, memory.images[9], atol=0.5 / 255 + 1e-6)


def test_a_large_set_is_cached_in_parts(tmp_path, monkeypatch):
    """Past tfds's 1 GB writer buffer (which spills through TensorFlow) the cache is parts."""
    monkeypatch.setattr(faces_lib, "_PART_BYTES", 16 * 16 * 10)  # 10 images a part: 5 parts of 48
    kw = dict(image_size=(16, 16), channels=1, cache_dir=str(tmp_path), progress=False)
    kw["synthetic"] = {"num_identities": 6, "images_per_identity": 8}
    records = faces_lib.load_faces("synthetic", stream=True, **kw)
    assert len(list((tmp_path / "faces").glob("synthetic-*/part*"))) == 5
    memory = faces_lib.load_faces("synthetic", **kw)
    images = np.stack([records.records[i]["image"] for i in range(len(records))])
    np.testing.assert_allclose(images / 255, memory.images, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(records.labels, memory.labels)
    assert records.files == memory.files
    # A folder's parts read back into memory as the one-builder cache does.
    att = dict(image_size=(16, 16), channels=1, progress=False)
    parts = faces_lib.load_faces("att", cache_dir=str(tmp_path / "parts"), **att)
    monkeypatch.setattr(faces_lib, "_PART_BYTES", 512 << 20)
    whole = faces_lib.load_faces("att", cache_dir=str(tmp_path / "whole"), **att)
    assert len(list((tmp_path / "parts" / "faces").glob("*/part*"))) == 40
    np.testing.assert_array_equal(parts.images, whole.images)
    assert (parts.names, parts.files) == (whole.names, whole.files)


def test_batch_must_divide_by_devices(monkeypatch, faces):
    monkeypatch.setattr(jax, "devices", lambda: [jax.local_devices()[0]] * 3)
    with pytest.raises(JaxmiaError, match="multiple of the 3 devices"):
        train.fit(MC, _cfg(batch_size=16), *faces, key=jax.random.key(0))


# Two forced CPU devices must be set before JAX starts, hence a subprocess: the same streamed
# fit (with crops and saturation) on 1 and on 2 devices. The paper CNN keeps the compile short.
TWO_DEVICES = r"""
import json, sys
import jax, numpy as np
from jaxmia import config
from jaxmia.recognizers import models, train
rng = np.random.default_rng(0)  # class prototypes plus noise: no renderer to compile
labels = np.arange(48) % 6
images = np.clip(rng.uniform(size=(6, 16, 16, 3))[labels] + rng.normal(0, 0.1, (48, 16, 16, 3)),
                 0, 1).astype(np.float32)
mc = models.ModelConfig(num_classes=6, image_size=(16, 16), channels=3, conv_features=(4, 8),
                        kernel_sizes=(3, 3), dense_features=(32,), dropout=0.0)
cfg = config.default_config().train
cfg.update(epochs=1, batch_size=16, stream=True, crop_scale=0.6, saturation=0.3)
out, every = {}, jax.devices
for devices in (every()[:1], every()):
    jax.devices = lambda: devices  # the mesh train.fit makes spans these
    _, state, hist = train.fit(mc, cfg, images, labels, key=jax.random.key(0))
    out[len(devices)] = {
        "shards": len(jax.tree.leaves(state)[0].sharding.device_set),
        "leaves": [np.asarray(a, np.float64).ravel().tolist() for a in jax.tree.leaves(state)],
        "loss": [h["loss"] for h in hist],
    }
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
def test_data_parallel_on_two_devices_equals_one():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(
        "--xla_force_host_platform_device_count=2", "--xla_cpu_multi_thread_eigen=false"
    )
    done = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = runs["1"], runs["2"]
    assert (one["shards"], two["shards"]) == (1, 2)
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-4)
    for a, b in zip(one["leaves"], two["leaves"], strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
