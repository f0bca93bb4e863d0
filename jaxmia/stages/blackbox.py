"""``jaxmia blackbox``: model inversion without R_T's weights: clone the service, invert the clone.

    jaxmia blackbox --config configs/att.py --workdir OUT --config.blackbox.experiment=RUN

The bridge between the two papers. RUN is a finished ``jaxmia experiment`` of the same config:
its R_T becomes a recognition service (``jaxmia.service.policy``) with each scenario's policy (no
defence, intentional misrecognition, misrecognition with near-duplicate detection against the
estimation attacker, ``cloning.SCENARIOS``); the attacker owns only the public auxiliary faces
the gray-box seed is made from, asks the service about them within the query budget (the
cloning attack, ``cloning.attack``), trains a clone recognizer of the config's architecture on
the answers, and runs the config's gray-box inversion on the clone. The clones are judged as
the experiment's are: by R_T (does the real service accept them?), R_E and every judge beside
it (``jaxmia.judges.panel``). The experiment's own result (inverting R_T itself) is the table's
gray-box row.

Resumable cell by cell (OUT/cells/SCENARIO_bBUDGET.json); a rerun with other settings is
refused. Writes OUT/blackbox.{json,csv,md,png}.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmia import checkpoint, files
from jaxmia import workdir as workdir_lib
from jaxmia.attacks import cloning, inversions_file, priors
from jaxmia.attacks import query as query_lib
from jaxmia.errors import JaxmiaError
from jaxmia.judges import panel as panel_lib
from jaxmia.recognizers import train
from jaxmia.report import study
from jaxmia.service import policy as policy_lib
from jaxmia.stages import evaluate, experiment, invert

RECORD = "settings.json"  # the settings claimed; blackbox.json is the table
GRID = ("scenarios", "budgets", "query.attacks", "query.outputs")  # cells: a rerun may add
JUDGES = panel_lib.TABLE_JUDGES


def _check(config: ml_collections.ConfigDict) -> Path:
    bb = config.blackbox
    if not bb.experiment:
        raise JaxmiaError(
            "config field blackbox.experiment: expected the workdir of a finished jaxmia "
            "experiment of this config (its R_T is served, its R_E judges)"
        )
    for s in bb.scenarios:
        if s not in cloning.SCENARIOS or cloning.SCENARIOS[s].get("accounts"):
            raise JaxmiaError(
                f"config field blackbox.scenarios: {s!r}; expected some of "
                f"{tuple(k for k, v in cloning.SCENARIOS.items() if not v.get('accounts'))}"
            )
    if not bb.budgets or any(not isinstance(b, int) or b < 1 for b in bb.budgets):
        raise JaxmiaError(
            f"config field blackbox.budgets: expected query counts >= 1, got {bb.budgets}"
        )
    if not 0 <= bb.rate <= 1:
        raise JaxmiaError(f"config field blackbox.rate: expected a probability, got {bb.rate}")
    if not isinstance(bb.clone_epochs, int) or bb.clone_epochs < 1:
        raise JaxmiaError(
            f"config field blackbox.clone_epochs: expected >= 1, got {bb.clone_epochs}"
        )
    source = Path(bb.experiment)
    records = experiment.read_records(source) if source.is_dir() else {}
    settings = experiment.stage_settings(config)
    for stage in ("target", "evaluation", "report"):
        record = records.get(stage, {})
        if record.get("status") != "done":
            raise JaxmiaError(
                f"config field blackbox.experiment: {source}: stage {stage!r} is not done; run "
                f"jaxmia experiment --workdir {source} with this config first"
            )
        old = record.get("settings", {})
        differ = workdir_lib.differing(old, settings[stage])
        if differ and stage != "report":
            raise JaxmiaError(
                f"config field blackbox.experiment: {source}: its {stage} stage was run with "
                f"other settings ({workdir_lib.describe(old, settings[stage], differ)})"
            )
    q = bb.query
    for attack in q.attacks:
        _query_settings(q, attack)  # refused here, before any work
    for output in q.outputs:
        output_policy(output)
    if q.attacks and not q.prior:
        raise JaxmiaError(
            "config field blackbox.query.prior: the query attacks need a generator folder "
            "(jaxmia prior) trained on the public faces"
        )
    if not isinstance(q.clones, int) or q.clones < 1:
        raise JaxmiaError(f"config field blackbox.query.clones: expected >= 1, got {q.clones}")
    return source


def output_policy(output: str) -> policy_lib.Policy:
    """The service's answers for "probs", "probs:D", "topk:K" or "label"."""
    kind, _, n = str(output).partition(":")
    try:
        if kind == "probs":
            return policy_lib.Policy(answer="probs", decimals=int(n) if n else -1)
        if kind == "topk" and n:
            return policy_lib.Policy(answer="topk", top_k=int(n))
        if kind == "label" and not n:
            return policy_lib.Policy(answer="label")
    except ValueError:
        pass
    raise JaxmiaError(
        f"config field blackbox.query.outputs: {output!r}; expected 'probs', 'probs:D', "
        "'topk:K' or 'label'"
    )


def _query_settings(q: ml_collections.ConfigDict, attack: str) -> query_lib.Settings:
    fields = ("steps", "samples", "sigma", "learning_rate", "init_codes", "radius", "growth",
              "step_size")  # fmt: skip
    try:
        return query_lib.Settings(attack=attack, **{f: q[f] for f in fields})
    except JaxmiaError as e:
        raise JaxmiaError(f"config field blackbox.query: {e}") from None


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    skip = workdir_lib.RUN_ONLY | {f"blackbox.{g}" for g in GRID}
    return workdir_lib.settings_of(
        config, "data", "split", "model", "train", "inversion", "judges", "cloning", "blackbox",
        skip=skip,
    )  # fmt: skip


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, plots: bool = True) -> dict:
    """The ``jaxmia blackbox`` stage; returns the table (also written)."""
    source = _check(config)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    bb, cc = config.blackbox, config.cloning
    t0 = time.perf_counter()
    src = experiment._Run(config, source)
    split = src.split()[0]
    faces = src.faces
    rec_t = checkpoint.load_recognizer(source / "target")
    rec_e = checkpoint.load_recognizer(source / "evaluation")
    other = source / "evaluation_other"
    rec_o = checkpoint.load_recognizer(other) if (other / "checkpoints").is_dir() else None
    workdir_lib.claim(
        workdir / RECORD, settings(config) | {"experiment": str(source.resolve())},
        hint="use a new --workdir (only blackbox.scenarios/budgets/query.attacks/query.outputs "
        "may change on a rerun)",
    )  # fmt: skip
    key = jax.random.key(bb.seed)
    # The attacker's faces: the public auxiliary pool, in an order of the attacker's choosing.
    pool = faces.images[split.aux]
    pool = pool[np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(pool)))]
    index = {n: i for i, n in enumerate(rec_t.names)}
    names = np.asarray(faces.names, object)
    test_x = faces.images[split.target.test]
    test_y = np.array([index[n] for n in names[faces.labels[split.target.test]]], np.int32)
    panel = _panel(config, src, split, rec_e, rec_o, rec_t)
    real, note = None, None
    rows = [_grey_box_row(source)]
    image_shape = (*rec_t.config.image_size, rec_t.config.channels)
    model_config = train.model_config_for(config, len(rec_t.names))
    clone_train = ml_collections.ConfigDict(config.train.to_dict())
    clone_train.epochs = int(bb.clone_epochs)
    clone_train.checkpoint_every = int(bb.clone_epochs)
    cells = [(s, int(b)) for s in bb.scenarios for b in bb.budgets]
    for i, (scenario, budget) in enumerate(cells, 1):
        name = f"{scenario}_b{budget}"
        path = workdir / "cells" / f"{name}.json"
        print(f"=== cell {i}/{len(cells)}: {scenario}, {budget} queries")
        if (row := _done_before(path)) is not None:
            rows.append(row)
            continue
        cell_dir = workdir / "cells" / name
        tc = time.perf_counter()
        spec = cloning.SCENARIOS[scenario]
        svc = policy_lib.Service(
            rec_t.graphdef, rec_t.params, policy=cloning.policy_for(scenario, bb.rate, cc),
            key=jax.random.fold_in(key, 1), image_shape=image_shape,
        )  # fmt: skip
        perturb = cc.outside_perturb if spec["attack"] == "outside" else cc.perturb
        res = cloning.attack(
            svc, pool, budget=budget, kind=spec["attack"], m=cc.near_duplicates, accounts=1,
            perturbation=cloning.Perturbation(**perturb.to_dict()), rule=cc.estimate,
            key=jax.random.fold_in(key, 2), ladder=tuple(cc.ladder),
            train_on_variants=cc.train_on_variants,
        )  # fmt: skip
        print(
            f"  {res.queries} queries about {res.distinct} public faces; {res.kept} kept, their "
            f"labels {100 * res.label_accuracy:.1f}% the service's true answers"
        )
        graphdef, params, _ = train.fit(
            model_config, clone_train, res.images, res.labels, key=jax.random.fold_in(key, 3),
            workdir=cell_dir / "clone", names=rec_t.names,
            meta={**rec_t.meta, "blackbox": {"scenario": scenario, "queries": res.queries}},
            progress=True,
        )  # fmt: skip
        accuracy, fidelity = cloning.clone_scores(graphdef, params, svc, test_x, test_y)
        print(
            f"  clone: R_T's test faces {100 * accuracy:.1f}%, agrees with R_T "
            f"{100 * fidelity:.1f}%"
        )
        invert.run(config, cell_dir / "inversions", checkpoint_dir=cell_dir / "clone")
        inversions = inversions_file.load_inversions(cell_dir / "inversions")
        if real is None:
            real, note = evaluate.real_faces_from(
                faces, inversions.identities, rec_e.meta.get("train_files")
            )
        summary = evaluate.judge_run(
            inversions, rec_e, cell_dir / "report", real_faces=real, target=rec_t,
            real_faces_note=note, panel=panel, sort_by=config.judges.sort_by, progress=True,
        ).summary  # fmt: skip
        h = experiment.headline(summary)
        row = {
            "scenario": scenario,
            "budget": budget,
            "queries": res.queries,
            "public_faces": res.distinct,
            "label_accuracy": res.label_accuracy,
            "altered": res.altered,
            "clone_accuracy": accuracy,
            "fidelity": fidelity,
            **_judged(h),
            "seconds": time.perf_counter() - tc,
        }
        files.write_json(path, row)
        rows.append(row)
    for attack in bb.query.attacks:
        # the label-only attack sees labels whatever else the service shows
        outputs = ("label",) if attack == "brep" else bb.query.outputs
        for output in outputs:
            name = f"{attack}_{output.replace(':', '')}"
            path = workdir / "cells" / f"{name}.json"
            print(f"=== query attack {attack}, the service answering {output}")
            if (row := _done_before(path)) is not None:
                rows.append(row)
                continue
            row = _query_cell(
                config, attack, output, workdir / "cells" / name, rec_t, rec_e, panel, faces,
                split, jax.random.fold_in(key, 4),
            )  # fmt: skip
            files.write_json(path, row)
            rows.append(row)
    out = {
        "rows": rows,
        "experiment": str(source),
        "judges": {j: panel_lib.JUDGE_TITLES.get(j, j) for j in JUDGES if j != "R_T"},
        "seconds_this_run": time.perf_counter() - t0,
        "config": config.to_dict(),
    }
    files.write_json(workdir / "blackbox.json", out)
    files.write_text(workdir / "blackbox.csv", _csv(rows))
    files.write_text(workdir / "blackbox.md", table(rows))
    if plots:
        write_plot(workdir / "blackbox.png", rows)
    print(table(rows))
    return out


def _done_before(path: Path) -> dict[str, Any] | None:
    """A finished cell's row, read instead of run again (None: run it)."""
    row = study.finished_row(path)
    if row is not None:
        print("  done before")
    return row


def _query_cell(config, attack, output, cell_dir, rec_t, rec_e, panel, faces, split, key):
    """One query attack against the service answering ``output``: clones, judged."""
    q = config.blackbox.query
    tc = time.perf_counter()
    gen = checkpoint.load_generator(q.prior)
    shape = (*rec_t.config.image_size, rec_t.config.channels)
    if (*gen.config.image_size, gen.config.channels) != shape:
        raise JaxmiaError(
            f"config field blackbox.query.prior: {q.prior} makes "
            f"{[*gen.config.image_size, gen.config.channels]} images, R_T takes {list(shape)}"
        )
    svc = policy_lib.Service(
        rec_t.graphdef, rec_t.params, policy=output_policy(output),
        key=jax.random.fold_in(key, 1), image_shape=shape,
    )  # fmt: skip
    index = {n: i for i, n in enumerate(rec_t.names)}
    attacked = list(split.attacked)
    targets = np.repeat([index[n] for n in attacked], q.clones)
    decoder = priors.generator_decoder(gen.config)
    got = query_lib.invert(
        svc, decoder.decode, gen.params, targets, gen.config.latent_dim,
        _query_settings(q, attack), jax.random.fold_in(key, 2),
    )  # fmt: skip
    ids, n = len(attacked), int(q.clones)
    keep = got["found"].reshape(ids, n).all(1)
    inv_dir = cell_dir / "inversions"
    inversions_file.save_inversions(
        inv_dir,
        clones=got["clones"].reshape(ids, n, *shape)[keep],
        steps=np.full((int(keep.sum()), n), q.steps, np.int32),
        seeds=got["starts"].reshape(ids, n, *shape)[keep],
        identities=np.asarray(attacked)[keep],
        labels=np.asarray([index[a] for a in attacked], np.int32)[keep],
        # decoded from finite codes: a query attack has nothing to diverge
        diverged=np.zeros((int(keep.sum()), n), bool),
    )
    row = {
        "scenario": f"{attack} ({output})",
        "budget": got["queries"],
        "queries": got["queries"],
        "shared_queries": got["shared_queries"],
        "identities_found": int(keep.sum()),
    }
    if not keep.any():
        print("  no random code was labelled as any attacked identity: no clones")
        return row | {
            "top1": {},
            "robust_mean_top1": None,
            "seed_top1": None,
            "chance_top1": None,
            "clones": 0,
            "seconds": time.perf_counter() - tc,
        }
    inversions = inversions_file.load_inversions(inv_dir)
    real, note = evaluate.real_faces_from(
        faces, inversions.identities, rec_e.meta.get("train_files")
    )
    summary = evaluate.judge_run(
        inversions, rec_e, cell_dir / "report", real_faces=real, target=rec_t,
        real_faces_note=note, panel=panel, sort_by=config.judges.sort_by, progress=True,
    ).summary  # fmt: skip
    return row | _judged(experiment.headline(summary)) | {"seconds": time.perf_counter() - tc}


def _panel(config, src, split, rec_e, rec_o, rec_t) -> panel_lib.Panel:
    """The experiment report's judges (the same photos, so the rows compare)."""
    faces = src.faces
    names = np.asarray(faces.names, object)
    attacked = np.isin(names[faces.labels], list(split.attacked))
    held_out = np.union1d(split.target.test, split.evaluation.test)
    held_out = held_out[attacked[held_out]]
    return panel_lib.make_panel(
        rec_e,
        faces.images[split.evaluation.train],
        list(names[faces.labels[split.evaluation.train]]),
        faces.images[held_out],
        list(names[faces.labels[held_out]]),
        panel_lib.Settings.from_config(config.judges),
        other=rec_o,
        target=rec_t,
    )


def _judged(h: dict[str, Any]) -> dict[str, Any]:
    clones = h.get("judges_top1", {}).get("clones", {})
    top1 = {"R_E": h["top1"], **{j: clones[j] for j in JUDGES if j in clones and j != "R_E"}}
    return {
        "top1": top1,
        "robust_mean_top1": panel_lib.mean_top1(clones),
        "seed_top1": h["seed_top1"],
        "chance_top1": h["chance_top1"],
        "clones": h["clones"],
        "identities": h["identities"],
    }


def _grey_box_row(source: Path) -> dict[str, Any]:
    h = experiment.read_records(source)["report"]["result"]["headline"]
    return {"scenario": "gray-box (R_T's weights)", "budget": 0, "queries": 0, **_judged(h)}


def table(rows: list[dict]) -> str:
    judges = [j for j in JUDGES if any(j in r["top1"] for r in rows)]
    head = ["attack", "queries", "identities", "clone acc.", "fidelity", *judges, "robust mean",
            "seed R_E"]  # fmt: skip
    pct = study.pct
    return study.markdown(head, (
        [
            r["scenario"], str(r["queries"]),
            str(r.get("identities_found", r.get("identities", ""))),
            pct(r.get("clone_accuracy")),
            pct(r.get("fidelity")), *(pct(r["top1"].get(j)) for j in judges),
            pct(r["robust_mean_top1"]), pct(r["seed_top1"]),
        ]
        for r in rows
    ))  # fmt: skip


def _csv(rows: list[dict]) -> str:
    judges = [j for j in JUDGES if any(j in r["top1"] for r in rows)]
    head = ["scenario", "budget", "queries", "clone_accuracy", "fidelity",
            *(f"top1_{j}" for j in judges), "robust_mean_top1", "seed_top1"]  # fmt: skip
    return study.csv_text(head, (
        [r["scenario"], r["budget"], r["queries"], r.get("clone_accuracy"), r.get("fidelity"),
         *(r["top1"].get(j) for j in judges), r["robust_mean_top1"], r["seed_top1"]]
        for r in rows
    ))  # fmt: skip


def write_plot(path: Path, rows: list[dict]) -> None:
    """Top-1 by R_T, R_E and the robust judges' mean against queries, per scenario; the
    gray-box attack and the seed as lines."""
    grey, cells = rows[0], rows[1:]
    fig, axes = study.figure(1, 3, figsize=(14, 4.2), sharey=True)
    panels = (("R_T", "by R_T (the service)"), ("R_E", "by R_E"), ("robust", "robust mean"))
    for ax, (what, title) in zip(axes, panels, strict=True):

        def value(r, what=what):
            return r["robust_mean_top1"] if what == "robust" else r["top1"].get(what)

        for scenario in dict.fromkeys(r["scenario"] for r in cells):
            mine = [r for r in cells if r["scenario"] == scenario and value(r) is not None]
            ax.plot([r["queries"] for r in mine], [100 * value(r) for r in mine], "o-",
                    label=scenario)  # fmt: skip
        if value(grey) is not None:
            ax.axhline(100 * value(grey), color="black", ls="-", lw=1, label="gray-box")
        ax.axhline(100 * grey["seed_top1"], color="grey", ls=":", lw=1, label="seed (R_E)")
        ax.axhline(100 * grey["chance_top1"], color="grey", ls="--", lw=1, label="chance")
        ax.set_xlabel("queries to the service")
        ax.set_title(f"attack top-1 {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    study.save_png(fig, path)
