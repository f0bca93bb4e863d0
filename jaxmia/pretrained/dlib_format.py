"""A reader of dlib's serialize format for DNN files (``dlib_face_recognition_resnet_model_v1``).

No dlib needed. The format, from dlib's ``serialize.h``, ``dnn/tensor.h``, ``dnn/core.h`` and
``dnn/layers.h``, checked byte by byte on the real file:

- an integer is one control byte (low 4 bits: how many bytes follow; 0x80: negative) then its
  magnitude in that many little-endian bytes (0 is ``01 00``);
- a float or double is two integers, a mantissa and a base-2 exponent (``float_details``:
  value = mantissa * 2**exponent; exponents 32000, 32001, 32002 stand for inf, -inf, NaN);
- a bool is the character ``'1'`` or ``'0'``; a string is its length (an integer) then its bytes;
- a tensor is version 2, then num_samples, k, nr, nc (integers), then its values as raw
  little-endian float32, row-major in that order; an ``alias_tensor`` (a view into a layer's
  params) is version 1 and the same four dimensions, no values.

A network ``loss<L_n<...L_1<input>>>`` is written by the loss layer as version 1, the loss'
details, then its subnetwork. Each ``add_layer`` writes its version (2; 3 for the innermost,
whose subnetwork is the input layer), then its subnetwork, then its details, then three bools
(setup called, gradient input stale, output and gradient input disabled) and three tensors
(x_grad, cached output, params_grad: empty in a trained file). ``add_tag_layer`` and
``add_skip_layer`` write version 1 and their subnetwork, nothing else. So the file opens with
the versions of every layer from the output inwards, and the layers' details follow from the
input outwards. Tags and skips carry no details, and tag IDs are not written: which tag a skip
or an ``add_prev`` refers to comes from the network's definition, not the file.

Each layer's details begin with its name (with dlib's version suffix: ``con_4``, ``affine_``,
``relu_``, ``max_pool_2``, ``avg_pool_2``, ``add_prev_``, ``fc_2``, ``loss_metric_2``,
``input_rgb_image_sized``), followed by the fields ``_LAYER_FIELDS`` lists.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxmia.errors import JaxmiaError

# Each layer's fields after its name, in file order: "int", "float", "bool", "tensor" (values)
# or "alias" (a shape only).
_LAYER_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "input_rgb_image_sized": (
        ("avg_red", "float"),
        ("avg_green", "float"),
        ("avg_blue", "float"),
        ("nr", "int"),
        ("nc", "int"),
    ),
    "con_4": (
        ("params", "tensor"),
        ("num_filters", "int"),
        ("nr", "int"),
        ("nc", "int"),
        ("stride_y", "int"),
        ("stride_x", "int"),
        ("padding_y", "int"),
        ("padding_x", "int"),
        ("filters", "alias"),
        ("biases", "alias"),
        ("learning_rate_multiplier", "float"),
        ("weight_decay_multiplier", "float"),
        ("bias_learning_rate_multiplier", "float"),
        ("bias_weight_decay_multiplier", "float"),
    ),
    "affine_": (("params", "tensor"), ("gamma", "alias"), ("beta", "alias"), ("mode", "int")),
    "relu_": (),
    "add_prev_": (),
    "max_pool_2": (
        ("nr", "int"),
        ("nc", "int"),
        ("stride_y", "int"),
        ("stride_x", "int"),
        ("padding_y", "int"),
        ("padding_x", "int"),
    ),
    "fc_2": (
        ("num_outputs", "int"),
        ("num_inputs", "int"),
        ("params", "tensor"),
        ("weights", "alias"),
        ("biases", "alias"),
        ("bias_mode", "int"),
        ("learning_rate_multiplier", "float"),
        ("weight_decay_multiplier", "float"),
        ("bias_learning_rate_multiplier", "float"),
        ("bias_weight_decay_multiplier", "float"),
    ),
    "loss_metric_2": (("margin", "float"), ("dist_thresh", "float")),
}
_LAYER_FIELDS["avg_pool_2"] = _LAYER_FIELDS["max_pool_2"]
_FLOAT_SPECIAL = {32000: np.inf, 32001: -np.inf, 32002: np.nan}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer's details as written: its name and fields (tensors as float32 arrays)."""

    name: str
    fields: dict  # field -> int, float, bool, np.ndarray [n, k, nr, nc] or alias shape tuple


@dataclasses.dataclass(frozen=True)
class Network:
    """A dlib DNN file: the loss, the input layer, and the layers between."""

    loss: Layer
    input: Layer
    layers: tuple[Layer | None, ...]  # from the input outwards; None for a tag or skip layer


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where

    def _fail(self, what: str) -> JaxmiaError:
        return JaxmiaError(f"{self.where}: {what} at byte {self.pos}; not a dlib DNN file")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self._fail(f"truncated: {n} bytes wanted, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self._fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent in _FLOAT_SPECIAL:
            return float(_FLOAT_SPECIAL[exponent])
        return float(np.ldexp(np.float64(mantissa), exponent))

    def bool(self) -> bool:
        c = self.take(1)
        if c not in (b"0", b"1"):
            raise self._fail(f"bad bool {c!r}")
        return c == b"1"

    def string(self) -> str:
        n = self.int()
        return self.take(n).decode("latin-1")

    def version(self, *allowed: int) -> int:
        v = self.int()
        if v not in allowed:
            raise self._fail(f"version {v}, expected {' or '.join(map(str, allowed))}")
        return v

    def shape(self) -> tuple[int, int, int, int]:
        shape = tuple(self.int() for _ in range(4))
        if min(shape) < 0:
            raise self._fail(f"negative tensor dimension {shape}")
        return shape

    def tensor(self) -> np.ndarray:
        self.version(2)
        shape = self.shape()
        count = int(np.prod(shape))
        values = np.frombuffer(self.take(4 * count), dtype="<f4")
        return values.reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        self.version(1)
        return self.shape()

    def layer(self) -> Layer:
        name = self.string()
        if name not in _LAYER_FIELDS:
            raise self._fail(f"unknown layer {name!r}")
        fields = {key: getattr(self, kind)() for key, kind in _LAYER_FIELDS[name]}
        return Layer(name=name, fields=fields)

    def trailer(self, innermost: bool) -> None:
        """An add_layer's state after its details: three bools and three (empty) tensors; the
        innermost one adds its sample expansion factor (an int)."""
        for _ in range(3):
            self.bool()
        for _ in range(3):
            self.tensor()
        if innermost:
            self.int()


def read_network(path: str | Path) -> Network:
    """Reads a dlib DNN file (a loss layer over add_layers, tags and skips over an input).

    Raises:
      JaxmiaError: the file is missing, truncated, has bytes left over, or holds a layer or
        version this reader does not know.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxmiaError(f"{path}: cannot read ({e.strerror}); expected a dlib DNN file") from e
    r = _Reader(data, str(path))
    r.version(1)
    loss = r.layer()
    # the versions from the output inwards: 2 an add_layer, 1 a tag or skip, 3 the innermost
    chain = []
    while not chain or chain[-1] != 3:
        chain.append(r.version(1, 2, 3))
    inp = r.layer()
    layers: list[Layer | None] = []
    for v in reversed(chain):
        if v == 1:
            layers.append(None)
            continue
        layers.append(r.layer())
        r.trailer(innermost=v == 3)
    if r.pos != len(data):
        raise r._fail(f"{len(data) - r.pos} bytes left after the network")
    return Network(loss=loss, input=inp, layers=tuple(layers))
