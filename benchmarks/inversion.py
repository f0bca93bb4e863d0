"""Inversion throughput: jaxmia side by side with its peers, in one run on one machine.

  python -m benchmarks.inversion            # the table (about 8 minutes on 2 busy CPU cores)
  python -m benchmarks.inversion --quick    # a smoke run of the same code (small batches)

For the paper's CNN at 64x64x1 (40 classes) and 128x128x3 (2041 classes), against batch size:
image-gradients/s (clones x steps / s) and inversions/s (the same over the paper's 600 steps) of

- jaxmia as ``jaxmia invert`` runs it: ``inversion.invert`` (vmapped per-clone step, SGD on
  least squares, projection to [0, 1], per-clone freezing/divergence checks on, clones sharded
  over every device JAX sees; on CPU the host is split into one device per core first) in chunks
  of ``inversion.chunk_size`` (on CPU, what stays in cache), and the whole batch as one program
  (``inversion.invert_batch``), compile time apart, XLA's memory analysis of the step
  (arguments + outputs + temporaries);
- (a) the plain batched PyTorch loop of the same network, weights and update (its gradient is
  checked against jaxmia's first);
- (b) jaxmia's engine with vmap replaced by a Python loop over clones (each clone inverted alone;
  its rate does not depend on the batch, so it is measured once per setting on a few clones);
- (c) IBM ART's ``MIFace`` on the PyTorch model (``PyTorchClassifier``), threshold 1.0 so every
  clone runs the fixed steps (ART ascends the class score: another loss, the same work per step),
  one target label per batch (ART's best case: it runs one backward pass per distinct label);

the fraction of the device's peak FLOP rate (a large matmul timed in the same run) that jaxmia's
step reaches, the most any engine could run ahead of ART here (that peak over ART's FLOP rate),
and jaxmia's scaling with the number of devices (the whole batch as one program, in
subprocesses under ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on CPU).

FLOPs of one image-gradient: 2 x ``ModelConfig.flops_per_image()``: the forward pass, plus the
backward pass to the input, which computes each layer's input gradient (as many multiply-adds as
its forward) but no weight gradient (the weights are not differentiated, and XLA drops what is
not needed). Elementwise work (ReLU, pooling, softmax) is left out; XLA's own count of the
compiled step is reported beside it.

Writes ``benchmarks/results/inversion{,_quick}.{json,md,png}``. Absolute figures on a shared
machine drift; only ratios measured in one run count.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxmia import files, sharding

OUT = Path(__file__).resolve().parent / "results"
LR = 0.1
PAPER_STEPS = 600  # steps of one inversion (configs: the paper's settings)
SETTINGS = {
    "64x64x1, 40 classes": (dict(num_classes=40, image_size=(64, 64), channels=1),
                            (1, 8, 64, 128, 256, 1024)),
    "128x128x3, 2041 classes": (dict(num_classes=2041, image_size=(128, 128), channels=3),
                                (1, 8, 64, 128, 256, 1024)),
}  # fmt: skip
HEADLINE_BATCH = 64


# --- jaxmia ------------------------------------------------------------------------------------


def _setup(setting: str):
    import jax

    from jaxmia.attacks import inversion as inv
    from jaxmia.recognizers import models

    mc = models.ModelConfig(**SETTINGS[setting][0])
    graphdef, params = models.init(mc, jax.random.key(0))
    return mc, inv.recognizer_apply(graphdef), params


def _batch(mc, batch: int):
    import jax
    import jax.numpy as jnp

    h, w = mc.image_size
    x = jax.random.uniform(jax.random.key(1), (batch, h, w, mc.channels))
    return x, jnp.arange(batch) % mc.num_classes, jax.random.split(jax.random.key(2), batch)


def jaxmia_config(shard: bool = True):
    """The engine's settings of the jaxmia timings (``steps_per_call`` the backend's default)."""
    from jaxmia.attacks import inversion as inv

    return inv.InversionConfig(loss="least_squares", learning_rate=LR, shard=shard)


# jaxmia's runs take at least this many steps: a run's fixed costs (placing the batch, the
# final evaluation, copying results to the host) come once per inversion of hundreds of steps
# in real use, and a timing of 2-3 steps would charge them several times over.
JAX_MIN_STEPS = 10


def step_loop(cfg) -> dict:
    """How the engine runs ``cfg``'s steps on this backend: steps per jitted call and the loop
    (``inversion.resolved_steps_per_call``: by default 1 on CPU, check_every on GPU/TPU)."""
    import jax

    from jaxmia.attacks import inversion as inv

    k = inv.resolved_steps_per_call(cfg)
    if k == 1:
        loop = "host loop of a jitted single step"
    elif k > 1:
        loop = f"host loop of jitted calls of {k} steps (fori_loop)"
    else:
        loop = "one while_loop over all steps"
    return {"backend": jax.default_backend(), "setting": cfg.steps_per_call,
            "steps_per_call": k, "check_every": cfg.check_every, "loop": loop}  # fmt: skip


def _steps_for(rate: float, batch: int, seconds: float, least: int = 2) -> int:
    return max(least, int(seconds * rate / batch))


def jax_run(
    mc, apply_fn, params, batch: int, seconds: float, shard: bool = True, size: int | None = None
) -> dict:
    """The engine on ``batch`` clones in chunks of ``size`` (default: the whole batch as one
    program): compile + warm-up, then about ``seconds`` of steps."""
    from jaxmia.attacks import inversion as inv

    cfg = jaxmia_config(shard)
    size = size or batch
    x, labels, keys = _batch(mc, batch)
    warm = inv.Timing()
    inv.invert(apply_fn, params, x, labels, keys, cfg, 2, size=size, timing=warm)
    steps = _steps_for(warm.gradients_per_s, batch, seconds, JAX_MIN_STEPS)
    t = inv.Timing()
    inv.invert(apply_fn, params, x, labels, keys, cfg, steps, size=size, timing=t)
    devices = _devices_used(size) if shard else 1
    rows = -(-size // devices) * devices  # the chunk as placed: padded to the devices
    image = (rows, *mc.image_size, mc.channels)
    step_program = next(c for sig, c in inv.make_program(apply_fn, cfg).compiled.items()
                        if sig[0] == "steps" and any(v[0] == image for v in sig[2]))  # fmt: skip
    mem = step_program.memory_analysis()
    cost = step_program.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "chunk_size": size,
        "steps_per_call": inv.resolved_steps_per_call(cfg),
        "compile_s": warm.compile_s,
        "steps": steps,
        "run_s": t.run_s,
        "per_s": t.gradients_per_s,
        "xla_bytes": None if mem is None else int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        ),
        # XLA's FLOP count of the compiled step, per clone (one device's share x devices).
        "xla_flops_per_gradient": float(cost.get("flops", 0.0)) * devices / rows,
    }  # fmt: skip


def chunked_run(mc, apply_fn, params, batch: int, seconds: float, one: dict) -> dict:
    """The engine as ``jaxmia invert`` runs ``batch`` clones: in chunks of ``inversion.chunk_size``
    (on CPU, what stays in cache); ``one`` (the ``jax_run`` of the whole batch) if that is one."""
    from jaxmia.attacks import inversion as inv

    cfg = jaxmia_config()
    size = inv.chunk_size(batch, batch, inv.bytes_per_clone(mc, cfg))
    return one if size >= batch else jax_run(mc, apply_fn, params, batch, seconds, size=size)


def _devices_used(batch: int) -> int:
    mesh = sharding.clone_mesh(batch)
    return 1 if mesh is None else mesh.devices.size


def loop_run(mc, apply_fn, params, clones: int, seconds: float) -> dict:
    """Peer (b): the engine with vmap replaced by a Python loop over clones (one at a time)."""
    from jaxmia.attacks import inversion as inv

    cfg = jaxmia_config(shard=False)
    x, labels, keys = _batch(mc, clones)
    warm = inv.Timing()
    inv.invert_batch(apply_fn, params, x[:1], labels[:1], keys[:1], cfg, 2, warm)
    steps = _steps_for(warm.gradients_per_s, clones, seconds)
    t = inv.Timing()
    for i in range(clones):
        inv.invert_batch(apply_fn, params, x[i : i + 1], labels[i : i + 1], keys[i : i + 1],
                         cfg, steps, t)  # fmt: skip
    return {"clones": clones, "steps": steps, "run_s": t.run_s, "per_s": t.gradients_per_s}


def layer_times(mc, model, batch: int, reps: int = 20) -> list[dict]:
    """Where a step's time goes: each layer's forward + backward to its input, timed alone on
    one device (jitted, warm, ``block_until_ready``), with its FLOP rate."""
    import jax
    import jax.numpy as jnp

    from jaxmia.recognizers import fastconv

    def timed(f, x):
        def forward_backward(v):
            y, vjp = jax.vjp(f, v)
            return vjp(jnp.ones_like(y))[0]

        step = jax.jit(forward_backward)
        jax.block_until_ready(step(x))
        t = time.perf_counter()
        for _ in range(reps):
            out = step(x)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / reps

    h = jax.random.uniform(jax.random.key(0), (batch, *mc.image_size, mc.channels))
    rows = []
    for i, conv in enumerate(model.convs):
        k, b = conv.kernel[...], conv.bias[...]
        f = functools.partial(fastconv.conv_relu_pool, kernel=k, bias=b)
        kh, kw, cin, cout = k.shape
        flops = 2 * 2 * batch * h.shape[1] * h.shape[2] * kh * kw * cin * cout
        seconds = timed(f, h)
        rows.append({"layer": f"conv{i + 1} {cin}->{cout}, {kh}x{kw} at "
                     f"{h.shape[1]}x{h.shape[2]}", "seconds": seconds, "flops": flops})  # fmt: skip
        h = f(h)

    def dense(v):
        v = v.reshape(v.shape[0], -1)
        for layer in model.dense:
            v = jax.nn.relu(layer(v))
        return model.classify(v)[0]

    dims = [mc.flat_features, *mc.dense_features, mc.num_classes]
    flops = 2 * 2 * batch * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))
    rows.append({"layer": "dense layers", "seconds": timed(dense, h), "flops": flops})
    return rows


def peak_flops(seconds: float = 1.0) -> dict:
    """The device's measured peak: float32 matmuls, on one device and split over all of them."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = 2048
    out = {"matmul_n": n}
    devices = jax.devices()
    for name, count in (("one_device", 1), ("all_devices", len(devices))):
        a = jax.random.normal(jax.random.key(0), (count, n, n))
        if count > 1:
            mesh = sharding.clone_mesh(count)
            a = jax.device_put(a, NamedSharding(mesh, P(sharding.AXIS)))
        f = jax.jit(lambda m: jnp.einsum("bij,bjk->bik", m, m))
        f(a).block_until_ready()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or reps < 3:
            f(a).block_until_ready()
            reps += 1
        out[name] = 2 * n**3 * count * reps / (time.perf_counter() - t)
    out["peak"] = max(out["one_device"], out["all_devices"])
    return out


# --- PyTorch and ART ---------------------------------------------------------------------------


def torch_run(net, mc, batch: int, seconds: float) -> dict:
    """Peer (a): the plain batched loop x <- clamp(x - lr * grad, 0, 1)."""
    import torch

    from benchmarks.inversion_cpu import torch_grad

    h, w = mc.image_size
    device = next(net.parameters()).device
    x = torch.rand(batch, mc.channels, h, w, generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(torch.arange(batch) % mc.num_classes, mc.num_classes)
    x, onehot = x.to(device), onehot.float().to(device)

    def loop(x, n):
        for _ in range(n):
            g = torch_grad(net, x, onehot)
            with torch.no_grad():
                x = (x - LR * g).clamp_(0, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    t = time.perf_counter()
    loop(x, 1)  # warm-up and a rate guess
    steps = _steps_for(batch / (time.perf_counter() - t), batch, seconds)
    t = time.perf_counter()
    loop(x, steps)
    run_s = time.perf_counter() - t
    return {"steps": steps, "run_s": run_s, "per_s": batch * steps / run_s}


def gradient_check(apply_fn, params, net, mc) -> dict:
    """Max |difference| / max |truth| of image gradients against PyTorch in float64.

    Max-pool's gradient jumps where two window entries nearly tie, so float32 computations that
    round differently can route a deep layer's gradient to another pixel; the float64 gradient
    shows which float32 result is accurate.
    """
    import copy

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.inversion_cpu import torch_grad
    from jaxmia.attacks import inversion as inv

    h, w = mc.image_size
    x = jax.random.uniform(jax.random.key(3), (2, h, w, mc.channels))
    labels = jnp.array([0, 1])
    cfg = inv.InversionConfig(loss="least_squares")
    g = jax.vmap(jax.grad(lambda v, y: inv.objective(cfg, apply_fn, params, v, None, y)[0]))
    ours = np.asarray(g(x, labels))
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1]), mc.num_classes)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    t32 = torch_grad(net, xt, onehot.float()).numpy().transpose(0, 2, 3, 1)
    net64 = copy.deepcopy(net).double()
    t64 = torch_grad(net64, xt.double(), onehot.double()).numpy().transpose(0, 2, 3, 1)
    scale = np.abs(t64).max()
    return {
        "jaxmia_vs_torch64": float(np.abs(ours - t64).max() / scale),
        "torch32_vs_torch64": float(np.abs(t32 - t64).max() / scale),
        "jaxmia_vs_torch32": float(np.abs(ours - t32).max() / scale),
    }


def art_run(net, mc, batch: int, steps: int, mixed: bool = False) -> dict:
    """Peer (c): ART's MIFace on the PyTorch model, every clone running ``steps`` steps.

    ``mixed``: every clone of the batch targets another identity (as jaxmia's batches of many
    identities do); else one identity's clones per call, as the paper makes them. ART's
    ``class_gradient`` runs one backward pass over the whole batch per distinct label.
    """
    import torch
    from art.attacks.inference.model_inversion import MIFace
    from art.estimators.classification import PyTorchClassifier

    h, w = mc.image_size
    clf = PyTorchClassifier(
        model=net,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(mc.channels, h, w),
        nb_classes=mc.num_classes,
        clip_values=(0.0, 1.0),
    )
    # threshold 1.0: ART keeps a clone active while its cost (1 - p) <= threshold, i.e. always.
    attack = MIFace(clf, max_iter=steps, window_length=steps + 1, threshold=1.0,
                    learning_rate=LR, batch_size=batch)  # fmt: skip
    x = np.random.default_rng(0).random((batch, mc.channels, h, w), dtype=np.float32)
    y = np.arange(batch) % mc.num_classes if mixed else np.zeros(batch, np.int64)
    MIFace(clf, max_iter=1, threshold=1.0, batch_size=batch).infer(x[:2], y[:2])  # warm-up
    t = time.perf_counter()
    attack.infer(x, y)
    run_s = time.perf_counter() - t
    return {"steps": steps, "run_s": run_s, "per_s": batch * steps / run_s, "mixed": mixed}


def art_best(net, mc, batch: int, steps: int, mixed: bool) -> dict:
    """``art_run`` with PyTorch's default threads and with one; the better, both recorded."""
    import torch

    threads = torch.get_num_threads()
    default = art_run(net, mc, batch, steps, mixed)
    torch.set_num_threads(1)
    one = art_run(net, mc, batch, steps, mixed)
    torch.set_num_threads(threads)
    best = max(default, one, key=lambda v: v["per_s"])
    return {"batch": batch, **best, "default_threads_per_s": default["per_s"],
            "one_thread_per_s": one["per_s"]}  # fmt: skip


# --- scaling over devices (subprocesses) -------------------------------------------------------


def worker(spec: str) -> None:
    """One jaxmia measurement in this process (its device count fixed by the parent's flags)."""
    import jax

    s = json.loads(spec)
    mc, apply_fn, params = _setup(s["setting"])
    r = jax_run(mc, apply_fn, params, s["batch"], s["seconds"])
    print(json.dumps({"devices": len(jax.devices()), **r}))


def scaling(setting: str, batch: int, counts: list[int], seconds: float) -> list[dict]:
    rows = []
    for count in counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")  # fmt: skip
        spec = json.dumps({"setting": setting, "batch": batch, "seconds": seconds})
        done = subprocess.run([sys.executable, "-m", "benchmarks.inversion", "--worker", spec],
                              env=env, capture_output=True, text=True, check=True)  # fmt: skip
        rows.append({"setting": setting, "batch": batch,
                     **json.loads(done.stdout.strip().splitlines()[-1])})  # fmt: skip
        print(f"  scaling {setting} batch {batch}, {count} devices: "
              f"{rows[-1]['per_s']:.0f}/s", flush=True)  # fmt: skip
    return rows


# --- the run -------------------------------------------------------------------------------------


def machine() -> dict:
    import jax
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    d = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "device_kind": d.device_kind,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    parser.add_argument("--seconds", type=float, default=1.5, help="target seconds per timing")
    parser.add_argument("--max-batch", type=int, default=None, help="leave out larger batches")
    parser.add_argument("--no-art", action="store_true", help="leave out ART's MIFace")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    sharding.use_all_cores()  # as `jaxmia invert` runs: one JAX CPU device per core
    import jax
    import torch
    from flax import nnx

    from benchmarks.inversion_cpu import torch_model
    from jaxmia.recognizers import models

    try:
        import art  # noqa: F401

        art_error = None if not args.no_art else "left out (--no-art)"
    except ImportError as e:
        art_error = f"not installable/importable here: {e}"
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    command = "python -m benchmarks.inversion" + " ".join(
        [""] + [a for a in sys.argv[1:]]
    )  # fmt: skip
    result = {"machine": machine(), "command": command, "settings": {}}
    # jax_run's settings: the step loop this backend resolves them to
    result["jaxmia_step_loop"] = step_loop(jaxmia_config())
    print(f"devices: {jax.devices()}", flush=True)
    result["peak_flops"] = peak_flops()
    print(f"peak {result['peak_flops']['peak'] / 1e9:.1f} GFLOP/s", flush=True)
    for name, (_, batches) in SETTINGS.items():
        mc, apply_fn, params = _setup(name)
        if args.quick:
            batches = batches[:3]
        if jax.default_backend() != "cpu" and not args.quick:
            # On an accelerator: double until the whole batch no longer fits in one program.
            batches = list(batches) + [max(batches) * 2**k for k in range(1, 8)]
        if args.max_batch:
            batches = [b for b in batches if b <= args.max_batch]
        net = torch_model(mc, params)  # on the CPU, for the gradient check and ART
        tnet = net.to("cuda") if torch.cuda.is_available() else net  # the PyTorch peer
        if tnet is not net:
            net = torch_model(mc, params)
        rows = []
        too_large = None
        for b in batches:
            try:
                whole = jax_run(mc, apply_fn, params, b, args.seconds)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                too_large = b
                print(f"{name} batch {b}: does not fit in device memory", flush=True)
                break
            j = chunked_run(mc, apply_fn, params, b, args.seconds, whole)
            t = torch_run(tnet, mc, b, args.seconds)
            torch.set_num_threads(1)
            t1 = torch_run(tnet, mc, b, args.seconds)
            torch.set_num_threads(threads)
            rows.append({"batch": b, "jaxmia": j, "jaxmia_one_program": whole,
                         "torch_threads": t, "torch_1_thread": t1,
                         "torch": max(t, t1, key=lambda v: v["per_s"])})  # fmt: skip
            print(f"{name} batch {b}: jaxmia {j['per_s']:.0f}/s in chunks of "
                  f"{j['chunk_size']}, {whole['per_s']:.0f}/s as one program "
                  f"(compile {j['compile_s']:.1f}s), torch {t['per_s']:.0f}/s, "
                  f"1 thread {t1['per_s']:.0f}/s", flush=True)  # fmt: skip
        hb = min(HEADLINE_BATCH, max(batches))
        graphdef = apply_fn.args[0]
        plain_fn = functools.partial(models.logits, graphdef)
        plain = {"batch": hb, **jax_run(mc, plain_fn, params, hb, args.seconds)}
        print(f"{name}: plain convolutions, batch {hb}: {plain['per_s']:.0f}/s", flush=True)
        per_device = next(r for r in reversed(rows) if r["batch"] <= HEADLINE_BATCH)["jaxmia"]
        layer_batch = max(1, per_device["chunk_size"] // len(jax.devices()))
        layers = layer_times(mc, nnx.merge(graphdef, params), layer_batch)
        loop = loop_run(mc, apply_fn, params, 4 if args.quick else 8, args.seconds)
        print(f"{name}: Python loop over clones {loop['per_s']:.0f}/s", flush=True)
        art_row = art_mixed = None
        if art_error is None:
            b = min(HEADLINE_BATCH, max(batches))
            art_row = art_best(net, mc, b, 2 if args.quick else 3, mixed=False)
            art_mixed = art_best(net, mc, min(b, 8), 2, mixed=True)
            print(f"{name}: ART MIFace batch {b}: {art_row['per_s']:.1f}/s; mixed "
                  f"identities, batch {art_mixed['batch']}: {art_mixed['per_s']:.1f}/s",
                  flush=True)  # fmt: skip
        flops = 2 * mc.flops_per_image()
        result["settings"][name] = {
            "model": mc.to_dict(),
            "flops_per_image_forward": mc.flops_per_image(),
            "flops_per_gradient": flops,
            "gradient_check": gradient_check(apply_fn, params, net, mc),
            "rows": rows,
            "first_batch_out_of_memory": too_large,
            "python_loop": loop,
            "layers": {"batch": layer_batch, "rows": layers},
            "plain_convolutions": plain,
            "art": art_row,
            "art_mixed": art_mixed,
            "art_error": art_error,
            "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    if jax.default_backend() == "cpu":
        counts = sorted({1, 2, os.cpu_count() or 1})
        quick = args.quick
        result["scaling"] = scaling("64x64x1, 40 classes", 8 if quick else 128, counts,
                                    args.seconds) + scaling(
            "128x128x3, 2041 classes", 8 if quick else 64, counts, args.seconds)  # fmt: skip
    result["load_average_at_end"] = os.getloadavg()
    stem = "inversion_quick" if args.quick else "inversion"
    files.write_json(OUT / f"{stem}.json", result)
    files.write_text(OUT / f"{stem}.md", markdown(result, f"{stem}.png"))
    plot(result, OUT / f"{stem}.png")
    print(markdown(result, f"{stem}.png"))


def _headline(s: dict, peak: float) -> dict:
    """Ratios at the headline batch (or the largest measured below it)."""
    rows = [r for r in s["rows"] if r["batch"] <= HEADLINE_BATCH] or s["rows"]
    row = rows[-1]
    j = row["jaxmia"]["per_s"]
    out = {"batch": row["batch"], "vs_torch": j / row["torch"]["per_s"],
           "vs_python_loop": j / s["python_loop"]["per_s"]}  # fmt: skip
    out["vs_plain_convolutions"] = j / s["plain_convolutions"]["per_s"]
    for key in ("art", "art_mixed"):
        if s.get(key):
            at = next(r["jaxmia"]["per_s"] for r in s["rows"] if r["batch"] == s[key]["batch"])
            out[f"vs_{key}"] = at / s[key]["per_s"]
            out[f"vs_{key}_ceiling"] = peak / (s[key]["per_s"] * s["flops_per_gradient"])
    return out


def _step_loop_line(loop: dict | None) -> str:
    if loop is None:  # a result written before the field existed
        return "jaxmia's step loop: not recorded."
    setting = "auto" if loop["setting"] is None else loop["setting"]
    return (f"jaxmia's step loop on this backend ({loop['backend']}; "
            f"`inversion.steps_per_call={setting}` -> {loop['steps_per_call']}, "
            f"check_every {loop['check_every']}): {loop['loop']}.")  # fmt: skip


def markdown(r: dict, png: str) -> str:
    m, pk = r["machine"], r["peak_flops"]
    lines = [
        "# Inversion throughput: jaxmia vs peers",
        "",
        f"Command: `{r['command']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; "
        f"Python {m['python']}, jax {m['jax']} ({m['jax_backend']}, {m['jax_devices']} devices "
        f"seen: {m['device_kind']}), torch {m['torch']} ({m['torch_threads']} threads). Load "
        f"average at start {m['load_average_at_start'][0]:.1f}, at end "
        f"{r['load_average_at_end'][0]:.1f}.",
        "",
        _step_loop_line(r.get("jaxmia_step_loop")),
        "",
        "**Absolute figures drift**: on a shared machine (a load average above the core count) "
        "they move up to 2x between runs; only ratios measured in this one run count.",
        "",
        f"Measured peak: {pk['peak'] / 1e9:.1f} GFLOP/s (float32 {pk['matmul_n']}^2 matmuls; "
        f"one device {pk['one_device'] / 1e9:.1f}, split over all {pk['all_devices'] / 1e9:.1f}; "
        "measured once, at the start, so the fractions below move with the load). "
        "FLOPs per image-gradient: 2 x forward (forward + backward to the input; no weight "
        "gradients). Inversions/s: image-gradients/s / 600 (the paper's steps). XLA MiB/device: "
        "XLA's memory analysis of the compiled step on one device (arguments + outputs + "
        "temporaries - donated).",
        "",
        "Peers: **PyTorch** = the plain batched loop of the same network, weights and update; "
        "**loop** = jaxmia's engine with vmap replaced by a Python loop over clones (batch-"
        "independent, measured once on a few clones); **ART** = IBM ART MIFace on the PyTorch "
        "model (fixed steps; with one target identity per batch, ART's best case, and with "
        "mixed identities, for which it runs one backward pass per distinct label). PyTorch "
        "and ART run with PyTorch's default threads and with one (on a busy machine its OpenMP "
        "threads spin and one thread is often faster): the better of the two is the peer. "
        "jaxmia runs as `jaxmia "
        "invert` does: clones sharded over every device JAX sees, the small-channel "
        "convolutions rewritten on the space-to-depth image "
        "(`jaxmia/recognizers/fastconv.py`), a batch larger than fits in cache (on CPU: "
        "`inversion.CPU_CACHE_BYTES` per device) run in "
        "equal chunks (`inversion.chunk_size`); 'one program' is the whole batch in one. jaxmia's "
        f"timings run at least {JAX_MIN_STEPS} steps (its fixed costs per run come once per "
        "inversion of hundreds of steps in real use).",
        "",
        "**Ceiling vs ART**: the measured peak FLOP rate over ART's FLOP rate (its "
        "image-gradients/s x FLOPs per image-gradient): the most any engine could run ahead of "
        "ART on this machine.",
        "",
        "## Headline ratios (jaxmia / peer, image-gradients/s)",
        "",
        "| setting | batch | vs PyTorch loop | vs Python loop over clones | vs ART MIFace, "
        "one identity per batch (ceiling) | vs ART MIFace, mixed identities, batch 8 (ceiling) "
        "| vs jaxmia with plain convolutions |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["settings"].items():
        h = _headline(s, pk["peak"])
        art = [f"{h[k]:.1f}x ({h[k + '_ceiling']:.0f}x)" if k in h else (s["art_error"] or "-")
               for k in ("vs_art", "vs_art_mixed")]  # fmt: skip
        lines.append(f"| {name} | {h['batch']} | {h['vs_torch']:.2f}x | "
                     f"{h['vs_python_loop']:.1f}x | {art[0]} | {art[1]} | "
                     f"{h['vs_plain_convolutions']:.2f}x |")  # fmt: skip
    for name, s in r["settings"].items():
        lines += [
            "",
            f"## {name}",
            "",
            f"Forward {s['flops_per_image_forward'] / 1e6:.1f} MFLOP/image, "
            f"{s['flops_per_gradient'] / 1e6:.1f} MFLOP per image-gradient counted. Image "
            f"gradient vs PyTorch float64 (max abs diff / max abs): jaxmia "
            f"{s['gradient_check']['jaxmia_vs_torch64']:.1e}, PyTorch float32 "
            f"{s['gradient_check']['torch32_vs_torch64']:.1e} (jaxmia vs PyTorch float32 "
            f"{s['gradient_check']['jaxmia_vs_torch32']:.1e}; a large value is a max-pool "
            f"near-tie routed differently by float32 rounding). "
            f"Python loop over clones: {s['python_loop']['per_s']:.1f}/s. jaxmia with the plain "
            f"convolutions (`models.logits`, no space-to-depth rewrite) at batch "
            f"{s['plain_convolutions']['batch']}: {s['plain_convolutions']['per_s']:.0f}/s."
            + (f" ART MIFace (better of default threads and one) at batch {s['art']['batch']}, "
               f"one identity: {s['art']['per_s']:.1f}/s; at batch {s['art_mixed']['batch']}, "
               f"every clone another identity: {s['art_mixed']['per_s']:.1f}/s."
               if s["art"] else f" ART: {s['art_error']}."),
            "",
            "| batch | chunk | jaxmia img-grad/s | one program | inversions/s | PyTorch "
            "img-grad/s | jaxmia / PyTorch | jaxmia / loop | % of peak FLOP/s | XLA FLOPs / ours "
            "| compile s | XLA MiB/device |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for row in s["rows"]:
            j, one, t = row["jaxmia"], row["jaxmia_one_program"], row["torch"]
            frac = j["per_s"] * s["flops_per_gradient"] / pk["peak"]
            mib = "-" if one["xla_bytes"] is None else f"{one['xla_bytes'] / 2**20:.0f}"
            lines.append(
                f"| {row['batch']} | {j['chunk_size']} | {j['per_s']:.0f} | {one['per_s']:.0f} | "
                f"{j['per_s'] / PAPER_STEPS:.2f} | "
                f"{t['per_s']:.0f} | {j['per_s'] / t['per_s']:.2f} | "
                f"{j['per_s'] / s['python_loop']['per_s']:.1f} | {100 * frac:.1f} | "
                f"{one['xla_flops_per_gradient'] / s['flops_per_gradient']:.2f} | "
                f"{one['compile_s']:.1f} | {mib} |"
            )
        if s.get("layers"):
            total = sum(r["seconds"] for r in s["layers"]["rows"])
            lines += [
                "",
                f"Where a step's time goes (each layer's forward + backward to its "
                f"input timed alone on one device, batch {s['layers']['batch']}, the "
                f"per-device chunk; sum {1e3 * total:.1f} ms):",
                "",
                "| layer | ms | share | GFLOP/s | % of peak |",
                "|---|---:|---:|---:|---:|",
            ]
            for lr in s["layers"]["rows"]:
                rate = lr["flops"] / lr["seconds"]
                lines.append(f"| {lr['layer']} | {1e3 * lr['seconds']:.2f} | "
                             f"{100 * lr['seconds'] / total:.0f}% | {rate / 1e9:.0f} | "
                             f"{100 * rate / pk['one_device']:.0f} |")  # fmt: skip
        lines.append(f"\nProcess RSS high-water after this setting: "
                     f"{s['peak_rss_bytes_so_far'] / 2**30:.2f} GiB.")  # fmt: skip
        if s.get("first_batch_out_of_memory"):
            lines.append(f"Batch {s['first_batch_out_of_memory']} as one program did not fit "
                         "in device memory.")  # fmt: skip
    if r.get("scaling"):
        lines += ["", "## Scaling with the JAX device count (CPU host split per device)", "",
                  "| setting | batch | devices | img-grad/s | vs 1 device |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        base = {}
        for row in r["scaling"]:
            key = (row["setting"], row["batch"])
            base.setdefault(key, row["per_s"])
            lines.append(f"| {row['setting']} | {row['batch']} | {row['devices']} | "
                         f"{row['per_s']:.0f} | {row['per_s'] / base[key]:.2f} |")  # fmt: skip
    lines += ["", f"![throughput vs batch size]({png})", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, len(r["settings"]), squeeze=False)[0]
    for ax, (name, s) in zip(axes, r["settings"].items(), strict=True):
        b = [row["batch"] for row in s["rows"]]
        ax.plot(b, [row["jaxmia"]["per_s"] for row in s["rows"]], "o-",
                label="jaxmia (as jaxmia invert: cache-sized chunks)")  # fmt: skip
        ax.plot(b, [row["jaxmia_one_program"]["per_s"] for row in s["rows"]], "o:",
                color="C0", alpha=0.5, label="jaxmia, whole batch as one program")  # fmt: skip
        ax.plot(b, [row["torch"]["per_s"] for row in s["rows"]], "s-", label="PyTorch loop")
        ax.axhline(s["python_loop"]["per_s"], color="gray", ls="--",
                   label="jaxmia, Python loop over clones")  # fmt: skip
        if s["art"]:
            ax.plot([s["art"]["batch"]], [s["art"]["per_s"]], "r^", label="ART MIFace, 1 identity")
        if s.get("art_mixed"):
            m = s["art_mixed"]
            ax.plot([m["batch"]], [m["per_s"]], "rv", label="ART MIFace, mixed identities")
        ax.set(xscale="log", yscale="log", title=name, xlabel="batch (clones)",
               ylabel="image-gradients / s")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle(f"Inversion throughput, {m['cpu']} ({m['jax_devices']} JAX devices); one run, "
                 f"load average {m['load_average_at_start'][0]:.1f} at its start",
                 fontsize=9)  # fmt: skip
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    main()
