"""PyTorch checkpoints read without torch: the real model files and tricky tensors, both formats.

The references come from ``tests/reference/make_torch_reference.py`` (run with torch): the small
checkpoints' expected arrays are rebuilt here with numpy, the real files' tensors are checked
against torch.load's shapes, dtypes, sums and end values.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch, torch_format

DATA = Path(__file__).resolve().parents[1] / "reference"
REFERENCE = np.load(DATA / "torch_reference.npz")


def model_file(name: str) -> Path:
    try:
        return next(iter(fetch.model_files(name).values()))
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip(f"no registry reachable: run `jaxmia models fetch {name}`")
        raise


def expected_small() -> dict:
    """make_torch_reference.small_object(), written with numpy."""
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    return {
        "view": x[1:, 2:].T,
        "half": x.astype(np.float16)[::2, 1::3],
        "bf16": x / 4,  # exact in bfloat16: multiples of 1/4 below 8
        "long": np.arange(-3, 4, dtype=np.int64),
        "bool": x > 10,
        "param": x[3],
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.mark.parametrize("name", ["torch_reference_zip.pt", "torch_reference_legacy.pt"])
def test_small_checkpoint_both_formats(name):
    got = torch_format.load(DATA / name)
    for key, want in expected_small().items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
        assert got[key].flags.c_contiguous and got[key].flags.owndata, key
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    row, inner = got["nested"]
    np.testing.assert_array_equal(row, x[2])
    assert inner["text"] == "kept" and inner["number"] == 3
    np.testing.assert_array_equal(inner["pair"][0], x[0, :2])
    assert inner["pair"][1] == 1.5


@pytest.mark.parametrize(
    ("model", "key", "legacy"),
    [("efficientnet_lite0", None, True), ("dcgan_face", "netG_state_dict", False)],
)
def test_real_checkpoints_match_torch_load(model, key, legacy):
    path = model_file(model)
    assert zipfile.is_zipfile(path) is not legacy  # both formats are exercised
    sd = torch_format.load_state_dict(path, key)
    assert list(sd) == list(REFERENCE[f"{model}_names"])
    for i, (name, a) in enumerate(sd.items()):
        shape = tuple(int(n) for n in REFERENCE[f"{model}_shapes"][i].split(",") if n)
        assert a.shape == shape and str(a.dtype) == REFERENCE[f"{model}_dtypes"][i], name
        f = a.astype(np.float64).ravel()
        got = [f.sum(), np.abs(f).sum(), f[0], f[-1]]
        np.testing.assert_allclose(got, REFERENCE[f"{model}_stats"][i], rtol=1e-9, err_msg=name)
    if model == "dcgan_face":
        # the checkpoint holds only the generator; None finds its one dict of tensors
        assert list(torch_format.load(path)) == ["netG_state_dict"]
        assert list(torch_format.load_state_dict(path)) == list(sd)


def test_efficientnet_strided_storage():
    # The converted TF weights are stored channels-last: strides other than C order.
    sd = torch_format.load_state_dict(model_file("efficientnet_lite0"))
    stem = sd["_conv_stem.weight"]  # [32, 3, 3, 3]
    assert stem.shape == (32, 3, 3, 3) and stem.flags.c_contiguous
    i = list(REFERENCE["efficientnet_lite0_names"]).index("_conv_stem.weight")
    assert stem.ravel()[-1] == REFERENCE["efficientnet_lite0_stats"][i, 3]


def _zip_with(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


def _legacy_with(pkl: bytes) -> bytes:
    head = b"".join(pickle.dumps(v, 2) for v in (0x1950A86A20F9469CFC6C, 1001, {"a": 1}))
    return head + pkl + pickle.dumps([], 2)


@pytest.mark.parametrize("wrap", [_zip_with, _legacy_with])
def test_malicious_pickle_is_refused(tmp_path, wrap):
    sentinel = tmp_path / "pwned"
    # protocol 0: os.system("touch <sentinel>"), as a malicious checkpoint would hold it
    evil = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()
    path = tmp_path / "evil.pt"
    path.write_bytes(wrap(evil))
    with pytest.raises(JaxmiaError, match=r"refused the global os\.system") as e:
        torch_format.load(path)
    assert "\n" not in str(e.value)
    assert not sentinel.exists()
    # another trusted-looking module is no better
    path.write_bytes(wrap(b"ctorch\nload\n(S'x'\ntR."))
    with pytest.raises(JaxmiaError, match=r"refused the global torch\.load"):
        torch_format.load(path)


def test_truncated_and_corrupt_files(tmp_path):
    for name in ("torch_reference_zip.pt", "torch_reference_legacy.pt"):
        data = (DATA / name).read_bytes()
        for cut in np.linspace(1, len(data) - 1, 25).astype(int):
            path = tmp_path / f"cut{cut}.pt"
            path.write_bytes(data[:cut])
            with pytest.raises(JaxmiaError, match=str(path)) as e:
                torch_format.load(path)
            assert "\n" not in str(e.value)
    real = model_file("dcgan_face").read_bytes()
    (tmp_path / "half.tar").write_bytes(real[: len(real) // 2])
    with pytest.raises(JaxmiaError, match="half.tar"):
        torch_format.load(tmp_path / "half.tar")
    real = model_file("efficientnet_lite0").read_bytes()
    (tmp_path / "half.pth").write_bytes(real[: len(real) // 2])
    with pytest.raises(JaxmiaError, match="truncated"):
        torch_format.load(tmp_path / "half.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(JaxmiaError, match="junk.pt"):
        torch_format.load(tmp_path / "junk.pt")
    with pytest.raises(JaxmiaError, match="not found"):
        torch_format.load(tmp_path / "absent.pt")


def test_state_dict_unwrapping_errors(tmp_path):
    with pytest.raises(JaxmiaError, match="no dict of tensors under 'nope'"):
        torch_format.load_state_dict(DATA / "torch_reference_zip.pt", "nope")
    # the small object mixes tensors, lists and strings: not a state_dict
    with pytest.raises(JaxmiaError, match="expected a dict of tensors"):
        torch_format.load_state_dict(DATA / "torch_reference_legacy.pt")


# Checkpoints written opcode by opcode (no torch): one tensor of any shape, strides and offset.
_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "LongStorage": np.int64,
           "ByteStorage": np.uint8, "BoolStorage": np.bool_}  # fmt: skip


def _ops(value) -> bytes:
    """The opcodes that push ``value`` (a str, int, or tuple of ints)."""
    return pickle.dumps(value, 2)[2:-1]  # without PROTO and STOP


def _tensor_pickle(kind: str, numel: int, offset: int, size, stride, *, legacy: bool) -> bytes:
    pid = b"(" + _ops("storage") + f"ctorch\n{kind}\n".encode() + _ops("0") + _ops("cpu")
    pid += _ops(numel) + (b"N" if legacy else b"") + b"tQ"  # the tuple, then BINPERSID
    args = pid + _ops(offset) + _ops(tuple(size)) + _ops(tuple(stride))
    args += b"\x89" + b"ccollections\nOrderedDict\n)R"  # requires_grad False, no hooks
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR."


@st.composite
def _tensors(draw):
    kind = draw(st.sampled_from(sorted(_DTYPES)))
    ndim = draw(st.integers(0, 4))
    size = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    order = draw(st.permutations(range(ndim)))
    stride, step = [0] * ndim, 1
    for axis in order:  # any axis order, with gaps between rows
        stride[axis] = step
        step *= size[axis] + draw(st.integers(0, 2))
    offset = draw(st.integers(0, 5))
    reach = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    numel = max(reach + draw(st.integers(-2, 3)), 0)
    return kind, size, stride, offset, numel, reach


@settings(max_examples=60, deadline=None)
@given(case=_tensors(), legacy=st.booleans())
def test_any_strided_tensor(tmp_path_factory, case, legacy):
    kind, size, stride, offset, numel, reach = case
    dtype = _DTYPES[kind]
    storage = (np.arange(numel) * 7 % 11).astype(dtype)  # distinct-ish values, exact in each type
    pkl = _tensor_pickle(kind, numel, offset, size, stride, legacy=legacy)
    if legacy:
        head = b"".join(pickle.dumps(v, 2) for v in (0x1950A86A20F9469CFC6C, 1001, {}))
        data = head + pkl + pickle.dumps(["0"], 2) + np.int64(numel).tobytes() + storage.tobytes()
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/data/0", storage.tobytes())
        data = buf.getvalue()
    path = tmp_path_factory.mktemp("t") / "t.pt"
    path.write_bytes(data)
    if 0 not in size and reach > numel:
        with pytest.raises(JaxmiaError, match="reaches past its storage"):
            torch_format.load(path)
        return
    got = torch_format.load(path)
    # element idx of the tensor is storage[offset + idx . stride]
    index = offset + sum(i * s for i, s in zip(np.indices(size), stride, strict=True))
    want = storage[index] if 0 not in size else np.zeros(size, dtype)
    assert got.dtype == dtype and got.shape == tuple(size)
    np.testing.assert_array_equal(got, want)
