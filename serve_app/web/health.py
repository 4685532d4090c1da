"""The health probe: every model that keeps a replica answers, and none is woken to find out.

A model allowed to scale to zero (autoscaling `min_replicas: 0`) is healthy with no replica. Its
generator deployment is looked up in Serve's own status (`serve.status()`) before anything is sent
to it, so the probe never counts as traffic that would start a replica. States:
- `ready`: replicas run and one answered the ping;
- `scaled_to_zero`: no replica, and Serve says that is the deployment's settled state;
- `starting`: no replica yet, and the autoscaler is bringing one up (a request woke it);
- `unavailable`: anything else (deploying, failing its health checks, not answering).
`unavailable` makes /health 503; the other three do not.

`HealthProbe` is the whole check, bounded: it answers within `HEALTH_BUDGET_S` whatever happens (a
controller that does not answer, a replica on a node that died, FluxJobs waiting for the job store's
lease), so a load balancer's probe never times out on it. No Ray here: the ingress gives it Serve's
status and the pings (serving/ingress.py), the unit tests give it fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from serve_app.config import ModelArgs
from serve_app.schemas import HealthResponse, ModelHealth

logger = logging.getLogger("ray.serve")

HEALTH_BUDGET_S = 1.5  # the longest /health takes, all of it (probes commonly time out at 2 s)
STATUS_TIMEOUT_S = 1.0  # the longest it waits on Serve's status; then the last one read is used
STATUS_MAX_AGE_S = 30.0  # ... if it is at most this old (a replica on a dead node fails its ping anyway)
PING_HEDGE_S = 0.25  # a ping unanswered this long gets a second one beside it (a hung replica is not the only one)
CAUSE_TIMEOUT_S = 0.3  # the end of the budget, kept to look for why FluxJobs does not answer (its store's lease)

# Serve's ReplicaState, DeploymentStatus and DeploymentStatusTrigger values: str enums of its
# private module, compared here as the text they equal.
_RUNNING = "RUNNING"
_SETTLED = "HEALTHY"
_SCALING_UP = "UPSCALING"
_AUTOSCALING = "AUTOSCALING"


def model_health(overview: Any | None) -> ModelHealth:
    """The state of one generator deployment from its `serve.status()` overview (None: not deployed).

    A `ready` answer still needs a ping of the deployment before it counts (the ingress sends it).
    """
    if overview is None:
        return ModelHealth(state="unavailable", replicas=0)
    running = sum(count for state, count in overview.replica_states.items() if state == _RUNNING)
    if running > 0:
        return ModelHealth(state="ready", replicas=running)
    if overview.status == _SETTLED:
        return ModelHealth(state="scaled_to_zero", replicas=0)
    if overview.status == _SCALING_UP and overview.status_trigger == _AUTOSCALING:
        return ModelHealth(state="starting", replicas=0)
    return ModelHealth(state="unavailable", replicas=0)


def health_response(models: dict[str, ModelHealth], jobs_ok: bool, causes: dict[str, str] | None = None
                    ) -> HealthResponse:
    unavailable = [model for model, health in models.items() if health.state == "unavailable"]
    if not jobs_ok:
        unavailable.append("jobs")
    causes = {name: why for name, why in (causes or {}).items() if name in unavailable}
    return HealthResponse(status="unhealthy" if unavailable else "healthy", models=models, unavailable=unavailable,
                          causes=causes)


Ping = Callable[[], Awaitable[Any]]


class HealthProbe:
    """/health, bounded by `budget_s` (module docstring).

    Args:
        models: the served models.
        jobs_deployment: FluxJobs' deployment name in Serve's status.
        read_status: Serve's status of this app, blocking: deployment name -> its overview. Run on a
            thread, one call at a time: a probe that finds one running waits on it rather than start another.
        ping_model: sends one ping to a model's generator deployment.
        ping_jobs: sends one ping to FluxJobs.
        jobs_cause: blocking; why FluxJobs does not answer where it can tell (the job store's lease
            holder), or None.
        jobs_answered_at: when (time.monotonic()) FluxJobs last answered any call of this replica, or None.
            Right after a node is lost one ping can be held back past its share of the budget while FluxJobs
            keeps answering the jobs' calls: an answer to any call during the probe counts as the ping's.
    """

    def __init__(self, models: list[ModelArgs], jobs_deployment: str, read_status: Callable[[], Mapping[str, Any]],
                 ping_model: Callable[[str], Awaitable[Any]], ping_jobs: Ping,
                 jobs_cause: Callable[[], str | None] = lambda: None,
                 jobs_answered_at: Callable[[], float | None] = lambda: None, budget_s: float = HEALTH_BUDGET_S,
                 status_timeout_s: float = STATUS_TIMEOUT_S, hedge_s: float = PING_HEDGE_S):
        self.models = models
        self.jobs_deployment = jobs_deployment
        self._read_status = read_status
        self._ping_model = ping_model
        self._ping_jobs = ping_jobs
        self._jobs_cause = jobs_cause
        self._jobs_answered_at = jobs_answered_at
        self.budget_s = budget_s
        self.status_timeout_s = min(status_timeout_s, budget_s)
        self.hedge_s = hedge_s
        self._status_call: asyncio.Future[Mapping[str, Any]] | None = None
        self._last_status: tuple[float, Mapping[str, Any]] | None = None
        self._cause_call: asyncio.Future[str | None] | None = None

    async def check(self) -> HealthResponse:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = loop.time() + self.budget_s
        pings_until = deadline - min(CAUSE_TIMEOUT_S, self.budget_s / 4)  # the rest: time to find a cause
        # FluxJobs is pinged from the start, beside the status read: it never scales to zero, so its ping wakes
        # nothing, and a controller slow to answer (busy with a lost node, say) must not eat the ping's time.
        jobs_ping = asyncio.ensure_future(_answered(self._ping_jobs, pings_until, self.hedge_s))
        try:
            deployments = await self._status(min(deadline, loop.time() + self.status_timeout_s))
            models = {m.id: model_health(None if deployments is None else deployments.get(m.deployment_name))
                      for m in self.models}
            ready = [model for model, health in models.items() if health.state == "ready"]
            jobs_running = deployments is None or model_health(deployments.get(self.jobs_deployment)).state == "ready"
            if not jobs_running:  # starting (waiting for the job store's lease, say): no ping can answer yet
                jobs_ping.cancel()
            answers = await asyncio.gather(
                *(_answered(partial(self._ping_model, model), pings_until, self.hedge_s) for model in ready))
            jobs_ok = jobs_running and (await jobs_ping or self._jobs_answered_since(started))
        finally:
            jobs_ping.cancel()
        for model, answered in zip(ready, answers):
            if not answered:
                models[model] = models[model].model_copy(update={"state": "unavailable"})
        causes = {}
        if deployments is None:
            causes.update({m.id: "Serve's status did not come in time" for m in self.models})
        if not jobs_ok:
            cause = await self._cause(deadline)
            if cause:
                causes["jobs"] = cause
        return health_response(models, jobs_ok, causes)

    def _jobs_answered_since(self, since: float) -> bool:
        answered_at = self._jobs_answered_at()
        if answered_at is None or answered_at < since:
            return False
        logger.info("health: FluxJobs' ping was not answered in time, but it answered a call %.2f s ago",
                    time.monotonic() - answered_at)
        return True

    async def _status(self, deadline: float) -> Mapping[str, Any] | None:
        """Serve's status of the app, or the last one read if it does not come by `deadline` (None: neither)."""
        loop = asyncio.get_running_loop()
        if self._status_call is None or self._status_call.done():
            self._status_call = asyncio.ensure_future(asyncio.to_thread(self._read_status))
        try:
            deployments = await asyncio.wait_for(asyncio.shield(self._status_call), max(0.0, deadline - loop.time()))
        except Exception as exc:  # too slow, or the controller is unreachable
            logger.warning("health: Serve's status is unavailable (%s)", type(exc).__name__)
            if self._last_status is not None and time.monotonic() - self._last_status[0] <= STATUS_MAX_AGE_S:
                return self._last_status[1]
            return None
        self._last_status = (time.monotonic(), deployments)
        return deployments

    async def _cause(self, deadline: float) -> str | None:
        loop = asyncio.get_running_loop()
        if self._cause_call is None or self._cause_call.done():
            self._cause_call = asyncio.ensure_future(asyncio.to_thread(self._jobs_cause))
        timeout = max(0.0, deadline - loop.time())
        try:
            return await asyncio.wait_for(asyncio.shield(self._cause_call), timeout)
        except Exception:
            return None


async def _answered(send: Ping, deadline: float, hedge_s: float) -> bool:
    """Whether a ping is answered by `deadline`. A ping unanswered after `hedge_s` gets another beside it, and
    one that fails (a replica that died answers at once with an error) another at once: Serve routes each
    new one by its replicas' queue probes, which a replica that is gone does not answer."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[Any]] = set()
    last_sent = -1.0
    try:
        while (remaining := deadline - loop.time()) > 0:
            if not pending or loop.time() - last_sent >= hedge_s:
                pending.add(asyncio.ensure_future(_awaited(send)))
                last_sent = loop.time()
            done, pending = await asyncio.wait(pending, timeout=min(remaining, hedge_s),
                                               return_when=asyncio.FIRST_COMPLETED)
            if any(not f.cancelled() and f.exception() is None for f in done):
                return True
            if done and not pending:  # every ping so far failed: a breath before the next one
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return False
    finally:
        for future in pending:
            future.cancel()


async def _awaited(send: Ping) -> Any:
    return await send()
