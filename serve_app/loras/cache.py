"""The disk cache of downloaded LoRA files: one directory, any number of processes, one size cap.

- Files are named by a hash of (canonical source, hash of the token that fetched it): a file fetched
  with a token is never found by a request without it, and no client text becomes a file name.
- A download writes a temporary `.part` file, reserved at its expected size (a sparse `ftruncate`,
  grown as bytes arrive when the size is unknown), so every process sees downloads in flight and the
  cap counts them: room is made by evicting least-recently-used complete files, and a download that
  cannot fit fails instead of overfilling the disk.
- A complete file appears only by `os.replace` after it was checked, so readers never see half a file.
- Eviction may delete a file another process is about to read: readers open it and read the bytes
  from the descriptor (`LoraSources.read`), so a file once opened stays readable; one evicted before
  it was opened is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Self

SUFFIX = ".safetensors"
PART_SUFFIX = ".part"
_GROW_BYTES = 8 * 2**20  # a download of unknown size reserves room in steps of at least this


class CacheFull(Exception):
    """The cap cannot hold this download even after evicting every complete file."""


def cache_key(source: str, token_digest: str | None = None) -> str:
    """The file name stem of a source fetched with (the hash of) a token, or without one."""
    text = source if token_digest is None else f"{source}\n{token_digest}"
    return hashlib.sha256(text.encode()).hexdigest()


class DownloadCache:
    """LRU disk cache with a size cap that counts downloads in flight (see module docstring).

    Args:
        directory: the cache directory (created on first write).
        cap_bytes: the most bytes that complete and in-flight files may take together.
        stale_part_s: a `.part` file untouched this long belongs to a download that died; it is removed.
    """

    def __init__(self, directory: Path, cap_bytes: int, stale_part_s: float):
        self.directory = Path(directory)
        self.cap_bytes = cap_bytes
        self.stale_part_s = stale_part_s
        self.evictions = 0
        self.reserving = threading.Lock()

    def path(self, key: str) -> Path:
        return self.directory / (key + SUFFIX)

    def contains(self, key: str) -> bool:
        """A hit makes the file the most recently used."""
        try:
            os.utime(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def open(self, key: str) -> BinaryIO | None:
        """The complete file opened for reading, or None if it is not (or no longer) cached."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        self.contains(key)  # LRU touch; the open descriptor stays readable whatever happens to the name
        return os.fdopen(fd, "rb")

    def part(self, key: str) -> PartFile:
        """A new temporary file for a download of `key`; use it as a context manager."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=PART_SUFFIX)
        return PartFile(self, key, os.fdopen(fd, "w+b"), Path(name))

    def make_room(self, extra: int = 0) -> None:
        """Evict least-recently-used complete files until everything, and `extra` more bytes, fit the cap.

        Raises:
            CacheFull: downloads in flight alone (with `extra`) exceed the cap.
        """
        complete, parts_bytes = self._scan()
        total = parts_bytes + extra + sum(size for _, size, _ in complete)
        for _, size, path in sorted(complete):
            if total <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evictions += 1
        if total > self.cap_bytes:
            raise CacheFull

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """(mtime, size, path) of complete files, and the bytes reserved by live downloads."""
        complete: list[tuple[float, int, Path]] = []
        parts_bytes = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return complete, 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if entry.name.endswith(PART_SUFFIX):
                if now - st.st_mtime > self.stale_part_s:
                    Path(entry.path).unlink(missing_ok=True)
                else:
                    parts_bytes += st.st_size
            elif entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                complete.append((st.st_mtime, st.st_size, Path(entry.path)))
        return complete, parts_bytes


class PartFile:
    """A download in flight: reserves its room in the cache as it learns or reaches its size."""

    def __init__(self, cache: DownloadCache, key: str, file: BinaryIO, path: Path):
        self.cache = cache
        self.key = key
        self.file = file
        self.path = path
        self.size = 0  # bytes written
        self.reserved = 0  # the file's apparent size: what other processes count
        self.published = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if not self.published:
            self.path.unlink(missing_ok=True)

    def expect(self, total: int) -> None:
        """The size the answer announced: reserve it at once (raises CacheFull)."""
        if total > self.reserved:
            self._reserve(total)

    def restart(self) -> None:
        """Start over (a retry); the reservation stays."""
        self.file.seek(0)
        self.size = 0

    def write(self, chunk: bytes) -> None:
        """Append bytes, reserving more room first when they pass the reservation (raises CacheFull)."""
        needed = self.size + len(chunk)
        if needed > self.reserved:
            self._reserve(max(needed, self.reserved + max(_GROW_BYTES, self.reserved // 4)))
        self.file.write(chunk)
        self.size = needed

    def seal(self) -> None:
        """The download is over: cut the reservation to the bytes written, ready to check."""
        self.file.flush()
        self.file.truncate(self.size)
        self.reserved = self.size

    def publish(self) -> Path:
        """Make the checked file visible to every reader, atomically."""
        dest = self.cache.path(self.key)
        os.replace(self.path, dest)
        self.published = True
        return dest

    def _reserve(self, total: int) -> None:
        # Room first, then the reservation (sparse: it counts against the cap, costs no disk yet). The
        # lock keeps this process's downloads from reserving the same room; another process may still
        # race us, so the cap is checked again after, and the later of two racers backs off.
        self.file.flush()
        with self.cache.reserving:
            self.cache.make_room(extra=total - self.reserved)
            os.ftruncate(self.file.fileno(), total)
            self.reserved = total
        self.cache.make_room()
