"""The ``jaxmia train`` stage: the config's faces, its split, and the recognizer(s) asked.

The training itself (the step, the fit loop, one recognizer's job) is
``jaxmia.recognizers.train``; this module loads the faces, splits them, checks every job before
anything is written and runs them.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from jaxmia import files
from jaxmia import workdir as workdir_lib
from jaxmia.data import faces as faces_lib
from jaxmia.data import splits
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import defences, train

# The recognizers this stage trains (its --recognizer choices); the roles are the training's.
RECOGNIZERS = train.RECOGNIZERS


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    recognizer: str | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """The ``jaxmia train`` stage: the config's faces, its split, and the recognizer(s) asked.

    ``recognizer`` (default ``config.train.recognizer``): "all" trains one recognizer on every
    identity into ``workdir``; "target", "evaluation" or "both" train R_T and/or R_E of the split
    into ``workdir/target`` and ``workdir/evaluation``. Everything is checked before anything is
    written: a recognizer folder trained with other settings is refused with the fields named,
    and the workdir's ``config.json`` and ``split.json`` stay as they were.

    Returns:
      role -> the training summary of that recognizer.
    """
    recognizer = recognizer or config.train.recognizer
    if recognizer not in RECOGNIZERS:
        raise JaxmiaError(
            f"config field train.recognizer: expected one of {RECOGNIZERS}, got {recognizer!r}"
        )
    train.check_train_config(config.train)
    defences.check_model(defences.Defence.from_config(config.train), config.model.arch)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    # Streaming keeps only labels, names and files in memory; the images stay in the cache.
    faces = faces_lib.faces_from_config(config, progress=progress, stream=bool(config.train.stream))
    split = splits.from_config(config, faces)
    record = split.to_json(faces)
    # the defences are the attacked recognizer's; R_E, the judge, is never defended
    configs = {
        role: config if role in train.DEFENDED else defences.undefended(config)
        for role in train.ROLES[recognizer]
    }
    jobs = [
        train.make_job(
            configs[role],
            faces,
            getattr(split, role),
            role,
            workdir if role == "all" else workdir / role,
            record,
        )
        for role in train.ROLES[recognizer]
    ]
    for job in jobs:
        workdir_lib.check(job.workdir / train.RECORD, job.settings(configs[job.role].train))
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_json(workdir / "config.json", config.to_dict())
    files.write_json(workdir / "split.json", record)
    for note in split.notes():  # identities left out for too few photos
        print(f"note: {note}")
    if faces.synthetic:
        print(f"note: training on SYNTHETIC faces ({faces.source})")
    summaries = {}
    for job in jobs:
        summary = train.run_job(job, configs[job.role].train, progress=progress)
        summaries[job.role] = summary
        print(
            f"{job.role}: {summary['identities']} identities, test accuracy "
            f"{summary['test_accuracy']:.4f} after {summary['epochs']} epochs"
            f"{train.privacy_note(summary)} -> {job.workdir}"
        )
    return summaries
