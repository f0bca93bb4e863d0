"""Inversion throughput with each prior, beside the pixel attack, in one run on one machine.

  python -m benchmarks.prior_speed            # the table (about 5 minutes on 2 cores)
  python -m benchmarks.prior_speed --quick    # a smoke run of the same code

For R_T shaped as configs/att.py's (the paper CNN at 64x64x1, 33 classes) and configs/celeba.py's
(64x64x3, 107 classes), with random weights (speed does not depend on them): the pixel attack of
configs/att.py (Adam on the max-margin loss, a Gaussian blur every 10 steps) and the same attack
in the coefficients of the linear prior (64 eigenfaces), in the codes of the generator prior
(the VAE of the config's ``prior`` section), each with and without the pixel residual; and for
the ResNet R_T of configs/att_resnet.py, the pixel attack with and without DeepInversion's
feature statistics. Each row: image-gradients/s (clones x steps / seconds, after a warm-up run,
compile time apart, ``block_until_ready`` by the engine), XLA's FLOPs of one clone's step
(``cost_analysis`` of the compiled step) and the GFLOP/s they make, against the GFLOP/s of a
large float32 matrix product measured in the same run (the practical limit of this machine).

Writes benchmarks/results/prior_speed.{json,md}. Run it on quiet cores: shared cores cut every
row, and only rows of one run compare.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmia import config as config_lib
from jaxmia import files
from jaxmia.attacks import generator, priors
from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models

OUT = Path(__file__).resolve().parent / "results"
ATTACK = {"loss": "max_margin", "margin": 20.0, "optimizer": "adam", "learning_rate": 0.05,
          "denoise": "gaussian", "denoise_sigma": 1.0}  # fmt: skip  # configs/att.py's
RESIDUAL = {"prior_residual": True, "residual_weight": 1.0}
# name -> (inversion overrides, prior kind)
ROWS = {
    "pixels": ({}, None),
    "linear 64": ({"prior": "linear", "denoise": "none"}, "linear"),
    "linear 64 + residual": ({"prior": "linear", **RESIDUAL}, "linear"),
    "generator": ({"prior": "generator", "prior_checkpoint": "-", "denoise": "none"},
                  "generator"),
    "generator + residual": ({"prior": "generator", "prior_checkpoint": "-", **RESIDUAL},
                             "generator"),
}  # fmt: skip
RESNET_ROWS = {"pixels": ({}, None), "pixels + features 0.1": ({"feature_weight": 0.1}, None)}


def _paper(channels: int, classes: int) -> models.ModelConfig:
    return models.ModelConfig(num_classes=classes, image_size=(64, 64), channels=channels)


def _resnet() -> models.ModelConfig:
    c = config_lib.load(str(Path(__file__).resolve().parents[1] / "configs" / "att_resnet.py"))
    m = c.model
    return models.ModelConfig(
        num_classes=33, image_size=(64, 64), channels=1, arch="resnet", widths=tuple(m.widths),
        blocks=tuple(m.blocks), stem_kernel=m.stem_kernel, stem_stride=m.stem_stride,
        stem_pool=m.stem_pool, dropout=0.0,
    )  # fmt: skip


def _prior(kind: str | None, mc: models.ModelConfig) -> priors.Prior | None:
    if kind is None:
        return None
    shape = (*mc.image_size, mc.channels)
    if kind == "linear":
        pool = np.asarray(jax.random.uniform(jax.random.key(9), (70, *shape)))
        return priors.Prior(priors.LINEAR, priors.fit_linear(pool, 64))
    gen_cfg, _ = generator.configs_from(config_lib.default_config().prior, mc.image_size,
                                        mc.channels)  # fmt: skip
    return priors.generator_prior(gen_cfg, generator.init(gen_cfg, jax.random.key(3))[1])


def measure(mc: models.ModelConfig, row: tuple[dict, str | None], batch: int, seconds: float):
    overrides, kind = row
    graphdef, params = models.init(mc, jax.random.key(0))
    cfg = inv.InversionConfig(**ATTACK | overrides, shard=False, check_every=10**6)
    apply_fn = inv.recognizer_apply(graphdef, statistics=cfg.feature_weight != 0)
    prior = _prior(kind, mc)
    x = jax.random.uniform(jax.random.key(1), (batch, *mc.image_size, mc.channels))
    labels = jnp.arange(batch) % mc.num_classes
    keys = jax.random.split(jax.random.key(2), batch)
    warm = inv.Timing()
    inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 2, warm, prior)
    steps = max(2, int(seconds * warm.gradients_per_s / batch))
    t = inv.Timing()
    inv.invert_batch(apply_fn, params, x, labels, keys, cfg, steps, t, prior)
    program = inv.make_program(apply_fn, cfg, None if prior is None else prior.decoder)
    step = next(c for sig, c in program.compiled.items() if sig[0] == "steps")
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) / batch
    return {
        "gradients_per_s": t.gradients_per_s,
        "compile_s": warm.compile_s,
        "steps": steps,
        "run_s": t.run_s,
        "flops_per_gradient": flops,
        "gflops_per_s": flops * t.gradients_per_s / 1e9,
    }


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n float32 matrix product on the default device (warm, synced)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small batch, short timing")
    p.add_argument("--batch", type=int, default=128, help="clones per program")
    p.add_argument("--seconds", type=float, default=10.0, help="timed run per row")
    args = p.parse_args()
    batch, seconds = (8, 1.0) if args.quick else (args.batch, args.seconds)
    peak = matmul_gflops(512 if args.quick else 2048)
    settings = {
        "paper CNN 64x64x1, 33 classes (configs/att.py)": (_paper(1, 33), ROWS),
        "paper CNN 64x64x3, 107 classes (configs/celeba.py)": (_paper(3, 107), ROWS),
        "ResNet 64x64x1, 33 classes (configs/att_resnet.py)": (_resnet(), RESNET_ROWS),
    }
    results = {}
    for setting, (mc, rows) in settings.items():
        for name, row in rows.items():
            r = measure(mc, row, batch, seconds)
            results.setdefault(setting, {})[name] = r
            print(
                f"{setting} | {name}: {r['gradients_per_s']:.0f} image-gradients/s, "
                f"{r['flops_per_gradient'] / 1e6:.1f} MFLOP each, "
                f"{r['gflops_per_s']:.1f} GFLOP/s, compile {r['compile_s']:.1f} s",
                flush=True,
            )
    lines = [f"Batch {batch} clones, {seconds:.0f} s a row; matrix product {peak:.0f} GFLOP/s.", ""]
    lines += ["| R_T | attack | image-gradients/s | vs pixels | MFLOP/gradient | GFLOP/s | "
              "of the matmul rate | compile s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for setting, rows in results.items():
        base = rows["pixels"]["gradients_per_s"]
        for name, r in rows.items():
            lines.append(
                f"| {setting} | {name} | {r['gradients_per_s']:.0f} | "
                f"{r['gradients_per_s'] / base:.2f}x | {r['flops_per_gradient'] / 1e6:.1f} | "
                f"{r['gflops_per_s']:.1f} | {100 * r['gflops_per_s'] / peak:.0f}% | "
                f"{r['compile_s']:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": jax.device_count(),
                "device": str(jax.devices()[0].device_kind), "batch": batch, "seconds": seconds,
                "matmul_gflops": peak}  # fmt: skip
        files.write_json(OUT / "prior_speed.json", {"meta": meta, "results": results})
        files.write_text(OUT / "prior_speed.md", table + "\n")


if __name__ == "__main__":
    main()
