"""The health probe: every model that keeps a replica answers, and none is woken to find out.

A model allowed to scale to zero (autoscaling `min_replicas: 0`) is healthy with no replica. Its
generator deployment is looked up in Serve's own status (`serve.status()`) before anything is sent
to it, so the probe never counts as traffic that would start a replica. States:
- `ready`: replicas run and one answered the ping;
- `scaled_to_zero`: no replica, and Serve says that is the deployment's settled state;
- `starting`: no replica yet, and the autoscaler is bringing one up (a request woke it);
- `unavailable`: anything else (deploying, failing its health checks, not answering).
`unavailable` makes /health 503; the other three do not.
"""

from __future__ import annotations

from typing import Any

from serve_app.schemas import HealthResponse, ModelHealth

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


def health_response(models: dict[str, ModelHealth], jobs_ok: bool) -> HealthResponse:
    unavailable = [model for model, health in models.items() if health.state == "unavailable"]
    if not jobs_ok:
        unavailable.append("jobs")
    return HealthResponse(status="unhealthy" if unavailable else "healthy", models=models, unavailable=unavailable)
