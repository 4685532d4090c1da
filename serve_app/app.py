"""build_app: the Serve application a config YAML names (`import_path: serve_app.app:build_app`).

Serve validates the YAML `args` into `AppArgs` because this builder's one parameter is annotated
with it. All Serve wiring lives here; the deployment classes stay plain, importable classes:

    FluxIngress ─┬─▶ FluxJobs ──▶ FluxGenerator-<id> (one deployment per model)
                 │      ▲  └─ the job store (records, images)
                 │      └──── step progress (generators look FluxJobs up by name: no cycle in the graph)
                 └──────────────▶ FluxGenerator-<id>

The options below are defaults: a YAML's `deployments:` section overrides them by name (a model's
generator deployment is named `FluxGenerator-<its id>`).
"""

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from serve_app.config import JOBS_DEPLOYMENT, TINY_SOURCE, AppArgs, ModelArgs
from serve_app.jobs.webhooks import write_secret_file
from serve_app.serving.generator import FluxGenerator
from serve_app.serving.ingress import FluxIngress
from serve_app.serving.jobs import FluxJobs

logger = logging.getLogger("ray.serve")

INGRESS = "FluxIngress"
JOBS = JOBS_DEPLOYMENT


def build_app(args: AppArgs) -> Application:
    """Build ingress → jobs → one generator per model, with the LoRA root resolved once, here.

    Serve validates the YAML's `args` into AppArgs from this signature's annotation (so this
    module must not use `from __future__ import annotations`, which would make it a string).
    """
    return build_app_with(AppArgs.model_validate(args), {})


def build_app_with(args: AppArgs, deployments: dict[str, dict[str, Any]]) -> Application:
    """`build_app` with deployment options given in code, keyed by deployment name, as a YAML's
    `deployments:` section gives them (tests and benchmarks use it)."""
    args = args.resolved()
    if args.loras.write_demo and not any(model.source == TINY_SOURCE for model in args.models):
        logger.warning("loras.write_demo is set but no model is `tiny`: the demo LoRA would not fit; none is written")
    if args.webhooks.generate_secret:
        _generate_webhook_secret(args)
    generators = {
        model.id: _with(_generator(model), deployments.get(model.deployment_name)).bind(model, args.loras)
        for model in args.models
    }
    jobs = serve.deployment(
        name=JOBS,
        num_replicas=1,  # exactly one: it owns the job store (and its lease, serving/store.py)
        max_ongoing_requests=10_000,  # every open event stream holds one long-poll call
        graceful_shutdown_timeout_s=60,  # drain the long-polls (30 s at most), then hand the store over
        ray_actor_options={"num_cpus": 0},
    )(FluxJobs)
    ingress = serve.deployment(
        name=INGRESS,
        max_ongoing_requests=1000,  # the default 5 would throttle the whole service
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(FluxIngress))
    bound_jobs = _with(jobs, deployments.get(JOBS)).bind(generators, args)
    return _with(ingress, deployments.get(INGRESS)).bind(generators, bound_jobs, args)


def _generator(model: ModelArgs) -> Deployment:
    return serve.deployment(
        name=model.deployment_name,
        max_ongoing_requests=16,  # ≥ max_batch_size × the keys you want in flight at once
        user_config=model.batching.model_dump(),
        graceful_shutdown_timeout_s=300,  # let a running batch finish on scale-down
        health_check_timeout_s=60,
    )(FluxGenerator)


def _with(deployment: Deployment, options: dict[str, Any] | None) -> Deployment:
    return deployment.options(**options) if options else deployment


def _generate_webhook_secret(args: AppArgs) -> None:
    """The webhook signing secret of a machine that has none: written once to `webhooks.secret_file`."""
    secret_file = args.webhooks.secret_file  # set whenever generate_secret is (WebhookArgs refuses it unset)
    if os.environ.get(args.webhooks.secret_env) or secret_file is None:
        return
    if write_secret_file(secret_file):
        logger.info("webhooks: generated a signing secret in %s", secret_file)
