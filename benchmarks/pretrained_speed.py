"""Throughput of the pretrained face models, each beside a PyTorch loop of the same network.

  OMP_WAIT_POLICY=PASSIVE python -m benchmarks.pretrained_speed   # the tables (~6 min, 2 cores)
  python -m benchmarks.pretrained_speed --quick    # a smoke run of the same code (no files)
  python -m benchmarks.pretrained_speed --device gpu --batch 64 --clones 64 --seconds 20

``--device gpu`` (the last line: the command for a lent GPU machine, with jax[cuda] and a CUDA
build of torch installed) refuses to run unless JAX's default backend is a GPU and torch sees
CUDA, so a GPU table is never a CPU one by mistake; ``--device auto`` (the default) takes what
there is. dlib-bin and the host-side chips stay on the CPU either way. ``OMP_WAIT_POLICY=PASSIVE``
is for shared cores: torch's OpenMP threads otherwise spin at their barriers against the other
jobs (measured on the loaded 2-core CPU: a 1024^2 matmul at 2 threads 15 GFLOP/s spinning, 24
passive, 28 at 1 thread); leave it out on a machine of one's own. It is recorded with the table.

All in one run on one machine, every JAX figure after a warm-up call, compile time apart and
``block_until_ready``; every torch figure after a warm-up call, ``torch.set_num_threads`` equal
to the cores, inference mode for embeddings, ``torch.cuda.synchronize`` on a GPU:

1. The face judge (``jaxmia.judges.face``) on CelebA photos: (a) the host-side chips
   (dlib-bin's HOG detector, 5-point landmarks and ``get_face_chip``) at 128x128 and 64x64;
   (b) jaxmia's JAX dlib ResNet-29 on the 150x150 chips at batch 32 and 64; (c) dlib-bin's own
   ``compute_face_descriptor`` on the same chips (its batched overload); (d) the ResNet-29
   written in torch below, with the weights jaxmia's reader loaded (its descriptors' max abs
   difference from JAX's and dlib-bin's is recorded). Then faceres (MobileNet-v1, 224x224
   inside) on the photos, in JAX and in a torch port with the same weights, likewise.
2. Inversion through a pretrained R_T: ``model.arch="faceres"`` (frozen faceres under a linear
   head of 50 classes, random head weights: speed does not depend on them) at 64x64x3, resized
   to 224 inside, attacked by jaxmia's engine (``inversion.invert_batch``: clones vmapped,
   jitted, Adam on the pixels, clipped to [0, 1]) with the max-margin and the cross-entropy
   loss, beside a torch loop of the same network doing the same step on a batch of clones
   (autograd to the input, ``torch.optim.Adam``, clamp). Image-gradients/s = clones x steps /
   seconds. XLA's FLOPs of one clone's step (``cost_analysis`` of the compiled step) and the
   GFLOP/s they make, against a large float32 matrix product timed in the same run (the
   practical peak; JAX's default precision), for torch too (the same FLOPs, the same network).
   The torch loss on the engine's final images is checked against the engine's own.

Writes benchmarks/results/pretrained_speed.{json,md} (not with ``--quick``). Shared cores cut
every row: only rows of one run compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from flax import nnx
from PIL import Image

from jaxmia import files
from jaxmia.attacks import inversion as inv
from jaxmia.judges import face as face_lib
from jaxmia.pretrained import dlib_resnet, faceres, fetch
from jaxmia.recognizers import models

OUT = Path(__file__).resolve().parent / "results"
CELEBA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "celeba128"
CLASSES = 50
ATTACK = {"optimizer": "adam", "learning_rate": 0.05, "margin": 20.0}  # configs/att.py's


# ---------------------------------------------------------------------------------------------
# The networks in torch, with the weights of jaxmia's modules.


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32))


class TorchDlibResNet(torch.nn.Module):
    """dlib's ResNet-29 in torch (NCHW), from a ``dlib_resnet.DlibResNet``'s weights."""

    def __init__(self, jm: dlib_resnet.DlibResNet):
        super().__init__()

        def conv(c: dlib_resnet.Conv) -> dict:
            return {
                "w": torch.nn.Parameter(_t(c.w[...]).permute(3, 2, 0, 1).contiguous(), False),
                "b": torch.nn.Parameter(_t(c.b[...]), False),
                "gamma": torch.nn.Parameter(_t(c.gamma[...]).view(1, -1, 1, 1), False),
                "beta": torch.nn.Parameter(_t(c.beta[...]).view(1, -1, 1, 1), False),
                "stride": c.stride,
                "padding": (c.padding[0][0], c.padding[1][0]),
            }

        self.convs = [conv(jm.stem)]
        self.downs = []
        for block in jm.blocks:
            self.convs += [conv(block.conv1), conv(block.conv2)]
            self.downs.append(block.down)
        self.params_ = torch.nn.ParameterList(
            [p for c in self.convs for p in c.values() if isinstance(p, torch.nn.Parameter)]
        )
        self.mean = _t(jm.mean).view(1, 3, 1, 1)
        self.fc = torch.nn.Parameter(_t(jm.fc[...]), False)  # [256, 128]

    @staticmethod
    def _conv(c: dict, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, c["w"], c["b"], stride=c["stride"], padding=c["padding"])
        return y * c["gamma"] + c["beta"]

    @staticmethod
    def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # dlib's add_prev: the smaller zero-padded at its end (channels, bottom, right)
        shape = [max(p, q) for p, q in zip(a.shape, b.shape, strict=True)]

        def pad(x):
            return F.pad(x, (0, shape[3] - x.shape[3], 0, shape[2] - x.shape[2],
                             0, shape[1] - x.shape[1]))  # fmt: skip

        return pad(a) + pad(b)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:  # [n, 3, 150, 150] in [0, 1]
        x = (chips * 255.0 - self.mean.to(chips.device)) / 256.0
        x = F.max_pool2d(F.relu(self._conv(self.convs[0], x)), 3, 2)
        for i, down in enumerate(self.downs):
            y = self._conv(self.convs[2 + 2 * i], F.relu(self._conv(self.convs[1 + 2 * i], x)))
            x = F.relu(self._add(F.avg_pool2d(x, 2, 2) if down else x, y))
        return x.mean(dim=(2, 3)) @ self.fc  # [n, 128]


def _same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding of a 3x3 window (the odd row and column after)."""
    h, w = x.shape[2:]
    ph = max((-(-h // stride) - 1) * stride + 3 - h, 0)
    pw = max((-(-w // stride) - 1) * stride + 3 - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class TorchFaceRes(torch.nn.Module):
    """faceres's MobileNet-v1 trunk and mean pool in torch, from a ``faceres.FaceRes``'s weights;
    optionally a linear head on the pooled features (``head``: kernel [1024, k], bias [k])."""

    def __init__(self, jm: faceres.FaceRes | faceres.FaceResBackbone, head=None):
        super().__init__()
        bb = getattr(jm, "backbone", jm)
        p = torch.nn.ParameterList()

        def param(a, shape=None):
            t = _t(a)
            p.append(torch.nn.Parameter(t if shape is None else t.reshape(shape), False))
            return p[-1]

        self.conv1 = param(np.transpose(np.asarray(bb.conv1_kernel[...]), (3, 2, 0, 1)))
        self.conv1_shift = param(bb.conv1_shift[...])
        self.blocks = []
        for blk in bb.blocks:
            # the depthwise norm's scale folded into its kernel, as torch ports of MobileNet do
            dw = np.asarray(blk.dw_kernel[...]) * np.asarray(blk.dw_scale[...])  # [3, 3, c]
            pw = np.asarray(blk.pw_kernel[...]).T[:, :, None, None]  # [c', c, 1, 1]
            self.blocks.append((blk.stride, param(np.transpose(dw, (2, 0, 1))[:, None]),
                                param(blk.dw_shift[...]), param(pw),
                                param(blk.pw_shift[...])))  # fmt: skip
        self.head = None if head is None else (param(np.asarray(head[0]).T), param(head[1]))
        self.params_ = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, 3, h, w] in [0, 1]
        if x.shape[2:] != (faceres.SIZE, faceres.SIZE):
            # jax.image.resize "linear" when enlarging: half-pixel bilinear, no antialiasing
            x = F.interpolate(x, (faceres.SIZE,) * 2, mode="bilinear", align_corners=False)
        x = F.relu6(F.conv2d(_same_pad(x * 255.0, 2), self.conv1, self.conv1_shift, stride=2))
        for stride, dw, shift, pw, pw_shift in self.blocks:
            # stride 1: TensorFlow's "SAME" is torch's symmetric padding 1
            x = F.conv2d(x if stride == 1 else _same_pad(x, stride), dw, shift, stride=stride,
                         padding=1 if stride == 1 else 0, groups=x.shape[1])  # fmt: skip
            x = F.relu6(F.conv2d(F.relu6(x), pw, pw_shift))
        h = x.mean(dim=(2, 3))  # [n, 1024]
        return h if self.head is None else F.linear(h, self.head[0], self.head[1])


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int, repeats: int = 10) -> float:
    """GFLOP/s of an n x n float32 matrix product in JAX on the default device (warm, synced)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def torch_matmul_gflops(n: int, dev: torch.device, repeats: int = 10) -> float:
    """The same product in torch."""
    a = torch.randn(n, n, device=dev)
    for _ in range(3):  # the thread pool started and warm
        a @ a
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ a
    _sync(dev)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def time_jax(fn, images: np.ndarray, batch: int, rounds: int) -> tuple[float, float, np.ndarray]:
    """(images/s, compile+first call s, outputs) of ``fn`` over ``images`` in batches."""
    xs = [jnp.asarray(images[lo : lo + batch]) for lo in range(0, len(images), batch)]
    t = time.perf_counter()
    jax.block_until_ready(fn(xs[0]))
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(rounds):
        out = [fn(x) for x in xs]
    jax.block_until_ready(out)
    return rounds * len(images) / (time.perf_counter() - t), first, np.concatenate(out)


def time_torch(net, images: np.ndarray, batch: int, rounds: int, dev: torch.device):
    """(images/s, outputs) of ``net`` over ``images`` (NHWC, moved to NCHW) in batches."""
    xs = [torch.from_numpy(np.ascontiguousarray(images[lo : lo + batch].transpose(0, 3, 1, 2)))
          .to(dev) for lo in range(0, len(images), batch)]  # fmt: skip
    with torch.inference_mode():
        net(xs[0])
        _sync(dev)
        t = time.perf_counter()
        for _ in range(rounds):
            out = [net(x) for x in xs]
        _sync(dev)
    return rounds * len(images) / (time.perf_counter() - t), torch.cat(out).cpu().numpy()


def celeba_photos(n: int, side: int) -> np.ndarray:
    """``n`` CelebA photos (two a person, people in name order) at side x side. # [n, s, s, 3]"""
    people = sorted(p for p in CELEBA.iterdir() if p.is_dir())
    paths = [f for p in people for f in sorted(p.iterdir())[:2]][:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR),
                                np.float32) / 255 for f in paths])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. Embedding.


def judge_rows(n: int, batches: tuple[int, ...], rounds: int, dev: torch.device) -> dict:
    import dlib  # noqa: PLC0415 - dlib-bin, the reference

    rows: dict = {}
    photos = celeba_photos(n, 128)
    for side in (128, 64):
        x = photos if side == 128 else celeba_photos(n, 64)
        face_lib.face_chips(x[:2])  # the detector and predictor loaded, outside the timing
        t = time.perf_counter()
        chips = face_lib.face_chips(x)
        dt = time.perf_counter() - t
        rows[f"chips {side}x{side} (host, dlib-bin HOG + landmarks + get_face_chip)"] = {
            "images_per_s": n / dt, "detected": float(chips.detected.mean())}  # fmt: skip
        if side == 128:
            chips128 = chips.images  # [n, 150, 150, 3]
    u8 = [np.ascontiguousarray(np.rint(c * 255).astype(np.uint8)) for c in chips128]

    model = dlib_resnet.load_dlib_resnet()
    tnet = TorchDlibResNet(model).to(dev).eval()
    path = fetch.model_files("dlib_resnet")["dlib_face_recognition_resnet_model_v1.dat"]
    rec = dlib.face_recognition_model_v1(str(path))
    rec.compute_face_descriptor(u8[:2])
    t = time.perf_counter()
    ref = np.asarray([np.asarray(d) for d in rec.compute_face_descriptor(u8)], np.float32)
    dlib_rate = n / (time.perf_counter() - t)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda x: nnx.merge(graphdef, state)(x))
    for b in batches:
        rate, first, out = time_jax(fn, chips128, b, rounds)
        trate, tout = time_torch(tnet, chips128, b, rounds, dev)
        rows[f"dlib ResNet-29, batch {b}"] = {
            "jax_images_per_s": rate, "torch_images_per_s": trate,
            "dlib_bin_images_per_s": dlib_rate, "jax_compile_s": first,
            "torch_vs_jax_max_abs": float(np.abs(tout - out).max()),
            "jax_vs_dlib_bin_max_abs": float(np.abs(out - ref).max()),
        }  # fmt: skip

    fr = faceres.load_faceres()
    tfr = TorchFaceRes(fr).to(dev).eval()
    graphdef, state = nnx.split(fr)
    fn = jax.jit(lambda x: nnx.merge(graphdef, state)(x))
    for b in batches:
        rate, first, out = time_jax(fn, photos, b, rounds)
        trate, tout = time_torch(tfr, photos, b, rounds, dev)
        rows[f"faceres 128x128 -> 224, batch {b}"] = {
            "jax_images_per_s": rate, "torch_images_per_s": trate, "jax_compile_s": first,
            "torch_vs_jax_max_abs": float(np.abs(tout - out).max()),
            "descriptor_max_abs": float(np.abs(out).max()),
        }  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# 2. Inversion.


def torch_loss(z: torch.Tensor, y: torch.Tensor, kind: str, margin: float) -> torch.Tensor:
    """Per-clone data loss, as ``inversion.data_loss``. # [b, k], [b] -> [b]"""
    if kind == "cross_entropy":
        return F.cross_entropy(z, y, reduction="none")
    target = z.gather(1, y[:, None])[:, 0]
    others = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -torch.inf).amax(1)
    return torch.clamp(target.neg() + others, min=-margin)


def torch_steps(net, x: torch.Tensor, opt, y: torch.Tensor, loss: str, steps: int) -> None:
    """The engine's step in torch on a batch of clones: loss, gradient to the pixels, Adam,
    clip to [0, 1]. Clones are independent (no batch statistics), so the gradient of the sum is
    each clone's own."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch_loss(net(x), y, loss, ATTACK["margin"]).sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)


def inversion_rows(clones: int, seconds: float, dev: torch.device) -> dict:
    mc = models.ModelConfig(num_classes=CLASSES, image_size=(64, 64), channels=3, arch="faceres")
    graphdef, params = models.init(mc, jax.random.key(0))
    model = nnx.merge(graphdef, params)
    head = (np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...]))
    tnet = TorchFaceRes(model.backbone, head).to(dev).eval()
    apply_fn = inv.recognizer_apply(graphdef)
    x = jax.random.uniform(jax.random.key(1), (clones, 64, 64, 3))
    labels = jnp.arange(clones) % CLASSES
    keys = jax.random.split(jax.random.key(2), clones)
    rows = {}
    for loss in ("max_margin", "cross_entropy"):
        # Steps per call fixed (on an accelerator the default is check_every, here a million):
        # 1 on CPU, 10 (a fori_loop) elsewhere, and a whole number of calls timed.
        per_call = 1 if jax.default_backend() == "cpu" else 10
        cfg = inv.InversionConfig(
            loss=loss, **ATTACK, shard=False, check_every=10**6, steps_per_call=per_call
        )
        warm = inv.Timing()
        inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 2 * per_call, warm)
        steps = per_call * max(2, int(seconds * warm.gradients_per_s / clones / per_call))
        t = inv.Timing()
        rec = inv.invert_batch(apply_fn, params, x, labels, keys, cfg, steps, t)
        program = inv.make_program(apply_fn, cfg)
        step = next(c for sig, c in program.compiled.items() if sig[0] == "steps")
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) / clones

        y = torch.from_numpy(np.array(labels)).long().to(dev)
        final = torch.from_numpy(rec.clones.transpose(0, 3, 1, 2).copy()).to(dev)
        with torch.inference_mode():
            tl = torch_loss(tnet(final), y, loss, ATTACK["margin"]).cpu().numpy()
        loss_diff = float(np.abs(tl - rec.loss).max())

        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(dev)
        xt.requires_grad_(True)
        opt = torch.optim.Adam([xt], lr=ATTACK["learning_rate"])

        one = (tnet, xt, opt, y, loss)
        torch_steps(*one, 1)
        _sync(dev)
        t0 = time.perf_counter()
        torch_steps(*one, 1)
        _sync(dev)
        tsteps = max(2, int(seconds / (time.perf_counter() - t0)))
        t0 = time.perf_counter()
        torch_steps(*one, tsteps)
        _sync(dev)
        trate = clones * tsteps / (time.perf_counter() - t0)
        rows[loss] = {
            "jax_gradients_per_s": t.gradients_per_s, "jax_steps": steps,
            "jax_compile_s": warm.compile_s, "flops_per_gradient": flops,
            "jax_gflops_per_s": flops * t.gradients_per_s / 1e9,
            "torch_gradients_per_s": trate, "torch_steps": tsteps,
            "torch_gflops_per_s": flops * trate / 1e9,
            "torch_vs_jax_final_loss_max_abs": loss_diff,
        }  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------


def _table(meta: dict, judge: dict, inversion: dict, gpu_note: str) -> str:
    peak, tpeak = meta["matmul_gflops"], meta["torch_matmul_gflops"]
    lines = [
        f"Device: JAX {meta['jax_device']}, torch {meta['torch_device']} ({meta['cores']} "
        f"cores, torch threads {meta['torch_threads']}), {meta['machine']}; torch "
        f"{meta['torch_version']}, JAX {meta['jax_version']}; code {meta['code']}. {gpu_note}",
        f"Cores shared with other jobs (load average {meta['load_before']:.1f} before the run, "
        f"{meta['load_after']:.1f} after; OMP_WAIT_POLICY={meta['OMP_WAIT_POLICY'] or 'unset'}): "
        "rows of this run compare with each other, not with other runs.",
        f"Matrix product {meta['matmul_n']}^2 float32: JAX {peak:.0f} GFLOP/s, torch "
        f"{tpeak:.0f} GFLOP/s.",
        "",
        f"## The face judge's embedding ({meta['images']} CelebA photos, {meta['rounds']} rounds)",
        "",
        "| stage | JAX images/s | PyTorch images/s | dlib-bin images/s | torch vs JAX max abs | "
        "JAX vs dlib-bin max abs | JAX compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in judge.items():
        if name.startswith("chips"):
            lines.append(f"| {name}: {100 * r['detected']:.0f}% detected | | | "
                         f"{r['images_per_s']:.1f} | | | |")  # fmt: skip
            continue
        dl = r.get("dlib_bin_images_per_s")
        lines.append(
            f"| {name} | {r['jax_images_per_s']:.1f} | {r['torch_images_per_s']:.1f} | "
            f"{'' if dl is None else f'{dl:.1f}'} | {r['torch_vs_jax_max_abs']:.1e} | "
            f"{r['jax_vs_dlib_bin_max_abs']:.1e} | {r['jax_compile_s']:.1f} |"
            if dl is not None
            else f"| {name} | {r['jax_images_per_s']:.1f} | {r['torch_images_per_s']:.1f} | "
            f"| {r['torch_vs_jax_max_abs']:.1e} (of values up to {r['descriptor_max_abs']:.1f}) "
            f"| | {r['jax_compile_s']:.1f} |"
        )
    lines += [
        "",
        f"## Inversion through a pretrained R_T ({meta['clones']} clones, faceres + linear head "
        f"of {CLASSES} classes, 64x64x3 resized to 224 inside, Adam)",
        "",
        "| loss | JAX image-gradients/s | PyTorch image-gradients/s | GFLOP/gradient (XLA) | "
        "JAX GFLOP/s | of the JAX matmul rate | PyTorch GFLOP/s | of the torch matmul rate | "
        "final loss torch vs JAX | JAX compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss, r in inversion.items():
        lines.append(
            f"| {loss} | {r['jax_gradients_per_s']:.1f} | {r['torch_gradients_per_s']:.1f} | "
            f"{r['flops_per_gradient'] / 1e9:.2f} | {r['jax_gflops_per_s']:.1f} | "
            f"{100 * r['jax_gflops_per_s'] / peak:.0f}% | {r['torch_gflops_per_s']:.1f} | "
            f"{100 * r['torch_gflops_per_s'] / tpeak:.0f}% | "
            f"{r['torch_vs_jax_final_loss_max_abs']:.1e} | {r['jax_compile_s']:.1f} |"
        )
    return "\n".join(lines)


def _code_version() -> str:
    """The commit measured, and jaxmia's files with uncommitted edits (a shared checkout)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return r.stdout.rstrip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "jaxmia").splitlines()]
    return head + (f" + uncommitted edits in {', '.join(dirty)}" if dirty else "")


def torch_device(device: str) -> torch.device:
    """torch's device for ``--device`` (cpu, gpu, auto), JAX's backend checked to match; on a GPU
    both sides in full float32 (no TF32), as JAX's models compute at Precision.HIGHEST.

    Raises:
      SystemExit: the asked device is not what JAX and torch see.
    """
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    if device == "gpu" and not gpu:
        raise SystemExit(
            f"--device gpu: JAX's backend is {jax.default_backend()!r} and torch.cuda is "
            f"{'' if torch.cuda.is_available() else 'not '}available; expected both on a GPU"
        )
    if device == "cpu" and jax.default_backend() != "cpu":
        raise SystemExit("--device cpu: set JAX_PLATFORMS=cpu and CUDA_VISIBLE_DEVICES=")
    dev = torch.device("cuda" if gpu and device != "cpu" else "cpu")
    if dev.type == "cuda":
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(os.cpu_count() or 1)
    return dev


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few images, short timing")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="gpu: refuse to run without a GPU in JAX and CUDA in torch")  # fmt: skip
    p.add_argument("--images", type=int, default=128, help="CelebA photos embedded")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64], help="embedding batches")
    p.add_argument("--rounds", type=int, default=1, help="timed passes over the photos")
    p.add_argument("--clones", type=int, default=16, help="clones per inversion program")
    p.add_argument("--seconds", type=float, default=15.0, help="timed inversion per row")
    args = p.parse_args()
    dev = torch_device(args.device)
    if args.quick:
        args.images, args.batch, args.rounds, args.clones, args.seconds = 8, [4], 1, 2, 1.0
    n_mm = 512 if args.quick else 2048
    meta = {
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "jax_device": str(jax.devices()[0].device_kind), "torch_device": str(dev),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "jax_version": jax.__version__, "load_before": os.getloadavg()[0],
        "images": args.images, "rounds": args.rounds, "clones": args.clones,
        "seconds": args.seconds, "matmul_n": n_mm,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""), "code": _code_version(),
    }  # fmt: skip
    meta["matmul_gflops"] = matmul_gflops(n_mm)
    meta["torch_matmul_gflops"] = torch_matmul_gflops(n_mm, dev)
    print(f"matmul: JAX {meta['matmul_gflops']:.0f}, torch {meta['torch_matmul_gflops']:.0f} "
          "GFLOP/s", flush=True)  # fmt: skip
    judge = judge_rows(args.images, tuple(args.batch), args.rounds, dev)
    for name, r in judge.items():
        print(name, {k: round(v, 7) for k, v in r.items()}, flush=True)
    inversion = inversion_rows(args.clones, args.seconds, dev)
    for name, r in inversion.items():
        print(name, {k: round(v, 7) for k, v in r.items()}, flush=True)
    meta["load_after"] = os.getloadavg()[0]
    note = ("No GPU was lent to the session that made this table: a CPU run only."
            if dev.type == "cpu" else "")  # fmt: skip
    table = _table(meta, judge, inversion, note)
    print(table)
    if not args.quick:
        files.write_json(OUT / "pretrained_speed.json",
                         {"meta": meta, "judge": judge, "inversion": inversion})  # fmt: skip
        files.write_text(OUT / "pretrained_speed.md", table + "\n")


if __name__ == "__main__":
    main()
