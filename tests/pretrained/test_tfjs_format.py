"""The tfjs graph-model reader: on faceres's real files and on manifests built here."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch, tfjs_format


@pytest.fixture(scope="module")
def faceres_files():
    try:
        return fetch.model_files("faceres")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("faceres is not fetched and no registry is reachable: "
                        "jaxmia models fetch faceres")  # fmt: skip
        raise


def _half(bits: int) -> float:
    """IEEE 754 binary16 by its definition, written out independently of numpy."""
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:
        return sign * mantissa * 2.0**-24
    if exponent == 31:
        return sign * math.inf if mantissa == 0 else math.nan
    return sign * (1 + mantissa / 1024) * 2.0 ** (exponent - 15)


def test_faceres_weights_have_the_manifest_shapes(faceres_files):
    spec = json.loads(faceres_files["faceres.json"].read_text())
    listed = [w for group in spec["weightsManifest"] for w in group["weights"]]
    model = tfjs_format.load_graph_model(faceres_files["faceres.json"])
    assert [w["name"] for w in listed] == list(model.weights)
    for w in listed:
        array = model.weights[w["name"]]
        assert array.shape == tuple(w["shape"]), w["name"]
        assert array.dtype == np.dtype(w["dtype"]), w["name"]
        assert np.isfinite(array).all(), w["name"]
    # every byte of the shard is accounted for by the manifest (float16 halves, int32 words)
    stored = sum(math.prod(w["shape"]) * (2 if "quantization" in w else 4) for w in listed)
    assert stored == faceres_files["faceres.bin"].stat().st_size


def test_faceres_float16_values_decoded_by_hand(faceres_files):
    spec = json.loads(faceres_files["faceres.json"].read_text())
    listed = spec["weightsManifest"][0]["weights"]
    raw = faceres_files["faceres.bin"].read_bytes()
    model = tfjs_format.load_graph_model(faceres_files["faceres.json"])
    offsets, at = {}, 0
    for w in listed:
        offsets[w["name"]] = at
        at += math.prod(w["shape"]) * (2 if "quantization" in w else 4)
    for name, flat_index in [
        ("conv1/convolution/merged_input", 0),
        ("conv1/convolution/merged_input", 200),
        ("conv_dw_13_bn/batchnorm_1/mul", 1023),
        ("age_pred/bias", 57),
        ("conv1_relu/Cast", 0),
    ]:
        (bits,) = struct.unpack_from("<H", raw, offsets[name] + 2 * flat_index)
        assert model.weights[name].reshape(-1)[flat_index] == np.float32(_half(bits)), name
    # the ReLU6 bounds, as Keras writes them
    assert model.weights["conv1_relu/Cast"] == 6.0
    assert model.weights["conv1_relu/Const_1"] == 0.0
    assert model.weights["global_pooling/Mean/reduction_indices"].tolist() == [1, 2]


def test_faceres_nodes_and_attributes(faceres_files):
    model = tfjs_format.load_graph_model(faceres_files["faceres.json"])
    conv = model.node("conv1_bn/batchnorm_1/mul_1")
    assert conv.op == "Conv2D"
    assert conv.inputs == ("input_1", "conv1/convolution/merged_input")
    assert conv.attrs["strides"] == [1, 2, 2, 1]
    assert conv.attrs["padding"] == "SAME" and conv.attrs["data_format"] == "NHWC"
    assert model.node("feats/Relu").attrs["fused_ops"] == ["BiasAdd", "Relu"]
    assert model.node("global_pooling/Mean").attrs["keep_dims"] is False
    assert [n.name for n in model.consumers("feats/Relu")] == [
        "gender_pred/BiasAdd",
        "age_pred/BiasAdd",
    ]
    with pytest.raises(JaxmiaError, match="no node 'nope'"):
        model.node("nope")


def _write_model(tmp_path, weights, shards):
    spec = {
        "format": "graph-model",
        "modelTopology": {"node": [{"name": "x", "op": "Placeholder", "attr": {}}]},
        "weightsManifest": [
            {"paths": [f"s{i}.bin" for i in range(len(shards))], "weights": weights}
        ],
    }
    for i, data in enumerate(shards):
        (tmp_path / f"s{i}.bin").write_bytes(data)
    (tmp_path / "model.json").write_text(json.dumps(spec))
    return tmp_path / "model.json"


def test_quantised_uint8_uint16_and_int32_weights(tmp_path):
    q8 = np.array([0, 1, 7, 128, 255, 3], np.uint8)
    q16 = np.array([0, 65535, 1000, 4], np.uint16)
    qi = np.array([0, 3, 5], np.uint8)
    plain = np.array([1.5, -2.25], np.float32)
    weights = [
        {"name": "a", "shape": [2, 3], "dtype": "float32",
         "quantization": {"dtype": "uint8", "scale": 0.01, "min": -1.2}},
        {"name": "b", "shape": [4], "dtype": "float32",
         "quantization": {"dtype": "uint16", "scale": 1e-4, "min": 0.5}},
        {"name": "c", "shape": [3], "dtype": "int32",
         "quantization": {"dtype": "uint8", "scale": 0.5, "min": 1.0}},
        {"name": "d", "shape": [2], "dtype": "float32"},
    ]  # fmt: skip
    data = q8.tobytes() + q16.astype("<u2").tobytes() + qi.tobytes() + plain.tobytes()
    # split across two shards mid-weight: the shards are one byte string
    path = _write_model(tmp_path, weights, [data[:5], data[5:]])
    model = tfjs_format.load_graph_model(path)
    expected_a = np.array([v * 0.01 - 1.2 for v in q8.tolist()], np.float32).reshape(2, 3)
    np.testing.assert_array_equal(model.weights["a"], expected_a)
    expected_b = np.array([v * 1e-4 + 0.5 for v in q16.tolist()], np.float32)
    np.testing.assert_array_equal(model.weights["b"], expected_b)
    assert model.weights["b"][2] == np.float32(0.6)
    assert model.weights["b"].dtype == np.float32
    # int32 weights are rounded as Math.round does: 2.5 -> 3, 3.5 -> 4
    assert model.weights["c"].tolist() == [1, 3, 4]
    np.testing.assert_array_equal(model.weights["d"], plain)
    assert list(model.nodes) == ["x"]


def test_float16_weights_and_bad_files(tmp_path):
    halves = np.array([1.0, -0.5, 65504.0, 6.1e-5, 0.0], np.float16)
    weights = [{"name": "h", "shape": [5], "dtype": "float32",
                "quantization": {"dtype": "float16", "original_dtype": "float32"}}]  # fmt: skip
    model = tfjs_format.load_graph_model(_write_model(tmp_path, weights, [halves.tobytes()]))
    np.testing.assert_array_equal(model.weights["h"], halves.astype(np.float32))

    with pytest.raises(JaxmiaError, match="truncated: weight 'h'"):
        tfjs_format.load_graph_model(_write_model(tmp_path, weights, [halves.tobytes()[:-1]]))
    with pytest.raises(JaxmiaError, match="manifest accounts for 10"):
        tfjs_format.load_graph_model(_write_model(tmp_path, weights, [halves.tobytes() + b"\0"]))
    (tmp_path / "s0.bin").unlink()
    with pytest.raises(JaxmiaError, match="cannot read weight shard 's0.bin'"):
        tfjs_format.load_graph_model(tmp_path / "model.json")
    (tmp_path / "bad.json").write_text('{"format": "layers-model"}')
    with pytest.raises(JaxmiaError, match="expected a tfjs graph model"):
        tfjs_format.load_graph_model(tmp_path / "bad.json")
    bad = [{"name": "s", "shape": [1], "dtype": "string"}]
    with pytest.raises(JaxmiaError, match="weight 's' has dtype 'string'"):
        tfjs_format.decode_weights(bad, b"\0\0\0\0")
