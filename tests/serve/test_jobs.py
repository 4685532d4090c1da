"""Jobs that survive a restart, with live progress and signed webhooks (issue 14), on a real local Ray Serve.

One deployment for the module: jobs in a directory store, a short store lease (so the FluxJobs
replacement after a kill waits little), webhooks to 127.0.0.1 signed with a secret the app builder
generates. Receivers are real HTTP servers on 127.0.0.1 (tests/support/receiver.py). The kill test
runs last: it kills the FluxJobs replica under load through Ray's own API (`ray.kill`), never by
process. Figures are printed with `-s`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
import ray
from PIL import Image
from ray import serve

from serve_app import errors
from serve_app.client import iter_sse
from serve_app.client import main as client_main
from serve_app.jobs.webhooks import SIGNATURE_HEADER, verify
from tests.serve.helpers import APP_NAME, wait_finished
from tests.support.receiver import Receiver

pytestmark = pytest.mark.serve

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
LONG = {"width": 512, "height": 512, "sample_steps": 60}  # seconds on the small model
STEPPED = {"width": 384, "height": 384, "sample_steps": 30}  # about 2 s on the small model: several updates
LOAD_SHAPE = {"width": 256, "height": 256, "sample_steps": 16}  # a second or more: jobs queue up
REQUEST_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def setup(app_url, app_state):
    """The shared app (tests/serve/apps.py): a directory job store with a short lease, webhooks to 127.0.0.1
    signed with the secret it generated in `app_state`."""
    return app_url, (app_state / "webhook_secret").read_text().strip()


@pytest.fixture(scope="module")
def url(setup):
    return setup[0]


def body(prompt: str, shape: dict = SMALL, **extra) -> dict:
    return {"model": "flux", "prompts": [{"prompt": prompt, **shape}], **extra}


def submit(url: str, request: dict) -> str:
    answer = httpx.post(f"{url}/v1/inference", json=request, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["request_id"]


def stream(url: str, request_id: str) -> list[tuple[str, dict, float]]:
    """Every event of a job's stream until it closes: (event, status, arrival time)."""
    events = []
    with httpx.stream("GET", f"{url}/v1/requests/{request_id}/events", timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        for event, data in iter_sse(answer.iter_lines()):
            events.append((event, json.loads(data), time.time()))
    return events


# ---- the webhook_url field --------------------------------------------------------------------------


@pytest.mark.parametrize("path,webhook_url,status,code", [
    ("/v1/inference", "ftp://127.0.0.1/hook", 422, errors.VALIDATION_ERROR),
    ("/v1/inference", "http://user:pw@127.0.0.1/hook", 422, errors.VALIDATION_ERROR),
    ("/v1/inference", "http://example.com/hook", 400, errors.WEBHOOK_FORBIDDEN),
    ("/v1/inference", "http://localhost:9/hook", 400, errors.WEBHOOK_FORBIDDEN),  # allowed as 127.0.0.1 only
    ("/v1/generate", "http://127.0.0.1:9/hook", 422, errors.VALIDATION_ERROR),  # webhooks are for async requests
])
def test_webhook_urls_are_checked_at_submit(url, path, webhook_url, status, code):
    answer = httpx.post(f"{url}{path}", json=body("x", webhook_url=webhook_url), timeout=30)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    assert "webhook_url" in answer.text


# ---- progress and events ------------------------------------------------------------------------


def test_progress_rises_while_a_multi_step_job_runs(url):
    request_id = submit(url, body("stepping", STEPPED))
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        status = httpx.get(f"{url}/v1/requests/{request_id}/status").json()
        if status["status"] == "in_progress" and (not seen or status["progress"]["step"] != seen[-1]):
            seen.append(status["progress"]["step"])
        if status["status"] == "succeeded":
            break
        time.sleep(0.05)
    print(f"\nPROGRESS polled: steps seen {seen} of {STEPPED['sample_steps']}")
    assert status["progress"] == {"images_done": 1, "images": 1, "step": 30, "steps": 30}
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0]


def test_the_event_stream_of_a_running_job_delivers_progress_then_the_end(url):
    request_id = submit(url, body("streamed", STEPPED))
    events = stream(url, request_id)
    names = [name for name, _, _ in events]
    steps = [status["progress"]["step"] for name, status, _ in events if status["status"] == "in_progress"]
    rates = [len(events) / max(events[-1][2] - events[0][2], 0.001)]
    print(f"\nEVENTS: {len(events)} events ({names.count('status')} status, {rates[0]:.1f}/s), steps {steps}")
    assert names[-1] == "end" and names.count("end") == 1 and set(names[:-1]) == {"status"}
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["progress"]["images_done"] == 1
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] > steps[0]
    assert rates[0] < 20  # a few updates a second, not one per step


def test_a_finished_job_streams_its_end_at_once_and_an_unknown_one_is_404(url):
    request_id = submit(url, body("done"))
    wait_finished(url, request_id)
    started = time.time()
    events = stream(url, request_id)
    assert [name for name, _, _ in events] == ["end"] and time.time() - started < 5
    answer = httpx.get(f"{url}/v1/requests/{'0' * 32}/events")
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, errors.REQUEST_NOT_FOUND)


def test_the_cli_shows_a_progress_bar_from_the_event_stream(url, tmp_path, capsys):
    out = tmp_path / "cli.png"
    client_main(["a photo", "--url", url, "--async", "--width", "256", "--height", "256", "--steps", "20",
                 "--format", "png", "--out", str(out)])
    bars = capsys.readouterr().err.split("\r")
    assert any("in_progress" in bar for bar in bars) and "100%" in bars[-1] and "succeeded" in bars[-1]
    with Image.open(out) as image:
        assert image.size == (256, 256)


# ---- webhooks -------------------------------------------------------------------------------------------


def test_a_webhook_arrives_signed_with_the_result_once_the_job_ends(setup):
    url, secret = setup
    with Receiver() as receiver:
        request_id = submit(url, body("hooked", webhook_url=receiver.url))
        status = wait_finished(url, request_id)
        [delivery] = receiver.wait_for(1)
        time.sleep(0.5)  # no second delivery
    latency = delivery.at - finished_at(status)
    print(f"\nWEBHOOK: delivered {latency:.3f} s after the job finished, in 1 attempt")
    assert len(receiver.deliveries) == 1 and delivery.method == "POST"
    assert verify(secret, delivery.headers[SIGNATURE_HEADER], delivery.body)
    result = httpx.get(f"{url}/v1/requests/{request_id}/result").json()
    assert json.loads(delivery.body) == result and result["status"] == "succeeded"
    final = httpx.get(f"{url}/v1/requests/{request_id}/status").json()
    assert final["webhook"] == {"delivered": True, "attempts": 1, "last_error": None}


def test_a_webhook_arrives_after_the_receiver_answered_500_twice(setup):
    url, secret = setup
    with Receiver(statuses=(500, 500)) as receiver:
        request_id = submit(url, body("hooked twice refused", webhook_url=receiver.url))
        wait_finished(url, request_id)
        deliveries = receiver.wait_for(3)
        deadline = time.time() + 10
        while (webhook := httpx.get(f"{url}/v1/requests/{request_id}/status").json()["webhook"])["attempts"] < 3:
            assert time.time() < deadline, webhook
            time.sleep(0.05)
    gaps = [round(b.at - a.at, 2) for a, b in zip(deliveries, deliveries[1:])]
    print(f"\nWEBHOOK after 500, 500: {len(deliveries)} attempts, {gaps} s apart")
    assert webhook == {"delivered": True, "attempts": 3, "last_error": None}
    assert all(verify(secret, d.headers[SIGNATURE_HEADER], d.body) for d in deliveries)
    assert len({d.body for d in deliveries}) == 1


def test_a_hung_receiver_never_slows_generation(url):
    def three_jobs() -> float:
        started = time.time()
        ids = [submit(url, body(f"while hung {n}")) for n in range(3)]
        assert all(wait_finished(url, request_id)["status"] == "succeeded" for request_id in ids)
        return time.time() - started

    baseline = three_jobs()
    with Receiver(hang=True) as receiver:
        hooked = submit(url, body("hooked to a hung receiver", webhook_url=receiver.url))
        wait_finished(url, hooked)
        receiver.wait_for(1)
        during = three_jobs()
        webhook = httpx.get(f"{url}/v1/requests/{hooked}/status").json()["webhook"]
    print(f"\nHUNG RECEIVER: 3 jobs took {during:.2f} s while it hung ({baseline:.2f} s before)")
    assert not webhook["delivered"]  # still trying, after the other jobs are done
    assert during < baseline * 2 + 1.0


# ---- a FluxJobs replica killed under load (last: it replaces the replica) ---------------------------------


class JobLoad:
    """Job clients that submit and follow jobs back to back until stopped; records every submit."""

    def __init__(self, url: str, clients: int):
        self.url, self.clients = url, clients
        self.accepted: dict[str, float] = {}  # request id -> submitted at
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> JobLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S + 30)
        assert not self._thread.is_alive(), "a load client is still waiting: a request hung"

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            await asyncio.gather(*(self._client(client, n) for n in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, n: int) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            answer = await client.post("/v1/inference", json=body(f"load {n}.{i}", LOAD_SHAPE))
            if answer.status_code != 200:
                self.refused.append(answer.text[:200])
                await asyncio.sleep(0.5)
                continue
            request_id = answer.json()["request_id"]
            self.accepted[request_id] = time.time()
            while not self._stop.is_set():
                status = (await client.get(f"/v1/requests/{request_id}/status")).json()
                if status.get("status") in ("succeeded", "failed", "canceled"):
                    break
                await asyncio.sleep(0.2)


def jobs_actor() -> str:
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and "FluxJobs" in a["name"]]
    return name


def finished_at(status: dict) -> float:
    return datetime.strptime(status["finished_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def wait_running(url: str, request_id: str, timeout_s: float = 60) -> None:
    """Until the job's image has run a denoising step: its call is at a generator."""
    deadline = time.time() + timeout_s
    while httpx.get(f"{url}/v1/requests/{request_id}/status").json()["progress"]["step"] < 1:
        assert time.time() < deadline, f"{request_id} never started"
        time.sleep(0.05)


def test_killing_the_jobs_replica_under_load_loses_no_accepted_job(url):
    finished_before = [submit(url, body(f"finished before the kill {n}")) for n in range(4)]
    assert all(wait_finished(url, request_id)["status"] == "succeeded" for request_id in finished_before)
    victim = jobs_actor()
    load = JobLoad(url, clients=6).start()
    try:
        time.sleep(2)
        # A job seconds from its end when FluxJobs dies (the load's jobs may all end between a check and the kill).
        unfinished = submit(url, body("cut off by the kill", LONG))
        wait_running(url, unfinished)
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        deadline = time.time() + 60
        while httpx.get(f"{url}/v1/requests/{finished_before[0]}/status", timeout=60).status_code != 200:
            assert time.time() < deadline
        answering = time.time() - killed_at
        time.sleep(3)  # load on the replacement
    finally:
        load.stop()

    final = {}
    for request_id in load.accepted:
        answer = httpx.get(f"{url}/v1/requests/{request_id}/status")
        final[request_id] = wait_finished(url, request_id) if answer.status_code == 200 else {"status": "lost (404)"}
    outcomes = [status["status"] for status in final.values()]
    counts = {state: outcomes.count(state) for state in set(outcomes)}
    # Accepted before the kill and ended after it: cut off by the kill, run again by the replacement.
    cut_off = [request_id for request_id, submitted in load.accepted.items()
               if submitted < killed_at and final[request_id].get("finished_at") and
               finished_at(final[request_id]) > killed_at]
    print(f"\nJOBS KILL: {len(load.accepted)} jobs accepted ({len(cut_off)} of them unfinished at the kill), "
          f"{counts}; {len(load.refused)} submits refused; status answered again {answering:.1f} s after the kill")
    assert jobs_actor() != victim
    rerun = wait_finished(url, unfinished)  # run again by the replacement
    assert rerun["status"] == "succeeded" and finished_at(rerun) > killed_at, rerun
    assert all(final[request_id]["status"] == "succeeded" for request_id in cut_off)
    assert counts == {"succeeded": len(load.accepted)}, counts
    assert not load.refused, load.refused[:3]
    for request_id in finished_before:  # kept through the restart, images included
        result = httpx.get(f"{url}/v1/requests/{request_id}/result").json()
        assert result["status"] == "succeeded"
        image = httpx.get(f"{url}{result['outputs']['images'][0]['url']}")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert serve.status().applications[APP_NAME].deployments["FluxJobs"].replica_states.get("RUNNING") == 1
