"""build_app: the Serve application a config YAML names (`import_path: serve_app.app:build_app`).

Serve validates the YAML `args` into `AppArgs` because this builder's one parameter is annotated
with it. All Serve wiring lives here; the deployment classes stay plain, importable classes.
Per-deployment options below are defaults: a YAML's `deployments:` section overrides them.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from serve_app.config import TINY_SOURCE, AppArgs
from serve_app.serving.generator import FluxGenerator
from serve_app.serving.ingress import FluxIngress
from serve_app.serving.jobs import FluxJobs

logger = logging.getLogger("ray.serve")

DEMO_LORA = "demo/demo_lora.safetensors"


def build_app(args: AppArgs) -> Application:
    """Build ingress → jobs → generator with the LoRA root resolved once, here."""
    return assemble(args)


def assemble(
    args: AppArgs, *, generator_options: dict | None = None, ingress_options: dict | None = None
) -> Application:
    """build_app with deployment options overridden in code, as a YAML's `deployments:` would."""
    args = args.resolved()
    if args.loras.write_demo:
        _write_demo_lora(args)
    generator = serve.deployment(
        FluxGenerator,
        name="FluxGenerator",
        max_ongoing_requests=16,  # ≥ max_batch_size × the keys you want in flight at once
        user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
        graceful_shutdown_timeout_s=300,  # let a running batch finish on scale-down
        health_check_timeout_s=60,
    )
    if generator_options:
        generator = generator.options(**generator_options)
    jobs = serve.deployment(
        FluxJobs, name="FluxJobs", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )
    ingress = serve.deployment(
        serve.ingress()(FluxIngress),
        name="FluxIngress",
        max_ongoing_requests=1000,  # the default 5 would throttle the whole service
        ray_actor_options={"num_cpus": 0},
    )
    if ingress_options:
        ingress = ingress.options(**ingress_options)
    bound_generator = generator.bind(args)
    return ingress.bind(bound_generator, jobs.bind(bound_generator, args), args)


def _write_demo_lora(args: AppArgs) -> None:
    """The demo LoRA of the built-in small model, at <lora root>/demo/demo_lora.safetensors."""
    if args.model.source != TINY_SOURCE:
        logger.warning("loras.write_demo is set but the model is not `tiny`: the demo LoRA would not fit; skipped")
        return
    from pathlib import Path

    from serve_app.tiny import write_aitoolkit_lora

    path = Path(args.loras.root) / DEMO_LORA
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_aitoolkit_lora(path)
