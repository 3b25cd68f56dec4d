"""Reading and writing the safetensors format without torch or the safetensors package.

A .safetensors file is an 8-byte little-endian header length, a JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__"}) and the raw little-endian tensor bytes. Reading maps the file
into memory (`np.memmap`), so a tensor costs nothing until a slice of it is
indexed: the checkpoint importer reads each device's shard straight from the
page cache and never holds a full host copy of a large model. Writing streams
tensor by tensor after a header computed from shapes alone, so an exporter can
fetch one parameter at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# A header larger than this is not a safetensors file (the reference reader's own bound).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A malformed or inconsistent safetensors file; the message names the file and entry."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset of the data, from the start of the file
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file: names, shapes and lazily read tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self._infos = _read_header(self.path)
        self._mmap: Optional[np.memmap] = None

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self._infos[name]

    def array(self, name: str) -> np.ndarray:
        """A read-only, memory-mapped view of tensor `name` (no bytes read yet)."""
        info = self.info(name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[info.begin:info.end]
        return raw.view(info.dtype).reshape(info.shape)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(f"{path}: header length {header_len} does not fit the file ({size} bytes); "
                                   "not a safetensors file or truncated")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a {type(header).__name__}, expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry, data_start, size)
    return metadata, infos


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SafetensorsError(f"{where}: header entry must have dtype, shape and data_offsets, got {entry!r}")
    code = entry["dtype"]
    if code not in DTYPES:
        raise SafetensorsError(f"{where}: field dtype={code!r} is not one of {sorted(DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: field shape={shape!r} is not a list of non-negative ints")
    offsets = entry["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: field data_offsets={offsets!r} is not [begin, end] with begin <= end")
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but dtype {code} "
                               f"and shape {shape} need {expected}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise SafetensorsError(f"{where}: data ends at byte {end} but the file has {size} bytes (truncated?)")
    return TensorInfo(dtype, tuple(shape), begin, end)


@dataclasses.dataclass(frozen=True)
class TensorToWrite:
    """A tensor to stream into a file: its name, shape, dtype and a producer of its values."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_stream(filename: str | os.PathLike, tensors: Iterable[TensorToWrite],
                 metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes tensors one at a time: each `produce()` is called only when its bytes are due.

    The file is written under a temporary name and renamed at the end, so an
    interrupted export never leaves a truncated file with the final name.
    """
    tensors = sorted(tensors, key=lambda t: t.name)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        dtype = np.dtype(t.dtype)
        if dtype not in _CODES:
            raise ValueError(f"{t.name}: dtype {dtype} cannot be written to safetensors")
        header[t.name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    tmp = f"{filename}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            array = np.asarray(t.produce())
            if array.shape != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
                raise ValueError(f"{t.name}: produced {array.dtype}{list(array.shape)}, "
                                 f"announced {np.dtype(t.dtype)}{list(t.shape)}")
            f.write(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes())
    os.replace(tmp, filename)


def write(filename: str | os.PathLike, tensors: Mapping[str, np.ndarray],
          metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes in-memory numpy arrays to one safetensors file."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    write_stream(filename, [TensorToWrite(name, a.shape, a.dtype, lambda a=a: a) for name, a in arrays.items()],
                 metadata)


def read(filename: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a file, copied into memory (small files: tests, adapters)."""
    f = SafetensorsFile(filename)
    return {name: np.array(f.array(name)) for name in f.names()}
