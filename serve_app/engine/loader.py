"""load_pipeline: a model's weights as a diffusers FluxPipeline, the one loader of every engine.

A model's `source` is `tiny` (the built-in small model), a local diffusers directory or a Hugging
Face repo id. `tiny` is built once into a cache directory (serve_app.tiny.ensure_tiny_dir) and then
loaded through the same `from_pretrained` path as any other directory, so what is served is exactly
what `python -m serve_app.tiny --out DIR` exports. Nothing here forces network access or forbids it:
the Hugging Face client's own settings (HF_HUB_OFFLINE, its cache) decide.

No Ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline

from serve_app.config import TINY_SOURCE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> str:
    """`auto` is CUDA when there is one, else the CPU; any other name is kept as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def dtype_for(device: str, dtype: str = "auto") -> torch.dtype:
    """A model's `dtype` on `device`: `auto` is bf16 on CUDA and fp32 on CPU, as the reference."""
    if dtype != "auto":
        return _DTYPES[dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pipeline(
    source: str,
    device: str,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    *,
    device_map: bool = False,
) -> FluxPipeline:
    """Load a FluxPipeline from `tiny`, a local diffusers directory or a Hugging Face repo id.

    Args:
        source: `tiny`, a directory, or a repo id.
        device: where the pipeline ends up (`cpu`, `cuda`, `cuda:N`; see `pick_device` for `auto`).
        revision: the Hugging Face revision of a repo id (ignored for a directory).
        dtype: the weights' dtype; default `dtype_for(device)`.
        device_map: on `cuda`, read the weights straight onto the GPU (diffusers' device_map), never
            staged in host RAM. Other devices (diffusers takes "cuda", not "cuda:N") load, then move.

    Returns:
        The pipeline on `device` with its progress bar off.
    """
    if source == TINY_SOURCE:
        from serve_app.tiny import ensure_tiny_dir

        source = str(ensure_tiny_dir())
    kwargs: dict[str, Any] = {"dtype": dtype or dtype_for(device)}
    if revision and not Path(source).is_dir():
        kwargs["revision"] = revision
    direct = device_map and device == "cuda"
    if direct:
        kwargs["device_map"] = "cuda"
    pipe = FluxPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe if direct else pipe.to(device)
