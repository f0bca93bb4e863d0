"""Inversion throughput on this CPU: jaxmia's engine against a plain batched PyTorch loop.

  python -m benchmarks.inversion_cpu            # the full table (about 5-8 minutes on 2 cores)
  python -m benchmarks.inversion_cpu --quick    # a smoke run of the same code

Measures image-gradients per second (clones x steps / seconds) of the paper's CNN at 64x64x1 with
40 classes and at 128x128x3 with 2041 classes, for batch sizes from 1 to 1024: jaxmia's
``inversion.invert_batch`` (vmapped per-clone step, SGD on the least-squares loss, projection to
[0, 1], stopping off) with its compile time apart, after a warm-up run; and the loop a PyTorch user
would write for the same network and update, with the same weights (its gradient is checked
against jaxmia's first). Also the loop study behind the engine's default: a host loop of a jitted
single step vs K steps per call (fori_loop) vs one while_loop, at batch 128, 64x64x1.

Writes ``benchmarks/inversion_cpu.json`` and ``benchmarks/inversion_cpu.md``. The machine is
shared with other processes while it runs: absolute figures are noisy and only ratios measured in
one run mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia.attacks import inversion as inv
from jaxmia.recognizers import models

OUT = Path(__file__).resolve().parent
LR = 0.1
SETTINGS = {
    "64x64x1, 40 classes": (
        models.ModelConfig(num_classes=40, image_size=(64, 64), channels=1),
        (1, 8, 64, 128, 256, 1024),
    ),
    "128x128x3, 2041 classes": (
        models.ModelConfig(num_classes=2041, image_size=(128, 128), channels=3),
        (1, 8, 64, 256, 1024),
    ),
}


def _steps_for(batch: int, rate_guess: float, seconds: float) -> int:
    """Steps that take about ``seconds`` at ``rate_guess`` image-gradients/s (at least 2)."""
    return max(2, math.ceil(seconds * rate_guess / batch))


# --- jaxmia ------------------------------------------------------------------------------------


def jax_run(
    apply_fn, params, mc: models.ModelConfig, batch: int, steps: int, cfg: inv.InversionConfig
) -> dict:
    h, w = mc.image_size
    x = jax.random.uniform(jax.random.key(1), (batch, h, w, mc.channels))
    labels = jnp.arange(batch) % mc.num_classes
    keys = jax.random.split(jax.random.key(2), batch)
    warm = inv.Timing()
    inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 1, warm)  # compiles, warms up
    t = inv.Timing()
    inv.invert_batch(apply_fn, params, x, labels, keys, cfg, steps, t)
    return {
        "compile_s": warm.compile_s,
        "steps": steps,
        "run_s": t.run_s,
        "per_s": t.gradients_per_s,
    }


# --- PyTorch -----------------------------------------------------------------------------------


def torch_model(mc: models.ModelConfig, params: nnx.State):
    """The paper's CNN in PyTorch with jaxmia's weights (NCHW convs, NHWC flatten as in JAX)."""
    import torch
    from torch import nn

    pure = nnx.to_pure_dict(params)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            convs, cin = [], mc.channels
            for cout, k in zip(mc.conv_features, mc.kernel_sizes, strict=True):
                convs.append(nn.Conv2d(cin, cout, k, padding="same"))
                cin = cout
            self.convs = nn.ModuleList(convs)
            dims = [mc.flat_features, *mc.dense_features, mc.num_classes]
            self.dense = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
            )

        def forward(self, x):
            h = (x - mc.mean) / mc.std
            for conv in self.convs:
                h = torch.max_pool2d(torch.relu(conv(h)), 2)
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
            for layer in self.dense[:-1]:
                h = torch.relu(layer(h))
            return self.dense[-1](h)

    net = Net()
    with torch.no_grad():
        for i, conv in enumerate(net.convs):
            conv.weight.copy_(
                torch.from_numpy(
                    np.asarray(pure["convs"][i]["kernel"]).transpose(3, 2, 0, 1).copy()
                )
            )
            conv.bias.copy_(torch.from_numpy(np.array(pure["convs"][i]["bias"])))
        layers = [pure["dense"][i] for i in range(len(mc.dense_features))] + [pure["head"]]
        for layer, p in zip(net.dense, layers, strict=True):
            layer.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    return net.eval()


def torch_grad(net, x, onehot):
    """Gradient of the least-squares loss (summed over clones) w.r.t. the images."""
    import torch

    x = x.detach().requires_grad_(True)
    loss = ((torch.softmax(net(x), -1) - onehot) ** 2).sum()
    (g,) = torch.autograd.grad(loss, x)
    return g


def torch_run(net, mc: models.ModelConfig, batch: int, seconds: float) -> dict:
    """The plain loop: x <- clamp(x - lr * grad, 0, 1), batched, for about ``seconds``.

    PyTorch runs synchronously, so the loop can stop on the clock (at least 2 steps).
    """
    import torch

    h, w = mc.image_size
    x = torch.rand(batch, mc.channels, h, w, generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(
        torch.arange(batch) % mc.num_classes, mc.num_classes
    ).float()

    def step(x):
        g = torch_grad(net, x, onehot)
        with torch.no_grad():
            return (x - LR * g).clamp_(0, 1)

    for _ in range(2):  # warm-up
        x = step(x)
    steps, t = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t < seconds:
        x = step(x)
        steps += 1
    run_s = time.perf_counter() - t
    return {"steps": steps, "run_s": run_s, "per_s": batch * steps / run_s}


def check_same_gradient(apply_fn, params, net, mc: models.ModelConfig) -> float:
    """Max |jaxmia grad - torch grad| on two images (relative to the largest entry)."""
    import torch

    h, w = mc.image_size
    x = jax.random.uniform(jax.random.key(3), (2, h, w, mc.channels))
    labels = jnp.array([0, 1])
    cfg = inv.InversionConfig(loss="least_squares")
    g = jax.vmap(jax.grad(lambda v, y: inv.objective(cfg, apply_fn, params, v, None, y)[0]))(
        x, labels
    )
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1]), mc.num_classes).float()
    tg = torch_grad(net, torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), onehot)
    tg = tg.numpy().transpose(0, 2, 3, 1)
    return float(np.abs(np.asarray(g) - tg).max() / np.abs(tg).max())


# --- the run -------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_device": str(jax.devices()[0]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }


def loop_study(quick: bool) -> list[dict]:
    mc, batch = SETTINGS["64x64x1, 40 classes"][0], 8 if quick else 128
    graphdef, params = models.init(mc, jax.random.key(0))
    apply_fn = inv.recognizer_apply(graphdef)
    rows = []
    for k, name in [
        (1, "host loop, 1 step per call"),
        (10, "host loop, 10 steps per call (fori_loop)"),
        (0, "one while_loop"),
    ]:
        cfg = inv.InversionConfig(loss="least_squares", learning_rate=LR, steps_per_call=k)
        inv.build_program.cache_clear()  # compile times of fresh programs
        r = jax_run(apply_fn, params, mc, batch, 4 if quick else 40, cfg)
        rows.append({"variant": name, "steps_per_call": k, "batch": batch, **r})
        print(f"  loop study {name}: {r['per_s']:.0f}/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches and steps (a smoke run)")
    parser.add_argument("--seconds", type=float, default=2.5, help="target seconds per measurement")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    result = {
        "machine": machine(),
        "command": "python -m benchmarks.inversion_cpu" + (" --quick" if args.quick else ""),
        "settings": {},
    }
    cfg = inv.InversionConfig(loss="least_squares", optimizer="sgd", learning_rate=LR)
    result["engine_config"] = dataclasses.asdict(cfg)
    result["engine_steps_per_call"] = inv.resolved_steps_per_call(cfg)  # steps_per_call None: auto
    for name, (mc, batches) in SETTINGS.items():
        if args.quick:
            batches = batches[:2]
        graphdef, params = models.init(mc, jax.random.key(0))
        apply_fn = inv.recognizer_apply(graphdef)
        net = torch_model(mc, params)
        rel = check_same_gradient(apply_fn, params, net, mc)
        rows = []
        guess = 1000.0 if mc.channels == 1 else 250.0
        for b in batches:
            steps = 2 if args.quick else _steps_for(b, guess, args.seconds)
            j = jax_run(apply_fn, params, mc, b, steps, cfg)
            t = torch_run(net, mc, b, 0.1 if args.quick else args.seconds)
            torch.set_num_threads(1)
            t1 = torch_run(net, mc, b, 0.1 if args.quick else args.seconds)
            torch.set_num_threads(threads)
            best = max(t["per_s"], t1["per_s"])
            rows.append(
                {
                    "batch": b,
                    "jaxmia": j,
                    "torch": t,
                    "torch_1_thread": t1,
                    "ratio": j["per_s"] / best,
                }
            )
            print(
                f"{name} batch {b}: jaxmia {j['per_s']:.0f}/s "
                f"(compile {j['compile_s']:.1f}s), torch {t['per_s']:.0f}/s, "
                f"1 thread {t1['per_s']:.0f}/s",
                flush=True,
            )
        result["settings"][name] = {
            "model": mc.to_dict(),
            "flops_per_image_forward": mc.flops_per_image(),
            "gradient_max_rel_diff_vs_torch": rel,
            "rows": rows,
        }
    result["loop_study"] = loop_study(args.quick)
    result["load_average_at_end"] = os.getloadavg()
    suffix = "_quick" if args.quick else ""
    (OUT / f"inversion_cpu{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"inversion_cpu{suffix}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Inversion throughput on CPU: jaxmia vs a plain PyTorch loop",
        "",
        f"Command: `{r['command']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; "
        f"Python {m['python']}, jax {m['jax']} ({m['jax_device']}), torch {m['torch']} "
        f"({m['torch_threads']} threads). Load average at start "
        f"{m['load_average_at_start'][0]:.1f}, at end {r['load_average_at_end'][0]:.1f}.",
        "",
        "**Figures are noisy**: the 2 cores were shared with other processes during the run, so "
        "absolute rates drift (up to 2x between runs); only ratios measured in this one run count.",
        "",
        "Image-gradients/s = clones x steps / seconds of the step loop (compile, warm-up apart). "
        "Both sides: the paper's CNN, the same weights, least squares between softmax and one-hot, "
        "x <- clip(x - 0.1 grad, 0, 1), fixed steps. jaxmia: `inversion.invert_batch` (vmapped "
        "per-clone step, host loop of a jitted single step, per-clone freezing/divergence checks "
        "included); PyTorch: the batched loop a user would write (autograd.grad, clamp_), with "
        "its default threads and with one thread: on an oversubscribed machine its OpenMP "
        "threads spin and one thread is often faster, so the ratio is taken against the better.",
        "",
    ]
    for name, s in r["settings"].items():
        lines += [
            f"## {name}",
            "",
            f"Forward pass {s['flops_per_image_forward'] / 1e6:.1f} MFLOP/image; jaxmia's gradient "
            f"equals PyTorch's to {s['gradient_max_rel_diff_vs_torch']:.1e} (max relative).",
            "",
            "| batch | jaxmia steps | jaxmia img-grad/s | PyTorch img-grad/s | PyTorch 1 thread "
            "| jaxmia / best PyTorch | jaxmia compile s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in s["rows"]:
            j, t, t1 = row["jaxmia"], row["torch"], row["torch_1_thread"]
            lines.append(
                f"| {row['batch']} | {j['steps']} | {j['per_s']:.0f} | {t['per_s']:.0f} | "
                f"{t1['per_s']:.0f} | {row['ratio']:.2f} | {j['compile_s']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Loop study (64x64x1, 40 classes): how to run the steps",
        "",
        "| variant | batch | img-grad/s | compile s |",
        "|---|---:|---:|---:|",
    ]
    for row in r["loop_study"]:
        lines.append(
            f"| {row['variant']} | {row['batch']} | {row['per_s']:.0f} | {row['compile_s']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
