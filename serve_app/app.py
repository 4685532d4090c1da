"""build_app: the Serve application a config YAML names (`import_path: serve_app.app:build_app`).

Serve validates the YAML `args` into `AppArgs` because this builder's one parameter is annotated
with it. All Serve wiring lives here; the deployment classes stay plain, importable classes.
Per-deployment options below are defaults: a YAML's `deployments:` section overrides them.
"""

import hashlib
import logging
from pathlib import Path

from ray import serve
from ray.serve import Application

from serve_app.config import TINY_SOURCE, AppArgs
from serve_app.serving.generator import FluxGenerator
from serve_app.serving.ingress import FluxIngress
from serve_app.serving.jobs import FluxJobs

logger = logging.getLogger("ray.serve")

DEMO_LORA = "demo/demo_lora.safetensors"


def build_app(args: AppArgs) -> Application:
    """Build ingress → jobs → generator with the LoRA root resolved once, here.

    Serve validates the YAML's `args` into AppArgs from this signature's annotation (so this
    module must not use `from __future__ import annotations`, which would make it a string).
    """
    return assemble(AppArgs.model_validate(args))


def assemble(
    args: AppArgs, *, generator_options: dict | None = None, ingress_options: dict | None = None
) -> Application:
    """build_app with deployment options overridden in code, as a YAML's `deployments:` would."""
    args = args.resolved()
    if args.loras.write_demo:
        _write_demo_lora(args)
    version = code_version(args)
    generator = serve.deployment(
        FluxGenerator,
        name="FluxGenerator",
        max_ongoing_requests=16,  # ≥ max_batch_size × the keys you want in flight at once
        user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
        graceful_shutdown_timeout_s=300,  # let a running batch finish on scale-down
        health_check_timeout_s=60,
    ).options(version=version, _internal=True)
    if generator_options:
        generator = generator.options(**generator_options)
    jobs = serve.deployment(
        FluxJobs, name="FluxJobs", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    ).options(version=version, _internal=True)
    ingress = serve.deployment(
        serve.ingress()(FluxIngress),
        name="FluxIngress",
        max_ongoing_requests=1000,  # the default 5 would throttle the whole service
        ray_actor_options={"num_cpus": 0},
    ).options(version=version, _internal=True)
    if ingress_options:
        ingress = ingress.options(**ingress_options)
    bound_generator = generator.bind(args)
    return ingress.bind(bound_generator, jobs.bind(bound_generator, args), args)


def code_version(args: AppArgs) -> str:
    """The deployments' code version: the args and this package's source, hashed.

    `serve.run` gives a deployment without a version a random one (serve/_private/client.py:
    `deployment._version or get_random_string()`), so every redeploy from Python restarted the
    replicas, even for a user_config-only change. With a version that changes exactly when the
    args or the code do, a redeploy that changes only user_config (or replicas, or
    max_ongoing_requests) is a lightweight update: `reconfigure` runs on the live replica, as with
    `serve deploy` of a YAML (where Serve derives the version from the config and ignores this one).
    `_internal=True` is how Serve itself sets a version since the public `version=` was removed.
    """
    digest = hashlib.sha256(args.model_dump_json().encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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
