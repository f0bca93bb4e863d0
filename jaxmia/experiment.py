"""``jaxmia experiment``: the gray-box paper's protocol end to end, resumable stage by stage.

    jaxmia experiment --config configs/att.py --workdir OUT

Five stages, each into its own place in OUT:

1. ``split``: the faces of the ``data`` section and the paper's split of its identities
   (``split`` section) -> ``split.json``. With the default counts (-1) a data set too small for
   ``split.num_attacked`` gets fewer attacked identities; that and how the data set falls short
   of the paper's (identities, auxiliary faces) are printed and recorded as notes.
2. ``target``: R_T trained on its part of the split -> ``OUT/target`` (as ``jaxmia train``).
3. ``evaluation``: R_E -> ``OUT/evaluation``.
4. ``inversions``: R_T's attacked identities inverted -> ``OUT/inversions`` (as ``jaxmia
   invert``), ``experiment.restarts`` x ``inversion.clones`` clones per identity. With restarts
   > 1 the ``inversion.clones`` best of each identity by R_T (``experiment.select``) are kept
   in ``OUT/inversions/selected``: the attacker cannot ask R_E, but can ask R_T.
5. ``report``: the clones judged by R_E -> ``OUT/report`` (as ``jaxmia evaluate``:
   ``report.html``, ``evaluation.json``, CSVs and pictures); ``OUT/experiment.json`` sums up.

Resuming: ``OUT/stages.json`` records for each stage the settings it depends on (the config
fields it reads, those of the stages before it included), when it started and whether it
finished; it is rewritten atomically before and after every stage. A rerun skips finished stages
with the same settings; an interrupted stage resumes through its own resume (training
checkpoints, inversion chunks). A stage whose settings changed since it started is an error that
names the changed fields, unless ``--redo`` is given: then that stage's outputs and those of
every later stage are deleted and the stages run again. Erroring is the default because a changed
field may be a typo, and the training stages of the paper's size take hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmia import checkpoint, evaluation, files, invert, models, seeds, splits, train
from jaxmia import inversion as inv
from jaxmia.errors import JaxmiaError

STAGES = ("split", "target", "evaluation", "inversions", "report")
SELECT = ("confidence", "margin", "robust")
MARGIN_BATCH = 256
RECORD = "stages.json"
SELECTED = "selected"
# Where each stage writes, relative to the workdir (deleted by --redo).
OUTPUTS = {
    "split": ("split.json", "config.json"),
    "target": ("target",),
    "evaluation": ("evaluation",),
    "inversions": ("inversions",),
    "report": ("report", "experiment.json"),
}
# Fields that do not change a stage's result (paths, bookkeeping, how the inversion runs).
NOT_SETTINGS = {
    "data.cache_dir",
    "train.recognizer",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    *(f"inversion.{k}" for k in invert.HOW_NOT_WHAT),
}
PAPER_AUX_FACES = 256  # the paper's seed: the mean of 256 auxiliary faces
MIN_IDENTITIES = 4  # attacked, target-only, evaluation-only, auxiliary: one each at least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redo",
        action="store_true",
        help="redo a stage whose settings changed, and every stage after it (their outputs in "
        "the workdir are deleted); without it such a change is an error",
    )


# --- settings and the stage record ------------------------------------------------------------


def _flat(prefix: str, node: Any) -> dict[str, Any]:
    if isinstance(node, ml_collections.ConfigDict | dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flat(f"{prefix}.{k}" if prefix else k, v)
        return out
    return {} if prefix in NOT_SETTINGS else {prefix: node}


def stage_settings(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """Per stage, the config fields its result depends on, earlier stages' included (JSON-ready)."""
    c = config

    def flat(*sections: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in sections:
            out |= _flat(name, c[name])
        return out

    split = flat("data", "split")
    recognizer = split | flat("model", "train") | {"seed": c.seed}
    inversions = recognizer | flat("inversion", "experiment")
    out = {
        "split": split,
        "target": recognizer,
        "evaluation": recognizer,
        "inversions": inversions,
        "report": inversions,
    }
    return json.loads(json.dumps(out))  # tuples as lists, as they read back


def read_records(workdir: Path) -> dict[str, Any]:
    """The stage record of a workdir ({} for a new one)."""
    path = workdir / RECORD
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxmiaError(
            f"{path}: not a readable stage record ({e}); delete it to start over"
        ) from e
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise JaxmiaError(f"{path}: expected an object of stage records; delete it to start over")
    return records


def changed_stage(
    records: dict[str, Any], settings: dict[str, dict]
) -> tuple[str, list[str]] | None:
    """The first recorded stage whose settings differ from ``settings``; the differing fields."""
    for stage in STAGES:
        old = records.get(stage, {}).get("settings")
        if old is None:
            continue
        new = settings[stage]
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if differ:
            return stage, differ
    return None


def _describe(old: dict, new: dict, keys: list[str], most: int = 4) -> str:
    shown = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def _clear_from(workdir: Path, records: dict[str, Any], stage: str) -> None:
    """Deletes the outputs and records of ``stage`` and every later stage."""
    for later in STAGES[STAGES.index(stage) :]:
        for name in OUTPUTS[later]:
            path = workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        records.pop(later, None)
    files.write_json(workdir / RECORD, records)


# --- stage 1: faces and split -----------------------------------------------------------------


def _resolved_counts(split: splits.Split) -> tuple[int, int, int, int]:
    s = split.settings
    return s["num_attacked"], s["num_target_only"], s["num_evaluation_only"], s["num_aux"]


def make_split(
    config: ml_collections.ConfigDict, faces: Any
) -> tuple[splits.Split, ml_collections.ConfigDict, list[str]]:
    """The paper's split of ``faces``, scaled down to a small data set; and notes on it.

    With every other count at its default (-1) and too few identities for ``num_attacked`` and
    an auxiliary pool, the attacked identities become a quarter of the data set (at least one).

    Returns:
      (split, the config with the split's counts as used, notes for people).
    """
    s = config.split
    n = len(faces.names)
    notes: list[str] = []
    defaults = (s.num_target_only, s.num_evaluation_only, s.num_aux) == (-1, -1, -1)
    try:
        split = train.make_config_split(config, faces)
        too_small = _resolved_counts(split)[3] == 0 and defaults
    except JaxmiaError:
        if not defaults:
            raise
        too_small = True
    if too_small:
        if n < MIN_IDENTITIES:
            raise JaxmiaError(
                f"data source {faces.source}: {n} identities; the experiment needs at least "
                f"{MIN_IDENTITIES} (attacked, target-only, evaluation-only, auxiliary)"
            )
        config = ml_collections.ConfigDict(config.to_dict())
        config.split.num_attacked = min(s.num_attacked, max(1, n // 4))
        config.split.num_aux = max(1, (n - config.split.num_attacked) // 5)
        split = train.make_config_split(config, faces)
        notes.append(
            f"the data set has {n} identities, too few for split.num_attacked="
            f"{s.num_attacked} and an auxiliary pool: {config.split.num_attacked} attacked instead"
        )
    k, t, e, a = _resolved_counts(split)
    if a == 0 and config.inversion.seed in seeds.POOL_KINDS and not config.inversion.seed_source:
        raise JaxmiaError(
            f"split.num_aux=0: inversion.seed={config.inversion.seed!r} needs auxiliary faces; "
            "set split.num_aux >= 1, inversion.seed_source or inversion.seed=grey|uniform"
        )
    aux_faces = len(split.aux)
    notes.append(
        f"{n} identities ({faces.source}): {k} attacked, {t} target-only, {e} evaluation-only, "
        f"{a} auxiliary ({aux_faces} faces); R_T knows {k + t}, R_E {k + e} "
        f"(attacked photos: {split.settings['attacked_photos']})"
    )
    if a and aux_faces < PAPER_AUX_FACES and config.inversion.seed in seeds.POOL_KINDS:
        notes.append(
            f"the auxiliary pool has {aux_faces} faces, the paper's seed averages 256: "
            + _seed_note(config, aux_faces)
        )
    if faces.synthetic:
        notes.append("the faces are SYNTHETIC")
    return split, config, notes


def _seed_note(config: ml_collections.ConfigDict, pool: int) -> str:
    cfg = config.inversion
    if cfg.seed == "subset_mean":
        return f"each clone's seed averages {max(1, min(cfg.seed_subset_size, pool // 2))} of them"
    return f"the seed averages {min(cfg.seed_pool_size, pool)} of them"


# --- stage 4: inversion and selection by R_T ----------------------------------------------------


@functools.partial(jax.jit, static_argnames=("jitter", "flip"))
def _transform(x: jax.Array, keys: jax.Array, *, jitter: int, flip: bool) -> jax.Array:
    """Each image shifted and flipped as the inversion's jitter does. # [n, h, w, c]"""
    return jax.vmap(lambda xi, k: inv.random_transform(xi, k, jitter, flip))(x, keys)


@functools.partial(jax.jit, static_argnums=0)
def _margin_batch(graphdef, params, x: jax.Array, labels: jax.Array) -> jax.Array:
    z = models.logits(graphdef, params, x)  # [b, k]
    target = jnp.take_along_axis(z, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, z.shape[1]) > 0, -jnp.inf, z)
    return target - jnp.max(others, axis=1)


def logit_margins(
    rec: checkpoint.LoadedRecognizer, images: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Each image's logit for its label minus its highest other logit. # [n]

    Unlike the softmax score, which rounds to 1.0 for most clones of a long inversion, the
    margin keeps ordering them. Fixed-size batches (the last padded): one compile.
    """
    n = len(images)
    b = max(1, min(MARGIN_BATCH, n))
    out = []
    for start in range(0, n, b):
        x, y = images[start : start + b], labels[start : start + b]
        pad = b - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            y = np.concatenate([y, np.repeat(y[-1:], pad)])
        m = _margin_batch(rec.graphdef, rec.params, jnp.asarray(x), jnp.asarray(y, jnp.int32))
        out.append(np.asarray(m)[: b - pad])
    return np.concatenate(out).astype(np.float64)


def robust_margins(
    rec: checkpoint.LoadedRecognizer,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    jitter: int,
    flip: bool,
    samples: int,
    key: jax.Array,
) -> np.ndarray:
    """The mean ``logit_margins`` of each image over random shifts and flips.

    Args:
      rec: the recognizer (R_T: the attacker's only judge).
      images: in [0, 1]. # [n, h, w, c]
      labels: the recognizer's label of each image's identity. # [n]
      jitter: largest shift in pixels (edges replicated).
      flip: also flip at random.
      samples: transforms per image; sample s uses ``fold_in(key, s)`` split over the images.
      key: PRNG key.

    Returns:
      Mean margins. # [n]
    """
    total = np.zeros(len(images))
    for s in range(samples):
        keys = jax.random.split(jax.random.fold_in(key, s), len(images))
        moved = np.asarray(_transform(jnp.asarray(images), keys, jitter=jitter, flip=flip))
        total += logit_margins(rec, moved, labels)
    return total / samples


def select_clones(
    run_dir: Path,
    out_dir: Path,
    rec_t: checkpoint.LoadedRecognizer,
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Keeps the ``inversion.clones`` best clones per identity of a run by R_T's judgement.

    Writes ``out_dir/inversions.npz`` in ``jaxmia invert``'s format (the kept clones, best
    first) plus ``selected`` (indices into the run's clones) and ``select_score`` [ids, keep],
    and ``out_dir/summary.json`` (the run's summary with a ``selection`` entry). A diverged clone
    is never preferred to a finite one.
    """
    keep, exp = config.inversion.clones, config.experiment
    with np.load(run_dir / evaluation.INVERSIONS_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    clones = arrays["clones"]  # [ids, n, h, w, c]
    ids, n = clones.shape[:2]
    flat = clones.reshape(ids * n, *clones.shape[2:])
    labels = np.repeat(arrays["labels"], n)
    if exp.select == "confidence":
        score = arrays["confidence"].astype(np.float64)
    elif exp.select == "margin":
        score = logit_margins(rec_t, flat, labels).reshape(ids, n)
    else:
        score = robust_margins(
            rec_t,
            flat,
            labels,
            jitter=exp.select_jitter,
            flip=exp.select_flip,
            samples=exp.select_samples,
            key=jax.random.fold_in(jax.random.key(config.inversion.rng_seed), 2),
        ).reshape(ids, n)
    score = np.where(arrays["diverged"] | ~np.isfinite(score), -np.inf, score)
    order = np.argsort(-score, axis=1, kind="stable")[:, :keep]  # [ids, keep]
    out = dict(arrays)
    for k, v in arrays.items():
        if v.shape[:2] == (ids, n):
            out[k] = np.take_along_axis(v, order.reshape(ids, keep, *[1] * (v.ndim - 2)), axis=1)
    out["selected"] = order.astype(np.int32)
    out["select_score"] = np.take_along_axis(score, order, axis=1)
    files.savez(out_dir / evaluation.INVERSIONS_FILE, **out)
    summary = json.loads((run_dir / evaluation.SUMMARY_FILE).read_text())
    summary["clones"] = keep
    summary["selection"] = {
        "from": str(run_dir),
        "inverted_per_identity": n,
        "kept_per_identity": keep,
        **{k: v for k, v in exp.to_dict().items() if k.startswith("select")},
        "mean_score_kept": float(np.mean(out["select_score"][np.isfinite(out["select_score"])]))
        if np.isfinite(out["select_score"]).any()
        else None,
        "mean_score_all": float(np.mean(score[np.isfinite(score)]))
        if np.isfinite(score).any()
        else None,
    }
    files.write_json(out_dir / evaluation.SUMMARY_FILE, summary)
    return summary["selection"]


# --- the stages ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """One run of the command: the config, the workdir, and the faces and split, made once."""

    config: ml_collections.ConfigDict
    workdir: Path
    progress: bool = True
    _split: tuple | None = None

    @functools.cached_property
    def faces(self):
        return train.load_config_data(self.config, progress=self.progress)

    def split(self) -> tuple[splits.Split, ml_collections.ConfigDict, list[str], dict]:
        if self._split is None:
            split, used, notes = make_split(self.config, self.faces)
            self._split = (split, used, notes, split.to_json(self.faces))
        return self._split

    def inversions_dir(self) -> Path:
        base = self.workdir / "inversions"
        return base / SELECTED if self.config.experiment.restarts > 1 else base


def _stage_split(run: _Run) -> dict[str, Any]:
    split, used, notes, record = run.split()
    for note in notes:
        print(f"  note: {note}")
    files.write_json(run.workdir / "config.json", used.to_dict())
    files.write_json(run.workdir / "split.json", record)
    return {"notes": notes, "counts": split.settings}


def _check_split(run: _Run) -> None:
    """A finished split must still be what the data gives (a folder may have changed since)."""
    record = run.split()[3]
    path = run.workdir / "split.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxmiaError(f"{path}: unreadable ({e}); rerun with --redo") from e
    if old != json.loads(json.dumps(record)):
        raise JaxmiaError(
            f"{path}: the data ({run.config.data.source}) now gives another split than the "
            "finished stages used; rerun with --redo, or use another --workdir"
        )


def _stage_recognizer(run: _Run, role: str) -> dict[str, Any]:
    split, used, _, record = run.split()
    part = getattr(split, role)
    print(f"  {len(part.identities)} identities, {len(part.train)} training photos")
    summary = train.train_part(
        used, run.faces, part, role, run.workdir / role, record, progress=run.progress
    )
    print(f"  test accuracy {summary['test_accuracy']:.4f} after {summary['epochs']} epochs")
    return {"test_accuracy": summary["test_accuracy"], "epochs": summary["epochs"]}


def _stage_inversions(run: _Run) -> dict[str, Any]:
    cfg = run.config
    out = run.workdir / "inversions"
    args = argparse.Namespace(
        checkpoint=str(run.workdir / "target"),
        identities=None,
        clones=cfg.inversion.clones * cfg.experiment.restarts,
        steps=None,
        workdir=str(out),
    )
    invert.run(args, cfg)
    if cfg.experiment.restarts == 1:
        return {}
    rec_t = checkpoint.load_recognizer(run.workdir / "target")
    selection = select_clones(out, out / SELECTED, rec_t, cfg)
    print(
        f"  kept {selection['kept_per_identity']} of {selection['inverted_per_identity']} clones "
        f"per identity by R_T ({cfg.experiment.select}): mean score "
        f"{selection['mean_score_all']:.3f} -> {selection['mean_score_kept']:.3f}"
    )
    return {"selection": selection}


def _stage_report(run: _Run) -> dict[str, Any]:
    rec_e = checkpoint.load_recognizer(run.workdir / "evaluation")
    rec_t = checkpoint.load_recognizer(run.workdir / "target")
    inversions = evaluation.load_inversions(run.inversions_dir())
    real, note = evaluation.real_faces_from(
        run.faces, inversions.identities, rec_e.meta.get("train_files")
    )
    summary = evaluation.evaluate_run(
        inversions,
        rec_e,
        run.workdir / "report",
        real_faces=real,
        target=rec_t,
        real_faces_note=note,
        progress=run.progress,
    )
    return {"headline": headline(summary)}


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers the closing line quotes, from an evaluation summary."""
    o, s = summary["overall"], summary["overall"]["seed"]
    return {
        "top1": o["top1"],
        "top5": o["top5"],
        "seed_top1": s["top1"],
        "seed_top5": s["top5"],
        "chance_top1": summary["chance_top1"],
        "clones": o["count"],
        "identities": summary["num_identities"],
    }


STAGE_FUNCTIONS = {
    "split": _stage_split,
    "target": lambda run: _stage_recognizer(run, "target"),
    "evaluation": lambda run: _stage_recognizer(run, "evaluation"),
    "inversions": _stage_inversions,
    "report": _stage_report,
}
WHAT = {
    "split": "faces and the paper's split",
    "target": "train the target recognizer R_T",
    "evaluation": "train the evaluation recognizer R_E",
    "inversions": "invert R_T's attacked identities",
    "report": "judge the clones with R_E",
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Bad settings fail before any work."""
    e, i = config.experiment, config.inversion
    if not isinstance(e.restarts, int) or e.restarts < 1:
        raise JaxmiaError(
            f"config field experiment.restarts: expected an integer >= 1, got {e.restarts!r}"
        )
    if e.select not in SELECT:
        raise JaxmiaError(
            f"config field experiment.select: expected one of {SELECT}, got {e.select!r}"
        )
    if e.select_samples < 1:
        raise JaxmiaError(
            f"config field experiment.select_samples: expected >= 1, got {e.select_samples}"
        )
    if e.select_jitter < 0:
        raise JaxmiaError(
            f"config field experiment.select_jitter: expected >= 0, got {e.select_jitter}"
        )
    for name in ("clones", "steps", "max_batch"):
        if i[name] < 1:
            raise JaxmiaError(f"config field inversion.{name}: expected >= 1, got {i[name]}")
    inv.InversionConfig.from_config(i)
    train.make_optimizer(config.train, 1)


def run_stages(
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    redo: bool = False,
    progress: bool = True,
    until: str = STAGES[-1],
) -> dict:
    """Runs (or resumes) the stages up to ``until`` (all by default); returns the stage record."""
    check_config(config)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    settings = stage_settings(config)
    records = read_records(workdir)
    changed = changed_stage(records, settings)
    if changed:
        stage, keys = changed
        what = _describe(records[stage]["settings"], settings[stage], keys)
        if not redo:
            raise JaxmiaError(
                f"workdir {workdir}: stage {stage!r} ran with other settings ({what}); "
                f"pass --redo to redo it and the stages after it, or use another --workdir"
            )
        print(f"settings of stage {stage!r} changed ({what}): redoing it and the stages after it")
        _clear_from(workdir, records, stage)
    run = _Run(config, workdir, progress)
    for n, stage in enumerate(STAGES[: STAGES.index(until) + 1], 1):
        record = records.get(stage, {})
        head = f"[{n}/{len(STAGES)}] {stage}: {WHAT[stage]}"
        if record.get("status") == "done":
            print(f"{head}: done before ({record.get('seconds', 0):.0f} s), skipped")
            if stage == "split":
                _check_split(run)
            continue
        resumed = " (resuming)" if record.get("status") == "running" else ""
        print(f"{head}{resumed}", flush=True)
        records[stage] = {"status": "running", "settings": settings[stage], "started": time.time()}
        files.write_json(workdir / RECORD, records)
        t0 = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](run)
        records[stage] |= {"status": "done", "seconds": time.perf_counter() - t0, "result": result}
        files.write_json(workdir / RECORD, records)
    return records


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    workdir = Path(args.workdir)
    t0 = time.perf_counter()
    records = run_stages(config, workdir, redo=args.redo, progress=True)
    h = records["report"]["result"]["headline"]
    stage_seconds = {s: records[s].get("seconds") for s in STAGES}
    files.write_json(
        workdir / "experiment.json",
        {
            "headline": h,
            "notes": records["split"]["result"]["notes"],
            "recognizers": {s: records[s]["result"] for s in ("target", "evaluation")},
            "stage_seconds": stage_seconds,
            "report": str(workdir / "report" / "report.html"),
            "config": config.to_dict(),
        },
    )
    total = sum(v or 0 for v in stage_seconds.values())
    print(
        f"done: top-1 by R_E {100 * h['top1']:.1f}% (top-5 {100 * h['top5']:.1f}%) over "
        f"{h['clones']} clones of {h['identities']} identities; the seed "
        f"{100 * h['seed_top1']:.1f}% (top-5 {100 * h['seed_top5']:.1f}%); chance "
        f"{100 * h['chance_top1']:.1f}%; stages took {total:.0f} s "
        f"(this run {time.perf_counter() - t0:.0f} s)"
    )
    print(f"report: {workdir / 'report' / 'report.html'}")
