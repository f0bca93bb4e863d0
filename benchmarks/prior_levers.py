"""Which prior makes clones that survive the honest judges? One experiment's R_T, every judge.

    jaxmia prior --config configs/att.py --checkpoint runs/att-s0/target --workdir runs/vae-s0
    python -m benchmarks.prior_levers --experiment runs/att-s0 --config configs/att.py \\
        --workdir runs/prior_levers/att-s0 --clones 4 --generator runs/vae-s0
    python -m benchmarks.prior_levers --experiment runs/att --config configs/att.py \\
        --workdir runs/prior_levers/att --clones 20 --only "pixels;linear 64"

A trial is one row of TRIALS: ``inversion.FIELD`` overrides on top of the config's attack. Each
inverts the experiment's R_T (``EXPERIMENT/target``) on its attacked identities with the
``jaxmia invert`` stage and judges the clones with the ``jaxmia evaluate`` stage: R_E
(``EXPERIMENT/evaluation``), the second R_E of another architecture beside it
(``evaluation_other``) and the judges that are not CNNs, on the clones, their seeds, held-out
real photos and PGD controls (``jaxmia.judges.panel``). Each row records every judge's top-1 on the
clones, the Fréchet distance to R_E's photos in eigenface space, the KNN ratio, and the
inversion's image-gradients/s (compile time apart) beside the pixel attack's, measured in the
same run.

Settings are chosen on one experiment's split and reported on another's: run it first on an
experiment whose split no figure is quoted from (``runs/att-s0``: ``--config.split.seed=0``),
then the chosen rows on the reported split. Results go to WORKDIR/levers.jsonl (a rerun skips
finished trials) and a Markdown table to stdout; see benchmarks/prior_levers.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxmia import config as config_lib
from jaxmia import files
from jaxmia.stages import evaluate as evaluate_lib
from jaxmia.stages import invert

PIXELS: dict = {}
LINEAR = {"prior": "linear", "denoise": "none"}
VIEWS = {"views": 4, "jitter": 2, "flip": True, "zoom": 0.1, "blur": 1.0, "noise": 0.02}
# name -> inversion overrides (the config's attack otherwise: configs/att.py's max-margin 20,
# Adam 0.05, Gaussian blur every 10 steps, 200 steps).
TRIALS: dict[str, dict] = {
    "pixels": PIXELS,
    "pixels, 4 views": VIEWS,
    "linear 16": {**LINEAR, "prior_components": 16},
    "linear 32": {**LINEAR, "prior_components": 32},
    "linear 64": {**LINEAR, "prior_components": 64},
    "linear 64, coef 0.1": {**LINEAR, "prior_components": 64, "coef_weight": 0.1},
    "linear 64, Adam 0.2": {**LINEAR, "prior_components": 64, "learning_rate": 0.2},
    "linear 64 + residual 1, Gaussian": {
        "prior": "linear",
        "prior_components": 64,
        "prior_residual": True,
        "residual_weight": 1.0,
    },  # fmt: skip
    "linear 64, 4 views": {**LINEAR, "prior_components": 64, **VIEWS},
    # The VAE of `jaxmia prior` (--generator): trained on the same auxiliary pool.
    "generator": {"prior": "generator", "denoise": "none"},
    "generator, coef 0.1": {"prior": "generator", "denoise": "none", "coef_weight": 0.1},
    "generator + residual 1, Gaussian": {
        "prior": "generator",
        "prior_residual": True,
        "residual_weight": 1.0,
    },  # fmt: skip
    # DeepInversion's feature statistics: only for an R_T with batch norm (--target, a ResNet).
    "pixels, features 0.003": {"feature_weight": 0.003},
    "pixels, features 0.01": {"feature_weight": 0.01},
    "pixels, features 0.03": {"feature_weight": 0.03},
    "pixels, features 0.1": {"feature_weight": 0.1},
    "pixels, features 1": {"feature_weight": 1.0},
    "generator + residual 1, Gaussian, features 0.01": {
        "prior": "generator",
        "prior_residual": True,
        "residual_weight": 1.0,
        "feature_weight": 0.01,
    },  # fmt: skip
}
JUDGES = ("R_E", "R_E_transformed", "R_E_other", "R_E_other_transformed", "eigenface_nn",
          "eigenface_mean", "pixel_nn")  # fmt: skip
# What a setting is chosen by: the mean top-1 of the judges beside R_E (R_E's alone rewards
# adversarial patterns that fool R_T's twin).
HONEST = JUDGES[1:]


def honest_top1(row: dict) -> float:
    """The mean top-1 of the judges beside R_E on a row's clones."""
    return sum(row["top1"][j] for j in HONEST) / len(HONEST)


def run_trial(
    experiment: Path,
    base: Path,
    name: str,
    config_path: str,
    clones: int,
    generator: str,
    target: Path | None = None,
) -> dict:
    """Inverts and judges one setting; returns its row. ``target``: the R_T to invert
    (default EXPERIMENT/target), trained on the same split as the experiment's judges."""
    cfg = config_lib.load(config_path)
    for field, value in TRIALS[name].items():
        cfg.inversion[field] = value
    if cfg.inversion.prior == "generator":
        cfg.inversion.prior_checkpoint = generator
    cfg.inversion.clones = clones
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    out = base / "trials" / f"{slug}_c{clones}"
    t0 = time.perf_counter()
    invert.run(cfg, out / "inversions", checkpoint_dir=target or experiment / "target")
    inverted = time.perf_counter() - t0
    summary = evaluate_lib.run(
        cfg, out / "eval", inversions=out / "inversions", evaluator=experiment / "evaluation",
        progress=False,
    )  # fmt: skip
    judged = summary["judges"]
    timing = json.loads((out / "inversions" / "summary.json").read_text())["timing"]
    clones_top = judged["top"]["clones"]
    realism = judged["realism"]
    return {
        "name": name,
        "overrides": TRIALS[name],
        "clones": clones_top["R_E"]["count"],
        "clones_per_identity": clones,
        "top1": {j: clones_top[j]["top1"] for j in JUDGES if j in clones_top},
        "top5_R_E": clones_top["R_E"]["top5"],
        "seed_top1": {j: judged["top"]["seeds"][j]["top1"] for j in JUDGES if j in clones_top},
        "robust_best": max(clones_top[j]["top1"] for j in judged["robust"]),
        "inflation": judged["inflation"]["adversarial_inflation"],
        "frechet": realism["clones"]["frechet_eigenface"],
        "frechet_seeds": realism["seeds"]["frechet_eigenface"],
        "frechet_real": realism["real"]["frechet_eigenface"],
        "knn_below_1": realism["clones"]["knn_ratio_below_1"],
        "outside_span": realism["clones"]["residual_energy_mean"],
        "gradients_per_s": timing["image_gradients_per_s"],
        "compile_s": timing["compile_s"],
        "invert_s": inverted,
        "judges_s": judged["seconds"],
        "chance_top1": judged["chance_top1"],
        "grid": str(out / "eval"),
    }


def markdown(rows: list[dict]) -> str:
    head = ["setting", *JUDGES, "mean beside R_E", "Fréchet", "image-grads/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{100 * r['top1'][j]:.1f}%" if j in r["top1"] else "-" for j in JUDGES]
        lines.append(
            f"| {r['name']} | " + " | ".join(cells) + f" | {100 * honest_top1(r):.1f}% | "
            f"{r['frechet']:.1f} | {r['gradients_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="a jaxmia experiment workdir")
    p.add_argument("--config", required=True, help="the config that experiment ran")
    p.add_argument("--workdir", required=True)
    p.add_argument("--clones", type=int, default=4, help="per attacked identity")
    p.add_argument("--only", default=None, help="trial names separated by semicolons")
    p.add_argument("--generator", default="", help="a `jaxmia prior` folder for the generator rows")
    p.add_argument(
        "--target",
        default=None,
        help="another R_T to invert (default EXPERIMENT/target), trained on the same split: "
        "e.g. a ResNet for the feature-statistics rows (jaxmia experiment --until target)",
    )
    args = p.parse_args()
    names = list(TRIALS) if args.only is None else [n.strip() for n in args.only.split(";")]
    unknown = [n for n in names if n not in TRIALS]
    if unknown:
        raise SystemExit(f"unknown trial(s) {unknown}; known: {list(TRIALS)}")
    if not args.generator:
        names = [n for n in names if TRIALS[n].get("prior") != "generator"]
    if args.target is None:
        names = [n for n in names if not TRIALS[n].get("feature_weight")]
    base, experiment = Path(args.workdir), Path(args.experiment)
    results = base / "levers.jsonl"
    done = {(r["name"], r["clones_per_identity"]): r for r in files.read_jsonl(results)}
    rows = []
    for name in names:
        row = done.get((name, args.clones))
        if row is None:
            row = run_trial(experiment, base, name, args.config, args.clones, args.generator,
                            Path(args.target) if args.target else None)  # fmt: skip
            files.append_jsonl(results, row)
        rows.append(row)
        top = ", ".join(f"{j} {100 * v:.1f}%" for j, v in row["top1"].items())
        print(f"{name}: {top}; Fréchet {row['frechet']:.1f}", flush=True)
    print(markdown(rows))
    if rows:
        best = max(rows, key=honest_top1)
        print(f"best by the judges beside R_E: {best['name']} ({100 * honest_top1(best):.1f}%)")
        print(f"chance: {100 * rows[0]['chance_top1']:.1f}%; seeds: {rows[0]['seed_top1']}")


if __name__ == "__main__":
    main()
