"""An incremental safetensors writer that never leaves a partial output behind.

The safetensors library writes a whole dict at once, so a streaming converter would have to
hold the model in memory. This writer takes one tensor at a time and writes the format itself
(see ``safetensors_file`` for the byte layout):

1. Each tensor's bytes go to an anonymous spool file (``O_TMPFILE``-style, deleted by the
   kernel even if the process is killed) beside the output, one spool per element size
   (8, 4, 2, 1 bytes), while the header entries are collected in memory.
2. ``commit`` writes ``len(header) + header`` into a named temporary file beside the output,
   appends the spools largest element size first, ``fsync``s it and renames it over the
   output. Ordering by element size is what ``safetensors.torch.save_file`` does too: every
   tensor then starts on a multiple of its element size (the header is padded with spaces to
   a multiple of 8), so readers that map the file can view tensors in place.
3. Any failure (an exception, Ctrl-C, a full disk) before the rename removes the temporary
   file; the output path is either untouched or the complete new file.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .safetensors_file import DTYPE_NAMES, DTYPES, SafetensorsError


class OutputExistsError(FileExistsError):
    """The output exists and overwriting was not asked for."""


class WriteError(OSError):
    """Writing the output failed (full disk, I/O error); the message names the tensor."""


def _copy_all(src, dst) -> None:
    """Append all of ``src`` to ``dst`` (both binary file objects), in the kernel when possible."""
    src.flush()
    dst.flush()  # copy_file_range works on the descriptors: nothing may sit in Python's buffer
    src.seek(0)
    try:
        remaining = os.fstat(src.fileno()).st_size
        while remaining:
            n = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
            if n == 0:
                break
            remaining -= n
        dst.seek(0, os.SEEK_END)
    except (AttributeError, OSError) as exc:  # no copy_file_range here: copy through Python
        if isinstance(exc, OSError) and exc.errno not in (18, 22, 38, 95):  # EXDEV EINVAL ENOSYS EOPNOTSUPP
            raise
        src.seek(0)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor without a copy (and without needing numpy).

    Valid while ``tensor`` lives; ``add`` holds it for the duration of the write.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class SafetensorsWriter:
    """Collect tensors one by one; ``commit()`` publishes the file atomically.

    Use as a context manager: leaving the block without ``commit()`` (an exception, Ctrl-C)
    discards everything written so far.
    """

    def __init__(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                 overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path} exists; pass --overwrite to replace it")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: output directory does not exist")
        self.metadata = dict(metadata or {})
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {}  # dtype, shape, itemsize, offset, len
        self._spools: dict[int, tuple[object, int]] = {}  # element size -> (file, bytes written)
        self._closed = False
        self.bytes_written = 0

    # -- adding tensors -----------------------------------------------------------------------
    def _spool(self, itemsize: int):
        if itemsize not in self._spools:
            spool = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.")
            self._spools[itemsize] = (spool, 0)
        return self._spools[itemsize]

    def _check_new(self, name: str) -> None:
        if self._closed:
            raise RuntimeError("writer already committed or aborted")
        if name in self._entries:
            raise SafetensorsError(f"{self.path}: tensor '{name}' written twice")

    def add_raw(self, name: str, dtype: str, shape: Iterable[int], chunks: Iterable[bytes]) -> None:
        """Append a tensor from its stored bytes (``dtype`` in safetensors spelling)."""
        self._check_new(name)
        itemsize = DTYPES[dtype].itemsize
        spool, offset = self._spool(itemsize)
        length = 0
        try:
            for chunk in chunks:
                spool.write(chunk)
                length += len(chunk)
        except OSError as exc:
            raise WriteError(exc.errno, f"writing tensor '{name}' beside {self.path}: {exc.strerror}") from None
        self._spools[itemsize] = (spool, offset + length)
        self._entries[name] = (dtype, tuple(shape), itemsize, offset, length)
        self.bytes_written += length

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append a (dense, non-quantized) tensor."""
        if tensor.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"tensor '{name}': dtype {tensor.dtype} cannot be stored in safetensors")
        tensor = tensor.detach().to("cpu").contiguous()
        self.add_raw(name, DTYPE_NAMES[tensor.dtype], tensor.shape, [_bytes_view(tensor)])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    # -- publishing -------------------------------------------------------------------------------
    def _header(self) -> bytes:
        starts, position = {}, 0
        for itemsize in sorted(self._spools, reverse=True):
            starts[itemsize] = position
            position += self._spools[itemsize][1]
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        for name, (dtype, shape, itemsize, offset, length) in self._entries.items():
            begin = starts[itemsize] + offset
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + length]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return raw + b" " * (-len(raw) % 8)

    def commit(self) -> None:
        """Write the final file beside the output, fsync it, and rename it into place."""
        if self._closed:
            raise RuntimeError("writer already committed or aborted")
        fd, tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                header = self._header()
                out.write(len(header).to_bytes(8, "little"))
                out.write(header)
                for itemsize in sorted(self._spools, reverse=True):
                    _copy_all(self._spools[itemsize][0], out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, self.path)
        except BaseException as exc:
            Path(tmp_name).unlink(missing_ok=True)
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, WriteError):
                raise WriteError(exc.errno, f"writing {self.path}: {exc.strerror or exc}") from None
            raise
        self._close_spools()
        try:  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def _close_spools(self) -> None:
        for spool, _ in self._spools.values():
            spool.close()
        self._spools.clear()
        self._closed = True

    def abort(self) -> None:
        """Discard everything; the output path is left as it was."""
        if not self._closed:
            self._close_spools()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
