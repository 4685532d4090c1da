"""Work items: one normalized image each, and the BatchKey that says which may share a pipeline call.

These are the engine's inputs and outputs. Turning an HTTP request into work items (validation,
defaults, seeds) is `serve_app.intake.request_rules`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from serve_app.states import LoraMode


@dataclass(frozen=True)
class LoraUse:
    """One LoRA file (by canonical source) and the multiplier it runs at.

    `token_digest` is set when the request brought its own hf_token for the file: the file fetched
    with a token is another file than the one fetched without, so the digest is part of its `key`
    (a replica never serves a token's file to a request without it). The token itself travels
    beside the work items, never in them.
    """

    source: str
    multiplier: float
    token_digest: str = ""

    @property
    def key(self) -> str:
        """The file's identity in a replica: its source, and the hash of the token it was fetched with."""
        return f"{self.source} (token {self.token_digest})" if self.token_digest else self.source


@dataclass(frozen=True)
class BatchKey:
    """Every argument a pipeline call fixes for all of its images: only items with equal keys may batch.

    A new request field that changes what a call computes for all its images belongs here
    (tests/unit/replica/test_batching.py fails when a WorkItem field is neither here nor per image).
    """

    model: str
    width: int
    height: int
    steps: int
    guidance: float
    loras: tuple[LoraUse, ...] = ()
    lora_mode: LoraMode = LoraMode.UNSET  # a preview model's: merged or hook, chosen per request; unset for the others

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def lora_set_id(self) -> str:
        return lora_set_id(u.key for u in self.loras)

    def label(self) -> str:
        """A metrics tag: the geometry only, never a LoRA (unbounded cardinality)."""
        return f"{self.width}x{self.height}x{self.steps}"


@dataclass(frozen=True)
class WorkItem:
    """One image to generate, fully normalized."""

    request_id: str
    index: int
    prompt: str
    seed: int
    key: BatchKey
    neg: str = ""
    output_format: str = "jpeg"
    deadline: float | None = field(default=None, compare=False)
    report_progress: bool = field(default=False, compare=False)  # an async job's item: tell FluxJobs its steps

    # What may differ between the images of one pipeline call; everything else is in `key`.
    PER_IMAGE = frozenset({"request_id", "index", "prompt", "seed", "neg", "output_format", "deadline",
                           "report_progress"})

    @property
    def ref(self) -> tuple[str, int]:
        """(request id, prompt index): the item's identity within a replica."""
        return self.request_id, self.index


@dataclass(frozen=True)
class ItemResult:
    """The generated image of one work item, encoded, with what the client is told about it."""

    request_id: str
    index: int
    seed: int
    width: int
    height: int
    format: str
    data: bytes = field(repr=False)
    seconds: float = 0.0
    lora_modules: tuple[tuple[str, int], ...] = ()  # (LoRA key, matched module count)
    speed_tier: str = "exact"  # the engine's tier that drew it (docs/performance.md)
    lora_mode: LoraMode = LoraMode.PEFT  # peft | slot; a preview model's: merged | hook | none
    # What ran, for a preview model's `effective` (docs/models.md): the item's after its prompt flags.
    prompt: str = ""
    steps: int = 0
    guidance: float = 0.0
    multiplier: float | None = None


def lora_set_id(sources: Iterable[str]) -> str:
    """The canonical id of a set of LoRA files (not multipliers): the multiplexed model id."""
    unique = sorted(set(sources))
    if not unique:
        return ""
    digest = hashlib.sha256("\n".join(unique).encode()).hexdigest()[:16]
    return f"loras-{digest}"
