"""FluxIngress: the Serve shell of the ingress; the request logic is `web/service.py` (IngressService).

Each replica builds an IngressService from its handles (`serving/dispatch.Generators` for the generator
deployments, one per model; `serving/jobs_client.FluxJobsClient` for FluxJobs, every call sent again while
its replica is replaced) and its health probe, and serves the routes of `web/routes.py` over it (one FastAPI
app per replica, from `__serve_build_asgi_app__`). The health probe stays here: it reads Serve's status.
The app's error answers are counted by code (`web/middleware.ErrorCodes`) into `ray.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import JOBS_DEPLOYMENT, AppArgs
from serve_app.jobs.store import JobStore, lease_holder, open_store
from serve_app.schemas import HealthResponse
from serve_app.serving.dispatch import Generators
from serve_app.serving.jobs import server_name
from serve_app.serving.jobs_client import FluxJobsClient
from serve_app.serving.metrics import IngressMetrics, keep_exporting
from serve_app.web.guards import load_api_key
from serve_app.web.health import HealthProbe
from serve_app.web.middleware import ErrorCodes
from serve_app.web.routes import build_api
from serve_app.web.service import IngressService

logger = logging.getLogger("ray.serve")


class FluxIngress:
    def __init__(self, generators: dict[str, DeploymentHandle], jobs: DeploymentHandle, args: AppArgs):
        self.args = args
        self.handles = generators
        self.jobs = jobs
        self.api_key = load_api_key(args.auth)
        self.context = serve.get_replica_context()
        self._store: JobStore | None = None  # opened by the first probe that needs it (a blocking call)
        jobs_client = FluxJobsClient(jobs, args.limits.retry_after_s)
        self.probe = HealthProbe(args.models, JOBS_DEPLOYMENT, self._deployments,
                                 lambda model: self.handles[model].ready.remote(), lambda: self.jobs.ping.remote(),
                                 self._jobs_cause, lambda: jobs_client.answered_at)
        self.service = IngressService(args, Generators(generators, args.limits.retry_after_s), jobs_client,
                                      self.health)
        self.metrics = IngressMetrics()
        self._metrics_task = asyncio.get_running_loop().create_task(keep_exporting(self.metrics.export))

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its ASGI app after the constructor (late-bound ingress)."""
        api = build_api(self.service, self.args, self.api_key, self.context.replica_id.unique_id)
        api.add_middleware(ErrorCodes, on_error=self.metrics.request_failed)  # outermost: sees every answer
        return api

    async def health(self) -> HealthResponse:
        """Each model's state from Serve's status (no replica is woken), then a ping of those that run and of
        FluxJobs; answered within web/health.HEALTH_BUDGET_S whatever happens (web/health.py)."""
        return await self.probe.check()

    def _deployments(self) -> Mapping[str, Any]:
        """Serve's status of this app's deployments (blocking: the probe runs it on a thread)."""
        return serve.status().applications[self.context.app_name].deployments

    def _jobs_cause(self) -> str | None:
        """Who holds the job store's lease while FluxJobs does not answer (blocking, on a thread)."""
        if self.args.jobs.in_memory:
            return None
        if self._store is None:
            self._store = open_store(self.args.jobs)
        return lease_holder(self._store, server_name())
