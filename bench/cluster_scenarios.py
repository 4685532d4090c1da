"""What tests/cluster/ checks and bench/cluster.py measures, on one cluster of bench/cluster_nodes.py.

Each scenario drives the cluster from outside and returns what it saw, from what Ray and Serve report (the
state API, Serve's application details, each node's Prometheus endpoint, the replicas' access logs): the
tests assert on it, the bench writes its figures. They run in this file's order on one cluster and one deploy;
the destructive ones (overlays, lost nodes) come last, and each leaves the cluster as the next one expects.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import httpx

from bench.cluster_nodes import GENERATOR, METRICS_INTERVAL_S, WORKERS, LocalCluster

SMALL = {"width": 64, "height": 64, "sample_steps": 2}
HEALTH_LIMIT_S = 2.0  # /health must answer within this, whatever happens
JOB_CLIENTS = 6
GENERATOR_ACTOR = f"ServeReplica:flux:{GENERATOR}"  # the class name the state API gives its replicas' actors

# The generator's autoscaling in the autoscaling overlay: short delays, so that a test sees a scale-out and a
# scale-in within seconds (the shipped flux-dev.yaml waits 30 s and 600 s). Clients that keep 4 requests in
# flight ask for 2 replicas (4 / target_ongoing_requests), and no more: max_replicas is 2 anyway.
AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 2,
    "look_back_period_s": 2,
    # How often handles and replicas push the request counts the autoscaler decides on (default 10 s).
    # Deprecated in favour of RAY_SERVE_{HANDLE,REPLICA}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, but Ray
    # 2.60 does not read those yet: its router and replica push every `metrics_interval_s`.
    "metrics_interval_s": 0.5,
}


def body(prompt: str, lora: str | None = None) -> dict:
    request: dict = {"model": "flux", "prompts": [{"prompt": prompt, **SMALL}]}
    if lora is not None:
        request["loras"] = [{"path": lora, "network_multiplier": 1.0}]
    return request


def generate_concurrently(url: str, bodies: list[dict], clients: int | None = None) -> list[httpx.Response]:
    """Each body as one sync /v1/generate, `clients` at a time (all at once by default), answers in order."""

    async def send():
        gate = asyncio.Semaphore(clients or len(bodies))
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(request: dict) -> httpx.Response:
                async with gate:
                    return await client.post(f"{url}/v1/generate", json=request)

            return await asyncio.gather(*(one(request) for request in bodies))

    return asyncio.run(send())


def served_request_ids(cluster: LocalCluster, replica: dict) -> set[str]:
    """The request ids of the `generate` calls a generator replica served, from its log (Serve's access log)."""
    path = cluster.replica_log(replica, GENERATOR)
    if not path.exists():
        return set()
    return {json.loads(line).get("request_id") for line in path.read_text().splitlines() if "CALL generate OK" in line}


# ---- placement ----------------------------------------------------------------------------------------------


@dataclass
class Placement:
    nodes: list[str]  # the names of the nodes alive
    generators: list[str]  # the node of each RUNNING generator replica
    ingress: str
    jobs: str
    serve_actors: dict[str, str]  # Serve's controller and proxy -> their node


def placement(cluster: LocalCluster) -> Placement:
    from ray.util.state import list_actors

    names = cluster.alive_nodes()
    [ingress] = cluster.replicas("FluxIngress")
    [jobs] = cluster.replicas("FluxJobs")
    serve_actors = {actor.class_name: names.get(actor.node_id or "", "?")
                    for actor in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")],
                                             raise_on_missing_output=False)
                    if actor.class_name in ("ServeController", "ProxyActor")}
    return Placement(sorted(names.values()), sorted(cluster.replica_nodes().values()), names[ingress["node_id"]],
                     names[jobs["node_id"]], serve_actors)


@dataclass
class Spread:
    statuses: list[int]
    served: dict[str, set[str]]  # node -> request ids its generator replica served
    request_ids: set[str]


def spread(cluster: LocalCluster, rounds: int = 5) -> Spread:
    """Rounds of 12 concurrent requests through the head's proxy until each worker's replica has served some
    (Serve's router balances by queue length, so a round may favour one)."""
    names = cluster.alive_nodes()
    statuses: list[int] = []
    request_ids: set[str] = set()
    served: dict[str, set[str]] = {}
    for round_ in range(rounds):
        answers = generate_concurrently(cluster.url, [body(f"spread {round_} {i}") for i in range(12)])
        statuses += [a.status_code for a in answers]
        request_ids |= {a.headers.get("x-request-id", "") for a in answers}
        deadline = time.monotonic() + 5  # a replica's log line may trail its answer a moment
        while True:
            served = {names[r["node_id"]]: served_request_ids(cluster, r) & request_ids
                      for r in cluster.replicas(GENERATOR) if r["state"] == "RUNNING"}
            if sum(map(len, served.values())) == len(request_ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if all(served.get(worker) for worker in WORKERS):
            break
    return Spread(statuses, served, request_ids)


# ---- LoRA affinity across nodes -----------------------------------------------------------------------------


@dataclass
class ReplicaLoras:
    """One generator replica's LoRA figures, from its node's Prometheus endpoint."""

    node: str
    registered: set[str]  # the multiplexed model ids (LoRA sets) Serve has registered on it now
    set_loads: float  # Serve's multiplexed model loads (ray_serve_multiplexed_models_load_counter)
    adapter_loads: float  # LoRA files loaded as adapters (ray_flux_lora_adapter_loads)


def replica_loras(cluster: LocalCluster, earlier: dict[str, ReplicaLoras] | None = None) -> dict[str, ReplicaLoras]:
    """Replica id -> its LoRA figures, for every RUNNING generator replica, each read from its own node's
    metrics (a node's Prometheus endpoint exports its own processes' metrics only). A series missing from this
    read (a gauge between two of its sets) keeps its value of `earlier`; the counts only ever grow."""
    earlier = earlier or {}
    found: dict[str, ReplicaLoras] = {}
    for replica, node in cluster.replica_nodes().items():
        before = earlier.get(replica)
        figures = ReplicaLoras(node, set(), before.set_loads if before else 0.0,
                               before.adapter_loads if before else 0.0)
        for name, labels, value in cluster.metrics(node):
            if labels.get("replica") != replica:
                continue
            if name == "ray_serve_registered_multiplexed_model_id" and value == 1:
                figures.registered.add(labels["model_id"])
            elif name == "ray_serve_multiplexed_models_load_counter_total":
                figures.set_loads = max(figures.set_loads, value)
            elif name == "ray_flux_lora_adapter_loads_total":
                figures.adapter_loads = max(figures.adapter_loads, value)
        if not figures.registered and before is not None:
            figures.registered = before.registered
        found[replica] = figures
    return found


@dataclass
class Affinity:
    statuses: list[int]
    requests: int  # round-robin requests after the warm-up
    before: dict[str, ReplicaLoras]
    after: dict[str, ReplicaLoras]

    def registered_on(self) -> dict[str, list[str]]:
        """LoRA set id -> the nodes whose replica holds it."""
        held: dict[str, list[str]] = {}
        for figures in self.after.values():
            for model_id in figures.registered:
                held.setdefault(model_id, []).append(figures.node)
        return held

    def loads_by_node(self, kind: str = "set_loads") -> dict[str, int]:
        """Loads on each node's replica during the scenario (warm-up included)."""
        return {figures.node: int(getattr(figures, kind) - getattr(self.before.get(replica), kind, 0.0))
                for replica, figures in self.after.items()}


def affinity(cluster: LocalCluster, loras: int = 4, rounds: int = 8, settle_s: float = 0.5) -> Affinity:
    """`loras` LoRAs, first each alone (a warm-up: where it lands, it is loaded), then round robin through the
    head's proxy, `loras` at a time. Serve learns which LoRA sets a replica holds from the replica's pushes,
    relayed by its controller to every router; `settle_s` after each first sight lets that happen, as new LoRAs
    trickle in on a real service. Figures are read once every request has been answered and the nodes' metrics
    have caught up."""
    from serve_app import tiny

    paths = [f"affinity/lora-{i}.safetensors" for i in range(loras)]
    for i, path in enumerate(paths):
        tiny.write_aitoolkit_lora(cluster.directory / ".flux-serve/cluster/loras" / path, seed=100 + i)
    before = replica_loras(cluster)
    statuses = []
    for i, path in enumerate(paths):
        statuses += [a.status_code for a in generate_concurrently(cluster.url, [body(f"first sight {i}", path)])]
        time.sleep(settle_s)
    order = [paths[i % loras] for i in range(rounds * loras)]
    answers = generate_concurrently(cluster.url, [body(f"round robin {i}", p) for i, p in enumerate(order)], loras)
    statuses += [a.status_code for a in answers]
    # Every load happened before the last answer: the metrics of a full export interval later hold them all.
    time.sleep(METRICS_INTERVAL_S + 1)
    after = replica_loras(cluster, before)
    deadline = time.monotonic() + 20
    while sum(len(f.registered) for f in after.values()) < loras and time.monotonic() < deadline:
        time.sleep(1)
        after = replica_loras(cluster, after)
    return Affinity(statuses, len(order), before, after)


# ---- updated in place ---------------------------------------------------------------------------------------


@dataclass
class InPlace:
    wanted: dict
    applied: dict
    applied_after_s: float
    before: dict[str, str]  # replica id -> node
    after: dict[str, str]
    statuses: list[int]


def update_in_place(cluster: LocalCluster) -> InPlace:
    """`serve deploy` of the same YAML with other batch settings (the generator's user_config)."""
    config = cluster.config()
    [generator] = [d for d in config["applications"][0]["deployments"] if d["name"] == GENERATOR]
    generator["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.01}
    before = cluster.replica_nodes()
    started = time.monotonic()
    cluster.deploy("cluster-local-updated.yaml", config)
    deadline = time.monotonic() + 60
    details: dict = {}
    while time.monotonic() < deadline:
        details = cluster.deployment(GENERATOR)
        applied = details["deployment_config"].get("user_config")
        if applied == generator["user_config"] and details["status"] == "HEALTHY":
            break
        time.sleep(0.5)
    applied_after = time.monotonic() - started
    after = cluster.replica_nodes()
    answers = generate_concurrently(cluster.url, [body(f"in place {i}") for i in range(4)])
    return InPlace(generator["user_config"], details["deployment_config"].get("user_config") or {}, applied_after,
                   before, after, [a.status_code for a in answers])


# ---- the job store held by another server -------------------------------------------------------------------


@dataclass
class StoreHeld:
    probes: list[tuple[float, int, dict]]  # (seconds the answer took, status, body) of /health while held
    named_after_s: float | None  # since FluxJobs was lost, until /health named the job store
    logged_after_s: float | None  # ... until the waiting FluxJobs logged who holds it
    log: str
    back_after_s: float  # since the store was let go, until serving again
    job_after: str  # how a job submitted after the hand-over ended


def store_held(cluster: LocalCluster) -> StoreHeld:
    """FluxJobs is lost, and another server (a second `make serve` on the same checkout, say) takes the job
    store meanwhile and keeps renewing its lease; then it lets go."""
    from serve_app.config import JobArgs
    from serve_app.jobs.store import Lease, open_store

    store = open_store(JobArgs(store=str(cluster.directory / ".flux-serve/cluster/jobs")))
    other = "app 'flux' of the Ray cluster at 10.9.8.7:6379"
    holding = threading.Event()
    holding.set()

    def other_server_holds_the_store():
        while holding.is_set():
            store.put_lease(Lease(owner="other-replica", expires_at=time.time() + 2, host="other-host", pid=4242,
                                  server=other))
            time.sleep(0.3)

    [lost] = cluster.replicas("FluxJobs")
    os.kill(lost["pid"], signal.SIGKILL)  # the replica's process, in one of this cluster's sessions
    holder = threading.Thread(target=other_server_holds_the_store)
    holder.start()
    started = time.monotonic()
    probes: list[tuple[float, int, dict]] = []
    named_after = logged_after = None
    waiting: list[dict] = []
    log = ""
    try:
        while time.monotonic() - started < 60 and (named_after is None or logged_after is None):
            began = time.monotonic()
            answer = httpx.get(f"{cluster.url}/health", timeout=10)
            probes.append((time.monotonic() - began, answer.status_code, answer.json()))
            if named_after is None and answer.status_code == 503 and "jobs" in answer.json().get("causes", {}):
                named_after = time.monotonic() - started
            waiting = [r for r in cluster.replicas("FluxJobs") if r["replica_id"] != lost["replica_id"]]
            if waiting and (path := cluster.replica_log(waiting[0], "FluxJobs")).exists():
                log = path.read_text()
                if logged_after is None and "which keeps renewing its lease" in log:
                    logged_after = time.monotonic() - started
            time.sleep(0.25)
        if logged_after is not None:
            time.sleep(1)  # a little longer: the waiting replica logs it once only
            log = cluster.replica_log(waiting[0], "FluxJobs").read_text()
    finally:
        holding.clear()
        holder.join()
    store.delete_lease()  # the other server stops, handing the store back
    released = time.monotonic()
    cluster.wait_serving(set(WORKERS), timeout_s=60)
    back_after = time.monotonic() - released
    answer = httpx.post(f"{cluster.url}/v1/inference", json=body("after the hand-over"), timeout=30)
    request_id = answer.json()["request_id"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{cluster.url}/v1/requests/{request_id}/status").json()["status"]) not in (
            "succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    return StoreHeld(probes, named_after, logged_after, log, back_after, status)


# ---- load: async jobs, /health ------------------------------------------------------------------------------


class BackgroundLoad:
    """Clients on an event loop of their own, on a thread, so the caller can kill nodes or watch Serve meanwhile:
    `start()`, then `stop()` once the scenario is done (every client ends the request it has out)."""

    unfinished = "the load did not end"  # stop()'s message when a client never returns

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), self.unfinished

    async def _main(self) -> None:
        raise NotImplementedError


@dataclass
class Probe:
    at: float  # seconds since the load started
    took: float
    status: int | str
    unavailable: list[str] = field(default_factory=list)


class JobLoad(BackgroundLoad):
    """`JOB_CLIENTS` clients, each submitting an async job and following it to its end, then the next.

    Every accepted job is recorded with how it ended; a /health poller records each answer and how long it
    took. Runs its own event loop on a thread, so the caller can kill a node meanwhile. An answer that is not
    200 (or no answer) is recorded as refused (a submission) or polled again (a job's status)."""

    unfinished = "the load did not end: a job never finished"

    def __init__(self, url: str, timeout_s: float = 30):
        super().__init__()
        self.url = url
        self.timeout_s = timeout_s
        self.accepted: list[str] = []
        self.ended: dict[str, str] = {}
        self.ended_at: dict[str, float] = {}
        self.refused: list[str] = []
        self.probes: list[Probe] = []
        self.started = time.monotonic()

    def since(self) -> float:
        return time.monotonic() - self.started

    def outcomes(self) -> Counter:
        return Counter(self.ended.get(request_id, "never followed") for request_id in self.accepted)

    def slowest(self) -> Probe:
        return max(self.probes, key=lambda probe: probe.took)

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            await asyncio.gather(self._health(client), *(self._client(client, i) for i in range(JOB_CLIENTS)))

    async def _client(self, client: httpx.AsyncClient, number: int) -> None:
        sent = 0
        while not self._stop.is_set():
            sent += 1
            try:
                answer = await client.post(f"{self.url}/v1/inference", json=body(f"client {number} job {sent}"))
            except httpx.HTTPError as exc:
                self.refused.append(f"{type(exc).__name__} at {self.since():.1f} s")
                await asyncio.sleep(0.5)
                continue
            if answer.status_code != 200:
                self.refused.append(f"{answer.status_code} {answer.text[:200]}")
                await asyncio.sleep(0.5)
                continue
            request_id = answer.json()["request_id"]
            self.accepted.append(request_id)
            self.ended[request_id] = await self._follow(client, request_id)
            self.ended_at[request_id] = self.since()

    async def _follow(self, client: httpx.AsyncClient, request_id: str) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = await client.get(f"{self.url}/v1/requests/{request_id}/status")
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 200:
                status = answer.json()
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


def sample_results(cluster: LocalCluster, request_ids: list[str], count: int = 10) -> list[dict]:
    """The results of about `count` of these jobs, spread over them."""
    return [httpx.get(f"{cluster.url}/v1/requests/{request_id}/result", timeout=30).json()
            for request_id in request_ids[:: max(1, len(request_ids) // count)]]


# ---- a worker node lost under load --------------------------------------------------------------------------


@dataclass
class NodeLoss:
    load: JobLoad
    killed_at: float  # seconds into the load
    accepted_before_kill: int
    new_records: set[str]  # the job records the store gained during the load
    results: list[dict]
    retried: int  # work items sent again after the kill (FluxJobs' log)
    replaced: bool  # the replica on the restarted node is a new one
    running_after_s: float  # since the node was started again, until its new replica was RUNNING
    serving_after_s: float  # ... until that replica served a request
    serving_after_kill_s: float
    served: set[str]


def generator_node_lost(cluster: LocalCluster, victim: str = "w1", before_s: float = 4,
                        after_s: float = 6) -> NodeLoss:
    """Async jobs under load; `victim` is killed `before_s` in, the load goes on `after_s` more; then the node
    is started again, by its documented command, and its replica must serve."""
    before = {node: replica for replica, node in cluster.replica_nodes().items()}
    records_before = {path.stem for path in cluster.job_records.glob("*.json")}
    load = JobLoad(cluster.url).start()
    time.sleep(before_s)
    accepted_before_kill = len(load.accepted)
    killed_at = load.since()
    cluster.kill(victim)
    time.sleep(after_s)
    load.stop()
    new_records = {path.stem for path in cluster.job_records.glob("*.json")} - records_before
    results = sample_results(cluster, load.accepted)
    [jobs_replica] = cluster.replicas("FluxJobs")
    retried = cluster.replica_log(jobs_replica, "FluxJobs").read_text().count("lost its generator replica")

    restarted = time.monotonic()
    cluster.start_worker(victim)
    cluster.wait_nodes({"head", *WORKERS})
    cluster.wait_serving(set(WORKERS))
    running = time.monotonic()
    names = cluster.alive_nodes()
    [replacement] = [r for r in cluster.replicas(GENERATOR)
                     if r["state"] == "RUNNING" and names.get(r["node_id"]) == victim]
    served: set[str] = set()
    deadline = time.monotonic() + 60
    while not served and time.monotonic() < deadline:
        answers = generate_concurrently(cluster.url, [body(f"after the restart {i}") for i in range(6)])
        assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers]
        served = served_request_ids(cluster, replacement) & {a.headers["x-request-id"] for a in answers}
    serving = time.monotonic()
    return NodeLoss(load, killed_at, accepted_before_kill, new_records, results, retried,
                    replacement["replica_id"] != before.get(victim), running - restarted, serving - restarted,
                    serving - load.started - killed_at, served)


# ---- autoscaling across nodes -------------------------------------------------------------------------------


class GenerateLoad(BackgroundLoad):
    """`clients` clients sending sync /v1/generate requests of `shape` one after another, on a thread of its own."""

    def __init__(self, url: str, clients: int, shape: dict):
        super().__init__()
        self.url = url
        self.clients = clients
        self.shape = shape
        self.answers: list[tuple[str, int]] = []  # (request id, or the error's name; status, 0 if none)

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, number: int) -> None:
        sent = 0
        while not self._stop.is_set():
            sent += 1
            request = {"model": "flux", "prompts": [{"prompt": f"scale {number} {sent}", **self.shape}]}
            try:
                answer = await client.post(f"{self.url}/v1/generate", json=request)
                self.answers.append((answer.headers.get("x-request-id", ""), answer.status_code))
            except httpx.HTTPError as exc:
                self.answers.append((type(exc).__name__, 0))
                await asyncio.sleep(0.5)


# Each request of the autoscaling load computes 8 times SMALL's (4 times the pixels, twice the steps): the
# replica stays as busy with fewer requests, and the proxy, the ingress and the clients take less of the CPU
# the added replica needs to start (a 2-core machine runs all of it).
SCALING_SHAPE = {"width": 128, "height": 128, "sample_steps": 4}


@dataclass
class Autoscaling:
    redeployed_after_s: float  # since `serve deploy` of the overlay, until serving on one generator replica
    kept: str  # the node of that replica
    decided_after_s: float  # since the load started, until Serve added a replica
    running_after_s: float  # ... until it was RUNNING
    nodes_at_peak: list[str]  # the nodes of the generator's actors at 2 replicas (state API)
    new_replica_served: int  # requests the added replica served while the load lasted
    removed_after_s: float  # since the load stopped, until Serve was back to one replica
    statuses: Counter  # of the load's answers and the trickle's
    trickle_answered: int  # requests of one client that kept sending while the added replica drained


def autoscaling(cluster: LocalCluster, clients: int = 3, timeout_s: float = 150) -> Autoscaling:
    """The generator autoscaled (AUTOSCALING: min 1, max 2) by an overlay (`last_overlay`): under load, Serve adds
    a replica, which can only go to the other worker (one replica per node); with the load down to one client,
    it removes it while that client's requests keep coming (none may be lost while the replica drains).

    Ray 2.60 counts the deployments' autoscaling policies in an application's code version, so the first deploy
    that gives a deployment an `autoscaling_config` rebuilds the whole app: every replica is replaced, the
    generator by `initial_replicas` (1). Later changes of it (min, max, delays) are applied in place."""
    deployed = time.monotonic()
    cluster.deploy("cluster-local-overlay.yaml", last_overlay(cluster))
    wait_until(lambda: (len(cluster.replicas(GENERATOR)) == 1 and len(cluster.replica_nodes()) == 1
                        and on_a_worker(cluster, "FluxJobs")), timeout_s, "serving on one generator replica")
    redeployed = time.monotonic() - deployed
    [(kept_id, kept)] = cluster.replica_nodes().items()

    load = GenerateLoad(cluster.url, clients, SCALING_SHAPE).start()
    started = time.monotonic()
    decided = running = None
    nodes_at_peak: list[str] = []
    try:
        while time.monotonic() - started < timeout_s and running is None:
            if decided is None and len(cluster.replicas(GENERATOR)) == 2:
                decided = time.monotonic() - started
            if len(cluster.replica_nodes()) == 2:
                running = time.monotonic() - started
                nodes_at_peak = cluster.actor_nodes(GENERATOR_ACTOR)
            time.sleep(0.25)
        time.sleep(1)  # the added replica takes its share of the load
    finally:
        load.stop()
    stopped = time.monotonic()
    trickle = GenerateLoad(cluster.url, 1, SMALL).start()  # below target_ongoing_requests: scale in
    try:
        added = [r for r in cluster.replicas(GENERATOR) if r["replica_id"] != kept_id]
        ids = {request_id for request_id, _ in load.answers}
        served = len(served_request_ids(cluster, added[0]) & ids) if added else 0
        wait_until(lambda: len(cluster.replicas(GENERATOR)) == 1 and len(cluster.replica_nodes()) == 1, timeout_s,
                   "back to one generator replica")
        removed = time.monotonic() - stopped
    finally:
        trickle.stop()
    assert decided is not None and running is not None, (
        f"after {timeout_s} s of load: second replica decided {decided is not None}, RUNNING {running is not None}")
    return Autoscaling(redeployed, kept, decided, running, nodes_at_peak, served, removed,
                       Counter(status for _, status in load.answers + trickle.answers), len(trickle.answers))


def last_overlay(cluster: LocalCluster) -> dict:
    """deploy/cluster-local.yaml with the generator autoscaled by AUTOSCALING instead of 2 replicas, and FluxJobs on
    a worker: the overlay of the last two cases, deployed once. FluxJobs' move costs nothing more then, since this
    deploy rebuilds the app anyway (see `autoscaling`)."""
    config = cluster.config()
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    deployments[GENERATOR].pop("num_replicas")
    deployments[GENERATOR]["autoscaling_config"] = AUTOSCALING
    # Not the head: `ray.io/node-id` is a label Ray gives every node (`!` negates), so either worker may take it,
    # and FluxJobs' replacement the other one when its node is lost.
    head = next(node_id for node_id, name in cluster.alive_nodes().items() if name == "head")
    deployments["FluxJobs"]["ray_actor_options"] = {"num_cpus": 0, "label_selector": {"ray.io/node-id": f"!{head}"}}
    return config


def on_a_worker(cluster: LocalCluster, deployment: str) -> bool:
    """Whether the deployment's one replica is RUNNING on a worker node, and /health is 200."""
    replicas = cluster.replicas(deployment)
    return (len(replicas) == 1 and replicas[0]["state"] == "RUNNING"
            and cluster.alive_nodes().get(replicas[0]["node_id"]) in WORKERS
            and httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200)


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, KeyError):  # the dashboard is busy, or Serve is between two states
            pass
        time.sleep(0.25)
    raise TimeoutError(f"not {what} after {timeout_s} s")


# ---- FluxJobs' node lost ------------------------------------------------------------------------------------


@dataclass
class JobsNodeLoss:
    victim: str  # the worker FluxJobs ran on, killed
    victim_had_generator: bool
    load: JobLoad
    killed_at: float  # seconds into the load
    accepted_before_kill: int
    new_records: set[str]  # the job records the store gained during the load
    results: list[dict]
    replacement_node: str  # where the new FluxJobs runs
    replacement_running_after_s: float  # since the kill, until the new FluxJobs was RUNNING
    healthy_after_s: float  # since the kill, until /health answered 200 once the load was over
    in_flight_done_after_s: float | None  # since the kill, until every job in flight at it had ended


def jobs_node_lost(cluster: LocalCluster, before_s: float = 3, timeout_s: float = 120) -> JobsNodeLoss:
    """FluxJobs on a worker (the overlay of `last_overlay`), its node killed while jobs are in flight: a new
    FluxJobs starts on the other worker and takes the store over once the dead one's lease expires
    (`jobs.lease_s`), and finishes every job accepted."""
    if not on_a_worker(cluster, "FluxJobs"):  # run alone: the autoscaling case has not deployed the overlay
        cluster.deploy("cluster-local-overlay.yaml", last_overlay(cluster))
        wait_until(lambda: on_a_worker(cluster, "FluxJobs"), timeout_s, "FluxJobs on a worker")
    names = cluster.alive_nodes()
    [moved] = cluster.replicas("FluxJobs")
    victim = names[moved["node_id"]]
    had_generator = victim in cluster.replica_nodes().values()

    records_before = {path.stem for path in cluster.job_records.glob("*.json")}
    load = JobLoad(cluster.url, timeout_s=timeout_s).start()
    time.sleep(before_s)
    accepted_before_kill = len(load.accepted)
    killed_at = load.since()
    cluster.kill(victim)
    killed = time.monotonic()
    running_after = None
    before_kill = set(load.accepted[:accepted_before_kill])
    try:
        while time.monotonic() - killed < timeout_s:
            replicas = [r for r in cluster.replicas("FluxJobs") if r["state"] == "RUNNING"
                        and r["replica_id"] != moved["replica_id"]]
            if replicas and running_after is None:
                running_after = time.monotonic() - killed
            if running_after is not None and any(load.ended_at.get(r, 0) > killed_at for r in load.accepted):
                break  # a new FluxJobs runs and jobs end again
            time.sleep(0.25)
        time.sleep(1)
    finally:
        load.stop(timeout_s=timeout_s)
    wait_until(lambda: httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200, timeout_s, "healthy")
    healthy_after = time.monotonic() - killed
    names = cluster.alive_nodes()
    [replacement] = [r for r in cluster.replicas("FluxJobs") if r["replica_id"] != moved["replica_id"]]
    new_records = {path.stem for path in cluster.job_records.glob("*.json")} - records_before
    results = sample_results(cluster, load.accepted)
    # In flight at the kill: accepted before it, ended after it (every accepted job ended: load.stop checks it).
    done = [load.ended_at[r] - killed_at for r in before_kill if r in load.ended_at and load.ended_at[r] > killed_at]
    return JobsNodeLoss(victim, had_generator, load, killed_at, accepted_before_kill, new_records, results,
                        names.get(replacement.get("node_id", ""), "?"),
                        running_after if running_after is not None else float("nan"), healthy_after,
                        max(done) if done else None)
