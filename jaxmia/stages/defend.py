"""``jaxmia defend``: the defender's trade-off, leak against utility, one cell per defence.

    jaxmia defend --config configs/defences.py --workdir OUT

Each cell of ``defences.cells`` is the experiment of ``jaxmia.stages.experiment`` with the cell's
overrides (a defence of R_T: ``train.defence``, ``train.weight_decay``, ``model.dropout``, ...)
in ``OUT/cells/NAME``: R_T trained under the defence, attacked with the config's attack, and
the clones judged by R_E and every judge beside it. R_E and the second R_E are never defended,
so every cell takes them over from the first cell's (``experiment.adopt``): one judge for all.
With ``defences.reuse`` (a finished experiment's workdir), cells take over its R_T, R_E and
second R_E wherever their settings equal the cell's: the undefended cell trains nothing.

The adaptive attacker: for each cell, the attack of the config and each of ``defences.adaptive``
(attack overrides) invert ``defences.pilot_clones`` clones per identity; the attacker keeps
the one whose pilot clones R_T recognises most often under random transforms (top-1 of R_T's
softmax averaged over the judges' transforms): knowledge an attacker with R_T's weights has,
never R_E's or the judges'. Where that is not the config's attack, it runs again on the full
budget in ``OUT/cells/NAME/adaptive`` (R_T and the judges taken over) and the cell gets a
second row.

Resumable cell by cell: a cell's experiment resumes as ``jaxmia experiment`` does, and a cell
run with other settings is refused with the fields named. ``OUT/defences.{json,csv,md,png}``
hold the table and the plot (R_T's test accuracy against top-1 by R_E and by the robust judges).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmia import checkpoint, files
from jaxmia import config as config_lib
from jaxmia.attacks import inversions_file
from jaxmia.errors import JaxmiaError
from jaxmia.judges import panel
from jaxmia.judges import transformed as transformed_lib
from jaxmia.report import study
from jaxmia.stages import experiment, invert

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The table's columns of judges: the panel's order, without R_T (the defended model).
JUDGE_COLUMNS = tuple(j for j in panel.TABLE_JUDGES if j != "R_T")
JUDGE_STAGES = ("evaluation", "evaluation_other")  # never defended: shared by every cell


def parse_cells(cfg: ml_collections.ConfigDict) -> list[tuple[str, list[str]]]:
    """``defences.cells`` as (name, ["config.FIELD=VALUE", ...]); "NAME: f=v; f=v" each.

    Raises:
      JaxmiaError: no cells, a name that is empty, repeated or not a folder name.
    """
    cells, seen = [], set()
    if not cfg.cells:
        raise JaxmiaError("config field defences.cells: expected at least one cell")
    for text in cfg.cells:
        name, _, rest = str(text).partition(":")
        name = name.strip()
        if not _NAME.match(name) or name in seen:
            raise JaxmiaError(
                f"config field defences.cells: cell {text!r}: expected 'NAME: field=value; ...' "
                "with a unique NAME of letters, digits and _.+-"
            )
        seen.add(name)
        cells.append((name, _overrides(rest)))
    return cells


def _overrides(text: str) -> list[str]:
    return [f"config.{o.strip()}" for o in text.split(";") if o.strip()]


def cell_config(
    config: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
    """The sweep's config with a cell's (or an attack's) overrides applied."""
    out = ml_collections.ConfigDict(config.to_dict())
    config_lib.apply_overrides(out, overrides)
    return out


def _check(config: ml_collections.ConfigDict) -> list[tuple[str, list[str]]]:
    cfg = config.defences
    cells = parse_cells(cfg)
    if not isinstance(cfg.pilot_clones, int) or cfg.pilot_clones < 1:
        raise JaxmiaError(
            f"config field defences.pilot_clones: expected an integer >= 1, got {cfg.pilot_clones}"
        )
    for name, overrides in cells:
        try:
            c = cell_config(config, overrides)
            experiment.check_config(c)
            for attack in cfg.adaptive:
                experiment.check_config(cell_config(c, _overrides(attack)))
        except JaxmiaError as e:
            raise JaxmiaError(f"defence cell {name!r}: {e}") from e
    return cells


def _pilot_score(config: ml_collections.ConfigDict, folder: Path, rec_t) -> dict[str, float]:
    """R_T's verdict under the judges' random transforms on a pilot inversion's clones: its
    top-1 and its mean probability of the target (which still ranks attacks where top-1 is
    100% for both)."""
    inv = inversions_file.load_inversions(folder)
    n = inv.clones.shape[1]
    names = np.repeat(np.asarray(inv.identities, object), n)
    index = {name: i for i, name in enumerate(rec_t.names)}
    targets = np.array([index[name] for name in names], np.int32)
    settings = panel.Settings.from_config(config.judges)
    (got,) = transformed_lib.robust_scores_each(
        [rec_t], inv.clones.reshape(-1, *inv.clones.shape[2:]), [targets],
        settings.transforms, jax.random.key(settings.seed),
    )  # fmt: skip
    return {
        "R_T_transformed_top1": float(np.mean(got.rank <= 1)),
        "R_T_transformed_probability": float(np.mean(got.score)),
    }


def choose_attack(config: ml_collections.ConfigDict, cell_dir: Path) -> dict[str, Any]:
    """The adaptive attacker's choice for a cell whose R_T is trained: pilots scored by R_T.

    By R_T's top-1 under transforms, then its mean probability of the target under them.
    """
    cfg = config.defences
    rec_t = checkpoint.load_recognizer(cell_dir / "target")
    trials = []
    for k, attack in enumerate(("", *cfg.adaptive)):
        c = cell_config(config, _overrides(attack))
        out = cell_dir / "pilot" / str(k)
        invert.run(c, out, checkpoint_dir=cell_dir / "target", clones=cfg.pilot_clones)
        trials.append({"attack": attack, **_pilot_score(c, out, rec_t)})

    def rank(i):  # ties keep the earlier: the config's own attack first
        t = trials[i]
        return t["R_T_transformed_top1"], t["R_T_transformed_probability"], -i

    best = max(range(len(trials)), key=rank)
    return {"trials": trials, "chosen": trials[best]["attack"]}


def _row(name, overrides, attack, records) -> dict[str, Any]:
    target = records["target"]["result"]
    h = records["report"]["result"]["headline"]
    clones = h.get("judges_top1", {}).get("clones", {})
    top1 = {"R_E": h["top1"], **{j: clones[j] for j in JUDGE_COLUMNS if j in clones}}
    privacy = target.get("defence", {}).get("privacy", {})
    return {
        "cell": name,
        "defence": "; ".join(o.removeprefix("config.") for o in overrides) or "none",
        "attack": attack or "as configured",
        "R_T_test_accuracy": target["test_accuracy"],
        "epsilon": privacy.get("epsilon"),
        "top1": top1,
        "robust_mean_top1": panel.mean_top1(clones),
        "seed_top1": h["seed_top1"],
        "chance_top1": h["chance_top1"],
        "clones": h["clones"],
    }


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True) -> dict:
    """The ``jaxmia defend`` stage: every cell, its adaptive attack, the table and the plot."""
    cells = _check(config)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    reuse = Path(config.defences.reuse) if config.defences.reuse else None
    if reuse is not None and not (reuse / experiment.RECORD).is_file():
        raise JaxmiaError(
            f"config field defences.reuse: {reuse}: expected the workdir of a jaxmia experiment "
            f"(with {experiment.RECORD})"
        )
    t0 = time.perf_counter()
    rows, first = [], None
    for i, (name, overrides) in enumerate(cells, 1):
        c = cell_config(config, overrides)
        cell_dir = workdir / "cells" / name
        cell_dir.mkdir(parents=True, exist_ok=True)
        print(f"=== cell {i}/{len(cells)} {name}: {'; '.join(overrides) or 'no defence'}")
        if reuse is not None:
            taken = experiment.adopt(reuse, cell_dir, c, ("target", *JUDGE_STAGES))
            if taken:
                print(f"  taken over from {reuse}: {', '.join(taken)}")
        if first is not None:
            experiment.adopt(first, cell_dir, c, JUDGE_STAGES)
        records = _in_cell(name, experiment.run_stages, c, cell_dir)
        first = first or cell_dir
        rows.append(_row(name, overrides, "", records))
        if not config.defences.adaptive:
            continue
        choice = _in_cell(name, _cached_choice, c, cell_dir)
        print(f"  adaptive attacker: {_describe(choice)}")
        rows[-1]["adaptive_choice"] = choice
        if not choice["chosen"]:
            rows[-1]["attack"] = "as configured (also the adaptive choice)"
            continue
        a = cell_config(c, _overrides(choice["chosen"]))
        adaptive = cell_dir / "adaptive"
        adaptive.mkdir(exist_ok=True)
        experiment.adopt(cell_dir, adaptive, a, ("target", "evaluation", "evaluation_other"))
        records = _in_cell(name, experiment.run_stages, a, adaptive)
        rows.append(_row(name, overrides, choice["chosen"], records))
        rows[-1]["adaptive"] = True
    summary = {
        "rows": rows,
        "seconds_this_run": time.perf_counter() - t0,
        "judges": {j: panel.JUDGE_TITLES.get(j, j) for j in JUDGE_COLUMNS},
        "robust": list(panel.ROBUST),
        "config": config.to_dict(),
    }
    files.write_json(workdir / "defences.json", summary)
    files.write_text(workdir / "defences.csv", _csv(rows))
    files.write_text(workdir / "defences.md", table(rows))
    if plots:
        write_plot(workdir / "defences.png", rows)
    print(table(rows))
    print(f"table: {workdir / 'defences.md'}")
    return summary


def _in_cell(name: str, fn, *args):
    try:
        return fn(*args)
    except JaxmiaError as e:
        raise JaxmiaError(f"defence cell {name!r}: {e}") from e


def _cached_choice(config: ml_collections.ConfigDict, cell_dir: Path) -> dict[str, Any]:
    """The adaptive choice, recorded in the cell (with its settings) so a rerun reuses it."""
    path = cell_dir / "adaptive.json"
    settings = {
        "adaptive": list(config.defences.adaptive),
        "pilot": config.defences.pilot_clones,
        "criterion": "R_T transformed top-1, then mean probability",
    }
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == settings:
            return old["choice"]
        raise JaxmiaError(
            f"{path}: chosen with other settings ({old.get('settings')}); delete it or use "
            "another --workdir"
        )
    choice = choose_attack(config, cell_dir)
    files.write_json(path, {"settings": settings, "choice": choice})
    return choice


def _describe(choice: dict[str, Any]) -> str:
    trials = ", ".join(
        f"{t['attack'] or 'as configured'} {100 * t['R_T_transformed_top1']:.1f}% "
        f"(p {t['R_T_transformed_probability']:.3f})"
        for t in choice["trials"]
    )
    chosen = choice["chosen"] or "as configured"
    return f"R_T's transformed top-1 of the pilots: {trials}; chosen: {chosen}"


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (percentages)."""
    judges = [j for j in JUDGE_COLUMNS if any(j in r["top1"] for r in rows)]
    head = ["cell", "defence", "attack", "R_T test acc.", "epsilon", *judges, "robust mean"]
    pct = study.pct
    return study.markdown(head, (
        [
            r["cell"], r["defence"], r["attack"], pct(r["R_T_test_accuracy"]),
            "" if r["epsilon"] is None else f"{r['epsilon']:.3g}",
            *(pct(r["top1"].get(j)) for j in judges), pct(r["robust_mean_top1"]),
        ]
        for r in rows
    ))  # fmt: skip


def _csv(rows: list[dict]) -> str:
    judges = [j for j in JUDGE_COLUMNS if any(j in r["top1"] for r in rows)]
    head = ["cell", "defence", "attack", "R_T_test_accuracy", "epsilon",
            *(f"top1_{j}" for j in judges), "robust_mean_top1", "seed_top1", "clones"]  # fmt: skip
    return study.csv_text(head, (
        [r["cell"], r["defence"], r["attack"], r["R_T_test_accuracy"], r["epsilon"],
         *(r["top1"].get(j) for j in judges), r["robust_mean_top1"], r["seed_top1"], r["clones"]]
        for r in rows
    ))  # fmt: skip


def write_plot(path: Path, rows: list[dict]) -> None:
    """Utility (R_T's test accuracy) against leak (top-1 by R_E; the robust judges' mean)."""
    fig, axes = study.figure(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, (what, title) in zip(
        axes,
        (("R_E", "top-1 by R_E (R_T's twin)"), ("robust", "mean top-1 of the robust judges")),
        strict=True,
    ):
        for r in rows:
            y = r["top1"]["R_E"] if what == "R_E" else r["robust_mean_top1"]
            if y is None:
                continue
            adaptive, undefended = "adaptive" in r, r["defence"] == "none"
            style = (
                ("^", "tab:red", 40) if adaptive
                else ("*", "black", 160) if undefended
                else ("o", "tab:blue", 40)
            )  # fmt: skip
            ax.scatter(100 * r["R_T_test_accuracy"], 100 * y, marker=style[0], color=style[1],
                       s=style[2], zorder=3)  # fmt: skip
            if not adaptive:
                ax.annotate(r["cell"], (100 * r["R_T_test_accuracy"], 100 * y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.axhline(100 * rows[0]["chance_top1"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xlabel("R_T test accuracy (%): utility")
        ax.set_ylabel("attack top-1 (%): leak")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], marker="*", color="black", s=160, label="no defence")
    axes[0].scatter([], [], marker="o", color="tab:blue", label="attack as configured")
    axes[0].scatter([], [], marker="^", color="tab:red", label="adaptive attacker")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    study.save_png(fig, path)
