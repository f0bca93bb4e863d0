"""One attack over several split seeds: every judge's mean and spread, as JSON and a picture.

  python -m benchmarks.split_seeds --name att_gan runs/att-gan runs/att-gan-s3 runs/att-gan-s4

Each argument is the workdir of a finished ``jaxmia experiment`` of the same config on another
``split.seed``. For the attack with a prior (the experiment's headline), its pixel baseline and
the prior's seeds (``comparison.attacks``: ``prior``, ``pixels``, ``seeds``) it collects each
judge's top-1 on the clones, the face-detection rate and R_T's test accuracy, then the mean and
the sample standard deviation over the runs. One run is one draw of the split (which people are
attacked, which photos train R_T), so the spread is the figure to read beside the mean.

Writes benchmarks/results/NAME_split_seeds.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxmia import files
from jaxmia.judges import registry

OUT = Path(__file__).resolve().parent / "results"
ATTACKS = {"prior": "the prior's attack", "pixels": "pixel baseline", "seeds": "the prior's seeds"}


def run_figures(workdir: Path) -> dict:
    """One experiment's figures: {attack: {judge: top-1}} plus its seed and R_T's accuracy."""
    record = json.loads((workdir / "experiment.json").read_text())
    attacks = record["comparison"]["attacks"]
    missing = [a for a in ATTACKS if a not in attacks]
    if missing:
        raise SystemExit(f"{workdir}: expected an experiment with a prior and its baseline")
    figures = {a: dict(attacks[a]["top1"]) for a in ATTACKS}
    realism = {"prior": record["headline"], "pixels": record["baseline"]}
    for attack, part in realism.items():
        rate = (part.get("face_realism") or {}).get("clones", {}).get("face_detection_rate")
        if rate is not None:
            figures[attack]["face_detected"] = rate
    seeds = record["headline"].get("face_realism", {}).get("seeds", {})
    if "face_detection_rate" in seeds:
        figures["seeds"]["face_detected"] = seeds["face_detection_rate"]
    return {
        "split_seed": record["config"]["split"]["seed"],
        "R_T_test_accuracy": record["recognizers"]["target"]["test_accuracy"],
        "chance_top1": record["headline"]["chance_top1"],
        "clones": record["headline"]["clones"],
        "top1": figures,
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation of every figure present in all runs."""
    out = {}
    for attack in ATTACKS:
        names = set.intersection(*(set(r["top1"][attack]) for r in runs))
        out[attack] = {}
        for name in sorted(names, key=_order):
            values = np.array([r["top1"][attack][name] for r in runs])
            spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[attack][name] = {"mean": float(values.mean()), "sd": spread}
    accuracy = np.array([r["R_T_test_accuracy"] for r in runs])
    out["R_T_test_accuracy"] = {"mean": float(accuracy.mean()), "sd": float(accuracy.std(ddof=1))}
    return out


def _order(name: str) -> tuple[int, str]:
    order = [j.name for j in registry.JUDGES]
    return (order.index(name), name) if name in order else (len(order), name)


def plot(summary: dict, runs: list[dict], path: Path, title: str) -> None:
    """Bars of each judge's mean top-1 per attack, the spread as error bars, runs as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary["prior"] if n in summary["pixels"]]
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
    for i, attack in enumerate(ATTACKS):
        means = [100 * summary[attack].get(n, {"mean": np.nan})["mean"] for n in names]
        sds = [100 * summary[attack].get(n, {"sd": 0.0})["sd"] for n in names]
        ax.bar(x + (i - 1) * width, means, width, yerr=sds, capsize=3, label=ATTACKS[attack])
        for r in runs:
            dots = [100 * r["top1"][attack].get(n, np.nan) for n in names]
            ax.plot(x + (i - 1) * width, dots, "k.", markersize=3)
    chance = 100 * runs[0]["chance_top1"]
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.1f}%")
    ax.set_xticks(x, names, rotation=35, ha="right")
    ax.set_ylabel("top-1 on the clones (%); face_detected: rate")
    seeds = ", ".join(str(r["split_seed"]) for r in runs)
    ax.set_title(f"{title}: mean and sd over split seeds {seeds} (dots: each run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--name", required=True, help="results file stem, e.g. att_gan")
    args = parser.parse_args(argv)
    runs = [run_figures(w) for w in args.workdirs]
    if len({r["split_seed"] for r in runs}) != len(runs):
        raise SystemExit("expected runs of different split seeds")
    summary = summarise(runs)
    record = {
        "command": "python -m benchmarks.split_seeds --name "
        + args.name
        + " "
        + " ".join(str(w) for w in args.workdirs),
        "runs": {str(w): r for w, r in zip(args.workdirs, runs, strict=True)},
        "summary": summary,
    }
    OUT.mkdir(exist_ok=True)
    files.write_json(OUT / f"{args.name}_split_seeds.json", record)
    plot(summary, runs, OUT / f"{args.name}_split_seeds.png", args.name)
    for attack in ATTACKS:
        row = ", ".join(
            f"{n} {100 * v['mean']:.1f} ± {100 * v['sd']:.1f}%" for n, v in summary[attack].items()
        )
        print(f"{ATTACKS[attack]}: {row}")
    acc = summary["R_T_test_accuracy"]
    print(f"R_T test accuracy {100 * acc['mean']:.1f} ± {100 * acc['sd']:.1f}%")


if __name__ == "__main__":
    main()
