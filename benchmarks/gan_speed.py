"""Throughput of the generator-prior attack (``inversion.prior="gan"``), beside a PyTorch loop.

  OMP_WAIT_POLICY=PASSIVE python -m benchmarks.gan_speed   # the tables (4 min, 2 cores, load 11)
  python -m benchmarks.gan_speed --quick    # a smoke run of the same code (~1 min, no files)
  python -m benchmarks.gan_speed --device gpu --batches 256 1024 4096 \\
      --faceres-batches 64 256 1024 --seconds 10              # on a lent GPU machine

The GPU command has not been run (no GPU was lent to the session that wrote this); its cells
time 10 steps per jitted call (a ``fori_loop``: ``steps_per_call``), about 10 s each plus the
compilations (seconds each), a few minutes in all. faceres keeps roughly 35 MB of activations
a clone at 224x224 for the backward pass (a count of MobileNet-v1's, not measured): some 35 GiB
at 1024 clones.

``--device gpu`` (with jax[cuda] and a CUDA build of torch installed) refuses to run unless JAX's
default backend is a GPU and torch sees CUDA, so a GPU table is never a CPU one by mistake. On a
GPU both sides compute in full float32 (``jax_default_matmul_precision="highest"``, torch's TF32
off), so that the check below holds and both do the same arithmetic; TF32 tensor cores, which
either would otherwise use, are not measured. ``OMP_WAIT_POLICY=PASSIVE`` is for
shared cores (benchmarks/pretrained_speed.py: torch's OpenMP threads otherwise spin against the
other jobs); it is recorded with the table.

One step of the attack, for each clone: its latent z [100] through the pretrained face generator
G (``jaxmia.pretrained.dcgan``: the DCGAN of ``gan-face-generate``, 64x64 RGB), the image turned
to the recognizer's channels, the target R_T's logits, the max-margin (or cross-entropy) loss,
its gradient back to z (not to any weight) and an Adam update of z. JAX runs it through jaxmia's
engine (``inversion.invert_batch`` with ``priors.gan_prior``: every clone vmapped in one jitted
program); PyTorch runs the same generator (PyTorch's DCGAN tutorial network, the package's
``Generator``, loaded from the same ``weights.tar``) and the same R_T, with the same weights, as
a plain loop on the batch of clones (autograd to z, ``torch.optim.Adam``). Two targets:

(a) the AT&T paper CNN at 64x64 grey (runs/att/target when that checkpoint is there, else the
    same network with random weights; speed does not depend on them), the torch peer
    ``benchmarks.inversion_cpu.torch_model``;
(b) faceres (MobileNet-v1, 224x224 inside) under a linear head of 50 classes at 64x64 RGB,
    random head, the torch peer ``benchmarks.pretrained_speed.TorchFaceRes``.

Image-gradients/s = clones x steps / seconds, at each batch (clones per program): JAX after a
warm-up call, compile time apart, the engine's own ``block_until_ready``, the steps' rate as the
difference of a long and a one-call run (each run ends with a decode and an evaluation of the
clones, about half a step, reported apart as the whole run's rate); torch after a warm-up step,
``torch.set_num_threads`` equal to the cores, ``torch.cuda.synchronize`` on a GPU. FLOPs of one
image-gradient counted two ways: by hand (``generator_flops``: G's transposed convolutions'
multiply-adds that reach the output, 181 MFLOP, where torch's scatter form also computes the
taps its padding crops, 209; R_T's ``ModelConfig.flops_per_image``, itself XLA's count for the
faceres backbone; and the backward pass to the input as many again: every layer's input
gradient costs its forward's multiply-adds, and no weight gradient is taken) and by XLA
(``cost_analysis`` of the compiled step, per clone). The hand count over the rate
gives GFLOP/s, set against a 2048^2 float32 matrix product timed in the same run (the practical
peak of the machine, in JAX and in torch).

Before timing, each target checks that both steps compute the same thing, with either loss:
on a few clones the loss and the gradient w.r.t. z of one step (the engine's ``objective``
against torch autograd) agree to 1e-4 relative (``same_step``: for faceres, whose float32
gradient moves by ~1e-2 at a few ReLU6 kinks in torch alone, JAX's must be as close to torch's
float64 gradient as torch's float32 one is), and after a few engine steps the clones' images
and losses are compared with torch's Adam steps from the same latents.

Writes benchmarks/results/gan_speed.{json,md,png} (not with ``--quick``). Shared cores cut every
row: only rows of one run compare.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

from benchmarks.inversion_cpu import torch_model
from benchmarks.pretrained_speed import (
    TorchFaceRes,
    _code_version,
    _sync,
    matmul_gflops,
    torch_device,
    torch_loss,
    torch_matmul_gflops,
)
from jaxmia import checkpoint, files
from jaxmia.attacks import inversion as inv
from jaxmia.attacks import priors
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dcgan, fetch
from jaxmia.recognizers import models

OUT = Path(__file__).resolve().parent / "results"
ATT_TARGET = Path(__file__).resolve().parents[1] / "runs" / "att" / "target"
FACERES_CLASSES = 50
# configs/att_gan.py's step size and the max-margin of configs/att.py; the attack's random views
# and its Gaussian penalty on z are left out, so that both sides compute one plain step.
ATTACK = {"optimizer": "adam", "learning_rate": 0.02, "margin": 20.0}
TOLERANCE = 1e-4  # relative, of the loss and the gradient w.r.t. z


# ---------------------------------------------------------------------------------------------
# The attack in torch.


class TorchGenerator(nn.Module):
    """``gan_face_generate/models.py``'s ``Generator`` (1.1.1) with the package's settings (nz=100,
    ngf=64, nc=3): PyTorch's DCGAN tutorial network."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [n, 100] -> [n, 3, 64, 64] in [-1, 1]
        return self.main(z[:, :, None, None])


def load_torch_generator(path: str | Path | None = None) -> TorchGenerator:
    """The generator from ``weights.tar`` as the package's ``inference.py`` loads it, eval mode."""
    if path is None:
        path = fetch.model_files("dcgan_face")["weights.tar"]
    net = TorchGenerator()
    state = torch.load(path, map_location="cpu", weights_only=True)["netG_state_dict"]
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


class TorchGanAttack(nn.Module):
    """z -> R_T's logits: G, its [-1, 1] mapped to [0, 1], grey by ITU-R 601 luma for a grey
    R_T, clipped to [0, 1] (as ``priors.to_recognizer`` and ``priors.image``)."""

    def __init__(self, generator: nn.Module, target: nn.Module, channels: int):
        super().__init__()
        self.generator, self.target, self.channels = generator, target, channels
        self.register_buffer("luma", torch.tensor(priors.LUMA).view(1, 3, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [n, 100] -> [n, classes]
        x = (self.generator(z) + 1.0) / 2.0  # [n, 3, 64, 64]
        if self.channels == 1:
            x = (x * self.luma).sum(1, keepdim=True)
        return self.target(x.clamp(0.0, 1.0))


def torch_steps(attack: nn.Module, z: torch.Tensor, opt, y: torch.Tensor, loss: str, steps: int):
    """The engine's step in torch on a batch of clones: loss, gradient to z, Adam. Clones are
    independent (batch norms in eval mode), so the gradient of the sum is each clone's own."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch_loss(attack(z), y, loss, ATTACK["margin"]).sum().backward()
        opt.step()


# ---------------------------------------------------------------------------------------------
# The targets.


class Target:
    """One R_T in both frameworks: the JAX side as the engine takes it, the torch attack."""

    def __init__(self, name: str, mc: models.ModelConfig, graphdef, params, tnet, source: str):
        self.name, self.mc, self.params, self.source = name, mc, params, source
        self.shape = (*mc.image_size, mc.channels)
        self.apply_fn = inv.recognizer_apply(graphdef)
        self.tnet = tnet.requires_grad_(False).eval()


def att_target() -> Target:
    """The AT&T paper CNN: the trained one of runs/att/target if there, else random weights."""
    try:
        rec = checkpoint.load_recognizer(ATT_TARGET)
        mc, graphdef, params = rec.config, rec.graphdef, rec.params
        source = f"trained ({ATT_TARGET.relative_to(ATT_TARGET.parents[2])}, step {rec.step})"
    except JaxmiaError:
        mc = models.ModelConfig(num_classes=33, image_size=(64, 64), channels=1)
        graphdef, params = models.init(mc, jax.random.key(0))
        source = "random weights (no runs/att/target checkpoint)"
    name = f"paper CNN 64x64x1, {mc.num_classes} classes"
    return Target(name, mc, graphdef, params, torch_model(mc, params), source)


def faceres_target() -> Target:
    """faceres (frozen MobileNet-v1, 64x64 RGB resized to 224 inside) under a random linear head."""
    mc = models.ModelConfig(
        num_classes=FACERES_CLASSES, image_size=(64, 64), channels=3, arch="faceres"
    )
    graphdef, params = models.init(mc, jax.random.key(0))
    model = nnx.merge(graphdef, params)
    head = (np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...]))
    name = f"faceres 64x64x3 (224 inside), {FACERES_CLASSES} classes"
    return Target(name, mc, graphdef, params, TorchFaceRes(model.backbone, head), "random head")


def config(loss: str, steps_per_call: int) -> inv.InversionConfig:
    """The attack's settings: no host checks (``check_every`` past any run), one placement."""
    return inv.InversionConfig(
        loss=loss, prior="gan", **ATTACK, steps_per_call=steps_per_call,
        check_every=10**6, shard=False,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The check: the same loss, gradient and steps.


def check_same_step(
    target: Target, prior: priors.Prior, tattack: nn.Module, loss: str, clones: int = 4,
    steps: int = 3, dev: torch.device | None = None,
) -> dict:  # fmt: skip
    """JAX against torch on ``clones`` latents (those the engine starts from).

    Returns:
      loss_rel, grad_rel: the largest over clones of |jax - torch| / |jax| for the loss, and of
        max |grad_jax - grad_torch| / max |grad_jax| over z's entries, of one step;
      grad_rel_jax_vs_float64, grad_rel_torch_vs_float64: the same of JAX's and of torch's
        float32 gradient against torch's in float64 (the rounding's own effect);
      steps_image_max_abs, steps_loss_max_abs: after ``steps`` engine steps and as many torch
        Adam steps from the same latents, the clones' images' and final losses' differences.
    """
    dev = dev or torch.device("cpu")
    cfg = config(loss, 1)
    keys = jax.random.split(jax.random.key(5), clones)
    labels = jnp.arange(clones) % target.mc.num_classes
    z0 = jax.vmap(priors.gan_latent)(keys)  # [clones, 100]

    def one(z, y):
        return inv.objective(cfg, target.apply_fn, target.params, {"coef": z}, None, y,
                             prior.decoder, prior.params)[0]  # fmt: skip

    jl, jg = jax.jit(jax.vmap(jax.value_and_grad(one)))(z0, labels)
    jl, jg = np.asarray(jl), np.asarray(jg)
    y = torch.from_numpy(np.array(labels)).long().to(dev)
    zt = torch.from_numpy(np.array(z0)).to(dev).requires_grad_(True)
    tl = torch_loss(tattack(zt), y, loss, ATTACK["margin"])
    (tg,) = torch.autograd.grad(tl.sum(), zt)
    tl, tg = tl.detach().cpu().numpy(), tg.cpu().numpy()
    # float64 torch: how far float32 rounding alone moves the gradient
    z64 = torch.from_numpy(np.array(z0, np.float64)).to(dev).requires_grad_(True)
    loss64 = torch_loss(copy.deepcopy(tattack).double()(z64), y, loss, ATTACK["margin"])
    (g64,) = torch.autograd.grad(loss64.sum(), z64)
    g64 = g64.cpu().numpy()

    def rel(a: np.ndarray, b: np.ndarray) -> float:  # the worst clone's max |a - b| / max |b|
        return float((np.abs(a - b).max(1) / np.abs(b).max(1)).max())

    loss_rel = np.abs(tl - jl) / np.maximum(np.abs(jl), 1e-12)

    seeds = jnp.zeros((clones, *target.shape))
    rec = inv.invert_batch(target.apply_fn, target.params, seeds, labels, keys, cfg, steps,
                           prior=prior)  # fmt: skip
    zt = torch.from_numpy(np.array(z0)).to(dev).requires_grad_(True)
    torch_steps(tattack, zt, torch.optim.Adam([zt], lr=ATTACK["learning_rate"]), y, loss, steps)
    with torch.no_grad():
        final = tattack.generator(zt).add(1.0).div(2.0)
        if target.mc.channels == 1:
            final = (final * tattack.luma).sum(1, keepdim=True)
        final = final.clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
        fl = torch_loss(tattack(zt), y, loss, ATTACK["margin"]).cpu().numpy()
    return {
        "loss_rel": float(loss_rel.max()), "grad_rel": rel(tg, jg),
        "grad_rel_jax_vs_float64": rel(jg, g64), "grad_rel_torch_vs_float64": rel(tg, g64),
        "loss_max_abs": float(np.abs(jl).max()), "grad_max_abs": float(np.abs(jg).max()),
        "steps": steps, "steps_image_max_abs": float(np.abs(final - rec.clones).max()),
        "steps_loss_max_abs": float(np.abs(fl - rec.loss).max()),
    }  # fmt: skip


def same_step(check: dict) -> bool:
    """Whether ``check_same_step`` found the same step: the losses within ``TOLERANCE``, and
    the gradients too, or else JAX's no farther from the float64 gradient than twice torch's
    float32 one is (a network whose float32 gradient rounding alone moves by more: ReLU6 kinks
    in faceres's MobileNet, whose input is scaled by 255)."""
    if check["loss_rel"] > TOLERANCE:
        return False
    return check["grad_rel"] <= TOLERANCE or (
        check["grad_rel_jax_vs_float64"] <= 2 * check["grad_rel_torch_vs_float64"] + TOLERANCE
    )


# ---------------------------------------------------------------------------------------------
# FLOPs and timing.


def generator_flops() -> int:
    """Multiply-adds x 2 of G's forward pass that reach its output (batch norms and activations
    left out): a transposed convolution's input pixel meets each kernel tap, but the padding
    crops the taps that land outside the output, so per axis count the (input, tap) pairs that
    land inside; the 2-D count is its square."""
    side, total = 1, 0
    for cin, cout, stride, padding in dcgan.LAYERS:
        out = (side - 1) * stride + dcgan.KERNEL - 2 * padding
        pairs = sum(
            0 <= j * stride - padding + t < out for j in range(side) for t in range(dcgan.KERNEL)
        )
        total += 2 * pairs**2 * cin * cout
        side = out
    return total


def step_flops_xla(program: inv.Program, clones: int) -> float:
    """XLA's FLOPs of one clone's step: ``cost_analysis`` of the step compiled for ``clones``
    clones (the program's cache holds one per batch: that whose PRNG keys are ``[clones]``)."""

    def batch_of(sig) -> bool:
        return any(
            shape == (clones,) and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
            for shape, dtype, _ in sig[2]
        )

    step = next(c for sig, c in program.compiled.items() if sig[0] == "steps" and batch_of(sig))
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) / clones / program.spec.steps_per_call


def time_row(
    target: Target, prior: priors.Prior, tattack: nn.Module, loss: str, clones: int,
    seconds: float, steps_per_call: int, dev: torch.device,
) -> dict:  # fmt: skip
    """JAX (the engine) and torch image-gradients/s at ``clones`` clones per program.

    The engine's run ends with a decode and an evaluation of the clones (about half a step),
    which a short run would count against its steps: ``jax_gradients_per_s`` is the steps' own
    rate, the difference of a long and a one-call run; ``jax_run_gradients_per_s`` the long
    run's whole (``Timing``'s), as an attack of that many steps pays it.
    """
    cfg = config(loss, steps_per_call)
    keys = jax.random.split(jax.random.key(2), clones)
    labels = jnp.arange(clones) % target.mc.num_classes
    seeds = jnp.zeros((clones, *target.shape))
    run = (target.apply_fn, target.params, seeds, labels, keys, cfg)
    warm = inv.Timing()
    inv.invert_batch(*run, steps_per_call, warm, prior)  # compiles, then one call
    short = inv.Timing()
    inv.invert_batch(*run, steps_per_call, short, prior)
    per_call = max(1, round(seconds * short.gradients_per_s / clones / steps_per_call))
    steps = steps_per_call * max(2, per_call)
    t = inv.Timing()
    inv.invert_batch(*run, steps, t, prior)
    step_rate = clones * (steps - steps_per_call) / max(t.run_s - short.run_s, 1e-9)
    program = inv.make_program(target.apply_fn, cfg, prior.decoder)
    xla = step_flops_xla(program, clones)

    y = torch.from_numpy(np.array(labels)).long().to(dev)
    z = torch.from_numpy(np.array(jax.vmap(priors.gan_latent)(keys))).to(dev)
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=ATTACK["learning_rate"])
    one = (tattack, z, opt, y, loss)
    torch_steps(*one, 1)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    torch_steps(*one, 1)
    _sync(dev)
    tsteps = max(2, round(seconds / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    torch_steps(*one, tsteps)
    _sync(dev)
    trate = clones * tsteps / (time.perf_counter() - t0)
    return {
        "clones": clones, "loss": loss, "jax_gradients_per_s": step_rate,
        "jax_run_gradients_per_s": t.gradients_per_s, "jax_steps": steps,
        "jax_compile_s": warm.compile_s, "xla_flops_per_gradient": xla,
        "torch_gradients_per_s": trate, "torch_steps": tsteps,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Output.


def _table(meta: dict, results: dict) -> str:
    peak, tpeak = meta["matmul_gflops"], meta["torch_matmul_gflops"]
    lines = [
        f"Device: JAX {meta['jax_device']}, torch {meta['torch_device']} ({meta['cores']} "
        f"cores, torch threads {meta['torch_threads']}), {meta['machine']}; torch "
        f"{meta['torch_version']}, JAX {meta['jax_version']}; code {meta['code']}. "
        f"{meta['gpu_note']}",
        f"Cores shared with other jobs (load average {meta['load_before']:.1f} before the run, "
        f"{meta['load_after']:.1f} after; OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY'] or 'unset'}): "
        "rows of this run compare with each other, not with other runs.",
        f"Matrix product {meta['matmul_n']}^2 float32 (the peak the fractions are of): JAX "
        f"{peak:.0f} GFLOP/s, torch {tpeak:.0f} GFLOP/s.",
        f"One step: z [100] -> G (64x64 RGB) -> R_T -> {'/'.join(meta['losses'])} loss -> "
        f"gradient to z -> Adam (lr {ATTACK['learning_rate']}); JAX: the engine "
        f"(`invert_batch`, prior 'gan', {meta['steps_per_call']} step(s) per jitted call), "
        f"torch: a loop on the batch of clones. About {meta['seconds']:.0f} s timed per cell. "
        "JAX's steps' rate is the difference of a long and a one-call run (the engine's final "
        "decode and evaluation left out, as torch's loop has none); the whole run's beside it.",
        "",
    ]
    for name, r in results.items():
        g = r["flops"]
        lines += [
            f"## {name} (R_T: {r['source']})",
            "",
            f"FLOPs of one image-gradient, by hand: G {g['generator_forward'] / 1e6:.0f} M "
            f"forward, R_T {g['target_forward'] / 1e6:.0f} M forward, x 2 for the backward to "
            f"z = {g['hand'] / 1e6:.0f} MFLOP; XLA's cost analysis of the compiled step: "
            f"{g['xla'] / 1e6:.0f} MFLOP per clone.",
            "",
            "Same step in both (on {c} clones, both losses, the worst): loss {lr:.1e} and "
            "gradient w.r.t. z {gr:.1e} relative difference JAX vs torch (tolerance {tol:.0e}); "
            "against torch in float64 the gradient of JAX {j64:.1e}, of torch float32 {t64:.1e}"
            " ({ok}); after {s} Adam steps the images differ by {im:.1e} at most, the losses by "
            "{fl:.1e}.".format(
                c=r["check"]["clones"],
                lr=r["check"]["loss_rel"],
                gr=r["check"]["grad_rel"],
                tol=TOLERANCE,
                j64=r["check"]["grad_rel_jax_vs_float64"],
                t64=r["check"]["grad_rel_torch_vs_float64"],
                ok="the same step" if same_step(r["check"]) else "NOT the same step",
                s=r["check"]["steps"],
                im=r["check"]["steps_image_max_abs"],
                fl=r["check"]["steps_loss_max_abs"],
            ),  # fmt: skip
            "",
            "| clones | loss | JAX image-gradients/s (steps) | JAX, whole run | "
            "PyTorch image-gradients/s (steps) | JAX / torch | JAX GFLOP/s | of the JAX matmul | "
            "PyTorch GFLOP/s | of the torch matmul | JAX compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            jg, tg = row["jax_gradients_per_s"], row["torch_gradients_per_s"]
            jf, tf = g["hand"] * jg / 1e9, g["hand"] * tg / 1e9
            lines.append(
                f"| {row['clones']} | {row['loss']} | {jg:.1f} ({row['jax_steps']}) | "
                f"{row['jax_run_gradients_per_s']:.1f} | {tg:.1f} ({row['torch_steps']}) | "
                f"{jg / tg:.2f} | {jf:.1f} | {100 * jf / peak:.0f}% | {tf:.1f} | "
                f"{100 * tf / tpeak:.0f}% | {row['jax_compile_s']:.1f} |"
            )
        largest = max(row["clones"] for row in r["rows"])
        lines += [
            "",
            f"`jaxmia invert` (`inversion.invert`) would run {largest} clones here in chunks of "
            f"{r['engine_chunk']} (`chunk_size`: memory, and on CPU the cache); the rows above "
            "are single programs (`invert_batch`).",
            "",
        ]
    lines.append("![image-gradients/s against clones per program](gan_speed.png)")
    return "\n".join(lines)


def plot(meta: dict, results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - only for the files

    fig = Figure(figsize=(5.5 * len(results), 4.2), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        for i, loss in enumerate(meta["losses"]):
            rows = [row for row in r["rows"] if row["loss"] == loss]
            b = [row["clones"] for row in rows]
            ax.plot(b, [row["jax_gradients_per_s"] for row in rows], "o-", color=f"C{2 * i}",
                    label=f"JAX (jaxmia engine), steps, {loss}")  # fmt: skip
            ax.plot(b, [row["jax_run_gradients_per_s"] for row in rows], "o:",
                    color=f"C{2 * i}", alpha=0.5, label=f"JAX, whole run, {loss}")  # fmt: skip
            ax.plot(b, [row["torch_gradients_per_s"] for row in rows], "s--",
                    color=f"C{2 * i + 1}", label=f"PyTorch loop, {loss}")  # fmt: skip
        batches = sorted({row["clones"] for row in r["rows"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.5)
        ax.set_ylim(bottom=0)
        ax.set(title=name, xlabel="clones per program", ylabel="image-gradients / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"GAN-prior attack, {meta['jax_device']} / torch {meta['torch_device']}; one run, load "
        f"average {meta['load_before']:.1f} at its start",
        fontsize=9,
    )
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small batches, short timing")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="gpu: refuse to run without a GPU in JAX and CUDA in torch")  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256],
                   help="clones per program, paper CNN target")  # fmt: skip
    p.add_argument("--faceres-batches", type=int, nargs="*", default=[16],
                   help="clones per program, faceres target (none: skip it)")  # fmt: skip
    p.add_argument("--losses", nargs="+", default=["max_margin"],
                   choices=("max_margin", "cross_entropy"))  # fmt: skip
    p.add_argument("--seconds", type=float, default=8.0, help="timed run per cell and framework")
    args = p.parse_args()
    dev = torch_device(args.device)  # full float32 on both sides on a GPU (the docstring)
    if args.quick:
        args.batches, args.faceres_batches, args.seconds = [4], [2], 0.5
    # CPU: one step per call (the engine's default there); an accelerator: 10 in a fori_loop
    steps_per_call = 1 if jax.default_backend() == "cpu" else 10
    n_mm = 512 if args.quick else 2048
    meta = {
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "jax_device": str(jax.devices()[0].device_kind), "torch_device": str(dev),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "jax_version": jax.__version__, "load_before": os.getloadavg()[0],
        "seconds": args.seconds, "matmul_n": n_mm, "losses": args.losses,
        "steps_per_call": steps_per_call, "tolerance": TOLERANCE,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""), "code": _code_version(),
        "gpu_note": ("No GPU was lent to the session that made this table: a CPU run only."
                     if dev.type == "cpu" else ""),
    }  # fmt: skip
    meta["matmul_gflops"] = matmul_gflops(n_mm)
    meta["torch_matmul_gflops"] = torch_matmul_gflops(n_mm, dev)
    print(f"matmul: JAX {meta['matmul_gflops']:.0f}, torch {meta['torch_matmul_gflops']:.0f} "
          "GFLOP/s", flush=True)  # fmt: skip

    generator = dcgan.load_dcgan()
    tgen = load_torch_generator().to(dev)
    targets = [(att_target, args.batches)]
    if args.faceres_batches:
        targets.append((faceres_target, args.faceres_batches))
    results, failed = {}, []
    for make, batches in targets:
        target = make()
        prior = priors.gan_prior(generator, target.shape)
        tattack = TorchGanAttack(tgen, target.tnet, target.mc.channels).to(dev)
        check = {"clones": 4}
        for loss in ("max_margin", "cross_entropy"):
            c = check_same_step(target, prior, tattack, loss, dev=dev)
            print(target.name, loss, "check", {k: f"{v:.2e}" for k, v in c.items()}, flush=True)
            for k, v in c.items():  # the worst over the losses
                check[k] = max(check.get(k, v), v)
        if not same_step(check):
            failed.append(target.name)
        fwd = target.mc.flops_per_image()
        flops = {"generator_forward": generator_flops(), "target_forward": fwd}
        flops["hand"] = 2 * (flops["generator_forward"] + fwd)
        rows = []
        for clones in batches:
            for loss in args.losses:
                row = time_row(target, prior, tattack, loss, clones, args.seconds,
                               steps_per_call, dev)  # fmt: skip
                print(target.name, {k: v if isinstance(v, str) else round(v, 2)
                                    for k, v in row.items()}, flush=True)  # fmt: skip
                rows.append(row)
        flops["xla"] = rows[-1]["xla_flops_per_gradient"]
        # what `jaxmia invert` would make of the largest batch here (inversion.chunk_size)
        per_clone = inv.bytes_per_clone(target.mc, config(args.losses[0], steps_per_call))
        chunk = inv.chunk_size(max(batches), max(batches), per_clone)
        results[target.name] = {"source": target.source, "check": check, "flops": flops,
                                "rows": rows, "engine_chunk": chunk}  # fmt: skip
    meta["load_after"] = os.getloadavg()[0]
    table = _table(meta, results)
    print(table)
    if failed:
        raise SystemExit(f"JAX and torch steps differ (same_step) for {failed}")
    if not args.quick:
        files.write_json(OUT / "gan_speed.json", {"meta": meta, "results": results})
        files.write_text(OUT / "gan_speed.md", table + "\n")
        plot(meta, results, OUT / "gan_speed.png")


if __name__ == "__main__":
    main()
