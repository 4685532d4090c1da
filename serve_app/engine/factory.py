"""build_engine: the engine of a configured model, by its kind (or a test's engine class)."""

from __future__ import annotations

import importlib

from serve_app.config import ModelArgs
from serve_app.engine.protocol import Engine


def build_engine(model: ModelArgs) -> Engine:
    """Load the engine that serves `model`, by its kind and speed tier.

    `model.engine` (tests only) names a class built in place of the kind's engine through its
    `from_args(model)`; tests use it to wrap the real engine with fault injection and call records.
    """
    if model.engine is not None:
        module_name, _, attribute = model.engine.partition(":")
        return getattr(importlib.import_module(module_name), attribute).from_args(model)
    if model.is_preview:
        from serve_app.engine.preview.model import PreviewModel

        return PreviewModel.from_args(model)
    from serve_app.engine.compiled.fast import load_engine
    from serve_app.engine.compiled.speed import SpeedArgs

    # `exact` is FluxEngine; `compiled` and `fp8` the CompiledFluxEngine (fp8 refused on hardware without it)
    return load_engine(model.source, model.device, model.revision, SpeedArgs.of(model), model.dtype)
