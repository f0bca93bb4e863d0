"""Orbax checkpoints of recognizers and generators: the only module that imports orbax.

A recognizer folder holds ``checkpoints/<step>/`` with three items: ``params`` (a pure dict of
arrays), ``opt_state`` (training only) and ``meta`` (JSON: the model config, identity names in label
order, the data config, and anything the writer adds). That is everything needed to use the model
alone: ``load_recognizer(folder)``. A generator folder (``jaxmia prior``) has the same layout with
the generator's config under ``meta["generator"]``: ``load_generator(folder)``. Orbax writes each
step to a temporary folder and renames it when complete, so an interrupted save leaves no step that
loads half-written.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxmia.attacks import generator
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models

# Orbax logs every save and restore at INFO; a CLI user only needs the outcome.
logging.getLogger("absl").setLevel(logging.WARNING)


@dataclasses.dataclass(frozen=True)
class LoadedRecognizer:
    """A trained recognizer ready to use: ``rec.logits(x)``, ``rec.features(x)``."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: models.ModelConfig
    names: tuple[str, ...]  # identity names in label order
    meta: dict[str, Any]
    path: Path
    step: int

    @functools.cached_property
    def _logits(self):
        return jax.jit(functools.partial(models.logits, self.graphdef))

    @functools.cached_property
    def _features(self):
        return jax.jit(functools.partial(models.features, self.graphdef))

    def logits(self, x: jax.Array) -> jax.Array:
        """# [b, h, w, c] -> [b, num_classes]"""
        return self._logits(self.params, x)

    def features(self, x: jax.Array) -> jax.Array:
        """# [b, h, w, c] -> [b, dense_features[-1]]"""
        return self._features(self.params, x)


def _manager_dir(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoints"


def manager(path: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    """The CheckpointManager of a recognizer folder (created if needed)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(_manager_dir(path).absolute(), options=options)


def abstract_params(config: models.ModelConfig) -> dict:
    """Shapes and dtypes of the params pure dict for ``config``, without allocating them.

    Placed on this process's first device: in a multi-process run each process restores its own
    whole copy (orbax would otherwise look for the topology the checkpoint was saved on).
    """
    return _here(nnx.to_pure_dict(models.abstract(config)[1]))


def _here(shapes: Any) -> Any:
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here), shapes)


def _pure(params: nnx.State | dict) -> dict:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    params: nnx.State | dict,
    meta: dict[str, Any],
    opt_state: Any = None,
) -> None:
    """Saves one step and waits for it to be complete on disk."""
    items = {"params": ocp.args.StandardSave(_pure(params)), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def restore(
    mngr: ocp.CheckpointManager,
    step: int,
    config: models.ModelConfig,
    abstract_opt_state: Any = None,
) -> tuple[dict, dict, Any]:
    """Restores (params pure dict, meta, opt_state or None) of one step, checked against config.

    The parameters and the optimizer state are restored apart, so that an error says which of
    them does not fit: the parameters another model config, the optimizer state another optimizer.
    """
    what = (
        f"the model config (num_classes={config.num_classes}, image_size={config.image_size}, "
        f"channels={config.channels})"
    )
    return _restore(mngr, step, abstract_params(config), what, abstract_opt_state)


def _restore(
    mngr: ocp.CheckpointManager, step: int, abstract: Any, what: str, abstract_opt_state: Any
) -> tuple[dict, dict, Any]:
    """``restore`` against the parameters' shapes ``abstract``; ``what`` names them in errors."""
    where = mngr.directory / str(step)
    items = {"params": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise JaxmiaError(
            f"checkpoint {where}: its arrays do not fit {what}: {_first_line(e)}"
        ) from e
    if abstract_opt_state is None:
        return out["params"], out["meta"], None
    try:
        opt = mngr.restore(
            step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(abstract_opt_state))
        )
    except (ValueError, KeyError, TypeError) as e:
        saved = (out["meta"].get("train") or {}).get("optimizer")
        was = f" (it was saved by train.optimizer={saved!r})" if saved else ""
        raise JaxmiaError(
            f"checkpoint {where}: its optimizer state is missing or does not fit this run's "
            f"optimizer{was}; the parameters fit, but training cannot resume from another "
            f"optimizer's state: {_first_line(e)}"
        ) from e
    return out["params"], out["meta"], opt["opt_state"]


def save_recognizer(
    path: str | Path,
    params: nnx.State | dict,
    config: models.ModelConfig,
    names: tuple[str, ...] | list[str],
    meta: dict[str, Any] | None = None,
    *,
    step: int = 0,
) -> None:
    """Writes a usable recognizer folder (params + meta, no optimizer state)."""
    if len(names) != config.num_classes:
        raise ValueError(f"{len(names)} names for {config.num_classes} classes")
    meta = {**(meta or {}), "model": config.to_dict(), "names": list(names)}
    save(manager(path), step, params, meta)


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]


def _open(
    path: Path, step: int | None, what: str, writer: str
) -> tuple[ocp.CheckpointManager, int]:
    """The manager of an existing folder and its latest (or given) complete step."""
    if not _manager_dir(path).is_dir():
        raise JaxmiaError(
            f"checkpoint {path}: not found (expected {what} with checkpoints/<step>/, "
            f"as written by {writer})"
        )
    mngr = ocp.CheckpointManager(_manager_dir(path).absolute())
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise JaxmiaError(f"checkpoint {path}: no complete checkpoint step in {_manager_dir(path)}")
    return mngr, step


def load_recognizer(path: str | Path, step: int | None = None) -> LoadedRecognizer:
    """Loads the latest (or given) step of a recognizer folder written by ``jaxmia train``.

    Raises:
      JaxmiaError: no checkpoint there, or its meta or arrays do not describe a recognizer.
    """
    path = Path(path)
    mngr, step = _open(path, step, "a recognizer folder", "jaxmia train")
    meta = _read_meta(mngr, step)
    try:
        config = models.ModelConfig.from_dict(meta["model"])
        names = tuple(meta["names"])
    except (KeyError, TypeError, ValueError) as e:
        raise JaxmiaError(
            f"checkpoint {path}: meta lacks a valid model config and identity names ({e})"
        ) from e
    if len(names) != config.num_classes:
        raise JaxmiaError(
            f"checkpoint {path}: {len(names)} identity names for {config.num_classes} classes"
        )
    pure, _, _ = restore(mngr, step, config)
    graphdef, params = models.abstract(config)
    nnx.replace_by_pure_dict(params, pure)
    return LoadedRecognizer(graphdef, params, config, names, meta, path, step)


# --- generators (jaxmia prior) ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedGenerator:
    """A trained generator: its config, parameters (pure dict) and the meta it was saved with."""

    config: generator.GeneratorConfig
    params: dict
    meta: dict[str, Any]
    path: Path
    step: int


def save_generator(
    mngr: ocp.CheckpointManager,
    step: int,
    params: dict,
    config: generator.GeneratorConfig,
    meta: dict[str, Any],
    opt_state: Any = None,
) -> None:
    """Saves one step of a generator, its config in the meta (the folder describes itself)."""
    save(mngr, step, params, {**meta, "generator": config.to_dict()}, opt_state)


def restore_generator(
    mngr: ocp.CheckpointManager,
    step: int,
    config: generator.GeneratorConfig,
    abstract_opt_state: Any = None,
) -> tuple[dict, dict, Any]:
    """(params pure dict, meta, opt_state or None) of one step of a generator folder."""
    shapes = _here(nnx.to_pure_dict(generator.abstract(config)[1]))
    return _restore(
        mngr, step, shapes, f"the generator config {config.to_dict()}", abstract_opt_state
    )


def load_generator(path: str | Path, step: int | None = None) -> LoadedGenerator:
    """Loads the latest (or given) step of a generator folder written by ``jaxmia prior``.

    Raises:
      JaxmiaError: no checkpoint there, or its meta or arrays do not describe a generator.
    """
    path = Path(path)
    mngr, step = _open(path, step, "a generator folder", "jaxmia prior")
    meta = _read_meta(mngr, step)
    try:
        config = generator.GeneratorConfig.from_dict(meta["generator"])
    except (KeyError, TypeError, ValueError, JaxmiaError) as e:
        raise JaxmiaError(
            f"checkpoint {path}: meta lacks a valid generator config (is it a folder written "
            f"by jaxmia prior?): {_first_line(e)}"
        ) from e
    params, _, _ = restore_generator(mngr, step, config)
    return LoadedGenerator(config, params, meta, path, step)


# --- tuned GANs (jaxmia prior, inversion.prior="gan") -----------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedGan:
    """A tuned GAN: the generator (eval mode), its discriminator, the meta saved with them."""

    generator: Any  # dcgan.DCGANGenerator
    discriminator: Any  # gan_tuning.Discriminator
    meta: dict[str, Any]
    path: Path
    step: int


def _gan_modules(d_config: Any) -> tuple[Any, Any]:
    """Abstract (shapes only) generator and discriminator modules of a tuned GAN."""
    from jaxmia.attacks import gan_tuning  # noqa: PLC0415 - light imports for recognizers
    from jaxmia.pretrained import dcgan  # noqa: PLC0415

    generator_ = nnx.eval_shape(dcgan.DCGANGenerator)
    discriminator = nnx.eval_shape(lambda: gan_tuning.Discriminator(d_config, rngs=nnx.Rngs(0)))
    return generator_, discriminator


def save_gan(
    path: str | Path, step: int, generator_: Any, discriminator: Any, meta: dict[str, Any]
) -> None:
    """Writes a tuned GAN folder: both modules' states, and under ``meta["gan"]`` the generator
    (its latent size and image size, read from its weights) and the discriminator's config.

    Args:
      path: the folder (``checkpoints/<step>/`` inside).
      step: the tuning steps done.
      generator_: a ``dcgan.DCGANGenerator``; its batch norms' running averages are saved.
      discriminator: a ``gan_tuning.Discriminator``.
      meta: what else describes it (JSON).
    """
    first, last = generator_.convs[0].kernel, generator_.convs[-1].kernel
    depth = len(generator_.convs) - 1  # stride-2 layers, each doubling the first's 4x4
    described = {
        "generator": "dcgan_face",
        "latent": int(first.shape[0]),
        "image_size": int(4 * 2**depth),
        "image_channels": int(last.shape[1]),
        "discriminator": discriminator.config.to_dict(),
    }
    params = {
        "generator": _pure(nnx.state(generator_)),
        "discriminator": _pure(nnx.state(discriminator)),
    }
    save(manager(path), step, params, {**meta, "gan": described})


def load_gan(path: str | Path, step: int | None = None) -> LoadedGan:
    """Loads the latest (or given) step of a tuned GAN folder (``jaxmia prior`` with
    ``inversion.prior="gan"``).

    Raises:
      JaxmiaError: no checkpoint there, or it holds no tuned GAN, or a generator of another
        latent or image size than the DCGAN face generator's.
    """
    from jaxmia.attacks import gan_tuning  # noqa: PLC0415
    from jaxmia.pretrained import dcgan  # noqa: PLC0415

    path = Path(path)
    mngr, step = _open(path, step, "a tuned GAN folder", "jaxmia prior with inversion.prior=gan")
    meta = _read_meta(mngr, step)
    gan = meta.get("gan")
    try:
        d_config = gan_tuning.DiscriminatorConfig.from_dict(gan["discriminator"])
        got = (int(gan["latent"]), int(gan["image_size"]))
    except (KeyError, TypeError, ValueError, JaxmiaError) as e:
        raise JaxmiaError(
            f"checkpoint {path}: meta lacks a tuned GAN's description (is it a folder written "
            f"by jaxmia prior with inversion.prior=gan?): {_first_line(e)}"
        ) from e
    want = (dcgan.LATENT, dcgan.IMAGE_SIZE)
    if got != want:
        raise JaxmiaError(
            f"checkpoint {path}: its generator takes latents of size {got[0]} and makes "
            f"images of {got[1]} pixels a side; expected the DCGAN face generator's "
            f"{want[0]} and {want[1]}"
        )
    generator_, discriminator = _gan_modules(d_config)
    abstract = {
        "generator": nnx.to_pure_dict(nnx.state(generator_)),
        "discriminator": nnx.to_pure_dict(nnx.state(discriminator)),
    }
    pure, _, _ = _restore(mngr, step, _here(abstract), "the DCGAN face generator", None)
    for module, name in ((generator_, "generator"), (discriminator, "discriminator")):
        state = nnx.state(module)
        nnx.replace_by_pure_dict(state, pure[name])
        nnx.update(module, state)
    return LoadedGan(generator_, discriminator, meta, path, step)
