"""The attention backend switch, and a probe of which kernel attention actually runs.

diffusers routes every FLUX attention through its dispatcher (`dispatch_attention_fn`); the
backend is set per model. `native` is torch SDPA, which picks a kernel itself: on torch >= 2.11
with cuDNN >= 9.15 that is cuDNN attention on H100/H200, as fast as FA3 at FLUX's shapes
(pytorch#142132). Naming a backend is not proof of the kernel, so the probe profiles one
dispatcher call and reports the aten attention op that ran.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin

logger = logging.getLogger(__name__)

# aten ops that name the kernel SDPA chose, most specific first.
_KERNEL_OPS = (
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
)


def select_attention_backend(transformer: ModelMixin, backend: str) -> str:
    """Set `backend` on the transformer (`auto` keeps diffusers' default, native SDPA); return the name set.

    Raises:
        ValueError/ImportError/RuntimeError: from diffusers when the backend is unknown or its package
            is missing; a replica must not start on a backend it cannot run.
    """
    if backend == "auto":
        return "native"
    transformer.set_attention_backend(backend)
    return backend


def probe_attention_kernel(transformer: ModelMixin, device: str, dtype: torch.dtype, seq_len: int = 256) -> str:
    """The aten op one attention call of this transformer's geometry runs, e.g. `..._cudnn_attention`.

    Uses the backend the transformer's processors hold (the dispatcher's active backend), at the
    model's head count and width, so what it reports is what the blocks will run.
    """
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    query = torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype)  # (batch, seq, heads, dim)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dispatch_attention_fn(query, query, query)
    ran = {event.key for event in prof.key_averages()}
    for op in _KERNEL_OPS:
        if op in ran:
            return op
    others = sorted(name for name in ran if "attention" in name or "attn" in name)
    return others[0] if others else "unknown"


def log_attention(backend: str, kernel: str) -> None:
    logger.info("attention backend %s: one call ran %s", backend, kernel)
