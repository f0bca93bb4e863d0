"""The ``jaxmia clone`` stage: the cloning attack vs misrecognition and near-duplicate detection.

    cloning_study.run(config, "OUT")   # jaxmia clone --workdir OUT

Checks every setting, claims OUT for them (``OUT/cloning.json``, ``jaxmia.workdir``: only the
grid of cells, ``cloning.budgets/rates/scenarios/adaptive``, may change on a rerun), then trains
the service's recognizer (OUT/service, resumable), measures the near-duplicate detectors
(OUT/roc.json), then runs every scenario cell (scenario x query budget x misrecognition rate p;
the adaptive scenarios at the largest budget) into OUT/cells/*.json, each written atomically and
skipped on a rerun. Writes OUT/split.json, table.json, table.csv, accuracy.png, estimation.png,
roc.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from jaxmia import files
from jaxmia import workdir as workdir_lib
from jaxmia.attacks import cloning
from jaxmia.data import faces as faces_lib
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import train
from jaxmia.report import study
from jaxmia.service import policy as policy_lib

COLUMNS = (
    "scenario",
    "budget",
    "p",
    "queries",
    "images",
    "accounts",
    "detector",
    "scope",
    "keyed",
    "repeats",
    "clone_accuracy",
    "clone_accuracy_std",
    "fidelity",
    "fidelity_std",
    "label_accuracy",
    "kept",
    "altered",
    "precision",
    "recall",
    "detected",
    "suspicious_accounts",
    "strength",
    "seconds",
)


RECORD = "cloning.json"
# Fields a rerun may change: they add cells to the table, saved cells stay valid.
GRID = ("budgets", "rates", "scenarios", "adaptive")


def _check(cfg: ml_collections.ConfigDict) -> None:
    for name in (*cfg.scenarios, *cfg.adaptive):
        if name not in cloning.SCENARIOS:
            raise JaxmiaError(
                f"config field cloning.scenarios/adaptive: unknown scenario {name!r}; "
                f"expected some of {tuple(cloning.SCENARIOS)}"
            )
    if not cfg.budgets or any(int(b) < 1 for b in cfg.budgets):
        raise JaxmiaError(
            f"config field cloning.budgets: expected positive query counts, got {cfg.budgets}"
        )
    for p in cfg.rates:
        if not 0.0 <= p <= 1.0:
            raise JaxmiaError(
                f"config field cloning.rates: expected probabilities in [0, 1], got {p}"
            )
    if cfg.near_duplicates < 2:
        raise JaxmiaError(
            f"config field cloning.near_duplicates: expected >= 2, got {cfg.near_duplicates}"
        )
    if cfg.accounts < 1:
        raise JaxmiaError(f"config field cloning.accounts: expected >= 1, got {cfg.accounts}")
    if cfg.estimate not in cloning.ESTIMATES:
        raise JaxmiaError(
            f"config field cloning.estimate: expected one of {cloning.ESTIMATES}, "
            f"got {cfg.estimate!r}"
        )
    # Every policy field the scenarios use, checked before any training.
    for name in cloning.SCENARIOS:
        cloning.policy_for(name, 0.0, cfg)


def _cells(cfg: ml_collections.ConfigDict, pool_size: int) -> list[tuple[str, int, float]]:
    """(scenario, budget, p) of every cell, without cells that would repeat another."""
    cells: list[tuple[str, int, float]] = []
    biggest = max(int(b) for b in cfg.budgets)
    grid = [(s, int(b)) for s in cfg.scenarios for b in cfg.budgets] + [
        (s, biggest) for s in cfg.adaptive
    ]
    for scenario, budget in grid:
        spec = cloning.SCENARIOS[scenario]
        if spec["attack"] == "plain":
            budget = min(budget, pool_size)  # the plain attacker runs out of images first
        for p in cfg.rates if spec.get("p", True) is not False else (0.0,):
            cell = (scenario, budget, float(p))
            if cell not in cells:
                cells.append(cell)
    return cells


def _cell_path(workdir: Path, cell: tuple[str, int, float]) -> Path:
    scenario, budget, p = cell
    return workdir / "cells" / f"{scenario}_b{budget}_p{p:g}.json"


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the study's results depend on: the sections it reads, less the grid of cells."""
    skip = workdir_lib.RUN_ONLY | {f"cloning.{name}" for name in GRID}
    return workdir_lib.settings_of(config, "data", "model", "train", "cloning", skip=skip)


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True
) -> dict[str, Any]:
    """Runs (or resumes) the cloning study into ``workdir``; returns the table (also written).

    Returns:
      {"summary": ..., "rows": one per cell, "roc": the detectors' curves}, as table.json.
    """
    cfg = config.cloning
    _check(cfg)
    train.check_train_config(config.train)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    size = tuple(int(s) for s in cfg.image_size)
    faces = faces_lib.load_faces(
        config.data.source,
        image_size=size,
        channels=config.data.channels,
        cache_dir=config.data.cache_dir or None,
        synthetic=config.data.synthetic.to_dict(),
        crop=config.data.crop,
    )
    split = cloning.clone_split(faces.labels, cfg, cfg.seed)
    classes = {int(i): c for c, i in enumerate(split.service_identities)}
    relabel = np.vectorize(classes.__getitem__, otypes=[np.int32])
    x_train, y_train = faces.images[split.service_train], relabel(faces.labels[split.service_train])
    x_test, y_test = faces.images[split.service_test], relabel(faces.labels[split.service_test])
    pool = faces.images[split.pool]
    model_config = train.model_config_for(
        _with_size(config, size, cfg.dense_features), len(classes)
    )
    # Claimed only now, with every input checked, and before anything else is written.
    workdir_lib.claim(
        workdir / RECORD,
        settings(config),
        hint=f"use a new --workdir (only cloning.{'/'.join(GRID)} may change on a rerun)",
    )
    files.write_json(
        workdir / "split.json",
        {
            "source": faces.source,
            "synthetic": bool(faces.synthetic),
            "service_identities": [faces.names[i] for i in split.service_identities],
            "service_train": split.service_train,
            "service_test": split.service_test,
            "pool": split.pool,
        },
    )
    files.write_json(workdir / "config.json", config.to_dict())

    key = jax.random.key(cfg.seed)
    if cfg.service:
        return _run_remote(config, workdir, faces, split, pool, (x_test, y_test), model_config,
                           size, key, plots)  # fmt: skip
    service_train = _train_config(config, cfg.service_epochs)
    graphdef, params, history = train.fit(
        model_config,
        service_train,
        x_train,
        y_train,
        key=jax.random.fold_in(key, 0),
        test=(x_test, y_test),
        workdir=workdir / "service",
        names=tuple(faces.names[i] for i in split.service_identities),
        progress=True,
    )
    service_accuracy = train.accuracy(graphdef, params, x_test, y_test)
    image_shape = (*size, config.data.channels)
    perturbation = cloning.Perturbation(**cfg.perturb.to_dict())

    roc_path = workdir / "roc.json"
    if roc_path.exists():
        roc = json.loads(roc_path.read_text())
    else:
        plain = policy_lib.Service(
            graphdef,
            params,
            policy=policy_lib.Policy(),
            key=jax.random.key(0),
            image_shape=image_shape,
        )
        # Positives: near-duplicates of the service's own photos; hard negatives: pairs of
        # different photos of one of its people (what a detector must not confuse).
        known = np.concatenate([split.service_train, split.service_test])
        roc = cloning.detector_roc(
            plain,
            faces.images[known],
            faces.labels[known],
            m=cfg.near_duplicates,
            perturbation=perturbation,
            key=jax.random.fold_in(key, 1),
        )
        files.write_json(roc_path, roc)

    cells = _cells(cfg, len(pool))
    clone_train = _train_config(config, cfg.clone_epochs)
    bar = tqdm.tqdm(cells, desc="clone", unit="cell")
    rows = []
    for cell in bar:
        path = _cell_path(workdir, cell)
        bar.set_postfix_str(f"{cell[0]} b={cell[1]} p={cell[2]:g}")
        if (row := study.finished_row(path)) is not None:
            rows.append(row)
            continue
        row = cloning.run_scenario(
            *cell,
            cfg=cfg,
            recognizer=(graphdef, params),
            image_shape=image_shape,
            pool=pool,
            test=(x_test, y_test),
            clone_model=model_config,
            clone_train=clone_train,
            # One key for every cell (common random numbers: the same clone initialisations and
            # near-duplicate noise), so that the scenarios differ by their policy, not by luck.
            key=jax.random.fold_in(key, 2),
            service_key=jax.random.fold_in(jax.random.fold_in(key, 3), int(round(cell[2] * 1000))),
        )
        files.write_json(path, row)
        rows.append(row)

    summary = _summary(rows, roc, cfg, service_accuracy, faces, history)
    return _write_table(workdir, summary, rows, roc, cfg, plots)


def _write_table(workdir, summary, rows, roc, cfg, plots) -> dict[str, Any]:
    """table.json, table.csv and the plots; the table printed."""
    table = _no_nan({"summary": summary, "rows": rows, "roc": roc})
    files.write_json(workdir / "table.json", table)
    files.write_text(workdir / "table.csv", _csv(rows))
    if plots:
        write_plots(workdir, rows, roc, cfg)
    print(_text_table(rows))
    print(json.dumps(summary, indent=1))
    return table


def _admin_key(cfg: ml_collections.ConfigDict) -> str:
    if cfg.service_admin_key:
        path = Path(cfg.service_admin_key)
        if not path.is_file():
            raise JaxmiaError(
                f"config field cloning.service_admin_key: {path}: expected the server's "
                "admin.key file"
            )
        return path.read_text().strip()
    key = os.environ.get("JAXMIA_ADMIN_KEY", "")
    if not key:
        raise JaxmiaError(
            "cloning.service: the server's administrator key is needed (the ground truth): set "
            "config field cloning.service_admin_key to its admin.key file, or JAXMIA_ADMIN_KEY"
        )
    return key


def _run_remote(config, workdir, faces, split, pool, test, model_config, size, key, plots):
    """The study against a served service: each scenario's attacker, the server's policy."""
    from jaxmia.service import client as client_lib

    cfg = config.cloning
    admin = _admin_key(cfg)
    boss = client_lib.Client(cfg.service, admin)
    try:
        info = boss.policy()
        shape = (*size, config.data.channels)
        if tuple(info["image_shape"]) != shape or info["classes"] != model_config.num_classes:
            raise JaxmiaError(
                f"cloning.service {cfg.service}: serves {info['classes']} identities of "
                f"{info['image_shape']} images; this config's split has "
                f"{model_config.num_classes} of {list(shape)} (serve the checkpoint a local "
                "jaxmia clone of this config trained: WORKDIR/service)"
            )
        truth = np.concatenate(
            [boss.truth(test[0][i : i + 256]) for i in range(0, len(test[0]), 256)]
        )
    finally:
        boss.close()
    service_accuracy = float((truth == test[1]).mean())
    clone_train = _train_config(config, cfg.clone_epochs)
    biggest = max(int(b) for b in cfg.budgets)
    # One cell per attacker and budget: scenarios that differ by policy alone are one attacker
    grid = [(s, int(b)) for s in cfg.scenarios for b in cfg.budgets]
    grid += [(s, biggest) for s in cfg.adaptive]
    cells = {(cloning.remote_attacker(s, cfg)[0], b): s for s, b in reversed(grid)}
    rows = []
    bar = tqdm.tqdm(list(cells.items())[::-1], desc="clone (served)", unit="cell")
    for (name, budget), scenario in bar:
        path = workdir / "cells" / f"served_{name}_b{budget}.json"
        bar.set_postfix_str(f"{name} b={budget}")
        if (row := study.finished_row(path)) is not None:
            rows.append(row)
            continue
        row = cloning.run_remote(
            scenario, budget, cfg=cfg, url=cfg.service, admin_key=admin, pool=pool, test=test,
            clone_model=model_config, clone_train=clone_train, key=jax.random.fold_in(key, 2),
        )  # fmt: skip
        files.write_json(path, row)
        rows.append(row)
    summary = {
        "data": faces.source,
        "synthetic": bool(faces.synthetic),
        "service": cfg.service,
        "policy": info["policy"],
        "service_test_accuracy": service_accuracy,
    }
    return _write_table(workdir, summary, rows, None, cfg, plots)


def _with_size(config: ml_collections.ConfigDict, size, dense) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.image_size = size
    c.model.dense_features = tuple(dense)
    return c


def _train_config(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict(config.train.to_dict())
    t.epochs = int(epochs)
    t.batch_size = int(config.cloning.batch_size)
    t.checkpoint_every = max(1, int(epochs))
    return t


def _summary(rows, roc, cfg, service_accuracy, faces, history) -> dict[str, Any]:
    """The story in numbers at the largest budget and first rate."""
    hash_at = {
        "radius": cfg.radius,
        "detection_rate": roc["hash"]["tpr"][cfg.radius],
        "false_positive_rate": roc["hash"]["fpr"][cfg.radius],
    }
    t = np.asarray(roc["embedding"]["threshold"])
    i = int(np.argmin(np.abs(t - cfg.cosine)))
    embedding_at = {
        "cosine": cfg.cosine,
        "detection_rate": roc["embedding"]["tpr"][i],
        "false_positive_rate": roc["embedding"]["fpr"][i],
    }
    best = {}
    for r in rows:
        key = (r["scenario"], r["p"])
        if key not in best or r["budget"] > best[key]["budget"]:
            best[key] = r
    return {
        "data": faces.source,
        "synthetic": bool(faces.synthetic),
        "service_test_accuracy": service_accuracy,
        "service_epochs": len(history),
        "hash_detector": hash_at,
        "embedding_detector": embedding_at,
        "at_largest_budget": {
            f"{s}@p={p:g}": {
                k: r[k]
                for k in (
                    "queries",
                    "images",
                    "clone_accuracy",
                    "fidelity",
                    "label_accuracy",
                    "precision",
                    "recall",
                    "detected",
                )
            }
            for (s, p), r in best.items()
        },
    }


def _no_nan(obj: Any) -> Any:
    """NaN (a metric with nothing to measure, e.g. precision of a plain attack) as JSON null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    return obj


def _csv(rows: list[dict]) -> str:
    def cell(v: Any) -> Any:
        return f"{v:.4f}" if isinstance(v, float) else v

    return study.csv_text(
        COLUMNS, ([cell(r.get(k, "")) for k in COLUMNS] for r in rows), lineterminator="\n"
    )


def _text_table(rows: list[dict]) -> str:
    head = (
        f"{'scenario':<22}{'budget':>7}{'p':>5}{'queries':>8}{'acc':>7}{'fid':>7}{'labels':>7}"
        f"{'P':>6}{'R':>6}{'det':>6}"
    )
    lines = [head]
    for r in rows:
        f = lambda v: "   -" if v != v else f"{v:.2f}"  # noqa: E731 - nan as a dash
        lines.append(
            f"{r['scenario']:<22}{r['budget']:>7}{r['p']:>5.2f}{r['queries']:>8}"
            f"{r['clone_accuracy']:>7.3f}{r['fidelity']:>7.3f}{r['label_accuracy']:>7.3f}"
            f"{f(r['precision']):>6}{f(r['recall']):>6}{f(r['detected']):>6}"
        )
    return "\n".join(lines)


def write_plots(
    workdir: Path, rows: list[dict], roc: dict | None, cfg: ml_collections.ConfigDict
) -> None:
    """accuracy.png (clone accuracy vs queries), estimation.png (precision/recall), roc.png."""
    rates = sorted({r["p"] for r in rows if r["p"] > 0}) or [0.0]
    most = max(r["queries"] for r in rows)
    fig, axes = study.figure(
        1, len(rates), figsize=(8 * len(rates), 4.8), squeeze=False, layout="constrained"
    )
    for ax, p in zip(axes[0], rates, strict=True):
        for name in cfg.scenarios:
            spec = cloning.SCENARIOS[name]
            pts = sorted(
                (r["queries"], r["clone_accuracy"], r.get("clone_accuracy_std", 0.0))
                for r in rows
                if r["scenario"] == name and (r["p"] == p or spec.get("p", True) is False)
            )
            if not pts:
                continue
            q, acc, std = zip(*pts, strict=True)
            line = ax.errorbar(q, acc, yerr=std, marker="o", capsize=3, label=name)
            if spec["attack"] == "plain" and q[-1] < most:
                # The plain attacker has run out of pool images: more budget buys nothing.
                ax.plot([q[-1], most], [acc[-1]] * 2, ls=":", color=line[0].get_color())
        for i, name in enumerate(cfg.adaptive):
            pts = [
                (r["queries"], r["clone_accuracy"])
                for r in rows
                if r["scenario"] == name and r["p"] == p
            ]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True), marker="^sDvP*"[i % 6], s=60, label=name, zorder=3
                )
        ax.set(
            xlabel="queries",
            ylabel="clone accuracy on the service's test faces",
            title=f"misrecognition p = {p:g} (dotted: pool exhausted; bars: spread over repeats)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    study.save_png(fig, workdir / "accuracy.png")

    est = [r for r in rows if r["attack"] != "plain" and r["p"] > 0]
    fig, ax = study.figure(figsize=(max(6, 0.45 * len(est) + 2), 4.5), layout="constrained")
    x = np.arange(len(est))
    ax.bar(x - 0.2, [r["precision"] for r in est], 0.4, label="precision")
    ax.bar(x + 0.2, [r["recall"] for r in est], 0.4, label="recall")
    ax.set_xticks(
        x,
        [f"{r['scenario']}\nb={r['budget']} p={r['p']:g}" for r in est],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.set(
        ylim=(0, 1.05),
        ylabel="estimate of the altered answers",
        title="estimation attack vs the service's ground truth",
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    study.save_png(fig, workdir / "estimation.png")

    if roc is None:  # a served service's study: its detector is not measured here
        return
    fig, axes = study.figure(1, 2, figsize=(11, 4.5), layout="constrained")
    h, e = roc["hash"], roc["embedding"]
    axes[0].plot(h["fpr"], h["tpr"], marker=".")
    axes[0].scatter(
        [h["fpr"][cfg.radius]],
        [h["tpr"][cfg.radius]],
        color="red",
        zorder=3,
        label=f"radius {cfg.radius}",
    )
    axes[0].set(title="DCT hash, Hamming radius 0..64")
    i = int(np.argmin(np.abs(np.asarray(e["threshold"]) - cfg.cosine)))
    axes[1].plot(e["fpr"], e["tpr"], marker=".")
    axes[1].scatter(
        [e["fpr"][i]], [e["tpr"][i]], color="red", zorder=3, label=f"cosine {cfg.cosine:g}"
    )
    axes[1].set(title="embedding (penultimate features), cosine threshold")
    for ax in axes:
        # FPR is what matters at the low end: a linear scale near 0, logarithmic above 1%.
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set(
            xlabel="false positives: other photos of the same person",
            ylabel="detected near-duplicates",
            xlim=(0, 1.05),
            ylim=(-0.02, 1.02),
        )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.legend()
        ax.grid(alpha=0.3)
    study.save_png(fig, workdir / "roc.png")
