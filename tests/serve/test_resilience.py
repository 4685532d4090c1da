"""Resilience: load and replica faults on a real local Ray Serve.

A model of its own in the session's shared app (tests/serve/apps.py), which has two ingress replicas:
`flux-faults`, one generator replica. A 16-client load, then its replica killed under load (its items
are retried once, on the replacement Serve starts, or end REPLICA_FAILED), then an ingress replica
killed, last (FluxJobs keeps the jobs, the other ingress reports them; Serve replaces the replica).
Autoscaling (load adds a replica, a trickle lets it drain away, no request is lost) runs on a cluster of
several nodes, where the added replica lands on another node: tests/cluster/.

Replicas are killed through Ray's own API (`ray.kill` of the replica actor), never by process.
Load clients are plain HTTP clients: sync ones call /v1/generate, job ones submit to /v1/inference,
poll the status and download the image. Every request must be answered within REQUEST_TIMEOUT_S:
an image, a 503 OVERLOADED with Retry-After, or (only in the fault test) REPLICA_FAILED.
Figures (counts, seconds) are printed with `-s`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
import ray
from PIL import Image
from ray import serve

from serve_app import errors
from tests.serve.apps import JOB_TIMEOUT_S
from tests.serve.helpers import APP_NAME, generator_state

pytestmark = pytest.mark.serve

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
REQUEST_TIMEOUT_S = 90  # an answer later than this is a lost request
FAULTS = "flux-faults"
ANSWERED = {"image", "overloaded"}


@pytest.fixture(scope="module")
def url(app_url):
    return app_url


# ---- load clients --------------------------------------------------------------------------------


@dataclass
class Answer:
    kind: str  # "sync" or "job"
    started: float
    finished: float
    outcome: str  # "image", "overloaded", "replica_failed", or what went wrong


def body(prompt: str, shape: dict = SMALL, model: str = FAULTS) -> dict:
    return {"model": model, "prompts": [{"prompt": prompt, **shape}]}


def is_image(data: bytes, shape: dict) -> bool:
    return Image.open(io.BytesIO(data)).size == (shape["width"], shape["height"])


def error_outcome(answer: httpx.Response) -> str:
    try:
        code = answer.json()["error"]["code"]
    except Exception:
        code = None
    if answer.status_code == 503 and code == errors.OVERLOADED and int(answer.headers.get("Retry-After", 0)) > 0:
        return "overloaded"
    if answer.status_code == 500 and code == errors.REPLICA_FAILED:
        return "replica_failed"
    return f"HTTP {answer.status_code}: {answer.text[:200]}"


class Load:
    """HTTP clients that send requests back to back until stopped, recording every answer.

    Runs its own event loop in a thread, so the test can kill replicas and watch Serve meanwhile.
    """

    def __init__(self, url: str, sync_clients: int, job_clients: int = 0, shape: dict = SMALL,
                 model: str = FAULTS):
        self.url, self.shape, self.model = url, shape, model
        self.sync_clients, self.job_clients = sync_clients, job_clients
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        """Stop sending; every client finishes the request it has out. Returns all answers."""
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S + 30)
        assert not self._thread.is_alive(), "a load client is still waiting: a request hung"
        return self.answers

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.sync_clients + self.job_clients + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._client(client, "sync", n) for n in range(self.sync_clients)),
                                 *(self._client(client, "job", n) for n in range(self.job_clients)))

    async def _client(self, client: httpx.AsyncClient, kind: str, n: int) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            started = time.time()
            try:
                run = self._sync if kind == "sync" else self._job
                outcome = await run(client, f"{kind} client {n} request {i}")
            except httpx.HTTPError as exc:
                outcome = f"lost: {type(exc).__name__}: {exc}"
            self.answers.append(Answer(kind, started, time.time(), outcome))
            if outcome == "overloaded":
                await asyncio.sleep(1.0)  # honour Retry-After, shortened to keep the pressure on

    async def _sync(self, client: httpx.AsyncClient, prompt: str) -> str:
        answer = await client.post("/v1/generate", json=body(prompt, self.shape, self.model))
        if answer.status_code != 200:
            return error_outcome(answer)
        data = base64.b64decode(answer.json()["images"][0]["data"])
        return "image" if is_image(data, self.shape) else "bad image"

    async def _job(self, client: httpx.AsyncClient, prompt: str) -> str:
        submitted = await client.post("/v1/inference", json=body(prompt, self.shape, self.model))
        if submitted.status_code != 200:
            return error_outcome(submitted)
        request_id = submitted.json()["request_id"]
        deadline = time.time() + REQUEST_TIMEOUT_S
        while time.time() < deadline:
            answer = await client.get(f"/v1/requests/{request_id}/status")
            if answer.status_code != 200:
                return f"status: {error_outcome(answer)}"
            status = answer.json()
            if status["status"] == "succeeded":
                image = await client.get(f"/v1/requests/{request_id}/images/0")
                ok = image.status_code == 200 and is_image(image.content, self.shape)
                return "image" if ok else f"image download: HTTP {image.status_code}"
            if status["status"] == "failed" and status["error_code"] == errors.REPLICA_FAILED:
                return "replica_failed"
            if status["status"] in ("failed", "canceled"):
                return f"job {status['status']}: {status['error_code']} {status['error']}"
            await asyncio.sleep(0.2)
        return f"lost: job {request_id} still {status['status']} after {REQUEST_TIMEOUT_S} s"


def tally(answers: list[Answer]) -> Counter:
    return Counter(a.outcome if a.outcome in ANSWERED | {"replica_failed"} else "LOST: " + a.outcome
                   for a in answers)


# ---- Serve helpers ---------------------------------------------------------------------------------


def replica_states(deployment: str) -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return {str(getattr(state, "value", state)): n for state, n in status.replica_states.items() if n}


def wait_for(predicate, timeout_s: float, poll_s: float = 0.25, what: str = "condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")



def active_jobs() -> int:
    return serve.get_deployment_handle("FluxJobs", APP_NAME).counts.remote().result(timeout_s=30).active_jobs


def serve_actor(name_part: str, replica_id: str | None = None) -> list[str]:
    """Names of the live Serve replica actors whose name holds `name_part` (and the replica id)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and name_part in a["name"] and (replica_id is None or replica_id in a["name"])]


def wait_job(url: str, request_id: str, timeout_s: float = JOB_TIMEOUT_S + 10) -> dict:
    def finished():
        status = httpx.get(f"{url}/v1/requests/{request_id}/status").json()
        return status if status["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(finished, timeout_s, what=f"job {request_id} finished")


def generates(url: str) -> bool:
    answer = httpx.post(f"{url}/v1/generate", json=body("after"), timeout=REQUEST_TIMEOUT_S)
    return answer.status_code == 200 and is_image(base64.b64decode(answer.json()["images"][0]["data"]), SMALL)


# ---- load ------------------------------------------------------------------------------------------


def test_16_clients_for_10_s_every_request_answered_none_lost(url):
    load = Load(url, sync_clients=12, job_clients=4).start()
    time.sleep(10)
    answers = load.stop()
    counts = tally(answers)
    slowest = max(a.finished - a.started for a in answers)
    print(f"\nLOAD 16 clients x 10 s: {len(answers)} requests answered {dict(counts)}, slowest {slowest:.1f} s")
    assert set(counts) <= ANSWERED, counts
    assert counts["image"] > 0
    assert wait_for(lambda: active_jobs() == 0, 10, what="no active job")


# ---- replica faults --------------------------------------------------------------------------------


def test_a_generator_replica_killed_under_load_loses_no_request(url):
    victim = generator_state(deployment=f"FluxGenerator-{FAULTS}").actor_name
    load = Load(url, sync_clients=6, job_clients=4).start()
    try:
        time.sleep(4)
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        def served_after_kill():
            done = [a.finished for a in list(load.answers) if a.started > killed_at and a.outcome == "image"]
            return min(done) if done else None

        first_image = wait_for(served_after_kill, REQUEST_TIMEOUT_S, what="an image of a request sent after the kill")
        running = wait_for(lambda: replica_states(f"FluxGenerator-{FAULTS}") == {"RUNNING": 1} and time.time(), 60,
                           what="the replacement replica RUNNING")
        time.sleep(2)
    finally:
        answers = load.stop()

    counts = tally(answers)
    in_flight = tally([a for a in answers if a.started <= killed_at <= a.finished])
    print(f"\nFAULT generator kill: {len(answers)} requests answered {dict(counts)}; "
          f"in flight at the kill {dict(in_flight)}; recovered (first image of a request sent after the kill) "
          f"in {first_image - killed_at:.1f} s, replacement seen RUNNING after {running - killed_at:.1f} s")
    assert set(counts) <= ANSWERED | {"replica_failed"}, counts
    assert sum(in_flight.values()) > 0  # the kill hit requests in flight
    assert generator_state(deployment=f"FluxGenerator-{FAULTS}").actor_name != victim
    assert wait_for(lambda: active_jobs() == 0, 10, what="no job left in progress")
    assert generates(url)


def test_an_ingress_replica_killed_the_other_reports_its_jobs(url):
    assert len(serve_actor("FluxIngress")) == 2
    done = httpx.post(f"{url}/v1/inference", json=body("done before the kill")).json()
    assert wait_job(url, done["request_id"])["status"] == "succeeded"
    submitted = httpx.post(f"{url}/v1/inference",
                           json=body("running at the kill", {"width": 256, "height": 256, "sample_steps": 20}))
    running = submitted.json()
    victim_replica = submitted.headers["X-Flux-Replica"]
    [victim] = serve_actor("FluxIngress", victim_replica)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    seen = set()
    for job in (done, running):
        answer = httpx.get(f"{url}/v1/requests/{job['request_id']}/status")
        assert answer.status_code == 200, answer.text
        seen.add(answer.headers["X-Flux-Replica"])
    final = wait_job(url, running["request_id"])
    assert final["status"] == "succeeded", final
    for job in (done, running):
        result = httpx.get(f"{url}/v1/requests/{job['request_id']}/result")
        assert result.status_code == 200 and result.json()["status"] == "succeeded"
        seen.add(result.headers["X-Flux-Replica"])
        image = httpx.get(f"{url}{result.json()['outputs']['images'][0]['url']}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert victim_replica not in seen  # the survivor answered
    print(f"\nFAULT ingress kill: jobs reported by {sorted(seen)}, killed {victim_replica}")
    # Replaced: a new replica actor lives (so Serve's controller saw the death) and both run. The
    # next redeploy would otherwise race the controller noticing the death, and fail.
    wait_for(lambda: len(serve_actor("FluxIngress")) == 2 and not serve_actor("FluxIngress", victim_replica)
             and replica_states("FluxIngress") == {"RUNNING": 2}, 60, what="the ingress replica replaced")
