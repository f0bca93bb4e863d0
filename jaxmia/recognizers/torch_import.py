"""Bring your own recognizer: a torchvision-layout PyTorch ResNet ``state_dict`` as a jaxmia one.

torchvision's ResNets (``resnet18``/``34``: basic blocks; ``resnet50``/``101``/``152``:
bottleneck blocks) and any network written with the same module names (``conv1``, ``bn1``,
``layerN.M.convK``/``bnK``/``downsample.0``/``downsample.1``, ``fc``) map one to one onto
``models.ResNet``:

- ``config_from_state_dict`` reads the classes, channels, stage widths, blocks per stage, block
  kind and stem kernel from the tensors' names and shapes; what a ``state_dict`` cannot tell (the
  stem's stride, its max-pool, the input size and normalisation) comes as keywords, torchvision's
  by default;
- ``convert`` renames and transposes the tensors (convolutions ``[out, in, kh, kw]`` to
  ``[kh, kw, in, out]``, the classifier ``[out, in]`` to ``[in, out]``, batch norm's weight,
  bias, running mean and variance to scale, bias, mean, var), checking every name and shape;
- ``save_checkpoint`` writes a recognizer folder that ``checkpoint.load_recognizer``,
  ``jaxmia invert --checkpoint`` and ``jaxmia evaluate`` use as one trained by ``jaxmia train``.

PyTorch is not needed: ``load_state_dict`` reads the ``.pt`` file with
``jaxmia.pretrained.torch_format`` (tensors only, no code from the file run), and the other
functions take tensors or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmia import checkpoint
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import torch_format
from jaxmia.recognizers import models

# torchvision's ImageNet normalisation, the default for 3-channel models; other channel counts
# default to 0.5, 0.5 (x in [0, 1] mapped to [-1, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED = ("num_batches_tracked",)


def _array(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The dict without a ``module.`` prefix on every key (a ``DataParallel`` model's)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise JaxmiaError(f"state_dict: missing {key!r} (expected a torchvision-layout ResNet)")
    return tuple(np.shape(state_dict[key]))


def _numbers(value: Any, cast: type, what: str) -> Any:
    """A number or tuple of numbers from a value or a comma-separated string."""
    if not isinstance(value, str):
        return value
    try:
        parts = tuple(cast(p) for p in value.split(",") if p.strip())
    except ValueError:
        raise JaxmiaError(f"{what}: expected comma-separated numbers, got {value!r}") from None
    if not parts:
        raise JaxmiaError(f"{what}: expected comma-separated numbers, got {value!r}")
    return parts[0] if len(parts) == 1 else parts


def config_from_state_dict(
    state_dict: Mapping[str, Any],
    *,
    image_size: int | Sequence[int] | str,
    channels: int | None = None,
    mean: float | Sequence[float] | str | None = None,
    std: float | Sequence[float] | str | None = None,
    stem_stride: int = 2,
    stem_pool: bool = True,
) -> models.ModelConfig:
    """The ``ModelConfig`` of a torchvision-layout ResNet ``state_dict``.

    Args:
      state_dict: tensor or array by name (``model.state_dict()``).
      image_size: the input size ``(height, width)``, one int for a square, or ``"H,W"``.
      channels: the input channels; None reads them from ``conv1.weight`` (given: checked).
      mean, std: the input normalisation the network was trained with, ``(x - mean) / std`` for
        ``x`` in [0, 1]: a float, one per channel, or ``"a,b,c"``. None: torchvision's ImageNet
        values for 3 channels (``IMAGENET_MEAN``, ``IMAGENET_STD``), else 0.5 and 0.5.
      stem_stride: ``conv1``'s stride (torchvision's: 2; a ``state_dict`` does not record it).
      stem_pool: whether the 3x3 stride 2 max-pool follows the stem (torchvision's: yes).

    Raises:
      JaxmiaError: a tensor is missing or the network is not of this layout.
    """
    sd = _strip_prefix(state_dict)
    num_classes, _ = _shape(sd, "fc.weight")
    _, stem_in, kh, kw = _shape(sd, "conv1.weight")
    if kh != kw:
        raise JaxmiaError(f"state_dict: conv1.weight has a {kh}x{kw} kernel, expected a square one")
    if channels is not None and channels != stem_in:
        raise JaxmiaError(f"channels={channels}, but conv1.weight takes {stem_in} input channels")
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    widths, blocks = [], []
    while f"layer{len(widths) + 1}.0.conv1.weight" in sd:
        stage = len(widths) + 1
        widths.append(_shape(sd, f"layer{stage}.0.conv1.weight")[0])
        n = 0
        while f"layer{stage}.{n}.conv1.weight" in sd:
            n += 1
        blocks.append(n)
    if not widths:
        raise JaxmiaError("state_dict: no layer1.0.conv1.weight (expected a torchvision ResNet)")
    if block == "bottleneck":
        for s, width in enumerate(widths, 1):
            out = _shape(sd, f"layer{s}.0.conv3.weight")[0]
            if out != 4 * width:
                raise JaxmiaError(
                    f"state_dict: layer{s}.0.conv3.weight has {out} output channels, expected 4 x "
                    f"{width} (bottlenecks of another width, e.g. wide ResNets, are not supported)"
                )
    if isinstance(image_size, str):
        image_size = _numbers(image_size, int, "image_size")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    mean, std = _numbers(mean, float, "mean"), _numbers(std, float, "std")
    if mean is None:
        mean = IMAGENET_MEAN if stem_in == 3 else 0.5
    if std is None:
        std = IMAGENET_STD if stem_in == 3 else 0.5
    try:
        if len(image_size) != 2:
            raise ValueError(f"image_size: expected (height, width), got {image_size}")
        return models.ModelConfig(
            num_classes=int(num_classes),
            image_size=(int(image_size[0]), int(image_size[1])),
            channels=int(stem_in),
            arch="resnet",
            widths=tuple(int(w) for w in widths),
            blocks=tuple(blocks),
            block=block,
            stem_kernel=int(kh),
            stem_stride=int(stem_stride),
            stem_pool=bool(stem_pool),
            mean=tuple(float(m) for m in mean) if isinstance(mean, Sequence) else float(mean),
            std=tuple(float(s) for s in std) if isinstance(std, Sequence) else float(std),
        )
    except (TypeError, ValueError) as e:
        raise JaxmiaError(f"model config from the state_dict: {e}") from None


def _torch_name(path: tuple) -> tuple[str, str]:
    """(torch tensor name, kind: conv, dense or vector) of a jaxmia pure-dict path."""
    *module, leaf = path
    if module == ["head"]:
        return ("fc.weight", "dense") if leaf == "kernel" else ("fc.bias", "vector")
    if module[0] == "stages":  # [stages, s, b, part] or [stages, s, b, convs|norms, j]
        s, b, part = module[1:4]
        names = {"down_conv": "downsample.0", "down_norm": "downsample.1"}
        if part in ("convs", "norms"):
            names[part] = f"{'conv' if part == 'convs' else 'bn'}{module[4] + 1}"
        name = f"layer{s + 1}.{b}.{names[part]}"
    else:
        name = {"stem": "conv1", "stem_norm": "bn1"}[module[0]]
    if leaf == "kernel":
        return f"{name}.weight", "conv"
    return f"{name}.{_BN[leaf]}", "vector"


def _path(keys: tuple) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keys)


def convert(state_dict: Mapping[str, Any], config: models.ModelConfig) -> dict:
    """The jaxmia state pure dict (``models.logits``' second argument) of a torch ``state_dict``.

    Raises:
      JaxmiaError: a tensor is missing, left over, or of another shape than ``config`` needs
        (the message names it and both shapes).
    """
    sd = _strip_prefix(state_dict)
    abstract = nnx.to_pure_dict(models.abstract(config)[1])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    used, out = set(), []
    for keys, spec in leaves:
        name, kind = _torch_name(_path(keys))
        if name not in sd:
            raise JaxmiaError(
                f"state_dict: missing {name!r} (shape {tuple(spec.shape)} after conversion) for "
                f"the {config.block} ResNet widths={config.widths} blocks={config.blocks}"
            )
        a = _array(sd[name])
        if kind == "conv" and a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
        elif kind == "dense" and a.ndim == 2:
            a = a.T  # [out, in] -> [in, out]
        if a.shape != tuple(spec.shape):
            raise JaxmiaError(
                f"state_dict: {name!r} has shape {tuple(np.shape(sd[name]))}, expected "
                f"{_torch_shape(tuple(spec.shape), kind)} (torch layout) for the {config.block} "
                f"ResNet widths={config.widths} blocks={config.blocks}"
            )
        used.add(name)
        out.append(np.ascontiguousarray(a))
    left = sorted(k for k in sd if k not in used and k.rsplit(".", 1)[-1] not in _IGNORED)
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise JaxmiaError(
            f"state_dict: unexpected {left[0]!r}{more} (not part of the {config.block} ResNet "
            f"widths={config.widths} blocks={config.blocks} in torchvision's layout)"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return shape[::-1] if kind == "dense" else shape


def read_names(path: str | Path | None, num_classes: int) -> tuple[str, ...]:
    """Identity names in label order from a text file (one a line); None: "0".."n-1"."""
    if path is None:
        return tuple(str(i) for i in range(num_classes))
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise JaxmiaError(f"names file {path}: cannot read it ({e.strerror})") from None
    names = tuple(line.strip() for line in lines if line.strip())
    if len(names) != num_classes:
        raise JaxmiaError(
            f"names file {path}: {len(names)} names, but the model has {num_classes} classes "
            "(expected one name a line, in label order)"
        )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise JaxmiaError(f"names file {path}: the name {twice!r} appears more than once")
    return names


def save_checkpoint(
    state: dict,
    config: models.ModelConfig,
    names: Sequence[str],
    workdir: str | Path,
    meta: dict[str, Any] | None = None,
) -> None:
    """Writes ``state`` (from ``convert``) as a recognizer folder (step 0, no optimizer state).

    Its meta holds ``model`` (``config.to_dict()``), ``names`` and whatever ``meta`` adds (the
    command records ``source``: the ``state_dict`` file).
    """
    if len(names) != config.num_classes:
        raise JaxmiaError(f"{len(names)} identity names for {config.num_classes} classes")
    checkpoint.save_recognizer(workdir, state, config, list(names), meta, step=0)


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """The ``state_dict`` in a ``.pt``/``.pth`` file (``torch.save(model.state_dict(), path)``).

    Read without PyTorch (``torch_format.load_state_dict``): only tensors, numbers, strings and
    dicts, never code. A checkpoint dict holding the weights under ``"state_dict"`` or
    ``"model"`` (or as its only dict of tensors) is unwrapped.

    Raises:
      JaxmiaError: the file is missing, corrupt, names code, or holds no dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise JaxmiaError(f"state_dict {path}: not found")
    return torch_format.load_state_dict(path)


def run(
    state_dict: str | Path,
    workdir: str | Path,
    *,
    image_size: int | Sequence[int] | str,
    names: str | Path | None = None,
    stem_stride: int = 2,
    stem_pool: bool = True,
    mean: float | Sequence[float] | str | None = None,
    std: float | Sequence[float] | str | None = None,
) -> dict[str, Any]:
    """``jaxmia import-torch``: a ``.pt`` file's ResNet into the recognizer folder ``workdir``.

    Every input is checked before anything is written; an existing non-empty ``workdir`` is
    refused. Returns a summary (the model config, the number of classes, where it went).
    """
    workdir = Path(workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise JaxmiaError(f"workdir {workdir}: exists and is not empty; choose a new folder")
    sd = load_state_dict(state_dict)
    config = config_from_state_dict(
        sd, image_size=image_size, mean=mean, std=std, stem_stride=stem_stride, stem_pool=stem_pool
    )
    labels = read_names(names, config.num_classes)
    state = convert(sd, config)
    save_checkpoint(state, config, labels, workdir, {"source": f"torch state_dict {state_dict}"})
    return {"model": config.to_dict(), "num_classes": config.num_classes, "workdir": str(workdir)}
