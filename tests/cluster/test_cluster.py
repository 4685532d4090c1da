"""deploy/cluster-local.yaml on a real Ray cluster of three nodes: where the replicas run, and a worker node
lost under load with nothing lost.

The file runs top to bottom on one cluster and one deploy (conftest.py). What each test checks comes from
Ray and Serve themselves: the state API (nodes, actors), Serve's application details (replicas and their
nodes), and the generator replicas' own access logs (Serve writes the request id of every call it serves).
Figures (jobs, seconds) are printed with `-s`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from tests.cluster.conftest import GENERATOR, WORKERS, Deployed, generator_nodes, wait_serving

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
HEALTH_LIMIT_S = 2.0  # /health must answer within this, whatever happens
JOB_CLIENTS = 6


def body(prompt: str) -> dict:
    return {"model": "flux", "prompts": [{"prompt": prompt, **SMALL}]}


def served_request_ids(deployed: Deployed, replica: dict) -> set[str]:
    """The request ids of the `generate` calls a generator replica served, from its log (Serve's access log)."""
    path = deployed.cluster.replica_log(replica)
    if not path.exists():
        return set()
    served = set()
    for line in path.read_text().splitlines():
        if "CALL generate OK" in line:
            served.add(json.loads(line).get("request_id"))
    return served


def generate_concurrently(url: str, count: int) -> list[httpx.Response]:
    async def send():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/generate", json=body(f"spread {i}"))
                                          for i in range(count)))

    return asyncio.run(send())


def test_generators_run_on_both_workers_and_the_rest_on_the_head(deployed):
    cluster = deployed.cluster
    names = cluster.alive_nodes()
    assert sorted(names.values()) == ["head", "w1", "w2"]
    assert sorted(generator_nodes(cluster).values()) == ["w1", "w2"]  # one per worker, none on the head
    for deployment in ("FluxIngress", "FluxJobs"):
        [replica] = cluster.replicas(deployment)
        assert names[replica["node_id"]] == "head", deployment
    from ray.util.state import list_actors

    serve_actors = {actor.class_name: names.get(actor.node_id)
                    for actor in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")],
                                             raise_on_missing_output=False)
                    if actor.class_name in ("ServeController", "ProxyActor")}
    assert serve_actors == {"ServeController": "head", "ProxyActor": "head"}  # proxy_location: HeadOnly


def test_requests_through_the_head_are_served_by_both_workers(deployed):
    """Rounds of 12 concurrent requests through the head's proxy until each worker's replica has served some
    (Serve's router balances by queue length, so a round may favour one)."""
    names = deployed.cluster.alive_nodes()
    request_ids: set[str] = set()
    served: dict[str, set[str]] = {}
    for _ in range(5):
        answers = generate_concurrently(deployed.url, 12)
        assert [a.status_code for a in answers] == [200] * 12, [a.text[:200] for a in answers if a.status_code != 200]
        request_ids |= {a.headers["x-request-id"] for a in answers}
        deadline = time.monotonic() + 5  # a replica's log line may trail its answer a moment
        while True:
            served = {names[r["node_id"]]: served_request_ids(deployed, r) & request_ids
                      for r in deployed.cluster.replicas(GENERATOR) if r["state"] == "RUNNING"}
            if sum(map(len, served.values())) == len(request_ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if all(served.get(worker) for worker in WORKERS):
            break
    print(f"\nplacement: {len(request_ids)} requests through the head, served by w1: {len(served.get('w1', ()))}, "
          f"w2: {len(served.get('w2', ()))}")
    assert set(served) == set(WORKERS) and all(served.values()), served
    assert sum(map(len, served.values())) == len(request_ids)  # each request on exactly one replica


# ---- a worker node lost under load ---------------------------------------------------------------------------


@dataclass
class Probe:
    at: float  # seconds since the load started
    took: float
    status: int | str
    unavailable: list[str] = field(default_factory=list)


class JobLoad:
    """`JOB_CLIENTS` clients, each submitting an async job and following it to its end, then the next.

    Every accepted job is recorded with how it ended; a /health poller records each answer and how long it
    took. Runs its own event loop on a thread, so the test can kill a node meanwhile.
    """

    def __init__(self, url: str):
        self.url = url
        self.accepted: list[str] = []
        self.ended: dict[str, str] = {}
        self.refused: list[str] = []
        self.probes: list[Probe] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> JobLoad:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load did not end: a job never finished"

    def since(self) -> float:
        return time.monotonic() - self.started

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(self._health(client), *(self._client(client, i) for i in range(JOB_CLIENTS)))

    async def _client(self, client: httpx.AsyncClient, number: int) -> None:
        sent = 0
        while not self._stop.is_set():
            sent += 1
            answer = await client.post(f"{self.url}/v1/inference", json=body(f"client {number} job {sent}"))
            if answer.status_code != 200:
                self.refused.append(f"{answer.status_code} {answer.text[:200]}")
                await asyncio.sleep(0.5)
                continue
            request_id = answer.json()["request_id"]
            self.accepted.append(request_id)
            self.ended[request_id] = await self._follow(client, request_id)

    async def _follow(self, client: httpx.AsyncClient, request_id: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = (await client.get(f"{self.url}/v1/requests/{request_id}/status")).json()
            if status["status"] in ("succeeded", "failed", "canceled"):
                return status["status"] if status["status"] == "succeeded" else json.dumps(status)[:300]
            await asyncio.sleep(0.2)
        return "never ended"

    async def _health(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = await client.get(f"{self.url}/health", timeout=10)
                probe = Probe(self.since(), time.monotonic() - started, answer.status_code,
                              answer.json().get("unavailable", []))
            except httpx.HTTPError as exc:
                probe = Probe(self.since(), time.monotonic() - started, type(exc).__name__)
            self.probes.append(probe)
            await asyncio.sleep(0.25)


def test_a_worker_node_lost_under_load_loses_no_job_and_its_replica_comes_back(deployed):
    cluster = deployed.cluster
    before = {name: replica for replica, name in generator_nodes(cluster).items()}
    load = JobLoad(deployed.url).start()
    time.sleep(4)
    accepted_before_kill = len(load.accepted)
    killed_at = load.since()
    cluster.workers["w1"].kill()  # raylet, object store, agents and the replica on it: SIGKILL, all at once
    time.sleep(10)
    load.stop()
    # Every accepted job ended, succeeded, once: in the store exactly the jobs accepted, each with its image.
    outcomes = Counter(load.ended.get(request_id, "never followed") for request_id in load.accepted)
    lost = len(load.accepted) - outcomes["succeeded"]
    slowest = max(load.probes, key=lambda probe: probe.took)
    [jobs_replica] = cluster.replicas("FluxJobs")
    retried = cluster.replica_log(jobs_replica).read_text().count("lost its generator replica")
    print(f"\nnode loss: jobs accepted {len(load.accepted)} ({accepted_before_kill} before the kill at "
          f"{killed_at:.1f} s), succeeded {outcomes['succeeded']}, lost or failed {lost}, refused "
          f"{len(load.refused)}, work items sent again after the kill {retried}; /health polled "
          f"{len(load.probes)} times, longest {slowest.took:.2f} s (at {slowest.at:.1f} s), answers "
          f"{dict(Counter(str(p.status) for p in load.probes))}")
    assert outcomes == {"succeeded": len(load.accepted)}, outcomes
    assert len(set(load.accepted)) == len(load.accepted) and accepted_before_kill > 0
    assert load.accepted and not load.refused, load.refused[:3]
    stored = {path.stem for path in deployed.job_records.glob("*.json")}
    assert stored == set(load.accepted)  # the only async jobs of this cluster: none lost, none made twice
    for request_id in load.accepted[:: max(1, len(load.accepted) // 10)]:
        result = httpx.get(f"{deployed.url}/v1/requests/{request_id}/result", timeout=30).json()
        assert result["status"] == "succeeded" and len(result["outputs"]["images"]) == 1, result
    # /health: within the limit at every poll; 200 while a replica of `flux` answered (w2's), else 503 naming it.
    assert slowest.took < HEALTH_LIMIT_S, slowest
    for probe in load.probes:
        assert probe.status == 200 or (probe.status == 503 and probe.unavailable == ["flux"]), probe

    # The node comes back: Serve puts the lost replica there again, and it serves.
    restarted_at = time.monotonic()
    cluster.restart("w1")
    cluster.wait_nodes({"head", "w1", "w2"})
    wait_serving(cluster, deployed.url, {"w1", "w2"})
    running_at = time.monotonic()
    names = cluster.alive_nodes()
    [replacement] = [r for r in cluster.replicas(GENERATOR)
                     if r["state"] == "RUNNING" and names.get(r["node_id"]) == "w1"]
    assert replacement["replica_id"] != before["w1"]
    served: set[str] = set()
    deadline = time.monotonic() + 60
    while not served and time.monotonic() < deadline:
        answers = generate_concurrently(deployed.url, 6)
        assert [a.status_code for a in answers] == [200] * 6
        served = served_request_ids(deployed, replacement) & {a.headers["x-request-id"] for a in answers}
    served_at = time.monotonic()
    print(f"node loss: w1 back; its replica RUNNING {running_at - restarted_at:.1f} s after the restart and "
          f"serving {served_at - restarted_at:.1f} s after it ({served_at - load.started - killed_at:.1f} s "
          f"after the kill)")
    assert served, "the replica on the restarted node served nothing"


# ---- the job store held by another server -------------------------------------------------------------------


def test_a_job_store_held_by_another_server_is_named_by_health_until_it_is_free(deployed):
    """FluxJobs is lost, and another server (a second `make serve` on the same checkout, say) takes the job
    store meanwhile and keeps renewing its lease: the replacement FluxJobs waits, logs once who holds the store
    and how to use another, and /health answers 503 within the limit naming the job store. Once the other
    server lets go, FluxJobs takes the store over and jobs run again."""
    import os
    import signal

    from serve_app.config import JobArgs
    from serve_app.jobs.store import Lease, open_store

    cluster = deployed.cluster
    store = open_store(JobArgs(store=str(deployed.directory / ".flux-serve/cluster/jobs")))
    other = "app 'flux' of the Ray cluster at 10.9.8.7:6379"
    holding = threading.Event()
    holding.set()

    def other_server_holds_the_store():
        while holding.is_set():
            store.put_lease(Lease(owner="other-replica", expires_at=time.time() + 2, host="other-host", pid=4242,
                                  server=other))
            time.sleep(0.3)

    [lost] = cluster.replicas("FluxJobs")
    os.kill(lost["pid"], signal.SIGKILL)  # the replica's process, under this test's head node
    holder = threading.Thread(target=other_server_holds_the_store)
    holder.start()
    started = time.monotonic()
    probes: list[tuple[float, int, dict]] = []
    named_after = logged_after = None
    named: dict = {}
    waiting: list[dict] = []
    log = ""
    try:
        while time.monotonic() - started < 60 and (named_after is None or logged_after is None):
            began = time.monotonic()
            answer = httpx.get(f"{deployed.url}/health", timeout=10)
            probes.append((time.monotonic() - began, answer.status_code, answer.json()))
            if named_after is None and answer.status_code == 503 and "jobs" in answer.json().get("causes", {}):
                named_after, named = time.monotonic() - started, answer.json()
            waiting = [r for r in cluster.replicas("FluxJobs") if r["replica_id"] != lost["replica_id"]]
            if waiting and (path := cluster.replica_log(waiting[0], "FluxJobs")).exists():
                log = path.read_text()
                if logged_after is None and "which keeps renewing its lease" in log:
                    logged_after = time.monotonic() - started
            time.sleep(0.25)
        if logged_after is not None:
            time.sleep(2)  # a little longer: the waiting replica logs it once only
            log = cluster.replica_log(waiting[0], "FluxJobs").read_text()
    finally:
        holding.clear()
        holder.join()
    assert named_after is not None and logged_after is not None, (probes[-3:], log[-2000:])
    assert all(probe[1] == 503 and probe[2]["unavailable"] == ["jobs"] for probe in probes), probes  # the store alone
    cause = named["causes"]["jobs"]
    assert "10.9.8.7:6379" in cause and "pid 4242 on other-host" in cause and "`jobs.store`" in cause, cause
    assert max(p[0] for p in probes) < HEALTH_LIMIT_S, probes
    assert log.count("which keeps renewing its lease") == 1 and "`jobs.store`" in log

    store.delete_lease()  # the other server stops, handing the store back
    released = time.monotonic()
    wait_serving(cluster, deployed.url, {"w1", "w2"}, timeout_s=60)
    back_after = time.monotonic() - released
    answer = httpx.post(f"{deployed.url}/v1/inference", json=body("after the hand-over"), timeout=30)
    request_id = answer.json()["request_id"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{deployed.url}/v1/requests/{request_id}/status").json()["status"]) not in (
            "succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"\njob store held by another server: /health named it {named_after:.1f} s after FluxJobs was lost "
          f"(longest answer {max(p[0] for p in probes):.2f} s), the waiting FluxJobs logged it after "
          f"{logged_after:.1f} s; healthy {back_after:.1f} s after it was let go")
    assert status == "succeeded"


# ---- updated in place -------------------------------------------------------------------------------------------


def test_serve_deploy_of_a_new_user_config_updates_the_generators_in_place(deployed):
    """`serve deploy` of the same YAML with other batch settings (the generator's user_config) reaches the
    running replicas through `reconfigure`: the same replica ids, on the same nodes, still serving."""
    import yaml

    cluster = deployed.cluster
    before = generator_nodes(cluster)
    config = yaml.safe_load((deployed.directory / "cluster-local.yaml").read_text())
    [generator] = [d for d in config["applications"][0]["deployments"] if d["name"] == GENERATOR]
    generator["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.01}
    (deployed.directory / "cluster-local-updated.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.monotonic()
    done = cluster.command("serve", "deploy", "--address", cluster.dashboard, "cluster-local-updated.yaml")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        details = cluster.serve_details()["applications"]["flux"]["deployments"][GENERATOR]
        if details["deployment_config"].get("user_config") == generator["user_config"] and details["status"] == "HEALTHY":
            break
        time.sleep(0.5)
    applied_after = time.monotonic() - started
    assert details["deployment_config"]["user_config"] == generator["user_config"], details["deployment_config"]
    assert generator_nodes(cluster) == before  # no replica replaced
    answers = generate_concurrently(deployed.url, 4)
    assert [a.status_code for a in answers] == [200] * 4
    print(f"\nin place: user_config applied {applied_after:.1f} s after `serve deploy`, replicas kept: {sorted(before)}")
