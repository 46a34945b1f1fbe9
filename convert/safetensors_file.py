"""Reading a safetensors file one tensor at a time, with errors that name the file and tensor.

The format (https://github.com/huggingface/safetensors): bytes 0..7 hold N, the header length,
as an unsigned little-endian 64-bit integer; bytes 8..8+N hold a UTF-8 JSON object
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}`` with an
optional ``"__metadata__": {str: str}``, possibly padded with spaces; the data follows, and
each tensor's bytes are ``data[begin:end]``, row-major, little-endian.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a read
touches stays in the process's resident set until the handle closes, so streaming a 20 GB
checkpoint through one handle shows 20 GB of RSS. Here each tensor is ``pread`` into a fresh
buffer, so the resident set holds only the tensors in flight. The header is also checked
up front (truncation, overlapping or out-of-range offsets, unknown dtypes, size vs shape), so
a corrupt file fails before any output is written, with a message naming the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes (those this torch build has).
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
COPY_CHUNK_BYTES = 16 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file is not a valid safetensors file, or a tensor in it is not what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes are and what they mean."""

    name: str
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point


class SafetensorsFile:
    """An open safetensors file: its header parsed and validated, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            self.metadata, self.tensors = self._read_header()
        except BaseException:
            self.close()
            raise

    # -- header ---------------------------------------------------------------------------
    def _fail(self, message: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {message}")

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._fail(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise self._fail(
                f"header length {header_len} does not fit a {size}-byte file (truncated, or not safetensors)")
        raw = os.pread(self._fd, header_len, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not valid UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail(f"header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + header_len
        data_len = size - data_start
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry, data_start, data_len)
        # Tensors must not overlap (safetensors also forbids gaps, but readers tolerate them).
        spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.nbytes)
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise self._fail(f"tensors '{name_a}' and '{name_b}' overlap in the data section")
        return metadata, tensors

    def _parse_entry(self, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._fail(f"tensor '{name}': header entry needs dtype, shape and data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"tensor '{name}': unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise self._fail(f"tensor '{name}': data_offsets must be [begin, end] with begin <= end, got {offsets!r}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise self._fail(
                f"tensor '{name}': {dtype} {tuple(shape)} needs {expected} bytes but its data_offsets "
                f"span {offsets[1] - offsets[0]}")
        if offsets[1] > data_len:
            raise self._fail(
                f"tensor '{name}': data ends at byte {offsets[1]} of the data section, but the file holds "
                f"only {data_len} data bytes (truncated file?)")
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    # -- data -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._fail(f"no tensor named '{name}'") from None

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name``, read into fresh memory (never a view of a mapping)."""
        info = self.info(name)
        if not info.nbytes:
            tensor = torch.empty(info.shape, dtype=info.torch_dtype)
        else:
            # A bytearray, not numpy: torch.frombuffer keeps it alive and shares its memory.
            buffer = bytearray(info.nbytes)
            self._read_into(info, memoryview(buffer))
            tensor = torch.frombuffer(buffer, dtype=info.torch_dtype).reshape(info.shape)
        return tensor.to(device) if torch.device(device).type != "cpu" else tensor

    def raw_chunks(self, name: str, chunk: int = COPY_CHUNK_BYTES) -> Iterator[bytes]:
        """A tensor's bytes exactly as stored, in chunks (for byte-identical pass-through)."""
        info = self.info(name)
        pos = info.begin
        while pos < info.end:
            n = min(chunk, info.end - pos)
            data = os.pread(self._fd, n, pos)
            if len(data) != n:
                raise self._fail(f"tensor '{name}': short read at byte {pos} (file changed or truncated)")
            yield data
            pos += n

    def _read_into(self, info: TensorInfo, view: memoryview) -> None:
        done = 0
        while done < info.nbytes:
            try:
                n = os.preadv(self._fd, [view[done:]], info.begin + done)
            except OSError as exc:
                raise self._fail(f"tensor '{info.name}': read error ({exc.strerror})") from None
            if n <= 0:
                raise self._fail(f"tensor '{info.name}': short read at byte {info.begin + done} "
                                 "(file changed or truncated)")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()
