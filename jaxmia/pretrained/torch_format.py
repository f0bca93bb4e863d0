"""PyTorch checkpoints read without PyTorch: tensors as numpy arrays, no code run from the file.

``torch.save`` writes one of two formats:

- the zip format (PyTorch >= 1.6): a zip archive whose single top folder holds ``data.pkl`` (the
  pickled object, its tensors' storages as persistent ids ``("storage", type, key, location,
  numel)``), ``data/<key>`` (each storage's raw bytes) and ``byteorder`` (``little`` or ``big``;
  absent in old files, which are little-endian);
- the legacy format: five pickles one after another in the file (a magic number, the protocol
  version, the system's byte order and type sizes, the object itself, the list of storage keys)
  followed by each storage in that order as an int64 element count and the raw bytes.

A pickle can call any importable function, so the object pickles are read by an unpickler that
admits only the names a tensor checkpoint needs (``_TRUSTED``: the tensor and parameter rebuild
functions, ``OrderedDict`` and the typed storage classes) and refuses any other global with a
``JaxmiaError`` naming it; tensors become numpy arrays (offset and strides applied, copied into
contiguous memory), so nothing in a file can construct an object of any other type.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jaxmia.errors import JaxmiaError

# The legacy format's first pickle (torch.serialization.MAGIC_NUMBER) and the protocol it names.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch's typed storage classes -> the numpy dtype of their elements. bfloat16 has no numpy dtype:
# its 16 bits are the top half of a float32's, so it is read as uint16 and widened.
_STORAGES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """A typed storage class as the pickle names it: only its element type matters here."""

    name: str
    dtype: str


@dataclasses.dataclass
class _Storage:
    """One storage: its elements once read (the legacy format reads them after the pickle)."""

    key: str
    kind: _StorageType
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _View:
    """A legacy file's view of a storage: ``numel`` elements from ``offset`` of ``root``."""

    root: _Storage
    offset: int
    numel: int


@dataclasses.dataclass
class _Tensor:
    """A tensor before its storage is read: a strided view into it."""

    storage: _Storage | _View
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    # requires_grad, backward hooks and metadata do not change the values.
    if not isinstance(storage, (_Storage, _View)):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    return _Tensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, *_ignored):
    return data  # an nn.Parameter's values are its tensor's


_TRUSTED: dict[tuple[str, str], Callable | _StorageType] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Admits only ``_TRUSTED`` globals; storages come from ``storages`` by key."""

    def __init__(self, file: BinaryIO, source: str, storage: Callable[[tuple], Any]):
        super().__init__(file)
        self._source = source
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        found = _TRUSTED.get((module, name))
        if found is None:
            raise JaxmiaError(
                f"torch checkpoint {self._source}: refused the global {module}.{name} (only "
                "tensors, numbers, strings and dicts are read; a checkpoint that names other "
                "code can run it)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise JaxmiaError(
                f"torch checkpoint {self._source}: refused the persistent id {str(pid)[:60]!r} "
                "(expected a tensor storage)"
            )
        return self._storage(pid[1:])


def _storage_type(kind: Any) -> _StorageType:
    if not isinstance(kind, _StorageType):
        raise pickle.UnpicklingError(f"a storage of type {kind!r}")
    return kind


def _elements(raw: bytes, kind: _StorageType, big_endian: bool) -> np.ndarray:
    """The numpy array of a storage's raw bytes, in the machine's byte order."""
    order = ">" if big_endian else "<"
    if kind.dtype == "bf16":
        bits = np.frombuffer(raw, np.dtype("u2").newbyteorder(order)).astype(np.uint32) << 16
        return bits.view(np.float32)
    stored = np.dtype(kind.dtype).newbyteorder(order)
    return np.frombuffer(raw, stored).astype(stored.newbyteorder("="), copy=False)


def _itemsize(kind: _StorageType) -> int:
    return 2 if kind.dtype == "bf16" else np.dtype(kind.dtype).itemsize


def _materialise(obj: Any, source: str) -> Any:
    """``obj`` with every ``_Tensor`` replaced by a contiguous numpy array (dicts made plain)."""
    if isinstance(obj, _Tensor):
        view = obj.storage
        root = view.root if isinstance(view, _View) else view
        if root.data is None:
            raise JaxmiaError(f"torch checkpoint {source}: storage {root.key} has no data")
        data = root.data[view.offset : view.offset + view.numel] if view is not root else root.data
        # the last element any index reaches must lie inside the storage
        reach = obj.offset + sum(
            (n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True) if n > 0
        )
        empty = any(n == 0 for n in obj.size)
        if obj.offset < 0 or any(s < 0 for s in obj.stride) or (not empty and reach >= data.size):
            raise JaxmiaError(
                f"torch checkpoint {source}: a tensor of shape {obj.size} reaches past its "
                f"storage {root.key} ({data.size} elements): the file is corrupt"
            )
        if empty:
            return np.zeros(obj.size, data.dtype)
        step = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[obj.offset :], obj.size, tuple(s * step for s in obj.stride), writeable=False
        )
        return np.array(view, order="C")  # own, C-ordered memory: no view into the bytes read
    if isinstance(obj, Mapping):
        return {k: _materialise(v, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, source) for v in obj)
    return obj


def _read_zip(archive: zipfile.ZipFile, source: str) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise JaxmiaError(
            f"torch checkpoint {source}: a zip without one <folder>/data.pkl "
            "(not a torch.save file)"
        )
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    big = False
    if prefix + "byteorder" in names:
        order = archive.read(prefix + "byteorder").decode(errors="replace").strip()
        if order not in ("little", "big"):
            raise JaxmiaError(
                f"torch checkpoint {source}: byteorder {order!r}, expected little/big"
            )
        big = order == "big"
    storages: dict[str, _Storage] = {}

    def storage(pid: tuple) -> _Storage:
        kind, key, _location, numel = pid[:4]
        key = str(key)
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise JaxmiaError(f"torch checkpoint {source}: storage {member} is missing")
            kind = _storage_type(kind)
            raw = archive.read(member)
            if len(raw) != int(numel) * _itemsize(kind):
                raise JaxmiaError(
                    f"torch checkpoint {source}: storage {member} has {len(raw)} bytes, expected "
                    f"{int(numel)} {kind.name} elements: the file is corrupt"
                )
            storages[key] = _Storage(key, kind, int(numel), _elements(raw, kind, big))
        return storages[key]

    with archive.open(pickles[0]) as f:
        obj = _Unpickler(io.BytesIO(f.read()), source, storage).load()
    return _materialise(obj, source)


def _read_legacy(f: BinaryIO, source: str) -> Any:
    def plain() -> Any:  # the header pickles hold only numbers, strings and dicts
        return _Unpickler(f, source, lambda pid: None).load()

    if plain() != _LEGACY_MAGIC:
        raise JaxmiaError(f"torch checkpoint {source}: not a torch.save file (no magic number)")
    protocol = plain()
    if protocol != _LEGACY_PROTOCOL:
        raise JaxmiaError(f"torch checkpoint {source}: legacy protocol {protocol!r}, expected 1001")
    info = plain()
    big = isinstance(info, Mapping) and info.get("little_endian") is False
    storages: dict[str, _Storage] = {}

    def storage(pid: tuple) -> Any:
        kind, key, _location, numel, view = (*pid, None)[:5]
        key = str(key)
        if key not in storages:
            storages[key] = _Storage(key, _storage_type(kind), int(numel))
        if view is not None:  # (view key, offset, numel) inside the root storage
            return _View(storages[key], int(view[1]), int(view[2]))
        return storages[key]

    obj = _Unpickler(f, source, storage).load()
    keys = plain()
    if not isinstance(keys, list):
        raise JaxmiaError(f"torch checkpoint {source}: the storage key list is not a list")
    for key in keys:
        if str(key) not in storages:
            raise JaxmiaError(f"torch checkpoint {source}: data for an unknown storage {key!r}")
        s = storages[str(key)]
        head = f.read(8)
        if len(head) != 8:
            raise JaxmiaError(f"torch checkpoint {source}: truncated before storage {key}")
        (numel,) = struct.unpack(">q" if big else "<q", head)
        size = numel * _itemsize(s.kind)
        raw = f.read(size)
        if numel != s.numel or len(raw) != size:
            raise JaxmiaError(
                f"torch checkpoint {source}: storage {key} holds {len(raw)} of "
                f"{s.numel * _itemsize(s.kind)} bytes: the file is truncated or corrupt"
            )
        s.data = _elements(raw, s.kind, big)
    return _materialise(obj, source)


def load(path: str | Path) -> Any:
    """The object a ``torch.save`` file holds, its tensors as numpy arrays.

    Dicts (``OrderedDict`` included) come back as plain dicts, lists and tuples as they were.

    Raises:
      JaxmiaError: the file is missing, truncated or corrupt, or its pickle names a global
        other than the tensor-rebuilding ones (the message names it).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise JaxmiaError(f"torch checkpoint {source}: not found")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _read_zip(archive, source)
        with open(path, "rb") as f:
            return _read_legacy(f, source)
    except JaxmiaError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            IndexError, KeyError, AttributeError, struct.error, OSError) as e:  # fmt: skip
        said = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise JaxmiaError(
            f"torch checkpoint {source}: unreadable ({said}); expected a torch.save file"
        ) from None


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
    """A ``state_dict`` (name -> array) from a ``torch.save`` file, unwrapped from a checkpoint.

    Args:
      path: the file.
      key: the entry of a checkpoint dict that holds the weights (e.g. ``"netG_state_dict"``);
        None: the file's dict itself when all its values are arrays, else its ``"state_dict"``
        or ``"model"`` entry, else its only entry that is a dict of arrays.

    Raises:
      JaxmiaError: as ``load``, or no dict of arrays where one was expected.
    """
    obj = load(path)

    def tensors(d: Any) -> bool:
        return (
            isinstance(d, Mapping)
            and bool(d)
            and all(isinstance(v, np.ndarray) for v in d.values())
        )

    if not isinstance(obj, Mapping):
        raise JaxmiaError(f"torch checkpoint {path}: holds a {type(obj).__name__}, expected a dict")
    if key is not None:
        if not tensors(obj.get(key)):
            raise JaxmiaError(
                f"torch checkpoint {path}: no dict of tensors under {key!r} (it holds "
                f"{', '.join(map(repr, obj))})"
            )
        return dict(obj[key])
    if tensors(obj):
        return dict(obj)
    for wrapper in ("state_dict", "model"):
        if tensors(obj.get(wrapper)):
            return dict(obj[wrapper])
    inner = [k for k, v in obj.items() if tensors(v)]
    if len(inner) == 1:
        return dict(obj[inner[0]])
    raise JaxmiaError(
        f"torch checkpoint {path}: expected a dict of tensors (model.state_dict()) or a checkpoint "
        f"holding one; it holds {', '.join(map(repr, obj))}"
    )


class StateDictReader:
    """Takes a ``state_dict``'s tensors by name and shape, then refuses any left over.

    A module's loader asks for each tensor it needs (``take``), marks the ones it knows and does
    not need (``skip``), and ends with ``finish``, so a file of another network is an error
    naming the first tensor at fault, never a silently half-loaded model.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], what: str):
        self.state_dict = state_dict
        self.what = what  # e.g. "DCGAN generator weights.tar"
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` as float32, checked to have ``shape``."""
        if name not in self.state_dict:
            raise JaxmiaError(f"{self.what}: missing {name!r} (shape {shape})")
        a = np.asarray(self.state_dict[name], np.float32)
        if a.shape != shape:
            raise JaxmiaError(f"{self.what}: {name!r} has shape {a.shape}, expected {shape}")
        self.used.add(name)
        return a

    def skip(self, name: str) -> None:
        """A tensor the module does not need (batch norm's step count)."""
        self.used.add(name)

    def finish(self, hint: str) -> None:
        """Raises a JaxmiaError naming the first tensor no ``take`` or ``skip`` asked for."""
        left = sorted(set(self.state_dict) - self.used)
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise JaxmiaError(f"{self.what}: unexpected {left[0]!r}{more} ({hint})")
