"""The typed states the API reports as strings: a job's status and an image's LoRA mode.

Each is a `StrEnum`: a member is the very string the API has always sent (it compares, hashes,
formats and JSON-encodes as that string), and it pickles by name across Ray handles. The standard
library only here, so the command-line client imports it without the server's dependencies.
Model kinds are `config.ModelKind`; error codes are `errors.ErrorCode`.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """An async job's status (docs/jobs.md): queued, running, then one of the final three."""

    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        """The job has ended: its status changes no more."""
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class LoraMode(StrEnum):
    """How a call ran its LoRAs (docs/models.md, docs/performance.md), as an image's `lora_mode` reports it."""

    PEFT = "peft"  # reference models: PEFT adapters, eager
    SLOT = "slot"  # reference models' compiled tiers: the compile-stable LoRA slot
    MERGED = "merged"  # preview models: the LoRA merged into the bf16 weights (unquantized only)
    HOOK = "hook"  # preview models: the LoRA as a forward branch
    NONE = "none"  # preview models: no LoRA
    UNSET = ""  # a BatchKey's: no per-request choice (a reference model's engine decides)
