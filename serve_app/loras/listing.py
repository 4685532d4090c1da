"""The LoRA files a client may name by path: the `.safetensors` files under the LoRA root (GET /v1/loras).

A file is listed only under the name a request sends for it (`loras[].path`: relative, '/'-separated) and
only when the source policy (`LoraSources.canonical`) accepts that very name as that very file, so a
symlink that leads out of the root, or a name the policy would read otherwise, is never offered. The walk
never enters a hidden folder (where a URL download cache kept under the root belongs), the configured
download cache wherever it is, or a folder behind a symlink (so it stays in the root's own tree and cannot
loop). Hidden files are skipped too.

It reads the disk on the caller's thread: the ingress runs it on a worker thread, as the root may be slow
network storage. Plain Python: no Ray here.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass

from serve_app.errors import ApiError
from serve_app.loras.sources import SUFFIX, LoraSources

MAX_LISTED = 1000  # files in one answer: the first ones by name; a page's suggestions need no more


@dataclass(frozen=True)
class RootFile:
    """One listed file: its name as a request sends it, and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True)
class RootListing:
    """The first `limit` files by name; `truncated` when the root holds more."""

    files: list[RootFile]
    truncated: bool


def list_root(sources: LoraSources, limit: int = MAX_LISTED) -> RootListing:
    """The LoRA files under `sources`' root that its policy accepts by path, sorted by name (module docstring).

    A missing or unreadable root lists nothing; a folder that cannot be read is left out.
    """
    root = os.path.realpath(sources.args.root)
    cache = os.path.realpath(sources.args.cache_dir)
    # The smallest names without holding the whole tree in memory.
    first = heapq.nsmallest(limit + 1, _accepted(sources, _candidates(root, cache)))
    return RootListing([RootFile(path, size) for path, size in first[:limit]], truncated=len(first) > limit)


def _accepted(sources: LoraSources, candidates: Iterator[tuple[str, str]]) -> Iterator[tuple[str, int]]:
    """(name, size) of each candidate that a request may name as it is: the policy's own check decides."""
    for rel, full in candidates:
        try:
            if sources.canonical(rel) != rel:
                continue
            size = os.stat(full).st_size  # through a symlink inside the root: its target's size
        except (ApiError, OSError):  # refused (outside the root, not a file...) or gone since it was seen
            continue
        yield rel, size


def _candidates(root: str, skip: str) -> Iterator[tuple[str, str]]:
    """(relative name, full path) of each non-hidden `.safetensors` entry under `root`, folder by folder.

    A stack rather than recursion: no depth of folders can exhaust Python's.
    """
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        folders, files = [], []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):  # a symlink to a folder is not entered
                        if entry.path != skip:
                            folders.append((entry.path, f"{prefix}{entry.name}/"))
                    elif entry.name.lower().endswith(SUFFIX):
                        files.append((f"{prefix}{entry.name}", entry.path))
        except OSError:  # unreadable, or gone since its parent was read
            continue
        pending.extend(folders)
        yield from files
