"""TensorFlow.js graph models read without TensorFlow: the graph's nodes and its weights as numpy.

A tfjs graph model is a ``model.json`` and one or more binary shards. The JSON holds
``modelTopology`` (a TensorFlow GraphDef as JSON: ``node`` is a list of ``{name, op, input,
attr}``) and ``weightsManifest``: groups, each naming its shard files (``paths``, read one after
another as one byte string) and listing its weights in the order their bytes follow
(``name``, ``shape``, ``dtype`` and an optional ``quantization``). A quantised weight is stored
as ``quantization.dtype``: ``uint8`` or ``uint16`` codes ``q`` standing for ``q * scale + min``
(rounded when the weight is int32), or ``float16`` halves standing for float32. Unquantised
weights are little-endian float32, int32 or one-byte bool. This module follows tfjs-core's
``io.decodeWeights`` for all of these; string and complex64 weights, which no graph here uses,
are refused.

The nodes are kept as written, with their attributes decoded (``s`` from base64, ``i`` as int,
lists as Python lists), so a module built from the weights can be checked against the graph it
claims to reproduce.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxmia.errors import JaxmiaError

# Bytes per element of each stored dtype (unquantised dtypes and quantisation codes).
_STORED = {
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("u1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
}
_OUT = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}


@dataclasses.dataclass(frozen=True)
class Node:
    """One node of the graph: its op, the names of its inputs (``name:k`` for output k,
    ``^name`` for a control input) and its decoded attributes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GraphModel:
    """A tfjs graph model: its nodes in file order, its weights by name and its signature."""

    nodes: dict[str, Node]
    weights: dict[str, np.ndarray]
    signature: dict[str, Any]
    source: str  # the JSON file, for messages

    def node(self, name: str) -> Node:
        """The node called ``name``; a JaxmiaError naming the file when there is none."""
        if name not in self.nodes:
            raise JaxmiaError(f"{self.source}: the graph has no node {name!r}")
        return self.nodes[name]

    def weight(self, name: str) -> np.ndarray:
        """The weight called ``name``; a JaxmiaError naming the file when there is none."""
        if name not in self.weights:
            raise JaxmiaError(f"{self.source}: the weights manifest has no weight {name!r}")
        return self.weights[name]

    def consumers(self, name: str) -> list[Node]:
        """The nodes that take node ``name``'s first output as an input."""
        return [n for n in self.nodes.values() if name in n.inputs or f"{name}:0" in n.inputs]


def _attr_value(value: dict[str, Any]) -> Any:
    """One GraphDef AttrValue (as tfjs JSON writes it) as a plain Python value."""
    if "list" in value:
        items = value["list"]
        for key in ("s", "i", "f", "b", "type", "shape"):
            if key in items:
                return [_attr_value({key: v}) for v in items[key]]
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode("utf-8", errors="replace")
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "shape" in value:
        return [int(d.get("size", -1)) for d in value["shape"].get("dim", [])]
    return value  # a tensor or a function: left as written


def parse_nodes(topology: dict[str, Any]) -> dict[str, Node]:
    """The nodes of a ``modelTopology`` by name, in file order."""
    nodes = {}
    for raw in topology.get("node", []):
        attrs = {k: _attr_value(v) for k, v in raw.get("attr", {}).items()}
        node = Node(raw["name"], raw["op"], tuple(raw.get("input", [])), attrs)
        nodes[node.name] = node
    return nodes


def decode_weights(specs: list[dict[str, Any]], data: bytes, *, source: str = "weights") -> dict:
    """The weights one manifest group lists, decoded from its concatenated shard bytes.

    Args:
        specs: the group's ``weights`` list (``name``, ``shape``, ``dtype``, ``quantization``).
        data: the group's shard files' bytes, one after another.
        source: what to call the data in error messages.

    Returns:
        ``{name: array}``: float32, int32 or bool arrays of the listed shapes.
    """
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec["name"], spec["dtype"], tuple(int(d) for d in spec["shape"])
        quant = spec.get("quantization")
        if dtype not in _OUT:
            raise JaxmiaError(
                f"{source}: weight {name!r} has dtype {dtype!r}; expected one of {sorted(_OUT)}"
            )
        stored_name = quant["dtype"] if quant else dtype
        if quant and stored_name not in ("uint8", "uint16", "float16"):
            raise JaxmiaError(
                f"{source}: weight {name!r} is quantised as {stored_name!r}; expected "
                "uint8, uint16 or float16"
            )
        if quant and stored_name == "float16" and dtype != "float32":
            raise JaxmiaError(
                f"{source}: weight {name!r} is float16-quantised but {dtype!r}; expected float32"
            )
        stored = _STORED[stored_name]
        count = math.prod(shape)
        end = offset + count * stored.itemsize
        if end > len(data):
            raise JaxmiaError(
                f"{source}: truncated: weight {name!r} needs bytes {offset}..{end} of {len(data)}"
            )
        raw = np.frombuffer(data, dtype=stored, count=count, offset=offset)
        offset = end
        if quant and stored_name in ("uint8", "uint16"):
            if "scale" not in quant or "min" not in quant:
                raise JaxmiaError(
                    f"{source}: weight {name!r} is {stored_name}-quantised without scale and min"
                )
            # tfjs computes q * scale + min in JavaScript doubles, then stores the result
            values = raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
            if dtype == "int32":
                values = np.floor(values + 0.5)  # Math.round: halves go up
        else:
            values = raw
        out[name] = np.asarray(values, dtype=_OUT[dtype]).reshape(shape)
    if offset != len(data):
        raise JaxmiaError(f"{source}: {len(data)} bytes but the manifest accounts for {offset}")
    return out


def load_graph_model(path: str | Path) -> GraphModel:
    """Read a tfjs graph model: ``path`` is its JSON, whose shards lie beside it.

    Raises:
        JaxmiaError: the JSON is unreadable or not a graph model, a shard is missing, or the
            shards' bytes do not match the manifest.
    """
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxmiaError(f"{path}: not a readable tfjs model JSON ({e})") from None
    if not isinstance(spec, dict) or "modelTopology" not in spec or "weightsManifest" not in spec:
        raise JaxmiaError(
            f"{path}: expected a tfjs graph model (modelTopology and weightsManifest)"
        )
    if spec.get("format", "graph-model") != "graph-model":
        raise JaxmiaError(f"{path}: format is {spec.get('format')!r}; expected 'graph-model'")
    weights: dict[str, np.ndarray] = {}
    for group in spec["weightsManifest"]:
        chunks = []
        for shard in group["paths"]:
            try:
                chunks.append((path.parent / shard).read_bytes())
            except OSError as e:
                raise JaxmiaError(f"{path}: cannot read weight shard {shard!r} ({e})") from None
        source = ", ".join(str(path.parent / p) for p in group["paths"])
        weights.update(decode_weights(group["weights"], b"".join(chunks), source=source))
    return GraphModel(
        nodes=parse_nodes(spec["modelTopology"]),
        weights=weights,
        signature=spec.get("signature", {}),
        source=str(path),
    )
