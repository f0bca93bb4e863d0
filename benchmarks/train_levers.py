"""Which training recipe makes the best CelebA recognizer? R_T of configs/celeba.py, one recipe
per row, each a plain ``jaxmia train --recognizer target`` run.

    python -m benchmarks.train_levers --workdir runs/train_levers            # every recipe
    python -m benchmarks.train_levers --workdir runs/train_levers --only paper-adamw --jobs 1

The recipes are chosen here, on split.seed 2 (``TUNED_ON``), and configs/celeba.py reports its
figures on another draw of the split, so the headline is not the best of several tries on the
split it is measured on. Each recipe runs in its own process pinned to one core (``--jobs``
at a time, XLA single-threaded) and writes WORKDIR/NAME like any ``jaxmia train`` workdir: a
rerun resumes unfinished recipes and skips finished ones (refusing a recipe whose settings
changed, as ``jaxmia train`` does). The table reports the last epoch's test accuracy, never the
best epoch's (that would choose on the test photos): WORKDIR/train_levers.json, .md and .png
(test accuracy per epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TUNED_ON = {"split.seed": 2}
CONFIG = "configs/celeba.py"
_SGD = {"train.optimizer": "sgd", "train.momentum": 0.9, "train.nesterov": True}
_ADAMW = {"train.optimizer": "adamw", "train.momentum": 0.0, "train.nesterov": False}
_RECIPE = {
    "train.crop_scale": 0.6,
    "train.saturation": 0.3,
    "train.label_smoothing": 0.1,
    "train.batch_size": 64,
    "train.warmup_epochs": 3,
}
_PAPER = {"model.arch": "paper", "model.dropout": 0.5}
_R10 = {
    "model.arch": "resnet",
    "model.widths": (16, 32, 64, 128),
    "model.blocks": (1, 1, 1, 1),
    "model.stem_kernel": 3,
    "model.stem_stride": 2,
    "model.stem_pool": False,
    "model.dropout": 0.0,
}
# name -> every model/train setting that differs from jaxmia's defaults (so that a change of
# configs/celeba.py's own defaults does not silently change a row).
RECIPES = {
    "paper-adam-plain": {
        **_PAPER,
        "train.optimizer": "adam",
        "train.learning_rate": 1e-3,
        "train.weight_decay": 0.0,
        "train.momentum": 0.0,
        "train.nesterov": False,
        "train.crop_scale": 1.0,
        "train.saturation": 0.0,
        "train.label_smoothing": 0.0,
        "train.batch_size": 32,
        "train.warmup_epochs": 2,
        "train.epochs": 60,
    },
    "paper-adamw": {
        **_PAPER,
        **_RECIPE,
        **_ADAMW,
        "train.learning_rate": 1e-3,
        "train.weight_decay": 0.05,
        "train.epochs": 100,
    },
    "paper-adamw-crop": {
        **_PAPER,
        **_RECIPE,
        **_ADAMW,
        "data.crop": 0.75,
        "train.learning_rate": 1e-3,
        "train.weight_decay": 0.05,
        "train.epochs": 100,
    },
    "resnet10-adamw": {
        **_R10,
        **_RECIPE,
        **_ADAMW,
        "train.learning_rate": 3e-3,
        "train.weight_decay": 0.05,
        "train.epochs": 60,
    },
    "resnet10-sgd": {
        **_R10,
        **_RECIPE,
        **_SGD,
        "train.learning_rate": 0.1,
        "train.weight_decay": 5e-4,
        "train.epochs": 100,
    },
}


def _value(v) -> str:
    return f"({','.join(map(str, v))})" if isinstance(v, tuple) else str(v)


def command(name: str, workdir: Path) -> list[str]:
    """The ``jaxmia train`` command line of one recipe."""
    overrides = {**TUNED_ON, "train.recognizer": "target", **RECIPES[name]}
    args = [f"--config.{k}={_value(v)}" for k, v in overrides.items()]
    return ["jaxmia", "train", "--config", CONFIG, "--workdir", str(workdir / name), *args]


def _metrics(folder: Path) -> list[dict]:
    path = folder / "target" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def row(name: str, workdir: Path) -> dict:
    """One recipe's figures from its workdir (the last epoch's, and its time)."""
    history = _metrics(workdir / name)
    epochs = RECIPES[name]["train.epochs"]
    last = history[-1] if history else {}
    summary_path = workdir / name / "target" / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    seconds = sum(m["seconds"] for m in history)
    return {
        "recipe": name,
        "arch": RECIPES[name]["model.arch"],
        "epochs": f"{last.get('epoch', 0)}/{epochs}",
        "test_accuracy": last.get("test_accuracy"),
        "train_accuracy": last.get("train_accuracy"),
        "minutes": round(seconds / 60, 1),
        "images_per_s": round(summary.get("train_images", 0) * len(history) / seconds, 1)
        if seconds and summary
        else None,
        "settings": RECIPES[name],
    }


def _pinned(cmd: list[str], core: int | None) -> list[str]:
    if core is not None and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *cmd]
    return cmd


def run(names: list[str], workdir: Path, jobs: int) -> None:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    }
    pending, running = list(names), []
    cores = list(range(jobs))
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            core = cores[len(running) % len(cores)] if jobs > 1 else None
            log = open(workdir / f"{name}.log", "a")  # noqa: SIM115 (held while it runs)
            proc = subprocess.Popen(
                _pinned(command(name, workdir), core), stdout=log, stderr=log, env=env
            )
            running.append((name, proc, log))
            print(f"started {name} ({' '.join(command(name, workdir))})", flush=True)
        time.sleep(5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"{name}: {status}; last: {row(name, workdir)['test_accuracy']}", flush=True)


def write(names: list[str], workdir: Path) -> None:
    rows = [row(n, workdir) for n in names]
    (workdir / "train_levers.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| recipe | arch | epochs | test acc. (last epoch) | train acc. | minutes | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(
            f"| {r['recipe']} | {r['arch']} | {r['epochs']} | {pct(r['test_accuracy'])} | "
            f"{pct(r['train_accuracy'])} | {r['minutes']} | {r['images_per_s']} |"
        )
    (workdir / "train_levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        h = _metrics(workdir / n)
        ax.plot([m["epoch"] for m in h], [m.get("test_accuracy") for m in h], label=n)
    ax.set(xlabel="epoch", ylabel="R_T test accuracy", title="CelebA R_T (split.seed 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "train_levers.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--only", default="", help="comma-separated recipe names")
    p.add_argument("--jobs", type=int, default=2, help="recipes at a time, one core each")
    p.add_argument("--table-only", action="store_true", help="write the table, train nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    unknown = set(names) - set(RECIPES)
    if unknown:
        sys.exit(f"--only: unknown recipes {sorted(unknown)}; expected from {list(RECIPES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        run(names, args.workdir, max(1, args.jobs))
    write(names, args.workdir)


if __name__ == "__main__":
    main()
