"""torch.compile for the fast tiers: regional compile, a compile counter, and the compile cache.

Regional compile (diffusers' `compile_repeated_blocks`) compiles one FluxTransformerBlock and one
FluxSingleTransformerBlock graph and reuses them for all 57 blocks: about 10 s of compile per shape
on an H100 instead of a minute, for the same steady-state speed (PyTorch devlog, 2026-05).

Shapes: the first call compiles a static graph; a call of another image size recompiles once with
the image length dynamic, and a batch of 2 once more with the batch dynamic (automatic dynamic
shapes). From then on no size or batch recompiles; batch 1 keeps its own graph because Dynamo
specializes sizes of 1. `SpeedArgs.warmup_shapes` runs exactly these compiles before the replica is
healthy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path

import torch
from diffusers import ModelMixin

logger = logging.getLogger(__name__)

_COMPILE_ID = re.compile(r"^(\d+)/(\d+)$")


class CompileCounter:
    """Counts Dynamo compiles in this process: first compiles of a frame and recompiles.

    torch has no public compile-event API; `torch._dynamo.callback` is the hook Dynamo itself offers
    for compile start/end callbacks, so it is used here (and only here). A replica process runs one
    engine, so the process-wide count is the engine's.
    """

    def __init__(self):
        from torch._dynamo.callback import callback_handler  # private module: see the class docstring

        self._handler = callback_handler
        self._lock = threading.Lock()
        self.compiles = 0
        self.recompiles = 0  # compiles of a frame that already had compiled code (frame_compile_id > 0)
        self._handler.register_start_callback(self._on_start)

    def _on_start(self, args=None) -> None:
        # CallbackArgs (torch >= 2.7) carries the compile id "frame/attempt"; without it, count only.
        match = _COMPILE_ID.match(str(getattr(args, "compile_id", "")))
        with self._lock:
            self.compiles += 1
            if match is not None and int(match.group(2)) > 0:
                self.recompiles += 1
                logger.info("torch.compile: recompiling frame %s", args.compile_id)

    def close(self) -> None:
        """Stop counting (idempotent)."""
        with contextlib.suppress(ValueError):  # already removed
            self._handler.remove_start_callback(self._on_start)


def compile_blocks(transformer: ModelMixin, backend: str, mode: str) -> None:
    """Compile the transformer's repeated blocks with fullgraph: a graph break is an error, not a slowdown."""
    kwargs = {"fullgraph": True, "backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode  # torch.compile takes a mode for inductor only
    transformer.compile_repeated_blocks(**kwargs)


def use_compile_cache_dir(cache_dir: str | None) -> Path | None:
    """Point inductor's on-disk cache (kernels, FX graphs, autotuning) at a node-local directory.

    Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it resolves its cache, so setting it before the
    first compile is enough.
    """
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser()
    (path / "inductor").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    return path


def artifacts_path(cache_dir: Path, key: str) -> Path:
    """Where the saved compile artifacts of one engine configuration live in the cache directory."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", key)
    return cache_dir / f"compile-artifacts-{safe}.bin"


def load_compile_artifacts(path: Path) -> bool:
    """Load saved compile artifacts (torch checks its version, Triton's and the GPU); False if none fit."""
    if not path.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a stale or foreign file must not stop a replica: compile instead
        logger.warning(
            "compile artifacts %s not loaded (%s: %s); compiling from scratch", path, type(exc).__name__, exc
        )
        return False
    logger.info("loaded compile artifacts from %s: %s", path, info)
    return info is not None


def save_compile_artifacts(path: Path) -> bool:
    """Save this process's compile artifacts for the next replica; False when there is nothing to save."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return False
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(saved[0])
    tmp.replace(path)  # atomic: a replica starting beside us never reads half a file
    logger.info("saved compile artifacts to %s (%d bytes)", path, len(saved[0]))
    return True
