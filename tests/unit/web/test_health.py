"""HealthProbe without Ray: /health answers within its budget whatever Serve's status, the replicas or the job
store do, and still says 200 while each model keeps a replica that answers."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from serve_app.config import JOBS_DEPLOYMENT, ModelArgs
from serve_app.web.health import HealthProbe

BUDGET_S = 0.6
MODELS = [ModelArgs(id="flux"), ModelArgs(id="flux-preview", kind="preview")]


def running(replicas: int = 1):
    return SimpleNamespace(replica_states={"RUNNING": replicas}, status="HEALTHY", status_trigger="CONFIG_UPDATE")


def starting():
    return SimpleNamespace(replica_states={"STARTING": 1}, status="UPDATING", status_trigger="CONFIG_UPDATE")


def all_running():
    return {m.deployment_name: running() for m in MODELS} | {JOBS_DEPLOYMENT: running()}


async def answer():
    return True


async def hang():
    await asyncio.sleep(3600)


async def fail():
    raise ConnectionError("the replica's node is gone")


class Pings:
    """Each model's pings end, in order, as the given outcomes (then `answer`); every ping is counted."""

    def __init__(self, **outcomes):
        self.outcomes = {model: list(steps) for model, steps in outcomes.items()}
        self.sent: dict[str, int] = {}

    def __call__(self, model: str):
        self.sent[model] = self.sent.get(model, 0) + 1
        steps = self.outcomes.get(model, [])
        return (steps.pop(0) if steps else answer)()


def probe(read_status=all_running, pings=None, jobs=answer, cause=lambda: None, **kwargs) -> HealthProbe:
    return HealthProbe(MODELS, JOBS_DEPLOYMENT, read_status, pings or Pings(), jobs, cause, budget_s=BUDGET_S,
                       status_timeout_s=0.3, hedge_s=0.1, **kwargs)


def timed(health: HealthProbe, release: threading.Event | None = None):
    """The probe's answer and how long it took; then `release` lets a blocked fake go (asyncio.run waits for
    its thread)."""

    async def check():
        started = time.monotonic()
        try:
            answer = await health.check()
        finally:
            if release is not None:
                release.set()
        return answer, time.monotonic() - started

    return asyncio.run(check())


def test_all_answering_is_healthy_at_once():
    answer, took = timed(probe())
    assert (answer.status, answer.unavailable, answer.causes) == ("healthy", [], {})
    assert took < 0.2


def test_a_controller_that_does_not_answer_costs_no_more_than_the_budget():
    released = threading.Event()  # the blocked status call's thread, let go at the end (asyncio.run waits for it)

    def stuck():
        released.wait(30)
        return all_running()

    answer, took = timed(probe(read_status=stuck), released)
    assert took < BUDGET_S + 0.2
    assert answer.status == "unhealthy" and set(answer.unavailable) >= {"flux", "flux-preview"}
    assert "status" in answer.causes["flux"]


def test_a_slow_status_after_a_good_one_uses_the_last_one_read():
    calls = {"n": 0}
    released = threading.Event()

    def first_fast_then_stuck():
        calls["n"] += 1
        if calls["n"] > 1:
            released.wait(30)
        return all_running()

    health = probe(read_status=first_fast_then_stuck)

    async def twice():
        first = await health.check()
        started = time.monotonic()
        second = await health.check()
        took = time.monotonic() - started
        released.set()
        return first, second, took

    first, second, took = asyncio.run(twice())
    assert first.status == second.status == "healthy"
    assert took < BUDGET_S + 0.2


def test_a_ping_routed_to_a_dead_replica_is_hedged_by_another():
    """The first ping hangs (its replica's node is gone); the next one, sent beside it, answers: 200."""
    pings = Pings(flux=[hang])
    answer, took = timed(probe(pings=pings))
    assert answer.status == "healthy", answer
    assert pings.sent["flux"] == 2 and took < 0.3


def test_a_ping_that_fails_at_once_is_sent_again_at_once():
    pings = Pings(flux=[fail, fail])
    answer, took = timed(probe(pings=pings))
    assert answer.status == "healthy" and pings.sent["flux"] == 3 and took < 0.3


def test_a_model_whose_every_replica_hangs_is_unavailable_within_the_budget():
    pings = Pings(flux=[hang] * 100)
    answer, took = timed(probe(pings=pings))
    assert answer.unavailable == ["flux"] and answer.models["flux"].state == "unavailable"
    assert answer.models["flux-preview"].state == "ready"
    assert BUDGET_S / 2 < took < BUDGET_S + 0.2


def test_flux_jobs_not_running_is_not_waited_for_and_names_the_job_store_holder():
    """A FluxJobs that waits for the job store's lease is STARTING: 503 at once, with who holds the store."""
    def status():
        return all_running() | {JOBS_DEPLOYMENT: starting()}

    answer, took = timed(probe(read_status=status, jobs=hang, cause=lambda: "the job store /x is held by ..."))
    assert answer.status == "unhealthy" and answer.unavailable == ["jobs"]
    assert answer.causes == {"jobs": "the job store /x is held by ..."}
    assert took < 0.2


def test_a_slow_status_read_leaves_flux_jobs_its_ping_time():
    """A controller slow to answer (busy with a lost node) does not shorten FluxJobs' ping: the ping runs beside
    the status read, so a FluxJobs that answers only after it is still healthy."""
    released = threading.Event()

    def slow():
        released.wait(0.25)
        return all_running()

    async def slow_jobs():
        await asyncio.sleep(0.3)  # answers after the status came, later than the pings' share left after it
        return True

    answer, took = timed(probe(read_status=slow, jobs=slow_jobs), released)
    assert answer.status == "healthy", answer
    assert took < BUDGET_S


def test_a_cause_that_cannot_be_read_in_time_is_left_out():
    released = threading.Event()
    answer, took = timed(probe(jobs=hang, cause=lambda: released.wait(30) and "late"), released)
    assert answer.unavailable == ["jobs"] and answer.causes == {}
    assert took < BUDGET_S + 0.2


@pytest.mark.parametrize("state", ["scaled_to_zero", "starting"])
def test_a_model_without_replicas_by_its_autoscaling_is_never_pinged(state):
    overview = SimpleNamespace(replica_states={}, status="HEALTHY" if state == "scaled_to_zero" else "UPSCALING",
                               status_trigger="AUTOSCALING")
    pings = Pings()
    answer, _ = timed(probe(read_status=lambda: all_running() | {"FluxGenerator-flux-preview": overview}, pings=pings))
    assert answer.status == "healthy" and answer.models["flux-preview"].state == state
    assert "flux-preview" not in pings.sent


def test_a_flux_jobs_that_hangs_still_leaves_time_to_name_the_cause():
    """Serve still counts FluxJobs running (its replica was just lost), so it is pinged; the ping hangs for the
    pings' share of the budget, and the rest finds who holds the job store."""
    answer, took = timed(probe(jobs=hang, cause=lambda: "the job store /x is held by ..."))
    assert answer.unavailable == ["jobs"] and answer.causes == {"jobs": "the job store /x is held by ..."}
    assert took < BUDGET_S + 0.2


def test_a_flux_jobs_that_answers_other_calls_during_the_probe_is_healthy_though_its_ping_came_late():
    """Right after a node loss one ping can be held back past its share of the budget while FluxJobs keeps
    answering the jobs' calls: an answer to any call during the probe counts as the ping's."""
    answer, took = timed(probe(jobs=hang, jobs_answered_at=time.monotonic))
    assert answer.status == "healthy", answer
    assert took < BUDGET_S + 0.2


def test_an_answer_of_flux_jobs_from_before_the_probe_does_not_count_for_its_ping():
    """FluxJobs' node may have been lost since: only an answer while the probe looks counts."""
    before = time.monotonic() - 0.01
    answer, _ = timed(probe(jobs=hang, jobs_answered_at=lambda: before))
    assert answer.unavailable == ["jobs"]


def test_an_answer_of_flux_jobs_does_not_make_a_flux_jobs_that_is_not_running_healthy():
    answer, took = timed(probe(read_status=lambda: all_running() | {JOBS_DEPLOYMENT: starting()}, jobs=hang,
                               jobs_answered_at=time.monotonic))
    assert answer.unavailable == ["jobs"] and took < 0.2
