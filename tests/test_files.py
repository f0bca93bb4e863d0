import json
import os

import numpy as np
import pytest

from jaxmia import files


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_outputs_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_savez_and_jsonl(tmp_path):
    files.savez(tmp_path / "a.npz", x=np.arange(3))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    files.append_jsonl(tmp_path / "m.jsonl", {"epoch": 1, "v": np.float32(0.5)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"epoch": 2, "v"')  # a line cut by a crash
    assert files.read_jsonl(tmp_path / "m.jsonl") == [{"epoch": 1, "v": 0.5}]
    assert files.read_jsonl(tmp_path / "none.jsonl") == []
