"""Streamed training: peak memory as the data set grows tenfold, and images/s against PyTorch.

(a) Peak resident memory (``ru_maxrss``, a fresh subprocess per size and mode) of ``--steps``
training steps of the paper CNN on synthetic faces at 128x128x3, 2041 identities, with
``--small`` and ``--large`` images per identity: streamed from the array_record cache through
grain (``jaxmia.data.stream``) against the in-memory path (the whole set as float32). The in-memory
peak of the large set is predicted from the small one's (plus the float32 set and the uint8
read buffer ``faces_lib._read`` fills) unless ``--measure-large-in-memory``.

(b) Training images/s at 64x64x3, batch 64, of the ResNet (widths 16-128, one basic block a
stage, 3x3 stride-2 stem, no pool) and the paper CNN, with the same augmentation (random
resized crop of 0.6-1 of the area, flip, brightness/contrast, saturation 0.4): jaxmia streamed
(augmentation inside the jitted step) against a PyTorch loop of the same network (written here;
DataLoader over the same cache records, tensor augmentation per image). Warm-up steps are
excluded; the first (compiling) step is reported apart.

    python benchmarks/train_stream.py --out benchmarks/train_stream.json

Caches go to ``--cache`` (default $JAXMIA_CACHE or ~/.cache/jaxmia) and are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

IDS = 2041
AUG = {"crop_scale": 0.6, "saturation": 0.4}


def _records(size: int, per_identity: int, cache: str | None, stream_mode: bool = True):
    from jaxmia.data import faces as faces_lib

    return faces_lib.load_faces(
        "synthetic",
        image_size=(size, size),
        channels=3,
        cache_dir=cache,
        progress=False,
        stream=stream_mode,
        synthetic={"num_identities": IDS, "images_per_identity": per_identity, "seed": 0},
    )


def _setup(mc, batch: int, n_steps: int):
    import jax

    from jaxmia import config
    from jaxmia.recognizers import models, train

    cfg = config.default_config().train
    cfg.update(batch_size=batch, **AUG)
    tx = train.make_optimizer(cfg, n_steps)
    graphdef, state = models.init(mc, jax.random.key(0))
    params, rest = models.split_trainable(graphdef, state)
    return graphdef, params, rest, tx.init(params), tx, train.Augment.from_config(cfg)


def memory_child(args) -> dict:
    """One size, one mode: steps of training; returns the peak RSS and timings."""
    import jax

    from jaxmia import sharding
    from jaxmia.data import faces as faces_lib
    from jaxmia.data import stream
    from jaxmia.recognizers import models, train

    t0 = time.perf_counter()
    faces = _records(128, args.per_identity, args.cache)
    if args.mode == "memory":
        # What the in-memory path does with a cached source (faces_lib._cached): every image read
        # into one uint8 array, then the float32 FaceSet (synthetic faces would be rendered
        # into memory instead, the same float32 set).
        images, _, _ = faces_lib._read(faces.records, (128, 128, 3))
        faces = faces_lib.FaceSet(
            images.astype(np.float32) / 255.0, faces.labels, faces.names, faces.source, True
        )
        del images
    t_open = time.perf_counter() - t0
    n, batch = len(faces), 64
    mc = models.ModelConfig(num_classes=IDS, image_size=(128, 128), channels=3)
    graphdef, params, rest, opt, tx, aug = _setup(mc, batch, args.steps)
    if args.mode == "stream":
        mesh = stream.mesh(batch)
        params, rest, opt = sharding.replicate(mesh, (params, rest, opt))
        source = stream.Source(
            faces.records, np.arange(n), {m: i for i, m in enumerate(faces.names)}, faces.digest
        )
        batches = stream.epoch_batches(source, batch, 0, 0, mesh)
    else:
        order = train._epoch_batches(n, batch, jax.random.key(0))
        batches = ((faces.images[i], faces.labels[i]) for i in order)
    t1 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step == args.steps:
            break
        params, rest, opt, loss = train.train_step(
            graphdef, params, rest, opt, x, y, jax.random.key(step), tx=tx, aug=aug
        )
    loss.block_until_ready()
    return {
        "mode": args.mode,
        "images": n,
        "steps": args.steps,
        "open_seconds": t_open,
        "train_seconds": time.perf_counter() - t1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---------------------------------------------------------------------------------------------
# PyTorch peers


def torch_models(kind: str, classes: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
            self.n1 = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.n2 = nn.BatchNorm2d(width)
            self.down = None
            if stride != 1 or cin != width:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )

        def forward(self, x):
            h = self.n2(self.c2(torch.relu(self.n1(self.c1(x)))))
            return torch.relu(h + (x if self.down is None else self.down(x)))

    if kind == "resnet":
        widths, layers, cin = (16, 32, 64, 128), [], 16
        stem = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        for s, w in enumerate(widths):
            layers.append(Block(cin, w, 2 if s else 1))
            cin = w
        return nn.Sequential(
            *stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
            nn.Linear(cin, classes),
        )  # fmt: skip
    convs, cin = [], 3
    for cout, k in zip((5, 16, 32, 64), (5, 5, 3, 3), strict=True):
        convs += [nn.Conv2d(cin, cout, k, padding="same"), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(
        *convs, nn.Flatten(), nn.Linear(64 * 4 * 4, 1024), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, classes),
    )  # fmt: skip


class TorchFaces:
    """The cache's records, decoded and augmented per image as a torch Dataset."""

    def __init__(self, records, label_of):
        self.records, self.label_of = records, label_of

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        import torch
        import torch.nn.functional as F

        ex = self.records[i]
        x = torch.from_numpy(np.asarray(ex["image"])).permute(2, 0, 1).float() / 255  # [c, h, w]
        _, h, w = x.shape
        area = h * w * np.random.uniform(AUG["crop_scale"], 1)
        aspect = math.exp(np.random.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(1, round(math.sqrt(area / aspect))))
        cw = min(w, max(1, round(math.sqrt(area * aspect))))
        top, left = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
        crop = x[None, :, top : top + ch, left : left + cw]
        x = F.interpolate(crop, (h, w), mode="bilinear", align_corners=False)[0]
        if np.random.rand() < 0.5:
            x = x.flip(-1)
        mean = x.mean()
        x = (x - mean) * np.random.uniform(0.8, 1.2) + mean + np.random.uniform(-0.1, 0.1)
        grey = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        s = AUG["saturation"]
        x = grey + (x - grey) * np.random.uniform(1 - s, 1 + s)
        name = ex["identity"]
        name = name.decode() if isinstance(name, bytes) else name
        return x.clamp(0, 1), self.label_of[name]


def torch_rate(kind: str, faces, batch: int, warmup: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = torch_models(kind, IDS)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    label_of = {m: i for i, m in enumerate(faces.names)}
    loader = torch.utils.data.DataLoader(
        TorchFaces(faces.records, label_of), batch_size=batch, shuffle=True, drop_last=True
    )
    it = iter(loader)
    model.train()
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    measured = sum(times[warmup:])
    return {"images_per_s": batch * steps / measured, "first_step_s": times[0],
            "threads": torch.get_num_threads()}  # fmt: skip


def jax_rate(mc, faces, batch: int, warmup: int, steps: int) -> dict:
    import jax

    from jaxmia import sharding
    from jaxmia.data import stream
    from jaxmia.recognizers import train

    graphdef, params, rest, opt, tx, aug = _setup(mc, batch, warmup + steps)
    mesh = stream.mesh(batch)
    params, rest, opt = sharding.replicate(mesh, (params, rest, opt))
    source = stream.Source(
        faces.records, np.arange(len(faces)), {m: i for i, m in enumerate(faces.names)}, ""
    )
    batches = stream.epoch_batches(source, batch, 0, 0, mesh)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        x, y = next(batches)
        params, rest, opt, loss = train.train_step(
            graphdef, params, rest, opt, x, y, jax.random.key(step), tx=tx, aug=aug
        )
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    return {"images_per_s": batch * steps / sum(times[warmup:]), "first_step_s": times[0]}


def throughput(args) -> dict:
    from jaxmia.recognizers import models

    faces = _records(64, args.small, args.cache)
    nets = {
        "resnet": models.ModelConfig(
            num_classes=IDS, image_size=(64, 64), channels=3, arch="resnet",
            widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), stem_kernel=3, stem_stride=2,
            stem_pool=False,
        ),
        "paper": models.ModelConfig(num_classes=IDS, image_size=(64, 64), channels=3),
    }  # fmt: skip
    out = {}
    for name, mc in nets.items():
        out[name] = {
            "jaxmia": jax_rate(mc, faces, 64, args.warmup, args.rate_steps),
            "torch": torch_rate(name, faces, 64, args.warmup, args.rate_steps),
        }
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None)
    p.add_argument("--small", type=int, default=2, help="images per identity, 1x")
    p.add_argument("--large", type=int, default=20, help="images per identity, 10x")
    p.add_argument("--steps", type=int, default=30, help="training steps per memory run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rate-steps", type=int, default=20)
    p.add_argument("--measure-large-in-memory", action="store_true")
    p.add_argument("--skip", choices=("memory", "throughput"), default=None)
    p.add_argument("--out", default="benchmarks/train_stream.json")
    p.add_argument("--child", choices=("memory",), default=None)
    p.add_argument("--mode", choices=("stream", "memory"), default="stream")
    p.add_argument("--per-identity", type=int, default=2)
    args = p.parse_args()
    if args.child:
        print(json.dumps(memory_child(args)))
        return
    result = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "memory": [], "rate": {}}
    if args.skip != "memory":
        for k in (args.small, args.large):  # prepare the caches first, timed apart
            t = time.perf_counter()
            _records(128, k, args.cache)
            result.setdefault("prepare_seconds", {})[str(k)] = time.perf_counter() - t
        for k in (args.small, args.large):
            for mode in ("stream", "memory"):
                if mode == "memory" and k == args.large and not args.measure_large_in_memory:
                    continue
                cmd = [sys.executable, __file__, "--child", "memory", "--mode", mode,
                       "--per-identity", str(k), "--steps", str(args.steps)]  # fmt: skip
                cmd += ["--cache", args.cache] if args.cache else []
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                result["memory"].append(row)
                print(row, file=sys.stderr, flush=True)
        if not args.measure_large_in_memory:
            small = next(r for r in result["memory"] if r["mode"] == "memory")
            extra = IDS * (args.large - args.small) * 128 * 128 * 3 * (4 + 1)  # float32 + uint8
            result["memory"].append(
                {
                    "mode": "memory (predicted)",
                    "images": IDS * args.large,
                    "peak_rss_mb": small["peak_rss_mb"] + extra / 2**20,
                }  # fmt: skip
            )
    if args.skip != "throughput":
        result["rate"] = throughput(args)
    result["load_average_after"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
