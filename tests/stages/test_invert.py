import itertools
import json
import os

import jax
import numpy as np
import pytest
from conftest import xla_flags
from flax import nnx
from PIL import Image

from jaxmia import checkpoint, cli
from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models

MODEL = models.ModelConfig(
    num_classes=3,
    image_size=(16, 16),
    conv_features=(4, 4, 4, 4),
    dense_features=(16,),
    dropout=0.0,
)
NAMES = ("alice", "bob", "s5")
FAST = [
    "--config.inversion.seed=uniform",
    "--config.inversion.loss=cross_entropy",
    "--config.inversion.learning_rate=1.0",
    "--config.inversion.max_batch=4",
]


@pytest.fixture(autouse=True)
def only_invert(monkeypatch):
    """The invert command alone: its tests do not depend on the other commands importing."""
    monkeypatch.setattr(cli, "COMMANDS", {"invert": cli.COMMANDS["invert"]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "rt"
    _, params = models.init(MODEL, jax.random.key(0))
    checkpoint.save_recognizer(
        path, params, MODEL, NAMES, {"synthetic": True, "data_source": "test"}
    )
    return str(path)


def _invert(ckpt, workdir, *extra, identities="0,s5", clones="3", steps="5"):
    argv = [
        "invert",
        "--checkpoint",
        ckpt,
        "--workdir",
        str(workdir),
        "--clones",
        clones,
        "--steps",
        steps,
    ]
    if identities is not None:
        argv += ["--identities", identities]
    return cli.main(argv + FAST + list(extra))


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("jaxmia invert: error:")
    for w in words:
        assert w in err, err
    return err


@pytest.mark.slow
def test_end_to_end_outputs(ckpt, tmp_path, capsys):
    assert _invert(ckpt, tmp_path) == 0
    with np.load(tmp_path / "inversions.npz") as z:
        assert z["clones"].shape == (2, 3, 16, 16, 1) and z["clones"].dtype == np.float32
        assert z["seeds"].shape == (2, 3, 16, 16, 1)
        assert z["identities"].tolist() == ["alice", "s5"]
        assert z["labels"].tolist() == [0, 2]
        for k in ("steps", "loss", "confidence", "seed_confidence", "diverged", "reason"):
            assert z[k].shape == (2, 3), k
        assert (z["steps"] == 5).all() and not z["diverged"].any()
        assert z["clones"].min() >= 0 and z["clones"].max() <= 1
        # clones of one identity differ (per-clone seeds and keys)
        assert np.abs(z["clones"][0, 0] - z["clones"][0, 1]).max() > 0.01
        assert (z["confidence"] > z["seed_confidence"]).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["checkpoint"] == ckpt
    assert [r["name"] for r in summary["identities"]] == ["alice", "s5"]
    assert summary["timing"]["chunks"] == 2 and summary["timing"]["chunk_size"] == 3
    assert summary["timing"]["compile_s"] > 0 and summary["timing"]["image_gradients"] == 2 * 3 * 5
    assert summary["warnings"] == []
    for r in summary["identities"]:
        assert (tmp_path / r["grid"]).is_file()
        assert r["confidence_mean"] > r["seed_confidence_mean"]
    assert "2 identities x 3 clones" in capsys.readouterr().out


def test_resume_skips_finished_chunks(ckpt, tmp_path):
    assert _invert(ckpt, tmp_path) == 0
    with np.load(tmp_path / "inversions.npz") as z:
        first = z["clones"]
    kept = tmp_path / "chunks" / "chunk_00000.npz"
    os.utime(kept, (1, 1))  # an old mtime shows whether the rerun rewrote it
    (tmp_path / "chunks" / "chunk_00001.npz").unlink()
    (tmp_path / "inversions.npz").unlink()
    # how the steps run is not part of the run's identity: results are the same
    assert _invert(ckpt, tmp_path, "--config.inversion.steps_per_call=2") == 0
    assert kept.stat().st_mtime == 1
    with np.load(tmp_path / "inversions.npz") as z:
        np.testing.assert_allclose(z["clones"], first, atol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["timing"]["chunks_resumed"] == 1


def test_resume_keeps_the_recorded_chunk_size(ckpt, tmp_path, monkeypatch):
    """Chunk files hold fixed clone ranges: a rerun where chunk_size would now come out
    otherwise (another machine's devices or memory) keeps the workdir's size."""
    assert _invert(ckpt, tmp_path) == 0
    with np.load(tmp_path / "inversions.npz") as z:
        first = z["clones"]
    (tmp_path / "chunks" / "chunk_00001.npz").unlink()
    monkeypatch.setattr(inv, "chunk_size", lambda *a, **k: 2)
    assert _invert(ckpt, tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timing"]["chunk_size"] == 3 and summary["timing"]["chunks_resumed"] == 1
    with np.load(tmp_path / "inversions.npz") as z:
        np.testing.assert_allclose(z["clones"], first, atol=1e-6)


def test_other_settings_in_the_same_workdir_is_an_error(ckpt, tmp_path, capsys):
    assert _invert(ckpt, tmp_path) == 0
    capsys.readouterr()
    assert _invert(ckpt, tmp_path, "--config.inversion.learning_rate=0.5", steps="6") == 2
    _one_line_error(capsys, "inversion.learning_rate", "steps", str(tmp_path))


def test_default_identities_are_all_and_seed_is_shared(ckpt, tmp_path):
    assert _invert(ckpt, tmp_path, "--config.inversion.seed=grey", identities=None, clones="2") == 0
    with np.load(tmp_path / "inversions.npz") as z:
        assert z["identities"].tolist() == list(NAMES)
        assert z["seeds"].shape == (1, 1, 16, 16, 1)
        np.testing.assert_allclose(z["seeds"], 0.5)


@pytest.mark.parametrize(
    "args,kwargs,words",
    [
        ((), {"identities": "0,zed"}, ["'zed'", "0..2", "alice"]),
        ((), {"identities": "3"}, ["--identities 3", "0..2"]),
        ((), {"clones": "0"}, ["--clones 0", "positive"]),
        ((), {"steps": "-1"}, ["--steps -1", "positive"]),
        (("--config.inversion.loss=l1",), {}, ["inversion.loss", "least_squares"]),
        (("--config.inversion.seed=mean",), {}, ["auxiliary", "seed_source"]),
        (("--config.inversion.feature_weight=0.1",), {}, ["no batch normalisation", "ResNet R_T"]),
    ],
)
def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, args, kwargs, words):
    assert _invert(ckpt, tmp_path, *args, **kwargs) == 2
    _one_line_error(capsys, *words)


def test_missing_checkpoint(tmp_path, capsys):
    assert _invert(str(tmp_path / "nothing"), tmp_path / "out") == 2
    _one_line_error(capsys, "nothing")


def test_seed_image_of_the_wrong_size(ckpt, tmp_path, capsys):
    bad = tmp_path / "face.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
    extra = ["--config.inversion.seed=files", f"--config.inversion.seed_files={bad}"]
    assert _invert(ckpt, tmp_path / "out", *extra) == 2
    _one_line_error(capsys, str(bad), "10x12", "expected 16x16")


def test_seed_images_from_files(ckpt, tmp_path):
    good = tmp_path / "face.png"
    Image.fromarray(np.full((16, 16), 51, np.uint8)).save(good)
    extra = ["--config.inversion.seed=files", f"--config.inversion.seed_files={good}"]
    assert _invert(ckpt, tmp_path / "out", *extra) == 0
    with np.load(tmp_path / "out" / "inversions.npz") as z:
        np.testing.assert_allclose(z["seeds"], 0.2)


def test_every_clone_diverging_is_reported_and_fails(tmp_path, capsys):
    # A recognizer with a NaN weight makes every loss NaN.
    params = nnx.to_pure_dict(models.init(MODEL, jax.random.key(0))[1])
    params["head"]["bias"] = params["head"]["bias"].at[0].set(np.nan)
    broken = str(tmp_path / "broken")
    checkpoint.save_recognizer(broken, params, MODEL, NAMES, {})
    assert _invert(broken, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "warning: 6 of 6 clones diverged" in err
    assert err.strip().splitlines()[-1].startswith("jaxmia invert: error: every clone diverged")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"]["diverged"] == 6 and summary["warnings"]
    with np.load(tmp_path / "out" / "inversions.npz") as z:
        assert z["diverged"].all() and (z["steps"] == 0).all()


def test_infinite_learning_rate_is_refused(ckpt, tmp_path, capsys):
    assert _invert(ckpt, tmp_path, "--config.inversion.learning_rate=1e999") == 2
    _one_line_error(capsys, "inversion.learning_rate=inf", "finite")


@pytest.mark.slow
def test_seed_from_the_checkpoints_auxiliary_identities(tmp_path):
    """The default seed: per-clone means of faces of the split's auxiliary people."""
    from jaxmia.data import synthetic

    names = ("synthetic_0000", "synthetic_0001", "synthetic_0002")
    aux = ["synthetic_0003", "synthetic_0004"]
    synth = {"num_identities": 5, "images_per_identity": 4, "seed": 7}
    meta = {
        "data": {"source": "synthetic", "synthetic": synth},
        "split": {"attacked": ["synthetic_0002", "synthetic_0000"], "aux_identities": aux},
    }
    _, params = models.init(MODEL, jax.random.key(0))
    path = str(tmp_path / "rt")
    checkpoint.save_recognizer(path, params, MODEL, names, meta)
    out = tmp_path / "out"
    argv = ["invert", "--checkpoint", path, "--workdir", str(out), "--clones", "3", "--steps", "2"]
    argv += ["--config.inversion.seed_subset_size=256", f"--config.data.cache_dir={tmp_path}"]
    assert cli.main(argv) == 0
    images, labels, _ = synthetic.make_faces(5, 4, (16, 16), 1, seed=7)
    pool = images[labels >= 3]  # 8 faces: each seed is the mean of 4 of them (half the pool)
    with np.load(out / "inversions.npz") as z:
        assert z["identities"].tolist() == ["synthetic_0002", "synthetic_0000"]  # the attacked
        seeds = z["seeds"].reshape(6, -1)
    for s in seeds:
        # the mean of 4 of the 8 aux faces: some 4-subset matches to float tolerance
        best = min(
            np.abs(pool[list(c)].mean(0).reshape(-1) - s).max()
            for c in itertools.combinations(range(8), 4)
        )
        assert best < 1e-5
    assert np.abs(seeds[0] - seeds[1]).max() > 1e-3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed_from"].startswith("synthetic (2 identities, 8 faces)")


class _TwoProcesses:
    """``jaxmia invert --distributed`` in two processes on this machine (gloo), as on two hosts,
    started at once; ``results()`` waits for their (exit code, stderr)."""

    def __init__(self, tmp_path, checkpoints, workdirs):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
        self.procs, self.logs = [], []
        for i, (ckpt, workdir) in enumerate(zip(checkpoints, workdirs, strict=True)):
            cmd = [sys.executable, "-m", "jaxmia", "invert", "--workdir", str(workdir),
                   "--checkpoint", ckpt, "--clones", "3", "--steps", "5", "--identities", "0,s5",
                   *FAST, "--distributed", "--coordinator", address, "--num-processes", "2",
                   "--process-id", str(i)]  # fmt: skip
            self.logs.append(tmp_path / f"err{i}")
            with self.logs[-1].open("w") as err:  # files, not pipes: a full pipe would block one
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=err, stderr=err))

    def results(self) -> list[tuple[int, str]]:
        try:
            return [
                (p.wait(timeout=180), log.read_text())
                for p, log in zip(self.procs, self.logs, strict=True)
            ]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module", autouse=True)
def failing_pair(request, ckpt, tmp_path_factory):
    """The two processes of test_a_failing_process_stops_the_other_with_one_line (the last test
    here), started with the module: process 0's wait of about 30 s for JAX's collectives to time
    out passes while the other tests run, not as idle time of this file's worker. Not started
    where that test is deselected (``-m "not slow"``)."""
    wanted = test_a_failing_process_stops_the_other_with_one_line.__name__
    if not any(item.name == wanted for item in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("failing")
    pair = _TwoProcesses(tmp, [ckpt, str(tmp / "missing")], [tmp / "w", tmp / "w"])
    yield tmp, pair
    pair.kill()


@pytest.mark.slow
def test_two_processes_as_two_hosts_write_what_one_process_does(ckpt, tmp_path):
    """Process 0 writes the clones a single process makes; process 1 (given a workdir of its
    own to show it) writes nothing."""
    shared, other = tmp_path / "shared", tmp_path / "other"
    for code, log in _TwoProcesses(tmp_path, [ckpt, ckpt], [shared, other]).results():
        assert code == 0, log[-3000:]
    assert not other.exists()
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["timing"]["chunk_size"] == 3 and summary["timing"]["chunks"] == 2
    single = tmp_path / "single"
    assert _invert(ckpt, single, "--config.inversion.shard=false") == 0
    with np.load(shared / "inversions.npz") as a, np.load(single / "inversions.npz") as b:
        np.testing.assert_allclose(a["clones"], b["clones"], atol=1e-5)
        assert (a["steps"] == 5).all()


@pytest.mark.parametrize(
    "extra, words",
    [
        ([], ["--distributed", "could not join", "--coordinator HOST:PORT"]),
        (["--coordinator", "127.0.0.1:1"], ["expected all three or none"]),
        (["--process-id", "0"], ["expected all three or none"]),  # without --distributed
    ],
)
def test_distributed_without_a_cluster_is_a_one_line_error(
    ckpt, tmp_path, capsys, monkeypatch, extra, words
):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))]:
        monkeypatch.delenv(k)  # no cluster to detect
    flags = extra if "--process-id" in extra else ["--distributed", *extra]
    assert _invert(ckpt, tmp_path, *flags) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "inversions.npz").exists()


@pytest.mark.parametrize(
    "bad",
    [
        ["--config.inversion.seed=mean"],  # no auxiliary faces recorded: fails making seeds
        ["--config.inversion.seed=files", "--config.inversion.seed_files=/no/such.png"],
        ["--identities", "zed"],
    ],
)
def test_a_run_that_fails_on_bad_input_does_not_claim_the_workdir(ckpt, tmp_path, capsys, bad):
    """Everything is checked before the workdir is claimed: the corrected rerun runs."""
    argv_extra = [a for a in bad if not a.startswith("--identities") and a != "zed"]
    kwargs = {"identities": "zed"} if "zed" in bad else {}
    assert _invert(ckpt, tmp_path, *argv_extra, **kwargs) == 2
    capsys.readouterr()
    assert not (tmp_path / "run.json").exists()
    assert _invert(ckpt, tmp_path) == 0


@pytest.mark.slow
def test_a_failing_process_stops_the_other_with_one_line(failing_pair):
    """Process 1 is given a checkpoint that is not there: both stop with one-line errors
    (process 0 once JAX's collectives time out, about 30 s) and nothing is written."""
    tmp_path, pair = failing_pair
    (code0, log0), (code1, log1) = pair.results()
    assert code1 == 2 and "checkpoint" in log1 and "not found" in log1, log1[-3000:]
    assert code0 == 2 and "another process stopped or is unreachable" in log0, log0[-3000:]
    for log in (log0, log1):
        assert "Traceback" not in log
    assert not (tmp_path / "w" / "inversions.npz").exists()
