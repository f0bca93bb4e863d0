"""One resume rule for every stage: a workdir belongs to the settings that first claimed it.

A stage that writes resumable work (training checkpoints, inversion chunks, cloning cells)
first validates every input, then ``claim``s its folder: the settings its results depend on go
to a small JSON record there. A rerun with the same settings resumes; a rerun with other
settings is refused with a one-line error naming the fields that differ, never silently reused.
``check`` is the same test without writing, for a stage that must know before it writes
anything else (``jaxmia train`` checks every recognizer's folder before its own records).

Settings are flat dicts of JSON values keyed by dotted config paths (``train.learning_rate``);
``settings_of`` makes them from config sections, leaving out ``RUN_ONLY`` fields, which change
how a stage runs but not its results.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from jaxmia import files
from jaxmia.errors import JaxmiaError

# Fields that never change a stage's result: paths, bookkeeping, how the inversion runs.
RUN_ONLY = frozenset(
    {
        "data.cache_dir",
        "train.recognizer",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "inversion.steps_per_call",
        "inversion.check_every",
        "inversion.shard",
        "prior.checkpoint_every",
        "prior.keep_checkpoints",
        "experiment.reuse",
    }
)

# Fields added after records were first written, at the value that leaves results as before:
# left out of settings at that value, so those records still equal a rerun's.
LATER_DEFAULTS = {
    "train.stream": False,
    "train.flip_copies": False,
    # pretrained backbones (jaxmia/recognizers/models.py): every record before them was of the
    # paper CNN or a ResNet, and of R_E of R_T's architecture
    "model.tune": "linear",
    "model.tune_blocks": 0,
    "model.evaluation_arch": "",
    # every seed was judged before judges.seeds_per_identity existed
    "judges.seeds_per_identity": 0,
    "train.defence.label_smoothing": 0.0,
    "train.defence.smoothing_ramp_epochs": 0,
    "train.defence.dp": False,
    "train.defence.dp_clip": 1.0,
    "train.defence.dp_noise": 1.0,
    "train.defence.dp_delta": 1e-5,
    "train.defence.bottleneck": 0,
    "train.defence.bottleneck_weight": 0.0,
    "train.defence.weight_decay": -1.0,
    "train.defence.dropout": -1.0,
    "train.defence.epochs": -1,
    "inversion.views": 1,
    "inversion.zoom": 0.0,
    "inversion.blur": 0.0,
    "inversion.noise": 0.0,
    "inversion.prior": "pixels",
    "inversion.prior_components": 64,
    "inversion.prior_checkpoint": "",
    "inversion.prior_residual": False,
    "inversion.residual_weight": 0.0,
    "inversion.coef_weight": 0.0,
    "inversion.feature_weight": 0.0,
    "inversion.init_candidates": 1,
    # the tuned GAN prior (jaxmia/attacks/gan_tuning.py) and GMI's realism term
    "inversion.realism_weight": 0.0,
    "prior.tune_gan": False,
    "prior.gan_steps": 200,
    "prior.gan_learning_rate": 2e-4,
    # Only an attack with a prior has a baseline; every record before it was of free pixels.
    "experiment.baseline": True,
    "experiment.baseline_overrides": "",
}


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj, default=files.json_default))


def flatten(node: Any, prefix: str = "", skip: Iterable[str] = RUN_ONLY) -> dict[str, Any]:
    """A nested dict / ConfigDict as ``{"a.b": value}``, without the ``skip`` paths."""
    skip = frozenset(skip)
    if isinstance(node, ml_collections.ConfigDict | Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k), skip)
        return out
    if prefix in skip or _is_later_default(prefix, node):
        return {}
    return {prefix: jsonable(node)}


def _is_later_default(prefix: str, value: Any) -> bool:
    # Type and value: False == 0 == 0.0, but a 0 where False was the default is another setting.
    default = LATER_DEFAULTS.get(prefix, _UNSET)
    return type(value) is type(default) and value == default


def settings_of(
    config: ml_collections.ConfigDict, *sections: str, skip: Iterable[str] = RUN_ONLY
) -> dict[str, Any]:
    """The flat settings of the named config sections (a plain field by its own name)."""
    out: dict[str, Any] = {}
    for name in sections:
        out |= flatten(config[name], name, skip)
    return out


def differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ (or that only one side has), sorted."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _UNSET) != new.get(k, _UNSET))


_UNSET = object()


def describe(old: Mapping[str, Any], new: Mapping[str, Any], keys: list[str], most: int = 4) -> str:
    """``field: old -> new`` for the first ``most`` keys, for error messages."""

    def show(d, k):
        if k not in d:
            return "(unset)"
        text = repr(d[k])  # a list of names or files can be long: the start tells enough
        return text if len(text) <= 60 else text[:57] + "..."

    shown = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def read(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` (None if there is none)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise JaxmiaError(f"{path}: not a readable settings record ({e}); delete it") from e
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise JaxmiaError(f"{path}: expected a settings record; delete it or use another workdir")
    return record


def check(
    path: str | Path,
    settings: Mapping[str, Any],
    *,
    hint: str = "use another --workdir or delete that one",
) -> dict[str, Any] | None:
    """Raises a JaxmiaError if the record at ``path`` holds other settings; returns the record.

    Args:
      path: the record file (e.g. ``WORKDIR/run.json``).
      settings: the flat settings of this run (``settings_of``).
      hint: what the user can do instead, the end of the error message.
    """
    path = Path(path)
    record = read(path)
    if record is None:
        return None
    new = jsonable(dict(settings))
    differ = differing(record["settings"], new)
    if differ:
        raise JaxmiaError(
            f"workdir {path.parent}: holds a run with other settings "
            f"({describe(record['settings'], new, differ)}); {hint}"
        )
    return record


def claim(
    path: str | Path,
    settings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    hint: str = "use another --workdir or delete that one",
) -> dict[str, Any]:
    """``check``, then records the settings (and ``extra`` facts, e.g. a chunk size).

    A resumed run keeps the ``extra`` facts it recorded first: they describe work already on disk.

    Returns:
      The record as stored.
    """
    path = Path(path)
    old = check(path, settings, hint=hint)
    record = {**dict(extra or {}), **(old or {}), "settings": jsonable(dict(settings))}
    if old != record:
        files.write_json(path, record)
    return record
