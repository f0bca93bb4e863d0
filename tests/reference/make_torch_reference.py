"""Makes tests/test_torch_format.py's references with PyTorch (run once; the tests need no torch).

Writes, beside this script:

- ``torch_reference_zip.pt`` and ``torch_reference_legacy.pt``: one small object saved in both
  ``torch.save`` formats, with the cases a reader can get wrong (a transposed view with a
  storage offset, a strided half-precision slice, bfloat16, int64, bool, an ``nn.Parameter``,
  an empty tensor, nested lists and dicts); the test rebuilds the expected arrays with numpy;
- ``torch_reference.npz``: for every tensor of the two real checkpoints (``efficientnet_lite0``'s
  legacy ``.pth`` and ``dcgan_face``'s zip ``weights.tar``), as ``torch.load`` reads them: the
  name, the shape, the dtype, the float64 sum, the sum of absolute values and the first and last
  elements; and checks here that ``jaxmia.pretrained.torch_format.load`` gives every tensor
  bit for bit.

Run: ``python tests/reference/make_torch_reference.py`` (needs torch and the fetched models).
"""

from pathlib import Path

import numpy as np
import torch

from jaxmia.pretrained import fetch, torch_format

HERE = Path(__file__).parent
REAL = {"efficientnet_lite0": None, "dcgan_face": "netG_state_dict"}


def small_object() -> dict:
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "view": x[1:, 2:].t(),  # offset 8, strides (1, 6)
        "half": x.half()[::2, 1::3],  # strided
        "bf16": x.bfloat16() / 4,
        "long": torch.arange(-3, 4, dtype=torch.int64),
        "bool": x > 10,
        "param": torch.nn.Parameter(x[3]),
        "empty": torch.zeros(0, 3),
        "nested": [x[2], {"text": "kept", "number": 3, "pair": (x[0, :2], 1.5)}],
    }


def main() -> None:
    obj = small_object()
    torch.save(obj, HERE / "torch_reference_zip.pt")
    torch.save(obj, HERE / "torch_reference_legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("torch_reference_zip.pt", "torch_reference_legacy.pt"):
        ours = torch_format.load(HERE / name)
        assert np.array_equal(ours["view"], obj["view"].numpy()), name
        assert np.array_equal(ours["bf16"], obj["bf16"].float().numpy()), name

    out = {}
    for model, key in REAL.items():
        path = next(iter(fetch.model_files(model).values()))
        ref = torch.load(path, map_location="cpu", weights_only=True)
        ref = ref[key] if key else ref
        ours = torch_format.load_state_dict(path, key)
        assert list(ours) == list(ref), model
        names, rows, shapes = [], [], []
        for name, t in ref.items():
            a = t.numpy()
            assert ours[name].dtype == a.dtype and np.array_equal(ours[name], a), name
            f = a.astype(np.float64).ravel()
            names.append(name)
            shapes.append(",".join(map(str, a.shape)))
            rows.append([f.sum(), np.abs(f).sum(), f[0], f[-1]])
        out[f"{model}_names"] = np.array(names)
        out[f"{model}_shapes"] = np.array(shapes)
        out[f"{model}_dtypes"] = np.array([str(t.numpy().dtype) for t in ref.values()])
        out[f"{model}_stats"] = np.array(rows)  # [tensors, 4]: sum, abs sum, first, last
        print(f"{model}: {len(names)} tensors equal to torch.load's")
    np.savez_compressed(HERE / "torch_reference.npz", **out)


if __name__ == "__main__":
    main()
