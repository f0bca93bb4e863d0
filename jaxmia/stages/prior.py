"""The ``jaxmia prior`` stage: a generative prior trained on the attacker's public faces.

    prior_training.run(config, "PRIOR", checkpoint_dir="RUN/target")

The faces are exactly the inversion's seed pool (``invert.seed_pool``): the auxiliary identities
the recognizer's checkpoint records (never R_T's or R_E's photos), or ``inversion.seed_source``,
at the recognizer's input size and channels. The VAE (``jaxmia.attacks.generator``) takes its
settings from the config's ``prior`` section. Writes to PRIOR:

- ``checkpoints/<epoch>/``: the VAE's parameters, its optimizer state and a meta that describes
  it (the generator config, the ``prior`` section, the pool, the losses so far), every
  ``prior.checkpoint_every`` epochs and at the end (``checkpoint.save_generator``); what
  ``inversion.prior_checkpoint=PRIOR`` loads.
- ``training.json``: the settings record (``jaxmia.workdir``): the architecture, the ``prior``
  section and a digest of the pool. An interrupted run resumes from its latest checkpoint and
  ends with the weights of an uninterrupted one; a finished one only reports; other settings
  are refused, naming the fields.
- ``samples.png``: pool faces over their reconstructions, then faces decoded from random codes.
- ``prior.json``: the settings, the losses per epoch, the seconds.

With ``inversion.prior="gan"`` the stage instead fine-tunes the pretrained face generator with a
new discriminator on that pool (``jaxmia.attacks.gan_tuning``: GMI's and PPDG-MI's public-data
GAN; ``prior.gan_steps`` steps of ``prior.batch_size`` faces, flipped if ``prior.flip``, keyed by
``prior.seed``), starting from the fetched generator or the weights file
``inversion.prior_checkpoint``. It writes ``checkpoints/<steps>/`` (``checkpoint.save_gan``: G
and D, what ``inversion.prior_checkpoint=PRIOR`` loads for the ``gan`` prior and its realism
term), ``training.json``, ``prior.json`` (the losses and D's verdicts over the steps) and
``samples.png``: pool faces, then G of fixed latents before tuning and the same latents after,
as the recognizer sees them. Only the finished tuning is saved: an interrupted one starts again
(the same key gives the same weights); a finished one only reports.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxmia import checkpoint, files
from jaxmia import workdir as workdir_lib
from jaxmia.attacks import gan_tuning, generator
from jaxmia.attacks import priors as priors_lib
from jaxmia.errors import JaxmiaError
from jaxmia.report import grids
from jaxmia.stages import invert

RECORD = "training.json"
SUMMARY = "prior.json"
SHOWN_FACES = 10  # pool faces shown with their reconstructions (one row of the grid each)
SAMPLES = 20  # faces decoded from random codes
# The tuning's own fields of the prior section (the VAE's others do not change it).
GAN_FIELDS = ("gan_steps", "gan_learning_rate", "batch_size", "flip", "seed")


def _settings(
    gen_cfg: generator.GeneratorConfig, config: ml_collections.ConfigDict, pool: np.ndarray
) -> dict[str, Any]:
    """What the trained generator depends on, flat: the pool enters by a digest of its faces."""
    digest = hashlib.sha256(np.ascontiguousarray(pool, np.float32).tobytes()).hexdigest()[:16]
    return {
        **{f"generator.{k}": v for k, v in gen_cfg.to_dict().items()},
        **workdir_lib.flatten(config.prior, "prior"),
        "pool": f"{len(pool)} faces, sha256 {digest}",
    }


def _samples(
    path: Path,
    gen_cfg: generator.GeneratorConfig,
    params: dict,
    pool: np.ndarray,
    key: jax.Array,
) -> None:
    """The picture: a row of pool faces, a row of their reconstructions, then random faces."""
    shown = np.linspace(0, len(pool) - 1, min(SHOWN_FACES, len(pool))).astype(int)
    faces = pool[shown]
    recon = np.asarray(generator.reconstruct(gen_cfg, params, faces))
    drawn = np.asarray(generator.sample(gen_cfg, params, key, SAMPLES))
    pad = [grids.Cell(None, "")] * (grids.COLUMNS - len(shown))  # each row starts a new line
    cells = [grids.Cell(f, f"face {i}", "black") for i, f in zip(shown, faces, strict=True)] + pad
    cells += [grids.Cell(r, "recon") for r in recon] + pad
    cells += [grids.Cell(d, f"z #{j}") for j, d in enumerate(drawn)]
    caption = "generator prior: pool faces, their reconstructions, faces of random codes"
    grids.draw(path, cells, caption)


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    checkpoint_dir: str | Path | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains (or resumes, or reports) the generator prior into ``workdir``.

    Args:
      config: the jaxmia config; its ``prior`` section sets the VAE, its ``inversion`` section's
        ``seed_source`` (and ``data.cache_dir``) where the pool comes from.
      workdir: the generator folder.
      checkpoint_dir: the recognizer (R_T) folder whose meta names the auxiliary identities
        (and whose input size and channels the generator takes).
      progress: show a progress bar over the epochs.

    Returns:
      The summary written to ``prior.json``.

    Raises:
      JaxmiaError: bad input (no checkpoint, an empty pool, bad settings), before anything is
        written; or a workdir that holds a generator of other settings.
    """
    if checkpoint_dir is None:
        raise JaxmiaError(
            "--checkpoint: expected the recognizer folder (R_T, from jaxmia train) whose "
            "auxiliary identities make the pool"
        )
    checkpoint_dir, workdir = Path(checkpoint_dir), Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise JaxmiaError(f"--workdir {workdir}: exists and is not a folder")
    rec = checkpoint.load_recognizer(checkpoint_dir)
    if config.inversion.prior == "gan":
        return _run_gan(config, workdir, rec, checkpoint_dir, progress)
    gen_cfg, train_cfg = generator.configs_from(
        config.prior, tuple(rec.config.image_size), rec.config.channels
    )
    for name in ("checkpoint_every", "keep_checkpoints"):
        if config.prior[name] < 1:
            raise JaxmiaError(f"prior.{name}={config.prior[name]}: expected >= 1")
    pool, where = invert.seed_pool(rec, config)
    key = jax.random.key(config.prior.seed)
    summary_path = workdir / SUMMARY

    if (workdir / "checkpoints").is_dir() and not (workdir / RECORD).exists():
        raise JaxmiaError(
            f"workdir {workdir}: holds checkpoints without a settings record ({RECORD}), so "
            "they cannot be resumed safely; use another --workdir or delete that one"
        )
    workdir_lib.claim(workdir / RECORD, _settings(gen_cfg, config, pool))
    mngr = checkpoint.manager(workdir, keep=config.prior.keep_checkpoints)
    last = mngr.latest_step()
    if last == train_cfg.epochs and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        print(f"prior: already trained with these settings ({_result(summary)}) -> {workdir}")
        return summary

    t0 = time.perf_counter()
    resume = None
    if last is not None:
        abstract_opt = generator.abstract_opt_state(gen_cfg, train_cfg)
        params, meta, opt_state = checkpoint.restore_generator(mngr, last, gen_cfg, abstract_opt)
        resume = (last, params, opt_state, meta["history"])
    meta = {
        "prior": config.prior.to_dict(),
        "recognizer": str(checkpoint_dir),
        "pool": where,
        "seed_source": config.inversion.seed_source,
    }
    every = config.prior.checkpoint_every

    def save(done: int, params: dict, opt_state: Any, history: list[dict]) -> None:
        if done % every == 0 or done == train_cfg.epochs:
            step_meta = {**meta, "epoch": done, "history": history}
            checkpoint.save_generator(mngr, done, params, gen_cfg, step_meta, opt_state)

    params, history = generator.fit(
        gen_cfg, train_cfg, pool, key=key, resume=resume, on_epoch=save, progress=progress
    )
    _samples(workdir / "samples.png", gen_cfg, params, pool, jax.random.fold_in(key, 1))
    summary = {
        "recognizer": str(checkpoint_dir),
        "pool": where,
        "faces": len(pool),
        "generator": gen_cfg.to_dict(),
        "prior": config.prior.to_dict(),
        "epochs": train_cfg.epochs,
        "resumed_from_epoch": last or 0,
        "final": history[-1],
        "history": history,
        "seconds_training": sum(h["seconds"] for h in history),
        "seconds_this_run": time.perf_counter() - t0,
        "device": str(jax.devices()[0].device_kind),
    }
    files.write_json(summary_path, summary)
    print(f"prior: VAE on {where}: {_result(summary)} -> {workdir}")
    return summary


def _result(summary: dict[str, Any]) -> str:
    f = summary["final"]
    return (
        f"loss {f['loss']:.1f} (reconstruction {f['reconstruction']:.1f}, KL {f['kl']:.1f}) "
        f"after {summary['epochs']} epochs, {summary['seconds_training']:.0f}s of training"
    )


# --- the tuned GAN prior -------------------------------------------------------------------------


def _run_gan(
    config: ml_collections.ConfigDict,
    workdir: Path,
    rec: checkpoint.LoadedRecognizer,
    checkpoint_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """``run`` for ``inversion.prior="gan"``: tunes G and a new D on the pool (or reports)."""
    from jaxmia.pretrained import dcgan  # noqa: PLC0415 - only the gan prior needs it

    section, start = config.prior, config.inversion.prior_checkpoint
    tune_cfg = gan_tuning.TuneConfig.from_config(section)
    if section.batch_size < 1:
        raise JaxmiaError(f"prior.batch_size={section.batch_size}: expected >= 1")
    shape = (*rec.config.image_size, rec.config.channels)
    d_cfg = gan_tuning.DiscriminatorConfig(tuple(shape))
    if start and Path(start).is_dir():
        raise JaxmiaError(
            f"inversion.prior_checkpoint={start}: jaxmia prior tunes the pretrained generator; "
            "expected its weights file, or empty for the fetched one"
        )
    pretrained = dcgan.load_dcgan(start or None)
    priors_lib.gan_prior(pretrained, shape)  # refuses a recognizer of other channels
    pool, where = invert.seed_pool(rec, config)
    digest = hashlib.sha256(np.ascontiguousarray(pool, np.float32).tobytes()).hexdigest()[:16]
    settings = {
        "gan.generator": start or "dcgan_face",
        **{f"gan.discriminator.{k}": v for k, v in d_cfg.to_dict().items()},
        **{f"prior.{k}": section[k] for k in GAN_FIELDS},
        "pool": f"{len(pool)} faces, sha256 {digest}",
    }
    if (workdir / "checkpoints").is_dir() and not (workdir / RECORD).exists():
        raise JaxmiaError(
            f"workdir {workdir}: holds checkpoints without a settings record ({RECORD}), so "
            "they cannot be resumed safely; use another --workdir or delete that one"
        )
    workdir_lib.claim(workdir / RECORD, workdir_lib.jsonable(settings))
    summary_path = workdir / SUMMARY
    if summary_path.exists() and checkpoint.manager(workdir).latest_step() == tune_cfg.gan_steps:
        summary = json.loads(summary_path.read_text())
        print(f"prior: already tuned with these settings ({_gan_result(summary)}) -> {workdir}")
        return summary

    t0 = time.perf_counter()
    k_tune, k_samples = jax.random.split(jax.random.key(section.seed))
    tuned, history = gan_tuning.tune(
        pretrained, pool, tune_cfg, batch_size=section.batch_size, flip=section.flip,
        key=k_tune, progress=progress,
    )  # fmt: skip
    meta = {"prior": section.to_dict(), "recognizer": str(checkpoint_dir), "pool": where,
            "seed_source": config.inversion.seed_source, "history": history}  # fmt: skip
    checkpoint.save_gan(workdir, tune_cfg.gan_steps, tuned.generator, tuned.discriminator, meta)
    _gan_samples(workdir / "samples.png", pretrained, tuned, pool, k_samples)
    summary = {
        "recognizer": str(checkpoint_dir),
        "pool": where,
        "faces": len(pool),
        "generator": start or "dcgan_face (fetched)",
        "discriminator": d_cfg.to_dict(),
        "prior": {k: section[k] for k in ("tune_gan", *GAN_FIELDS)},
        "steps": tune_cfg.gan_steps,
        "final": history[-1],
        "history": history,
        "seconds_training": history[-1]["seconds"],
        "seconds_this_run": time.perf_counter() - t0,
        "device": str(jax.devices()[0].device_kind),
    }
    files.write_json(summary_path, summary)
    print(f"prior: GAN tuned on {where}: {_gan_result(summary)} -> {workdir}")
    return summary


def _gan_samples(
    path: Path, pretrained: Any, tuned: gan_tuning.Tuned, pool: np.ndarray, key: jax.Array
) -> None:
    """The picture: a row of pool faces, G of fixed latents before tuning, then after; each
    titled with the tuned D's probability that it is a pool photo."""
    shape = pool.shape[1:]
    shown = np.linspace(0, len(pool) - 1, min(SHOWN_FACES, len(pool))).astype(int)
    z = jax.random.normal(key, (SAMPLES, pretrained.convs[0].kernel.shape[0]))
    before = priors_lib.to_recognizer(pretrained(z), shape)
    after = priors_lib.to_recognizer(tuned.generator(z), shape)
    real = lambda x: np.asarray(jax.nn.sigmoid(tuned.discriminator(x)))  # noqa: E731
    pad = [grids.Cell(None, "")] * (grids.COLUMNS - len(shown))  # each part starts a new row
    cells = [grids.Cell(pool[i], f"pool {real(pool[i][None])[0]:.2f}", "black") for i in shown]
    cells += pad
    cells += [grids.Cell(x, f"before {p:.2f}") for x, p in zip(before, real(before), strict=True)]
    cells += [grids.Cell(x, f"after {p:.2f}") for x, p in zip(after, real(after), strict=True)]
    grids.draw(path, cells, "GAN prior tuned on the pool: pool faces, G(z) before "
               "tuning, the same z after; titles: the tuned D's P(pool photo)")  # fmt: skip


def _gan_result(summary: dict[str, Any]) -> str:
    f = summary["final"]
    return (
        f"D loss {f['d_loss']:.2f}, G loss {f['g_loss']:.2f}, D's P(pool photo) of the pool "
        f"{f['d_real']:.2f} and of G's faces {f['d_fake']:.2f}, after {summary['steps']} steps, "
        f"{summary['seconds_training']:.0f}s of tuning"
    )
