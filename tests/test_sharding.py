"""Sharded inversion equals the single-device program (4 forced host CPU devices, subprocess)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags

from jaxmia import sharding
from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models

# Runs under XLA_FLAGS=--xla_force_host_platform_device_count=4, which must be set before JAX
# starts, hence a subprocess. 6 clones over 4 devices: padded to 8, the padding dropped.
SHARDED_VS_ONE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxmia import sharding
from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models

mc = models.ModelConfig(num_classes=10, image_size=(16, 16), channels=3, conv_features=(4, 8),
                        kernel_sizes=(5, 3), dense_features=(32,))
graphdef, params = models.init(mc, jax.random.key(0))
apply_fn = inv.recognizer_apply(graphdef)
n = 6
x = jax.random.uniform(jax.random.key(1), (n, 16, 16, 3))
y = jnp.arange(n) % 10
keys = jax.random.split(jax.random.key(2), n)
out = {"devices": len(jax.devices())}
mesh = sharding.clone_mesh(n)
out["few"] = sharding.clone_mesh(3) is None
placed = sharding.shard_clones(mesh, (x, keys))
out["shard_rows"] = sorted(s.data.shape[0] for s in placed[0].addressable_shards)
out["pad_repeats_last"] = bool(
    jnp.all(placed[0][6:] == x[5])
    and jnp.all(jax.random.key_data(placed[1][6:]) == jax.random.key_data(keys[5]))
)
settings = {
    "sgd": {},
    "adam_transforms_stopping": dict(optimizer="adam", jitter=1, flip=True, patience=3,
                                     stop_confidence=0.3, check_every=2),
}
for name, kw in settings.items():
    recs = []
    for shard in (False, True):
        cfg = inv.InversionConfig(learning_rate=0.5, shard=shard, **kw)
        timing = inv.Timing()
        recs.append(inv.invert_batch(apply_fn, params, x, y, keys, cfg, 8, timing))
    a, b = recs
    out[name] = {
        "shape": list(b.clones.shape),
        "gradients": timing.gradients,
        "max_abs_diff": {f: float(np.abs(np.asarray(u, float) - np.asarray(v, float)).max())
                         for f, u, v in zip(a._fields, a, b)},
        "reasons": sorted(set(b.reason.tolist())),
    }
json.dump(out, sys.stdout)
"""


def _run(code: str, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"XLA_FLAGS": xla_flags()} | env_extra
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_devices() -> dict:
    flags = xla_flags("--xla_force_host_platform_device_count=4")
    return _run(SHARDED_VS_ONE, {"XLA_FLAGS": flags})


@pytest.mark.slow
def test_clones_split_over_four_devices_and_padded(four_devices):
    assert four_devices["devices"] == 4
    assert four_devices["shard_rows"] == [2, 2, 2, 2]  # 6 clones padded to 8
    assert four_devices["pad_repeats_last"]
    assert four_devices["few"]  # 3 clones on 4 devices: not sharded


@pytest.mark.parametrize("setting", ["sgd", "adam_transforms_stopping"])
@pytest.mark.slow
def test_sharded_equals_one_device(four_devices, setting):
    r = four_devices[setting]
    assert r["shape"] == [6, 16, 16, 3]  # the padding is dropped
    diff = r["max_abs_diff"]
    assert diff["steps"] == 0 and diff["reason"] == 0
    assert diff["clones"] < 1e-4 and diff["loss"] < 1e-5 and diff["confidence"] < 1e-5
    if setting == "adam_transforms_stopping":
        # The per-clone rules ran (sharded the same as on one device, per the diffs above).
        assert set(r["reasons"]) - {inv.STEPS}
    else:
        assert r["gradients"] == 6 * 8  # padded clones are not counted


def test_use_all_cores_before_jax_starts():
    code = (
        "import json, sys, jax\nfrom jaxmia import sharding\n"
        "n = sharding.use_all_cores(3)\n"
        "json.dump([n, len(jax.devices())], sys.stdout)"
    )
    assert _run(code, {}) == [3, 3]


def test_use_all_cores_after_jax_started_changes_nothing():
    before = len(jax.devices("cpu"))
    assert sharding.use_all_cores(before + 5) == before
    assert len(jax.devices("cpu")) == before


def test_one_device_means_no_mesh():
    assert sharding.clone_mesh(devices=jax.devices()[:1]) is None


def test_shard_flag_off_on_one_device_is_the_plain_program():
    mc = models.ModelConfig(
        num_classes=5,
        image_size=(8, 8),
        channels=1,
        conv_features=(2,),
        kernel_sizes=(3,),
        dense_features=(8,),
    )
    graphdef, params = models.init(mc, jax.random.key(0))
    apply_fn = inv.recognizer_apply(graphdef)
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
    y, keys = np.arange(3), jax.random.split(jax.random.key(2), 3)
    a, b = (
        inv.invert_batch(apply_fn, params, x, y, keys, inv.InversionConfig(shard=s), 3)
        for s in (True, False)
    )
    np.testing.assert_allclose(a.clones, b.clones, atol=1e-5)


# Two processes on this machine (one CPU device each, gloo collectives) as two hosts would run:
# jax.distributed.initialize, the same full batch in each, results gathered to both.
TWO_HOSTS = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models
mc = models.ModelConfig(num_classes=10, image_size=(16, 16), channels=3, conv_features=(4, 8),
                        kernel_sizes=(5, 3), dense_features=(32,))
graphdef, params = models.init(mc, jax.random.key(0))
x = jax.random.uniform(jax.random.key(1), (5, 16, 16, 3))
keys = jax.random.split(jax.random.key(2), 5)
cfg = inv.InversionConfig(learning_rate=0.5, shard=int(sys.argv[2]) >= 0)
r = inv.invert_batch(inv.recognizer_apply(graphdef), params, x, jnp.arange(5), keys, cfg, 6)
json.dump({"devices": len(jax.devices()), "clones": r.clones.tolist()}, sys.stdout)
"""


@pytest.mark.slow
def test_two_processes_as_two_hosts_equal_one_device(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    # Output to files: a full pipe would block one process while the other waits on it.
    logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with out.open("w") as o, err.open("w") as e:
            cmd = [sys.executable, "-c", TWO_HOSTS, address, str(i)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=o, stderr=e))
    try:
        for p, (_, err) in zip(procs, logs, strict=True):
            assert p.wait(timeout=120) == 0, err.read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    hosts = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    assert [h["devices"] for h in hosts] == [2, 2]  # one mesh over both processes' devices
    x, labels = jax.random.uniform(jax.random.key(1), (5, 16, 16, 3)), np.arange(5)
    mc = models.ModelConfig(
        num_classes=10,
        image_size=(16, 16),
        channels=3,
        conv_features=(4, 8),
        kernel_sizes=(5, 3),
        dense_features=(32,),
    )
    graphdef, params = models.init(mc, jax.random.key(0))
    keys = jax.random.split(jax.random.key(2), 5)
    cfg = inv.InversionConfig(learning_rate=0.5, shard=False)
    one = inv.invert_batch(inv.recognizer_apply(graphdef), params, x, labels, keys, cfg, 6)
    for h in hosts:  # every process holds the whole result
        np.testing.assert_allclose(np.asarray(h["clones"]), one.clones, atol=1e-5)
