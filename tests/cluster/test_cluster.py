"""deploy/cluster-local.yaml on a real Ray cluster of three nodes, started by docs/cluster.md's own commands:
where the replicas run, LoRA affinity across nodes, in-place updates, a job store held elsewhere, a worker node
lost under load, autoscaling across nodes, and FluxJobs' own node lost.

The file runs top to bottom on one cluster and one deploy (conftest.py); the scenarios are
bench/cluster_scenarios.py's, which bench/cluster.py runs for docs/cluster.md's figures. What each test checks
comes from Ray and Serve themselves: the state API (nodes, actors), Serve's application details (replicas and
their nodes), each node's Prometheus endpoint, and the replicas' own access logs. Figures are printed with -s.
"""

from __future__ import annotations

from collections import Counter

import pytest

from bench import cluster_scenarios as scenarios
from bench.cluster_nodes import NODE_DEATH_S, WORKERS, documented_block
from bench.cluster_scenarios import HEALTH_LIMIT_S

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_the_cluster_is_the_one_docs_cluster_md_starts(cluster):
    """The fixture ran the documented block as printed; its ports are its variables, set to free ones."""
    block = documented_block()
    assert cluster.block == block
    for variable in ("RAY_PORT", "DASHBOARD_PORT", "NODE_PORTS", "CLUSTER_TEMP_DIR"):
        assert f"${{{variable}:-" in block, variable  # a default a reader can run as is
    assert sorted(cluster.alive_nodes().values()) == ["head", *WORKERS]


def test_generators_run_on_both_workers_and_the_rest_on_the_head(cluster):
    placed = scenarios.placement(cluster)
    assert placed.nodes == ["head", "w1", "w2"]
    assert placed.generators == ["w1", "w2"]  # one per worker, none on the head
    assert (placed.ingress, placed.jobs) == ("head", "head")
    assert placed.serve_actors == {"ServeController": "head", "ProxyActor": "head"}  # proxy_location: HeadOnly


def test_requests_through_the_head_are_served_by_both_workers(cluster):
    spread = scenarios.spread(cluster)
    print(f"\nplacement: {len(spread.request_ids)} requests through the head, served by "
          + ", ".join(f"{node}: {len(ids)}" for node, ids in sorted(spread.served.items())))
    assert spread.statuses == [200] * len(spread.statuses)
    assert set(spread.served) == set(WORKERS) and all(spread.served.values()), spread.served
    assert sum(map(len, spread.served.values())) == len(spread.request_ids)  # each request on exactly one replica


def test_each_lora_is_loaded_on_one_node_only(cluster):
    """4 LoRAs sent round robin through the head after a warm-up: Serve's multiplexed routing keeps each on the
    node whose replica loaded it first. From each node's metrics: the LoRA sets Serve registered on each replica,
    and how many times each replica loaded a set and a LoRA file."""
    result = scenarios.affinity(cluster)
    held = result.registered_on()
    set_loads, adapter_loads = result.loads_by_node(), result.loads_by_node("adapter_loads")
    print(f"\naffinity: 4 LoRAs, {result.requests} requests round robin after the warm-up; sets held by node "
          f"{dict(sorted(Counter(node for nodes in held.values() for node in nodes).items()))}, set loads "
          f"{set_loads}, adapter loads {adapter_loads}")
    assert result.statuses == [200] * len(result.statuses)
    assert len(held) == 4 and all(len(nodes) == 1 for nodes in held.values()), held  # each set on one node
    assert sum(set_loads.values()) == 4, set_loads  # each loaded once, at its first sight: never on a second node
    assert sum(adapter_loads.values()) == 4, adapter_loads


def assert_every_job_succeeded_once(result) -> None:
    """Every accepted job ended, succeeded, once: in the store exactly the jobs accepted, each with its image."""
    load = result.load
    outcomes = load.outcomes()
    assert outcomes == {"succeeded": len(load.accepted)}, outcomes
    assert len(set(load.accepted)) == len(load.accepted) and result.accepted_before_kill > 0
    assert result.new_records == set(load.accepted)  # none lost, none made twice
    for answer in result.results:
        assert answer["status"] == "succeeded" and len(answer["outputs"]["images"]) == 1, answer


def assert_health_bounded(load, lost: set[str], stalled: tuple[set[str], float] = (set(), 0.0)) -> None:
    """/health within the limit at every poll; 200, or 503 naming only what the lost node took (`lost`): `flux`
    while no replica of it answered, `jobs` while FluxJobs was gone. `stalled`: what may also be named until a
    time of the load (seconds since it started)."""
    slowest = load.slowest()
    assert slowest.took < HEALTH_LIMIT_S, slowest
    names, until = stalled
    for probe in load.probes:
        allowed = lost | names if probe.at <= until else lost
        assert probe.status == 200 or (probe.status == 503 and set(probe.unavailable) <= allowed), probe


# ---- destructive: nodes lost, overlays; each leaves what the next one expects ---------------------------------


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def load_summary(result) -> str:
    """What the job load of a node-loss scenario saw, for the test's printout."""
    load = result.load
    succeeded = load.outcomes()["succeeded"]
    slowest = load.slowest()
    return (f"jobs accepted {len(load.accepted)} ({result.accepted_before_kill} before the kill at "
            f"{result.killed_at:.1f} s), succeeded {succeeded}, lost or failed {len(load.accepted) - succeeded}, "
            f"refused {len(load.refused)}; /health polled {len(load.probes)} times, longest {slowest.took:.2f} s "
            f"(at {slowest.at:.1f} s), answers {dict(Counter(str(p.status) for p in load.probes))}")


def test_a_worker_node_lost_under_load_loses_no_job_and_its_replica_comes_back(cluster):
    result = scenarios.generator_node_lost(cluster)
    load = result.load
    print(f"\nnode loss: {load_summary(result)}; work items sent again after the kill {result.retried}")
    print(f"node loss: w1 back; its replica RUNNING {result.running_after_s:.1f} s after the restart and serving "
          f"{result.serving_after_s:.1f} s after it ({result.serving_after_kill_s:.1f} s after the kill)")
    assert_every_job_succeeded_once(result)
    assert load.accepted and not load.refused, load.refused[:3]
    # FluxJobs, on the head, answers throughout, but for one window: while it owes a reply to a caller on the lost
    # node (a generator's progress report), Ray holds its event loop until it declares that node dead. Seen in
    # FluxJobs' logs: no call answered from the kill until the node's death reached it, 2.4 s later.
    assert_health_bounded(load, lost={"flux"}, stalled=({"jobs"}, result.killed_at + NODE_DEATH_S))
    assert load.probes[-1].status == 200, load.probes[-1]
    # The node came back (by its documented command): Serve put a new replica there, and it served.
    assert result.replaced and result.served


def test_serve_deploy_of_a_new_user_config_updates_the_generators_in_place(cluster):
    """`serve deploy` of the same YAML with other batch settings (the generator's user_config) reaches the
    running replicas through `reconfigure`: the same replica ids, on the same nodes, still serving."""
    result = scenarios.update_in_place(cluster)
    print(f"\nin place: user_config applied {result.applied_after_s:.1f} s after `serve deploy`, replicas kept: "
          f"{sorted(result.before)}")
    assert result.applied == result.wanted
    assert result.after == result.before  # no replica replaced
    assert result.statuses == [200] * 4


def test_a_job_store_held_by_another_server_is_named_by_health_until_it_is_free(cluster):
    """FluxJobs is lost, and another server takes the job store meanwhile and keeps renewing its lease: the
    replacement FluxJobs waits, logs once who holds the store and how to use another, and /health answers 503
    within the limit naming the job store. Once the other server lets go, FluxJobs takes the store over."""
    result = scenarios.store_held(cluster)
    longest = max(p[0] for p in result.probes)
    print(f"\njob store held by another server: /health named it {result.named_after_s} s after FluxJobs was "
          f"lost (longest answer {longest:.2f} s), the waiting FluxJobs logged it after {result.logged_after_s} s; "
          f"healthy {result.back_after_s:.1f} s after it was let go")
    assert result.named_after_s is not None and result.logged_after_s is not None, (result.probes[-3:],
                                                                                    result.log[-2000:])
    assert all(p[1] == 503 and p[2]["unavailable"] == ["jobs"] for p in result.probes), result.probes
    cause = next(p[2] for p in result.probes if "jobs" in p[2].get("causes", {}))["causes"]["jobs"]
    assert "10.9.8.7:6379" in cause and "pid 4242 on other-host" in cause and "`jobs.store`" in cause, cause
    assert longest < HEALTH_LIMIT_S, result.probes
    assert result.log.count("which keeps renewing its lease") == 1 and "`jobs.store`" in result.log
    assert result.job_after == "succeeded"


def test_the_generator_scales_out_to_the_other_worker_under_load_and_back_in_as_the_load_drops(cluster):
    result = scenarios.autoscaling(cluster)
    print(f"\nautoscaling: the overlay serving on one replica (on {result.kept}) {result.redeployed_after_s:.1f} s "
          f"after `serve deploy`; under load a second decided after {result.decided_after_s:.1f} s, RUNNING after "
          f"{result.running_after_s:.1f} s on {result.nodes_at_peak}, served {result.new_replica_served}; removed "
          f"{result.removed_after_s:.1f} s after the load stopped, while one client sent "
          f"{result.trickle_answered} requests; answers {dict(result.statuses)}")
    assert result.nodes_at_peak == ["w1", "w2"]  # 2 replicas on 2 different nodes, from the state API
    assert result.new_replica_served > 0
    assert result.trickle_answered > 0  # requests kept coming while the added replica drained
    assert set(result.statuses) == {200}, result.statuses  # no request lost, scaling out or in


def test_fluxjobs_node_lost_a_new_fluxjobs_on_another_node_finishes_every_job(cluster):
    result = scenarios.jobs_node_lost(cluster)
    load = result.load
    print(f"\nFluxJobs' node lost: FluxJobs on {result.victim} (with a generator replica: "
          f"{result.victim_had_generator}); {load_summary(result)}; the new FluxJobs RUNNING on "
          f"{result.replacement_node} {result.replacement_running_after_s:.1f} s after the kill, every job in flight "
          f"at the kill ended {seconds(result.in_flight_done_after_s)} after it, /health 200 "
          f"{result.healthy_after_s:.1f} s after it, once the load was over")
    assert result.victim in WORKERS and result.replacement_node in WORKERS and result.replacement_node != result.victim
    assert_every_job_succeeded_once(result)
    assert_health_bounded(load, lost={"flux", "jobs"})
