"""``jaxmia invert``: gray-box model inversion of a trained recognizer's identities.

  jaxmia invert --checkpoint RUN/target --identities 0,3,s5 --clones 100 --steps 300 --workdir OUT

Makes ``clones`` clone faces per identity (by label index or name; default: the split's attacked
identities if the checkpoint records a split, else all) with the settings of the config's
``inversion`` section, in chunks of equal shape (one compilation). Writes to OUT:

- ``inversions.npz``: ``clones`` [ids, clones, h, w, c] float32; ``seeds`` [ids, clones, h, w, c],
  or [1, 1, h, w, c] when every clone starts from the same image (broadcast it); ``identities``
  (names, str) [ids]; ``labels`` (R_T label indices) [ids]; per clone [ids, clones]: ``steps``,
  ``loss``, ``confidence`` (R_T's softmax of the target for the clone), ``seed_confidence``,
  ``diverged`` (bool), ``reason`` (int index into ``stop_reasons``, a str array).
- ``summary.json``: the checkpoint, settings, per-identity confidence before (seed) and after,
  steps, divergence, stop reasons; timings with compile time apart from run time.
- ``grid_<name>.png`` per identity: the seed, then the clones titled with their confidence.
- ``run.json`` (the settings the chunks belong to, and their size) and
  ``chunks/chunk_NNNNN.npz``: finished chunks, written atomically. A rerun with the same
  settings skips them (resume; a different machine keeps the recorded chunk size); other
  settings in the same workdir are an error naming the differing fields (except those in
  ``HOW_NOT_WHAT``, which do not change the results).

Multi-host (``--distributed``): the same command in every process; the clones are sharded over
every process's devices, process 0 alone reads and writes the workdir (the others need the
checkpoint and seed data, not the workdir) and decides which chunks are still to run.

Clones that diverge (NaN/Inf) are frozen at their last finite image and reported on stderr and
in the summary's ``warnings``. If every clone diverges the outputs are still written and the
command then fails (exit 2). With the projection to [0, 1] a large but finite learning rate
saturates pixels rather than overflowing; divergence comes from losses that reach infinity
(poincare on a one-hot-like output) or a recognizer whose outputs are not finite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from matplotlib.figure import Figure

from jaxmia import checkpoint, files, report, seeds, sharding
from jaxmia import inversion as inv
from jaxmia.errors import JaxmiaError

GRID_COLUMNS = 10
MAX_GRID_CLONES = 100
PER_CLONE = ("steps", "loss", "confidence", "seed_confidence", "reason")
# Settings that change how the program runs, not its results: a resumed run may change them.
HOW_NOT_WHAT = ("steps_per_call", "check_every", "shard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="recognizer folder (from jaxmia train)")
    parser.add_argument(
        "--identities",
        default=None,
        help="comma-separated label indices or names (default: the split's attacked identities "
        "recorded in the checkpoint, else all)",
    )
    parser.add_argument(
        "--clones", type=int, default=None, help="per identity (config: inversion.clones)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="most steps (config: inversion.steps)"
    )
    group = parser.add_argument_group(
        "multi-host", "run the same command in every process; process 0 writes the outputs"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process JAX run (jax.distributed.initialize) and shard the clones "
        "over every process's devices; where the coordinator is comes from the cluster "
        "(Slurm, Open MPI, Cloud TPU) or the three options below (which imply it)",
    )
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    group.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")


# --- inputs ------------------------------------------------------------------------------------


def parse_identities(spec: str | None, names: tuple[str, ...], meta: dict[str, Any]) -> list[int]:
    """Label indices of ``spec`` ("0,3,s5": indices or names, in that order, duplicates dropped).

    Without a spec: the attacked identities of the split the checkpoint records, else all.
    """
    if spec is None:
        attacked = [n for n in _split_names(meta, "attacked") if n in names]
        return [names.index(n) for n in attacked] if attacked else list(range(len(names)))
    out: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        if token in names:
            label = names.index(token)
        elif token.lstrip("-").isdigit():
            label = int(token)
            if not 0 <= label < len(names):
                raise JaxmiaError(
                    f"--identities {token}: no such label; expected 0..{len(names) - 1}"
                )
        else:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise JaxmiaError(
                f"--identities {token!r}: not an identity of the checkpoint; expected a label "
                f"0..{len(names) - 1} or a name ({shown})"
            )
        if label not in out:
            out.append(label)
    if not out:
        raise JaxmiaError("--identities: expected at least one index or name")
    return out


def _split_names(meta: dict[str, Any], key: str) -> list[str]:
    """Identity names under ``key`` ("attacked", "aux_identities") of the checkpoint's split."""
    split = meta.get("split")
    value = split.get(key) if isinstance(split, dict) else None
    return [str(v) for v in value] if isinstance(value, list) else []


def seed_pool(
    rec: checkpoint.LoadedRecognizer, config: ml_collections.ConfigDict
) -> tuple[np.ndarray, str]:
    """The auxiliary faces for the seed, at the recognizer's input shape, and where they came from.

    ``inversion.seed_source`` names a data source (its identities that the recognizer knows by
    name are left out); empty means the auxiliary identities of the split in the checkpoint's meta.
    """
    cfg = config.inversion
    source, keep = cfg.seed_source, None
    if not source:
        aux = _split_names(rec.meta, "aux_identities")
        data_cfg = rec.meta.get("data")
        if not aux or not isinstance(data_cfg, dict) or "source" not in data_cfg:
            raise JaxmiaError(
                f"checkpoint {rec.path}: its meta records no auxiliary identities to make the "
                f"seed from; set --config.inversion.seed_source=att|synthetic|folder:PATH or "
                f"--config.inversion.seed=grey|uniform|files"
            )
        source, keep = data_cfg["source"], set(aux)
        synthetic = data_cfg.get("synthetic")
    else:
        synthetic = config.data.synthetic.to_dict()
    from jaxmia import data  # only pool seeds need faces loaded

    faces = data.load_faces(
        source,
        image_size=tuple(rec.config.image_size),
        channels=rec.config.channels,
        cache_dir=config.data.cache_dir or None,
        synthetic=synthetic,
    )
    known = set(rec.names)
    wanted = [i for i, n in enumerate(faces.names) if (n in keep if keep else n not in known)]
    pool = faces.images[np.isin(faces.labels, wanted)]
    if len(pool) == 0:
        raise JaxmiaError(
            f"seed source {source}: no faces of identities outside the recognizer's to make a seed"
        )
    return pool, f"{source} ({len(wanted)} identities, {len(pool)} faces)"


def make_start(
    rec: checkpoint.LoadedRecognizer,
    config: ml_collections.ConfigDict,
    labels: list[int],
    clones: int,
) -> tuple[jax.Array, jax.Array, str]:
    """Seeds and inversion keys of every clone, flattened identity-major. # [n, h, w, c], [n]"""
    cfg = config.inversion
    shape = (*rec.config.image_size, rec.config.channels)
    root = jax.random.key(cfg.rng_seed)

    def keys(stream: int) -> jax.Array:  # [n]: fold_in(root, stream, label, clone)
        base = jax.random.fold_in(root, stream)
        per_id = [jax.random.fold_in(base, label) for label in labels]
        return jnp.concatenate(
            [jax.vmap(lambda j, k=k: jax.random.fold_in(k, j))(jnp.arange(clones)) for k in per_id]
        )

    seed_keys = keys(0)
    pool, images, where = None, None, cfg.seed
    if cfg.seed in seeds.POOL_KINDS:
        pool, where = seed_pool(rec, config)
    elif cfg.seed == "files":
        paths = [p.strip() for p in cfg.seed_files.split(",") if p.strip()]
        images = seeds.load_images(paths, shape) if paths else None
        where = f"files {paths}"
    start = seeds.make_seeds(
        cfg.seed,
        seed_keys,
        shape,
        pool=pool,
        pool_size=cfg.seed_pool_size,
        subset_size=cfg.seed_subset_size,
        noise_scale=cfg.seed_noise,
        grey=cfg.seed_grey,
        images=images,
    )
    return start, keys(1), where


# --- the run ------------------------------------------------------------------------------


def _fingerprint(args, rec, config, labels, clones, steps) -> dict[str, Any]:
    """The settings that fix a run's chunks, flat: ``inversion.*`` besides the run's shape."""
    run = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "checkpoint_step": rec.step,
        "labels": labels,
        "clones": clones,
        "steps": steps,
    }
    for k, v in config.inversion.to_dict().items():
        if k not in ("clones", "steps", *HOW_NOT_WHAT):
            run[f"inversion.{k}"] = v
    return json.loads(json.dumps(run))  # tuples as lists, as they read back


def _claim_workdir(workdir: Path, run: dict[str, Any], size: int) -> int:
    """Records the run's settings and chunk size, or checks that the workdir's chunks belong to
    the same settings; returns the chunk size to use (a resumed run keeps the recorded one, which
    may differ here, e.g. on a machine with other devices, so its chunk files stay valid)."""
    path = workdir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        size = int(old.pop("chunk_size", size))
        differ = sorted(k for k in run.keys() | old.keys() if run.get(k) != old.get(k))
        if differ:
            raise JaxmiaError(
                f"workdir {workdir}: holds a run with other settings ({', '.join(differ)}); "
                "use another --workdir or delete that one"
            )
    files.write_json(path, run | {"chunk_size": size})
    return size


def _invert_chunks(
    rec, config, start, keys, targets, steps, workdir, size
) -> tuple[dict, inv.Timing, int]:
    """Runs (or loads) every chunk: (per-clone arrays [n], total timing, chunks resumed)."""
    cfg = inv.InversionConfig.from_config(config.inversion)
    apply_fn = inv.recognizer_apply(rec.graphdef)
    n = start.shape[0]
    parts, total, resumed = [], inv.Timing(), 0
    bounds = list(inv.chunks(n, size))
    paths = [workdir / "chunks" / f"chunk_{i:05d}.npz" for i, _ in bounds]
    # Multi-host: every process computes the chunks process 0 has not got (the collectives
    # need all of them); only process 0 reads and writes files.
    done = sharding.agree(np.array([p.exists() for p in paths]))
    main = sharding.is_main()
    bar = tqdm.tqdm(
        bounds, desc="invert", unit="chunk", disable=None if main else True, leave=False
    )
    for (i, sl), path in zip(bar, paths, strict=True):
        if done[i]:
            if not main:
                continue
            with np.load(path) as z:
                part = {k: z[k] for k in z.files}
            resumed += 1
        else:
            count = sl.stop - sl.start
            batch = inv.pad_to((start[sl], targets[sl], keys[sl]), size)
            timing = inv.Timing()
            _, seed_conf = inv.evaluate(apply_fn, rec.params, batch[0], batch[1], cfg, timing)
            rec_ = inv.invert_batch(apply_fn, rec.params, *batch, cfg, steps, timing)
            part = {k: np.asarray(v)[:count] for k, v in rec_._asdict().items()}
            part["seed_confidence"] = np.asarray(seed_conf)[:count]
            part |= {
                "compile_s": timing.compile_s,
                "run_s": timing.run_s,
                "gradients": timing.gradients,
            }
            if not main:
                continue
            files.savez(path, **part)
        total.compile_s += float(part["compile_s"])
        total.run_s += float(part["run_s"])
        total.gradients += int(part["gradients"])
        parts.append(part)
    if not main:
        return {}, total, resumed
    merged = {k: np.concatenate([p[k] for p in parts]) for k in ("clones", *PER_CLONE)}
    return merged | {"chunk_size": size, "chunks": len(bounds)}, total, resumed


def _grid(
    path: Path, name: str, seed: np.ndarray, clones: np.ndarray, conf: np.ndarray, before: float
) -> None:
    """The seed, then the clones titled with R_T's confidence in the target."""
    shown = min(len(clones), MAX_GRID_CLONES)
    cells = 1 + shown
    cols = min(GRID_COLUMNS, cells)
    rows = -(-cells // cols)
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[cells:]:
        ax.axis("off")
    for ax, image, title in [(axes[0], seed, f"seed {before:.2f}")] + [
        (axes[1 + j], clones[j], f"#{j} {conf[j]:.2f}") for j in range(shown)
    ]:
        image = np.clip(np.nan_to_num(image), 0, 1)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7)
    more = f" (first {shown} of {len(clones)})" if shown < len(clones) else ""
    fig.suptitle(f"{name}: clones{more}; titles: R_T confidence in the target", fontsize=9)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def _identity_summary(name: str, label: int, r: dict[str, np.ndarray]) -> dict[str, Any]:
    reasons = {
        inv.STOP_REASONS[k]: int(v)
        for k, v in zip(*np.unique(r["reason"], return_counts=True), strict=True)
    }
    return {
        "name": name,
        "label": label,
        "seed_confidence_mean": float(np.mean(r["seed_confidence"])),
        "seed_confidence_max": float(np.max(r["seed_confidence"])),
        "confidence_mean": float(np.nanmean(r["confidence"]))
        if np.isfinite(r["confidence"]).any()
        else None,
        "confidence_max": float(np.nanmax(r["confidence"]))
        if np.isfinite(r["confidence"]).any()
        else None,
        "confidence_min": float(np.nanmin(r["confidence"]))
        if np.isfinite(r["confidence"]).any()
        else None,
        "steps_mean": float(np.mean(r["steps"])),
        "diverged": int(np.sum(r["reason"] == inv.DIVERGED)),
        "stop_reasons": reasons,
    }


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    clones = config.inversion.clones if args.clones is None else args.clones
    steps = config.inversion.steps if args.steps is None else args.steps
    if clones < 1:
        raise JaxmiaError(f"--clones {clones}: expected a positive number of clones per identity")
    if steps < 1:
        raise JaxmiaError(f"--steps {steps}: expected a positive number of steps")
    if config.inversion.max_batch < 1:
        raise JaxmiaError(f"inversion.max_batch={config.inversion.max_batch}: expected >= 1")
    cfg = inv.InversionConfig.from_config(config.inversion)  # bad settings fail before loading
    where = [getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")]
    if getattr(args, "distributed", False) or any(v is not None for v in where):
        sharding.initialize(*where)
    rec = checkpoint.load_recognizer(args.checkpoint)
    labels = parse_identities(args.identities, rec.names, rec.meta)
    names = [rec.names[i] for i in labels]
    workdir = Path(args.workdir)
    size = inv.chunk_size(
        len(labels) * clones, config.inversion.max_batch, inv.bytes_per_clone(rec.config, cfg)
    )
    if sharding.is_main():
        size = _claim_workdir(workdir, _fingerprint(args, rec, config, labels, clones, steps), size)
    size = int(sharding.agree(np.int32(size)))

    start, keys, seed_from = make_start(rec, config, labels, clones)
    targets = jnp.repeat(jnp.asarray(labels, jnp.int32), clones)
    r, timing, resumed = _invert_chunks(rec, config, start, keys, targets, steps, workdir, size)
    if not sharding.is_main():
        return

    ids = len(labels)
    shape = start.shape[1:]
    per_id = {k: r[k].reshape(ids, clones, *r[k].shape[1:]) for k in ("clones", *PER_CLONE)}
    shared_seed = config.inversion.seed in ("mean", "grey")
    seed_arr = (
        np.asarray(start[:1]).reshape(1, 1, *shape)
        if shared_seed
        else np.asarray(start).reshape(ids, clones, *shape)
    )
    files.savez(
        workdir / "inversions.npz",
        **per_id,
        seeds=seed_arr,
        identities=np.array(names, dtype=str),
        labels=np.asarray(labels, np.int32),
        diverged=per_id["reason"] == inv.DIVERGED,
        stop_reasons=np.array(inv.STOP_REASONS, dtype=str),
    )
    rows = [
        _identity_summary(name, label, {k: per_id[k][i] for k in PER_CLONE})
        for i, (name, label) in enumerate(zip(names, labels, strict=True))
    ]
    taken: set[str] = set()
    seeds_full = np.broadcast_to(seed_arr, per_id["clones"].shape)
    for i, row in enumerate(rows):
        row["grid"] = report.grid_filename(row["name"], taken)
        _grid(
            workdir / row["grid"],
            row["name"],
            seeds_full[i, 0],
            per_id["clones"][i],
            per_id["confidence"][i],
            float(per_id["seed_confidence"][i, 0]),
        )

    diverged = int(np.sum(r["reason"] == inv.DIVERGED))
    warnings = []
    if diverged:
        warnings.append(
            f"{diverged} of {len(r['reason'])} clones diverged (NaN/Inf) and were frozen at their "
            f"last finite image; consider a lower inversion.learning_rate "
            f"(now {config.inversion.learning_rate})"
        )
    summary = {
        "checkpoint": str(Path(args.checkpoint)),
        "checkpoint_step": rec.step,
        "synthetic": rec.meta.get("synthetic"),
        "data_source": rec.meta.get("data_source"),
        "clones": clones,
        "steps": steps,
        "seed_from": seed_from,
        "config": config.inversion.to_dict(),
        "identities": rows,
        "overall": {
            "seed_confidence_mean": float(np.mean(r["seed_confidence"])),
            "confidence_mean": float(np.nanmean(r["confidence"]))
            if np.isfinite(r["confidence"]).any()
            else None,
            "diverged": diverged,
        },
        "timing": {
            "compile_s": timing.compile_s,
            "run_s": timing.run_s,
            "image_gradients": timing.gradients,
            "image_gradients_per_s": timing.gradients_per_s,
            "chunks": r["chunks"],
            "chunk_size": r["chunk_size"],
            "chunks_resumed": resumed,
            "device": str(jax.devices()[0].device_kind),
        },
        "warnings": warnings,
    }
    files.write_json(workdir / "summary.json", summary)
    for w in warnings:
        print(f"jaxmia invert: warning: {w}", file=sys.stderr)
    if diverged == len(r["reason"]):
        raise JaxmiaError(
            f"every clone diverged (NaN/Inf in loss, gradient or image): lower "
            f"inversion.learning_rate (now {config.inversion.learning_rate}) or check that the "
            f"recognizer {args.checkpoint} gives finite outputs (outputs are in {workdir})"
        )
    o = summary["overall"]
    print(
        f"{ids} identities x {clones} clones: target confidence {o['seed_confidence_mean']:.3f} "
        f"(seed) -> {o['confidence_mean']:.3f}; {timing.gradients_per_s:.0f} image-gradients/s, "
        f"compile {timing.compile_s:.1f}s -> {workdir}"
    )
