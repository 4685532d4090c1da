"""docs/cluster.md's figures for a cluster on one machine: tests/cluster/'s scenarios, measured.

The same harness and scenarios as tests/cluster/ (bench/cluster_nodes.py, bench/cluster_scenarios.py), in
the same order, on one cluster: docs/cluster.md's block run as printed (a head and two workers with a logical
GPU each, then deploy/cluster-local.yaml), placement, LoRA affinity across nodes, a worker node lost under
load and started again, `serve deploy` of a user_config in place, the job store held by another server,
autoscaling across nodes, and FluxJobs' own node lost. Each scenario's figures (jobs accepted, succeeded and
lost, /health's answers and longest time, seconds to serve again, loads per node, scaling times) go to
bench/results/cluster.json and cluster.md, with the machine they were measured on and the wall time.

```bash
.venv/bin/python -m bench.cluster        # about 2 minutes; writes bench/results/cluster.json and .md
```
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from bench import cluster_scenarios as scenarios
from bench.cluster_nodes import ROOT, TEST_TUNING, WORKERS, LocalCluster, node_env
from bench.machine import describe, summary

RESULTS = Path(__file__).parent / "results"


def _probes(probes: list) -> dict:
    return {"polls": len(probes), "answers": dict(Counter(str(p.status) for p in probes)),
            "longest_s": round(max(p.took for p in probes), 2),
            "unavailable_named": sorted({name for p in probes for name in p.unavailable})}


def _jobs(load: scenarios.JobLoad, new_records: set[str]) -> dict:
    outcomes = load.outcomes()
    return {"accepted": len(load.accepted), "succeeded": outcomes["succeeded"],
            "lost_or_failed": len(load.accepted) - outcomes["succeeded"], "refused": len(load.refused),
            "store_holds_exactly_the_accepted": new_records == set(load.accepted)}


def run(cluster: LocalCluster) -> dict:
    """Every scenario, in tests/cluster/'s order; their figures."""
    result: dict = {}
    placed = scenarios.placement(cluster)
    result["placement"] = {"generators": placed.generators, "ingress": placed.ingress, "jobs": placed.jobs,
                           "serve_actors": placed.serve_actors}
    spread = scenarios.spread(cluster)
    result["spread"] = {"requests": len(spread.request_ids),
                        "served_by": {node: len(ids) for node, ids in sorted(spread.served.items())}}
    print(f"placement and spread: {result['placement']}, {result['spread']}", flush=True)

    affinity = scenarios.affinity(cluster)
    held = affinity.registered_on()
    held_by_node = Counter(node for nodes in held.values() for node in nodes)
    result["affinity"] = {"loras": len(held), "round_robin_requests": affinity.requests,
                          "answers": dict(Counter(str(s) for s in affinity.statuses)),
                          "sets_held_by_node": dict(sorted(held_by_node.items())),
                          "each_set_on_one_node": all(len(nodes) == 1 for nodes in held.values()),
                          "set_loads_by_node": affinity.loads_by_node(),
                          "adapter_loads_by_node": affinity.loads_by_node("adapter_loads")}
    print(f"affinity: {result['affinity']}", flush=True)

    lost = scenarios.generator_node_lost(cluster)
    result["node_loss"] = {**_jobs(lost.load, lost.new_records), "killed_at_s": round(lost.killed_at, 1),
                           "accepted_before_kill": lost.accepted_before_kill, "items_sent_again": lost.retried,
                           "health": _probes(lost.load.probes),
                           "replica_running_after_restart_s": round(lost.running_after_s, 1),
                           "replica_serving_after_restart_s": round(lost.serving_after_s, 1),
                           "replica_serving_after_kill_s": round(lost.serving_after_kill_s, 1)}
    print(f"node loss: {result['node_loss']}", flush=True)

    in_place = scenarios.update_in_place(cluster)
    result["in_place"] = {"applied_after_s": round(in_place.applied_after_s, 1),
                          "replicas_kept": in_place.after == in_place.before}
    print(f"in place: {result['in_place']}", flush=True)

    held_store = scenarios.store_held(cluster)
    result["store_held"] = {"named_after_s": held_store.named_after_s and round(held_store.named_after_s, 1),
                            "logged_after_s": held_store.logged_after_s and round(held_store.logged_after_s, 1),
                            "longest_health_s": round(max(p[0] for p in held_store.probes), 2),
                            "answers": dict(Counter(str(p[1]) for p in held_store.probes)),
                            "healthy_after_let_go_s": round(held_store.back_after_s, 1),
                            "job_after": held_store.job_after}
    print(f"store held: {result['store_held']}", flush=True)

    scaling = scenarios.autoscaling(cluster)
    result["autoscaling"] = {"redeployed_after_s": round(scaling.redeployed_after_s, 1), "kept": scaling.kept,
                             "decided_after_s": round(scaling.decided_after_s, 1),
                             "running_after_s": round(scaling.running_after_s, 1),
                             "nodes_at_peak": scaling.nodes_at_peak, "added_replica_served": scaling.new_replica_served,
                             "removed_after_idle_s": round(scaling.removed_after_s, 1),
                             "trickle_answered": scaling.trickle_answered,
                             "answers": {str(k): v for k, v in scaling.statuses.items()}}
    print(f"autoscaling: {result['autoscaling']}", flush=True)

    jobs_lost = scenarios.jobs_node_lost(cluster)
    result["jobs_node_loss"] = {
        **_jobs(jobs_lost.load, jobs_lost.new_records), "victim": jobs_lost.victim,
        "victim_had_generator": jobs_lost.victim_had_generator, "killed_at_s": round(jobs_lost.killed_at, 1),
        "accepted_before_kill": jobs_lost.accepted_before_kill, "replacement_node": jobs_lost.replacement_node,
        "replacement_running_after_kill_s": round(jobs_lost.replacement_running_after_s, 1),
        "in_flight_done_after_kill_s": jobs_lost.in_flight_done_after_s and round(jobs_lost.in_flight_done_after_s, 1),
        "healthy_after_kill_s": round(jobs_lost.healthy_after_s, 1),
        "health": _probes(jobs_lost.load.probes)}
    print(f"FluxJobs' node lost: {result['jobs_node_loss']}", flush=True)
    return result


def _text(value) -> str:
    """A figure as the markdown shows it: dicts as `key: value, ...`, lists joined, booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_text(item)}" for key, item in sorted(value.items())) or "none"
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value) or "none"
    return str(value)


def markdown(report: dict) -> str:
    c, a, n, i = report["cluster"], report["affinity"], report["node_loss"], report["in_place"]
    h, s, j = report["store_held"], report["autoscaling"], report["jobs_node_loss"]
    t = _text
    lines = [
        "# A cluster on one machine: measured",
        "",
        f"`python -m bench.cluster` on {summary(report['machine'])}, {report['when']}; load average "
        f"{report['load_average']['start']:.1f} at start, {report['load_average']['end']:.1f} at end (the machine "
        "is shared). Three Ray nodes on this one machine, started and deployed by docs/cluster.md's block (a head "
        "and two workers of 2 logical CPUs each, on the machine's cores), deploy/cluster-local.yaml's built-in "
        "small model on CPU; the scenarios of tests/cluster/, in its order, on one cluster.",
        "",
        "| what | measured |",
        "|---|---|",
        f"| the block (3 nodes one at a time, `serve run --non-blocking`) | {c['block_s']} s |",
        f"| healthy with a generator replica on each worker | {c['serving_after_s']} s after the block began |",
        f"| LoRA affinity: {a['loras']} LoRAs, {a['round_robin_requests']} requests round robin after a warm-up "
        f"| each set on one node: {t(a['each_set_on_one_node'])}; sets held by node {t(a['sets_held_by_node'])}; "
        f"set loads {t(a['set_loads_by_node'])}; adapter loads {t(a['adapter_loads_by_node'])}; answers "
        f"{t(a['answers'])} |",
        f"| worker node lost under load (6 clients, each following one async job of 64×64, 2 steps, at a time; "
        f"SIGKILL {n['killed_at_s']} s in, load on 6 s more) | jobs accepted {n['accepted']} "
        f"({n['accepted_before_kill']} before the kill), succeeded {n['succeeded']}, lost or failed "
        f"{n['lost_or_failed']}, refused {n['refused']}; the job store holds exactly the jobs accepted: "
        f"{t(n['store_holds_exactly_the_accepted'])}; work items sent again {n['items_sent_again']} |",
        f"| /health during it (polled every 0.25 s) | {n['health']['polls']} polls, answers "
        f"{t(n['health']['answers'])}, longest {n['health']['longest_s']} s; 503s named "
        f"{t(n['health']['unavailable_named'])} |",
        f"| the node started again (its documented command) | its new replica RUNNING "
        f"{n['replica_running_after_restart_s']} s later, serving {n['replica_serving_after_restart_s']} s later "
        f"({n['replica_serving_after_kill_s']} s after the kill) |",
        f"| `serve deploy` of another user_config | applied {i['applied_after_s']} s after the command; replicas "
        f"kept: {t(i['replicas_kept'])} |",
        f"| job store held by another server | /health named it {h['named_after_s']} s after FluxJobs was lost "
        f"(answers {t(h['answers'])}, longest {h['longest_health_s']} s); the waiting FluxJobs logged it after "
        f"{h['logged_after_s']} s; healthy {h['healthy_after_let_go_s']} s after it was let go |",
        f"| autoscaling overlay (min 1, max 2) deployed | serving on one replica {s['redeployed_after_s']} s after "
        "`serve deploy` (the app is rebuilt: see docs/cluster.md) |",
        f"| under load (3 clients of 128×128, 4 steps) | a second replica decided after {s['decided_after_s']} s, "
        f"RUNNING after {s['running_after_s']} s, on {t(s['nodes_at_peak'])}; it served "
        f"{s['added_replica_served']} requests |",
        f"| the load down to one client | the added replica removed {s['removed_after_idle_s']} s after the load "
        f"stopped, while that client's {s['trickle_answered']} requests were answered; answers {t(s['answers'])} |",
        f"| FluxJobs' node lost (FluxJobs on {j['victim']}, with a generator replica: "
        f"{t(j['victim_had_generator'])}; SIGKILL {j['killed_at_s']} s into the same job load) | jobs accepted "
        f"{j['accepted']} ({j['accepted_before_kill']} before the kill), succeeded {j['succeeded']}, lost or failed "
        f"{j['lost_or_failed']}, refused {j['refused']}; the job store holds exactly the jobs accepted: "
        f"{t(j['store_holds_exactly_the_accepted'])} |",
        f"| its takeover (`jobs.lease_s` 10) | the new FluxJobs RUNNING on {j['replacement_node']} "
        f"{j['replacement_running_after_kill_s']} s after the kill; every job in flight at the kill ended within "
        f"{j['in_flight_done_after_kill_s']} s of it; /health 200 {j['healthy_after_kill_s']} s after it, once the "
        f"load was over (answers {t(j['health']['answers'])}, longest {j['health']['longest_s']} s, 503s named "
        f"{t(j['health']['unavailable_named'])}) |",
        f"| stopping every process of the cluster (SIGKILL) | {c['stop_s']} s |",
        f"| wall time, from the block to the cluster stopped | {c['wall_s']} s |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (its Ray logs)")
    opts = parser.parse_args(argv)

    from serve_app import tiny

    tiny.ensure_tiny_dir()  # once, here: every node finds it in the same cache
    report: dict = {"when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": describe(),
                    "load_average": {"start": os.getloadavg()[0]}}
    directory = Path(tempfile.mkdtemp(prefix="fcl", dir="/tmp"))  # short: Ray's socket paths live under it
    env = node_env({**TEST_TUNING, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    cluster = LocalCluster(directory, env)
    started = time.monotonic()
    try:
        cluster.start()
        block = time.monotonic() - started
        cluster.wait_nodes({"head", *WORKERS})
        cluster.wait_serving(set(WORKERS))
        serving = time.monotonic() - started
        print(f"cluster: block {block:.1f} s, serving after {serving:.1f} s", flush=True)
        report.update(run(cluster))
    finally:
        stopping = time.monotonic()
        cluster.stop()
        stopped = time.monotonic()
        if not opts.keep:
            shutil.rmtree(directory, ignore_errors=True)
    report["cluster"] = {"block_s": round(block, 1), "serving_after_s": round(serving, 1),
                         "stop_s": round(stopped - stopping, 1), "wall_s": round(stopped - started, 1)}
    report["load_average"]["end"] = os.getloadavg()[0]
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    (opts.out / "cluster.md").write_text(markdown(report))
    print(f"wrote {opts.out / 'cluster.json'} and cluster.md; wall time {report['cluster']['wall_s']} s")


if __name__ == "__main__":
    main()
