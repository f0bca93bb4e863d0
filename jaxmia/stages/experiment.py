"""``jaxmia experiment``: the gray-box paper's protocol end to end, resumable stage by stage.

    jaxmia experiment --config configs/att.py --workdir OUT

Eight stages, each into its own place in OUT:

1. ``split``: the faces of the ``data`` section and the paper's split of its identities
   (``split`` section) -> ``split.json``. With the default counts (-1) a data set too small for
   ``split.num_attacked`` gets fewer attacked identities; that and how the data set falls short
   of the paper's (identities, auxiliary faces) are printed and recorded as notes.
2. ``target``: R_T trained on its part of the split -> ``OUT/target`` (as ``jaxmia train``).
3. ``evaluation``: R_E -> ``OUT/evaluation``.
4. ``prior``: with ``inversion.prior="generator"`` and no ``inversion.prior_checkpoint``, the
   generator prior trained on R_T's auxiliary pool (as ``jaxmia prior``) -> ``OUT/prior``, which
   the inversions then use; otherwise nothing.
5. ``inversions``: R_T's attacked identities inverted -> ``OUT/inversions`` (as ``jaxmia
   invert``), ``experiment.restarts`` x ``inversion.clones`` clones per identity. With restarts
   > 1 the ``inversion.clones`` best of each identity by R_T (``experiment.select``) are kept
   in ``OUT/inversions/selected``: the attacker cannot ask R_E, but can ask R_T.
6. ``baseline``: where the attack has a prior (``inversion.prior`` or ``feature_weight``) and
   ``experiment.baseline`` is on, the same attack on free pixels from the same seeds ->
   ``OUT/baseline``; otherwise nothing.
7. ``evaluation_other``: a second R_E of another architecture (``judges.other_arch``) on R_E's
   photos -> ``OUT/evaluation_other``; skipped with ``judges.other_arch=""``. After the
   inversions, so that a change of its recipe does not redo them.
8. ``report``: the clones judged by R_E and by the judges beside it (``jaxmia.judges.panel``), with
   the controls -> ``OUT/report`` (as ``jaxmia evaluate``: ``report.html``, ``evaluation.json``,
   CSVs and pictures); with a baseline, its clones judged alike -> ``OUT/report/pixels``, and
   both side by side: ``comparison.{json,csv}``, ``prior_vs_pixels.png`` and a section of
   ``report.html``. ``OUT/experiment.json`` sums up.

Resuming: ``OUT/stages.json`` records for each stage the settings it depends on (the config
fields it reads, those of the stages before it included), when it started and whether it
finished; it is rewritten atomically before and after every stage. A rerun skips finished stages
with the same settings; an interrupted stage resumes through its own resume (training
checkpoints, inversion chunks, each claimed for its settings: ``jaxmia.workdir``). A finished
stage whose settings changed, or an interrupted one that left outputs under other settings, is an
error that names the changed fields, unless ``redo`` is given: then that stage's outputs and those
of every later stage whose settings changed too are deleted and the stages run again (a later
stage with unchanged settings does not read the redone stage's outputs). Erroring is the default
because a changed field may be a typo, and the training stages of the paper's size take hours. A
stage that failed before writing anything (bad input) holds nothing against the corrected rerun.

Every stage runs through the library function its own command calls (``train.run_job``,
``invert.run``, ``evaluate_lib.judge_run``); ``run`` is the ``jaxmia experiment`` stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxmia import checkpoint, files
from jaxmia import config as config_lib
from jaxmia import workdir as workdir_lib
from jaxmia.attacks import generator, inversions_file, seeds, selection
from jaxmia.attacks import inversion as inv_lib
from jaxmia.data import faces as faces_lib
from jaxmia.data import splits
from jaxmia.errors import JaxmiaError
from jaxmia.judges import panel as panel_lib
from jaxmia.recognizers import defences, models, train
from jaxmia.stages import evaluate as evaluate_lib
from jaxmia.stages import invert
from jaxmia.stages import prior as prior_lib

STAGES = (
    "split", "target", "evaluation", "prior", "inversions", "baseline", "evaluation_other",
    "report",
)  # fmt: skip
RECORD = "stages.json"
# Where each stage writes, relative to the workdir (deleted by redo).
OUTPUTS = {
    "split": ("split.json", "config.json"),
    "target": ("target",),
    "evaluation": ("evaluation",),
    "prior": ("prior",),
    "inversions": ("inversions",),
    "baseline": ("baseline",),
    "evaluation_other": ("evaluation_other",),
    "report": ("report", "experiment.json"),
}
OVERRIDES = "experiment.baseline_overrides"
PAPER_AUX_FACES = 256  # the paper's seed: the mean of 256 auxiliary faces
MIN_IDENTITIES = 4  # attacked, target-only, evaluation-only, auxiliary: one each at least


# --- settings and the stage record ------------------------------------------------------------


def stage_settings(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """Per stage, the config fields its result depends on, earlier stages' included (JSON-ready)."""
    split = workdir_lib.settings_of(config, "data", "split")
    recognizer = split | workdir_lib.settings_of(config, "model", "train") | {"seed": config.seed}
    # R_E and the second R_E are never defended (train.defence is R_T's): a defence sweep's
    # cells share them
    judge = (
        split
        | workdir_lib.settings_of(defences.undefended(config), "model", "train")
        | {"seed": config.seed}
    )
    attack = workdir_lib.settings_of(config, "inversion", "experiment")
    # A stage that has nothing to do depends on nothing but that.
    prior: dict[str, Any] = {"trains": False}
    if trains_prior(config):
        prior = recognizer | workdir_lib.settings_of(config, "prior")
        prior |= {"inversion.seed_source": config.inversion.seed_source, "trains": True}
    # The generator the experiment trains is part of what the clones depend on.
    inversions = (prior if trains_prior(config) else recognizer) | attack
    pixels = baseline_config(config)
    baseline = {"runs": False}
    if pixels is not None:
        baseline = recognizer | workdir_lib.settings_of(pixels, "inversion", "experiment")
    judges = workdir_lib.settings_of(config, "judges")
    other = judge | {k: v for k, v in judges.items() if k.startswith("judges.other_")}
    return {
        "split": split,
        "target": recognizer,
        "evaluation": judge,
        "prior": prior,
        "inversions": inversions,
        "baseline": baseline,
        "evaluation_other": other,
        "report": inversions | judges,
    }


def trains_prior(config: ml_collections.ConfigDict) -> bool:
    """Whether the experiment trains the generator prior (``inversion.prior="generator"``, or
    ``"gan"`` with ``prior.tune_gan``, and no ``inversion.prior_checkpoint``: stage ``prior``,
    into WORKDIR/prior)."""
    inv = config.inversion
    trains = inv.prior == "generator" or (inv.prior == "gan" and config.prior.tune_gan)
    return trains and not inv.prior_checkpoint


def attack_config(config: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """``config`` as the inversion stage runs it: a generator it trains read from WORKDIR/prior."""
    if not trains_prior(config):
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    out.inversion.prior_checkpoint = str(Path(workdir) / "prior")
    return out


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The same attack on free pixels, beside one with a prior (``experiment.baseline``); None
    when there is none to run (the attack is the pixel attack, or the baseline is off)."""
    inv = config.inversion
    if not config.experiment.baseline or (inv.prior == "pixels" and not inv.feature_weight):
        return None
    out = ml_collections.ConfigDict(config.to_dict())
    b = out.inversion
    b.prior, b.prior_checkpoint, b.prior_residual = "pixels", "", False
    b.residual_weight = b.coef_weight = b.feature_weight = b.realism_weight = 0.0
    b.init_candidates = 1
    b.prior_components = inv_lib.InversionConfig.prior_components  # the prior's alone
    config_lib.apply_overrides(out, config_lib.overrides_from(config.experiment.baseline_overrides))
    return out


def other_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The config the second R_E trains with (``judges.other_*``), or None for none."""
    j = config.judges
    arch = j.other_arch
    if arch == "auto":
        arch = "resnet" if config.model.arch == "paper" else "paper"
    if arch == "":
        return None
    if arch not in models.ARCHS:
        raise JaxmiaError(
            f"config field judges.other_arch: expected 'auto', '' or one of {models.ARCHS}, "
            f"got {arch!r}"
        )
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.arch = arch
    other.model.update(j.other_model.to_dict())
    other.train.update(j.other_train.to_dict())
    return other


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
    records: dict[str, Any], settings: dict[str, dict], workdir: Path
) -> tuple[str, str, list[str]] | None:
    """The first stage whose recorded settings differ from ``settings``: (stage, which record,
    differing fields). A finished stage counts with its settings; an interrupted one only if it
    left outputs behind (one that failed on bad input before writing anything holds nothing)."""
    for stage in STAGES:
        record = records.get(stage, {})
        if record.get("status") == "done":
            old, which = record.get("settings", {}), "ran"
        elif _has_outputs(workdir, stage):
            old, which = record.get("attempted"), "was interrupted"
        else:
            continue
        if old is None:
            continue
        differ = workdir_lib.differing(old, settings[stage])
        if differ:
            return stage, which, differ
    return None


def adopt(source: Path, workdir: Path, config: ml_collections.ConfigDict, stages) -> list[str]:
    """Takes over finished stages of another experiment whose settings equal this config's.

    Same settings, same results: a stage that ``source`` finished with exactly the settings
    ``config`` gives it is hard-linked (copied where links fail) into ``workdir`` with its
    record, instead of run again; a stage ``workdir`` has already started is left alone. The
    pixel attack of a prior's experiment (stage ``baseline``) is also taken from the
    ``inversions`` of a pixel experiment run with its settings, e.g. configs/att_gan.py's
    baseline from configs/att.py's clones.

    Returns:
      The stages taken over.
    """
    settings = stage_settings(config)
    theirs, ours = read_records(Path(source)), read_records(Path(workdir))
    taken = []
    for stage in stages:
        origin = stage
        if stage == "baseline" and not _done_with(theirs.get(stage, {}), settings, stage):
            origin = "inversions"  # a pixel experiment's clones
        record = theirs.get(origin, {})
        if stage in ours or _has_outputs(workdir, stage) or not _done_with(record, settings, stage):
            continue
        for src_name, name in zip(OUTPUTS[origin], OUTPUTS[stage], strict=True):
            src, dst = Path(source) / src_name, Path(workdir) / name
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            elif src.exists():
                shutil.copy2(src, dst)
        ours[stage] = record | {"settings": settings[stage]}
        taken.append(stage if origin == stage else f"{stage} (their {origin})")
    if taken:
        files.write_json(Path(workdir) / RECORD, ours)
    return taken


def _done_with(record: dict[str, Any], settings: dict[str, dict], stage: str) -> bool:
    """Whether ``record`` is a finished stage with the settings ``stage`` has here."""
    theirs, ours = record.get("settings", {}), settings[stage]
    if stage == "baseline":
        # the overrides only say how the pixel attack's settings were derived from the prior's:
        # the settings themselves are the rest, whichever experiment ran them
        theirs, ours = ({k: v for k, v in d.items() if k != OVERRIDES} for d in (theirs, ours))
    return record.get("status") == "done" and not workdir_lib.differing(theirs, ours)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _has_outputs(workdir: Path, stage: str) -> bool:
    return any((workdir / name).exists() for name in OUTPUTS[stage])


def _clear_from(
    workdir: Path, records: dict[str, Any], stage: str, settings: dict[str, dict]
) -> None:
    """Deletes the outputs and records of ``stage`` and of every later stage whose settings
    changed too. A stage's settings include those of every stage whose outputs it reads, so a
    later stage with its recorded settings unchanged does not depend on ``stage``: the second
    R_E is kept when only the inversion changed."""
    for later in STAGES[STAGES.index(stage) :]:
        record = records.get(later, {})
        old = record.get("settings") or record.get("attempted")
        if later != stage and old is not None and not workdir_lib.differing(old, settings[later]):
            continue
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
    n = splits.kept_from_config(config, faces)  # identities with the photos the split needs
    notes: list[str] = []
    defaults = (s.num_target_only, s.num_evaluation_only, s.num_aux) == (-1, -1, -1)
    try:
        split = splits.from_config(config, faces)
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
        split = splits.from_config(config, faces)
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
    notes.extend(split.notes())  # identities left out for too few photos
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


# --- the stages ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """One run of the command: the config, the workdir, and the faces and split, made once."""

    config: ml_collections.ConfigDict
    workdir: Path
    progress: bool = True
    _split: tuple | None = None

    @functools.cached_property
    def faces(self) -> faces_lib.FaceSet:
        return faces_lib.faces_from_config(self.config, progress=self.progress)

    def split(self) -> tuple[splits.Split, ml_collections.ConfigDict, list[str], dict]:
        if self._split is None:
            split, used, notes = make_split(self.config, self.faces)
            self._split = (split, used, notes, split.to_json(self.faces))
        return self._split

    def inversions_dir(self, name: str = "inversions") -> Path:
        base = self.workdir / name
        return base / selection.SELECTED if self.config.experiment.restarts > 1 else base


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
    if old != workdir_lib.jsonable(record):
        raise JaxmiaError(
            f"{path}: the data ({run.config.data.source}) now gives another split than the "
            "finished stages used; rerun with --redo, or use another --workdir"
        )


def _stage_recognizer(run: _Run, role: str) -> dict[str, Any]:
    split, used, _, record = run.split()
    part = split.evaluation if role == "evaluation_other" else getattr(split, role)
    if role not in train.DEFENDED:
        used = defences.undefended(used)
    if role == "evaluation_other":
        used = other_config(used)
        print(f"  {used.model.arch} architecture")
    print(f"  {len(part.identities)} identities, {len(part.train)} training photos")
    job = train.make_job(used, run.faces, part, role, run.workdir / role, record)
    summary = train.run_job(job, used.train, progress=run.progress)
    print(
        f"  test accuracy {summary['test_accuracy']:.4f} after {summary['epochs']} epochs"
        f"{train.privacy_note(summary)}"
    )
    out = {"test_accuracy": summary["test_accuracy"], "epochs": summary["epochs"]}
    return out | ({"defence": summary["defence"]} if "defence" in summary else {})


def _stage_other(run: _Run) -> dict[str, Any]:
    if other_config(run.config) is None:
        print("  none (judges.other_arch is empty)")
        return {"skipped": True}
    return _stage_recognizer(run, "evaluation_other")


def _stage_prior(run: _Run) -> dict[str, Any]:
    if not trains_prior(run.config):
        print("  none (no generator prior to train: inversion.prior is not 'generator' or has a "
              "prior_checkpoint)")  # fmt: skip
        return {"skipped": True}
    summary = prior_lib.run(
        run.config, run.workdir / "prior", checkpoint_dir=run.workdir / "target",
        progress=run.progress,
    )  # fmt: skip
    return {"faces": summary["faces"], "final": summary["final"],
            "seconds_training": summary["seconds_training"]}  # fmt: skip


def _stage_inversions(run: _Run) -> dict[str, Any]:
    return _invert(run, attack_config(run.config, run.workdir), run.workdir / "inversions")


def _stage_baseline(run: _Run) -> dict[str, Any]:
    cfg = baseline_config(run.config)
    if cfg is None:
        print("  none (the attack is the pixel attack, or experiment.baseline is off)")
        return {"skipped": True}
    return _invert(run, cfg, run.workdir / "baseline")


def _invert(run: _Run, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
    invert.run(
        cfg,
        out,
        checkpoint_dir=run.workdir / "target",
        clones=cfg.inversion.clones * cfg.experiment.restarts,
    )
    if cfg.experiment.restarts == 1:
        return {}
    rec_t = checkpoint.load_recognizer(run.workdir / "target")
    chosen = selection.select_clones(out, out / selection.SELECTED, rec_t, cfg)
    print(
        f"  kept {chosen['kept_per_identity']} of {chosen['inverted_per_identity']} clones "
        f"per identity by R_T ({cfg.experiment.select}): mean score "
        f"{chosen['mean_score_all']:.3f} -> {chosen['mean_score_kept']:.3f}"
    )
    return {"selection": chosen}


def _stage_report(run: _Run) -> dict[str, Any]:
    rec_e = checkpoint.load_recognizer(run.workdir / "evaluation")
    rec_t = checkpoint.load_recognizer(run.workdir / "target")
    other_dir = run.workdir / "evaluation_other"
    rec_o = checkpoint.load_recognizer(other_dir) if (other_dir / "checkpoints").is_dir() else None
    inversions = inversions_file.load_inversions(run.inversions_dir())
    real, note = evaluate_lib.real_faces_from(
        run.faces, inversions.identities, rec_e.meta.get("train_files")
    )
    split = run.split()[0]
    faces = run.faces
    names = np.asarray(faces.names, object)
    attacked = np.isin(names[faces.labels], list(split.attacked))
    held_out = np.union1d(split.target.test, split.evaluation.test)
    held_out = held_out[attacked[held_out]]
    panel = panel_lib.make_panel(
        rec_e,
        faces.images[split.evaluation.train],
        list(names[faces.labels[split.evaluation.train]]),
        faces.images[held_out],
        list(names[faces.labels[held_out]]),
        panel_lib.Settings.from_config(run.config.judges),
        other=rec_o,
        target=rec_t,
    )
    judge = functools.partial(
        evaluate_lib.judge_run,
        evaluator=rec_e,
        real_faces=real,
        target=rec_t,
        real_faces_note=note,
        panel=panel,
        sort_by=run.config.judges.sort_by,
        progress=run.progress,
    )
    compared = baseline_config(run.config) is not None
    # with a baseline, report.html is written once, by compare, with the comparison in it
    prior = judge(inversions, out_dir=run.workdir / "report", with_html=not compared)
    out = {"headline": headline(prior.summary)}
    if compared:
        baseline = inversions_file.load_inversions(run.inversions_dir("baseline"))
        pixels = judge(baseline, out_dir=run.workdir / "report" / "pixels")
        out["baseline"] = headline(pixels.summary)
        out["comparison"] = compare(
            run.workdir / "report", {"pixels": (pixels, baseline), "prior": (prior, inversions)},
            real,
        )  # fmt: skip
    return out


def compare(
    report_dir: Path,
    attacks: dict[str, tuple[evaluate_lib.Evaluation, inversions_file.Inversions]],
    real: dict | None,
) -> dict[str, Any]:
    """A prior's clones against the pixel attack's: every judge's top-1 and the Fréchet distance
    side by side (``comparison.json``, ``comparison.csv``), the clones of the same identities
    and seeds in one picture (``prior_vs_pixels.png``), and the prior's ``report.html`` with the
    comparison in it.

    Args:
      report_dir: where the prior's report goes; the pixel attack's is ``report_dir/pixels``.
      attacks: "pixels" and "prior" -> (what ``judge_run`` returned, the inversions it judged).
      real: identity -> real faces, for the picture.
    """
    from jaxmia.report import html as html_lib  # matplotlib is slow to import

    def top1(s: dict[str, Any], group: str = "clones") -> dict[str, float]:
        """Every judge's top-1 but R_T's: the face judges first, then R_E."""
        r_e = s["overall"]["top1"] if group == "clones" else s["overall"]["seed"]["top1"]
        others = {
            j: v["top1"] for j, v in s.get("judges", {}).get("top", {}).get(group, {}).items()
            if j not in ("R_E", "R_T")
        }  # fmt: skip
        face = {j: v for j, v in others.items() if j in panel_lib.FACE_JUDGES}
        return face | {"R_E": r_e} | others

    (pixels_ev, pixel_inv), (prior_ev, prior_inv) = attacks["pixels"], attacks["prior"]
    pixels, prior = pixels_ev.summary, prior_ev.summary
    t_prior, t_pixels, t_seeds = top1(prior), top1(pixels), top1(prior, "seeds")
    judges = [j for j in t_prior if j in t_pixels]
    beside = [j for j in panel_lib.BESIDE_R_E if j in judges]
    robust = [j for j in panel_lib.ROBUST if j in judges]

    def row(t: dict[str, float], s: dict[str, Any], group: str = "clones") -> dict[str, Any]:
        frechet = s.get("judges", {}).get("realism", {}).get(group, {}).get("frechet_eigenface")
        return {
            "top1": t,
            "robust_mean": panel_lib.mean_top1(t, robust),
            "mean_beside_R_E": panel_lib.mean_top1(t, beside),
            "frechet": frechet,
        }

    # both attacks start from the seeds
    rows = {"pixels": row(t_pixels, pixels), "prior": row(t_prior, prior),
            "seeds": row(t_seeds, prior, "seeds")}  # fmt: skip
    result = {"judges": judges, "robust": robust, "beside_R_E": beside, "attacks": rows}
    files.write_json(report_dir / "comparison.json", result)
    header = ("attack", *judges, "robust_mean", "mean_beside_R_E", "frechet")
    lines = [",".join(header)] + [
        ",".join([name, *(f"{r['top1'][j]:.6g}" for j in judges),
                  *("" if r[k] is None else f"{r[k]:.6g}"
                    for k in ("robust_mean", "mean_beside_R_E", "frechet"))])
        for name, r in rows.items()
    ]  # fmt: skip
    files.write_text(report_dir / "comparison.csv", "\n".join(lines) + "\n")

    sides = {}
    for name, ev, inv in (("pixels", pixels_ev, pixel_inv), ("prior", prior_ev, prior_inv)):
        # how many of the judges beside R_E rank the target first, per clone # [ids, clones]
        votes = sum((ev.clones[f"rank_{j}"] == 1 for j in beside if f"rank_{j}" in ev.clones),
                    np.zeros(inv.clones.shape[:2], int))  # fmt: skip
        sides[name] = (inv.clones, ev.clones["rank_E"], votes)
    ids = len(inv.identities)
    shown = np.unique(np.linspace(0, ids - 1, min(ids, 12)).round().astype(int))
    names = [inv.identities[i] for i in shown]
    html_lib.comparison_grid(
        report_dir / "prior_vs_pixels.png",
        names,
        [real[n][0] if real and n in real and len(real[n]) else None for n in names],
        inv.seeds[shown, 0],
        {k: (c[shown], r[shown], v[shown]) for k, (c, r, v) in sides.items()},
        len(beside),
        seed_note=""
        if np.array_equal(pixel_inv.seeds, prior_inv.seeds)
        else "the seed column is the prior's start (the pixel attack starts from its own seeds)",
    )
    html_lib.write_html(report_dir / "report.html", prior | {"comparison": result})
    return result


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers the closing line quotes, from an evaluation summary."""
    o, s = summary["overall"], summary["overall"]["seed"]
    out = {
        "top1": o["top1"],
        "top5": o["top5"],
        "seed_top1": s["top1"],
        "seed_top5": s["top5"],
        "chance_top1": summary["chance_top1"],
        "clones": o["count"],
        "identities": summary["num_identities"],
    }
    judged = summary.get("judges")
    if judged:
        top = judged["top"]
        out["judges_top1"] = {
            g: {j: v["top1"] for j, v in table.items()} for g, table in top.items()
        }
        out["adversarial_inflation"] = judged["inflation"]["adversarial_inflation"]
        out["most_generous_robust_judge"] = judged["inflation"]["most_generous_robust_judge"]
        out["judges_seconds"] = judged["seconds"]
        out["face_realism"] = {
            g: {k: v for k, v in r.items() if k.startswith("face_")}
            for g, r in judged["realism"].items()
            if "face_detection_rate" in r
        }
    return out


def face_lines(h: dict[str, Any]) -> list[str]:
    """The closing lines on the face judges (first: the standard a person would apply), from a
    ``headline``: each one's top-1 on the clones, the seeds and the held-out real photos, and
    the rate of clones with a face found by dlib's detector."""
    top = h.get("judges_top1", {})
    clones = top.get("clones", {})
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out = []
    for j in panel_lib.FACE_JUDGES:
        if j in clones and not j.endswith("_centroid"):
            centroid = clones.get(f"{j}_centroid")
            out.append(
                f"face judge {j}: clones top-1 {pct(clones[j])} (by centroid {pct(centroid)}), "
                f"seeds {pct(top.get('seeds', {}).get(j))}, held-out real photos "
                f"{pct(top.get('real', {}).get(j))}; chance {pct(h['chance_top1'])}"
            )
    face = h.get("face_realism", {})
    if "clones" in face:
        out.append(
            f"a face found by dlib's detector: clones {pct(face['clones']['face_detection_rate'])}"
            + "".join(
                f", {g} {pct(face[g]['face_detection_rate'])}" for g in ("seeds", "real")
                if g in face
            )
        )  # fmt: skip
    return out


STAGE_FUNCTIONS = {
    "split": _stage_split,
    "target": lambda run: _stage_recognizer(run, "target"),
    "evaluation": lambda run: _stage_recognizer(run, "evaluation"),
    "prior": _stage_prior,
    "inversions": _stage_inversions,
    "baseline": _stage_baseline,
    "evaluation_other": _stage_other,
    "report": _stage_report,
}
WHAT = {
    "split": "faces and the paper's split",
    "target": "train the target recognizer R_T",
    "evaluation": "train the evaluation recognizer R_E",
    "prior": "train the generator prior on the auxiliary pool",
    "inversions": "invert R_T's attacked identities",
    "baseline": "the same attack on free pixels, beside a prior's",
    "evaluation_other": "train a second R_E of another architecture",
    "report": "judge the clones with R_E and the judges beside it",
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Bad settings fail before any work."""
    e = config.experiment
    if not isinstance(e.restarts, int) or e.restarts < 1:
        raise JaxmiaError(
            f"config field experiment.restarts: expected an integer >= 1, got {e.restarts!r}"
        )
    if e.select not in selection.SELECT:
        raise JaxmiaError(
            f"config field experiment.select: expected one of {selection.SELECT}, got {e.select!r}"
        )
    if e.select_samples < 1:
        raise JaxmiaError(
            f"config field experiment.select_samples: expected >= 1, got {e.select_samples}"
        )
    if e.select_jitter < 0:
        raise JaxmiaError(
            f"config field experiment.select_jitter: expected >= 0, got {e.select_jitter}"
        )
    invert.check_settings(attack_config(config, Path("WORKDIR")))
    if trains_prior(config):
        generator.configs_from(config.prior, config.data.image_size, config.data.channels)
    if config.inversion.feature_weight and not models.has_statistics(config.model.arch):
        raise JaxmiaError(
            f"inversion.feature_weight={config.inversion.feature_weight}: R_T "
            f"(model.arch={config.model.arch!r}) has no batch normalisation statistics; expected "
            "model.arch=resnet or feature_weight=0"
        )
    train.check_train_config(config.train)
    defences.check_model(defences.Defence.from_config(config.train), config.model.arch)
    train.check_target(config)  # an R_T on a face judge's own backbone
    panel_lib.Settings.from_config(config.judges)
    other = other_config(config)
    if other is not None:
        try:
            train.check_train_config(other.train)
            train.model_config_for(other, 2)
        except JaxmiaError as e:
            raise JaxmiaError(
                f"the second R_E (judges.other_arch={other.model.arch!r}, with "
                f"judges.other_model / other_train over model / train): {e}"
            ) from e


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
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    reuse = config.experiment.reuse
    if reuse and not (Path(reuse) / RECORD).is_file():
        raise JaxmiaError(
            f"config field experiment.reuse: {reuse}: expected the workdir of a jaxmia experiment "
            f"(with {RECORD})"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if reuse:
        taken = adopt(Path(reuse), workdir, config, STAGES)
        if taken:
            print(f"taken over from {reuse} (the same settings): {', '.join(taken)}")
    settings = stage_settings(config)
    records = read_records(workdir)
    changed = changed_stage(records, settings, workdir)
    if changed:
        stage, which, keys = changed
        old = records[stage].get("settings") or records[stage].get("attempted")
        what = workdir_lib.describe(old, settings[stage], keys)
        if not redo:
            raise JaxmiaError(
                f"workdir {workdir}: stage {stage!r} {which} with other settings ({what}); "
                f"pass --redo to redo it and the stages after it, or use another --workdir"
            )
        print(
            f"settings of stage {stage!r} changed ({what}): redoing it and the stages after it "
            "that depend on it"
        )
        _clear_from(workdir, records, stage, settings)
    run = _Run(config, workdir, progress)
    for n, stage in enumerate(STAGES[: STAGES.index(until) + 1], 1):
        record = records.get(stage, {})
        head = f"[{n}/{len(STAGES)}] {stage}: {WHAT[stage]}"
        if record.get("status") == "done":
            print(f"{head}: done before ({record.get('seconds', 0):.0f} s), skipped")
            if stage == "split":
                _check_split(run)
            continue
        resumed = " (resuming)" if _has_outputs(workdir, stage) else ""
        print(f"{head}{resumed}", flush=True)
        # Until it finishes, a stage's settings are only "attempted": they hold against a rerun
        # only where the stage left outputs (changed_stage), never after a failure on bad input.
        records[stage] = {"status": "running", "attempted": settings[stage], "started": time.time()}
        files.write_json(workdir / RECORD, records)
        t0 = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](run)
        records[stage] = {
            "status": "done",
            "settings": settings[stage],
            "started": records[stage]["started"],
            "seconds": time.perf_counter() - t0,
            "result": result,
        }
        files.write_json(workdir / RECORD, records)
    return records


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    redo: bool = False,
    progress: bool = True,
    until: str = STAGES[-1],
) -> dict[str, Any] | None:
    """The ``jaxmia experiment`` stage: every stage, then ``workdir/experiment.json``.

    With ``until`` short of the last stage, the stages up to it and nothing else.

    Returns:
      What ``experiment.json`` holds: the headline, notes, recognizers' accuracy, stage times;
      None when stopped short.
    """
    workdir = Path(workdir)
    t0 = time.perf_counter()
    records = run_stages(config, workdir, redo=redo, progress=progress, until=until)
    if until != STAGES[-1]:
        print(f"stopped after stage {until!r} (--until); a rerun without it goes on")
        return None
    result = records["report"]["result"]
    h = result["headline"]
    stage_seconds = {s: records[s].get("seconds") for s in STAGES}
    summary = {
        "headline": h,
        **{k: result[k] for k in ("baseline", "comparison") if k in result},
        "notes": records["split"]["result"]["notes"],
        "recognizers": {
            s: records[s]["result"] for s in ("target", "evaluation", "evaluation_other")
        },
        "stage_seconds": stage_seconds,
        "report": str(workdir / "report" / "report.html"),
        "config": config.to_dict(),
    }
    files.write_json(workdir / "experiment.json", summary)
    total = sum(v or 0 for v in stage_seconds.values())
    print(
        f"done: top-1 by R_E {100 * h['top1']:.1f}% (top-5 {100 * h['top5']:.1f}%) over "
        f"{h['clones']} clones of {h['identities']} identities; the seed "
        f"{100 * h['seed_top1']:.1f}% (top-5 {100 * h['seed_top5']:.1f}%); chance "
        f"{100 * h['chance_top1']:.1f}%; stages took {total:.0f} s "
        f"(this run {time.perf_counter() - t0:.0f} s)"
    )
    if "judges_top1" in h:
        for line in face_lines(h):
            print(line)
        clones = h["judges_top1"]["clones"]
        beside = [j for j in panel_lib.ROBUST if j not in panel_lib.FACE_JUDGES] + ["R_E_other"]
        robust = ", ".join(f"{j} {100 * clones[j]:.1f}%" for j in beside if j in clones)
        print(
            f"judges beside R_E, clones top-1: {robust}; adversarial inflation "
            f"{100 * h['adversarial_inflation']:.1f} points (R_E minus "
            f"{h['most_generous_robust_judge']}); judges took {h['judges_seconds']:.0f} s"
        )
    if "comparison" in result:
        rows = result["comparison"]["attacks"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        for name in ("seeds", "pixels", "prior"):
            r = rows[name]
            face = "".join(
                f"{j} {pct(r['top1'][j])}, " for j in panel_lib.FACE_JUDGES[:1] if j in r["top1"]
            )
            print(
                f"{name:>6}: {face}R_E {pct(r['top1']['R_E'])}, robust judges' mean "
                f"{pct(r['robust_mean'])}, mean beside R_E {pct(r['mean_beside_R_E'])}, "
                f"Fréchet {r['frechet'] if r['frechet'] is None else round(r['frechet'], 1)}"
            )
        print(f"side by side: {workdir / 'report' / 'prior_vs_pixels.png'}")
    print(f"report: {workdir / 'report' / 'report.html'}")
    return summary
