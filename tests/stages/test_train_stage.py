"""`jaxmia train` as a user runs it: in process for speed, and once killed for real."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmia import checkpoint, cli, files

SMALL = [
    "--config.data.source=synthetic",
    "--config.data.image_size=(32,32)",
    "--config.data.synthetic.num_identities=12",
    "--config.data.synthetic.images_per_identity=6",
    "--config.split.num_attacked=2",
    "--config.split.test_per_identity=2",
    "--config.model.dense_features=(64,64)",
    "--config.train.batch_size=16",
    "--config.train.epochs=2",
    "--config.train.checkpoint_every=1",
]


def test_train_all(tmp_path, capsys):
    assert cli.main(["train", "--workdir", str(tmp_path), *SMALL]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    rec = checkpoint.load_recognizer(tmp_path)
    assert rec.step == 2 and rec.config.num_classes == 12 and rec.config.image_size == (32, 32)
    assert rec.meta["synthetic"] is True and rec.meta["role"] == "all"
    assert len(rec.meta["train_files"]) == 12 * 4
    split = json.loads((tmp_path / "split.json").read_text())
    assert set(split) >= {"target", "evaluation", "attacked", "aux"}
    assert [m["epoch"] for m in files.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_train_both_shares_only_attacked(tmp_path):
    assert cli.main(["train", "--workdir", str(tmp_path), "--recognizer", "both", *SMALL]) == 0
    target = checkpoint.load_recognizer(tmp_path / "target")
    evaluation = checkpoint.load_recognizer(tmp_path / "evaluation")
    shared = set(target.names) & set(evaluation.names)
    assert shared == set(json.loads((tmp_path / "split.json").read_text())["attacked"])
    assert len(shared) == 2
    # Disjoint photos of the attacked identities.
    assert not set(target.meta["train_files"]) & set(evaluation.meta["train_files"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.train.epoch=3"], "unknown config field config.train.epoch"),
        (["--config.data.source=folder:does/not/exist"], "does/not/exist"),
        (["--config.data.source=nowhere:x"], "nowhere"),
        (["--config.split.num_attacked=40"], "identities"),
        (["--config.train.optimizer=rmsprop"], "train.optimizer"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), *SMALL, *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may come before it
    assert "Traceback" not in err
    assert last.startswith("jaxmia train: error:") and message in last
    assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_killed_training_resumes(tmp_path, capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = ["train", "--workdir", str(tmp_path), *SMALL, "--config.train.epochs=16"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxmia", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and checkpoint.manager(tmp_path).latest_step() in (None, 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.manager(tmp_path).latest_step()
    assert killed_at is not None and 1 <= killed_at < 16
    # The rerun in this process (the command `python -m jaxmia` runs): no second start-up.
    assert cli.main(argv) == 0, capsys.readouterr().err
    epochs = [m["epoch"] for m in files.read_jsonl(tmp_path / "metrics.jsonl")]
    assert epochs == list(range(1, 17))
    assert checkpoint.load_recognizer(tmp_path).step == 16
    summary = json.loads(Path(tmp_path / "train_summary.json").read_text())
    assert np.isfinite(summary["test_accuracy"])
