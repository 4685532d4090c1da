"""LoRA files as the loader receives them: opened safely, checked, read into memory at hand-over.

A loader gets a `LoraFile` (the tensors, read from bytes this process holds), never a path: a file
that another process evicts from the download cache, or a directory of the LoRA root swapped for a
symlink, can no longer change what is loaded once the file is open. A root-relative file is
verified after it is opened (the kernel says which file the descriptor holds), so a swap between
the policy check and the open is caught too.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from serve_app.loras.errors import forbidden, invalid, not_found

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True, eq=False)
class LoraFile:
    """One LoRA file, read and checked: what `FluxEngine.load_adapter` takes.

    Attributes:
        source: the canonical source (what messages and adapter names are made from).
        tensors: the safetensors state dict, on CPU.
        metadata: the file's `__metadata__` (str -> str), {} when it has none.
        size: the file's size in bytes.
    """

    source: str
    tensors: dict[str, Any] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)
    size: int


def check_safetensors(f: BinaryIO, size: int, label: str, max_bytes: int) -> dict:
    """Check size and safetensors structure from the header alone; return the header.

    Args:
        f: the file, positioned anywhere (it is read from the start).
        size: its size in bytes.
        label: how messages name it (the source, never a server path).
        max_bytes: the largest file accepted.

    Raises:
        ApiError: LORA_INVALID, saying what is wrong.
    """
    if size > max_bytes:
        raise invalid(label, f"larger than {max_bytes} bytes ({size} bytes)")
    if size == 0:
        raise invalid(label, "empty file")
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise invalid(label, "not a safetensors file (truncated: shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0 or header_len > MAX_HEADER_BYTES:
        raise invalid(label, "not a safetensors file (its header length is not sane)")
    if header_len > size - 8:
        raise invalid(label, "truncated (the header runs past the end of the file)")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, ValueError):
        raise invalid(label, "not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise invalid(label, "not a safetensors file (the header is not a JSON object)")
    _check_tensors(label, header, size - 8 - header_len)
    return header


def _check_tensors(label: str, header: dict, data_len: int) -> None:
    """Every tensor entry is well-formed and its bytes lie inside the file; there is at least one.

    Messages quote nothing of the header: for a download those would be a remote host's bytes.
    """
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise invalid(label, "empty (the file holds no tensors)")
    for info in tensors.values():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise invalid(label, "not a safetensors file (a tensor has no valid data_offsets)")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise invalid(label, "not a safetensors file (a tensor has offsets that make no sense)")
        if end > data_len:
            raise invalid(label, "truncated (a tensor ends past the end of the file)")


def read_lora(f: BinaryIO, source: str, max_bytes: int) -> LoraFile:
    """Read an open file whole, check it and turn it into tensors (the hand-over to a loader).

    Raises:
        ApiError: LORA_INVALID for a file that is not a usable safetensors file.
    """
    import safetensors
    import safetensors.torch

    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise invalid(source, f"larger than {max_bytes} bytes ({size} bytes)")
    f.seek(0)
    data = f.read(size + 1)
    if len(data) != size:
        raise invalid(source, "the file changed while it was read")
    header = check_safetensors(io.BytesIO(data), size, source, max_bytes)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise invalid(source, "not a safetensors file (its __metadata__ is not a map of strings)")
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError):
        raise invalid(source, "not a safetensors file (its tensors cannot be read)") from None
    return LoraFile(source=source, tensors=tensors, metadata=metadata, size=size)


def looks_like_html(head: bytes) -> bool:
    """An HTML page starts with '<'. A safetensors file may too (its header length's low byte can be
    0x3C), but then byte 8 opens its JSON header with '{' -- so that case is not HTML."""
    return head[8:9] != b"{" and head.lstrip()[:1] == b"<"


# ---- root-relative files -------------------------------------------------------------------------


def is_inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def resolve_in_root(root: str, rel: str) -> str:
    """The real path of `root/rel`, refused if it leads outside the root.

    Raises:
        ApiError: LORA_SOURCE_FORBIDDEN outside the root; LORA_NOT_FOUND when the path changes
            under our feet (a component swapped while it is resolved).
    """
    try:
        real = os.path.realpath(os.path.join(root, rel))
    except OSError:
        raise not_found(rel, "changed while it was looked up under the LoRA root") from None
    if not is_inside(root, real):
        raise forbidden(rel, "it resolves (through a symlink) outside the LoRA root")
    return real


def open_in_root(root: str, rel: str) -> BinaryIO:
    """Open `root/rel` for reading, as a regular file that is under `root` once it is open.

    Symlinks inside the root are followed as long as the file they lead to is under the root; the
    check is made on the open descriptor, so no rename or symlink swap in between can redirect it.

    Raises:
        ApiError: LORA_SOURCE_FORBIDDEN (outside the root), LORA_NOT_FOUND, LORA_INVALID (unreadable).
    """
    real = resolve_in_root(root, rel)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: a FIFO swapped in cannot block us
    except (FileNotFoundError, NotADirectoryError):
        raise not_found(rel, "not found under the LoRA root") from None
    except OSError as exc:  # ELOOP: a symlink swapped in after the check; EACCES: unreadable
        if _is_symlink_error(exc):
            raise forbidden(rel, "it changed into a symlink while it was opened") from None
        raise invalid(rel, f"cannot be read ({type(exc).__name__})") from None
    try:
        try:
            opened = _opened_path(fd)
        except OSError:  # no /proc: we cannot tell where the descriptor leads, so we do not read it
            raise forbidden(rel, "the server cannot check where this file lies") from None
        if not is_inside(root, opened):
            raise forbidden(rel, "it resolves (through a symlink) outside the LoRA root")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_found(rel, "not found under the LoRA root (not a regular file)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_symlink_error(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.ELOOP, getattr(errno, "EMLINK", -1))


def _opened_path(fd: int) -> str:
    """The path of the file an open descriptor holds, as the kernel knows it now."""
    if sys.platform == "darwin":
        import fcntl

        return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
    path = os.readlink(f"/proc/self/fd/{fd}")
    return path.removesuffix(" (deleted)")
