"""Grouping work items into pipeline calls: one BatchKey per call, cut by a pixel budget.

Batching is not free for a diffusion model (on 2 CPU cores one call of 8 images at 512² cost
1.34× per image of single calls: bench/results/batching.md), so a key's group is cut into calls
of at most max(1, pixel_budget // (width·height)) items: large images run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from serve_app.workitems import BatchKey


def max_items_per_call(key: BatchKey, pixel_budget: int, engine_limit: int | None = None) -> int:
    """max(1, pixel_budget // pixels), and no more than the engine's own limit when it has one."""
    size = max(1, pixel_budget // key.pixels)
    return size if engine_limit is None else min(size, engine_limit)


def plan_calls(keys: Sequence[BatchKey], pixel_budget: int, engine_limit: int | None = None) -> list[list[int]]:
    """Indices of items grouped into calls: same key only, in arrival order, within the budget and the
    engine's limit of images per call (None: no limit of its own)."""
    groups: dict[BatchKey, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    calls: list[list[int]] = []
    for key, indices in groups.items():
        size = max_items_per_call(key, pixel_budget, engine_limit)
        calls.extend(indices[start : start + size] for start in range(0, len(indices), size))
    return calls
