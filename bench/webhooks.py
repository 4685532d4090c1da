"""Webhook deliveries, timed: how soon a finished job's result reaches its receiver, how retries are
spaced, and whether a receiver that hangs slows other jobs.

The real JobManager (serve_app/jobs/manager.py) over an in-memory job store, with the real
WebhookSender (the host policy checked and the host resolved at each attempt, both signatures, one
pinned connection per POST), delivers to real HTTP receivers on 127.0.0.1 (tests/support/receiver.py).
A stand-in generator answers each work item after `--work-ms` with a few bytes: no Ray, no model, so
what is timed is the job service's own path, not generation. Four measurements:

1. latency: `--jobs` jobs of one image, one after another, each hooked to a receiver answering 200: the
   time from the job's `finished_at` (its status) to the POST's arrival at the receiver;
2. burst: `--burst` hooked jobs submitted at once, so their deliveries overlap: the same latency;
3. retries: a receiver answering 500 twice, `backoff_s` 0.2 (`--retry-runs` times): the gaps between
   the attempts' arrivals, and the attempt that delivered;
4. a hung receiver: `--batch` jobs without a webhook, timed from submit to the last one's end, on a job
   service whose `--hung` deliveries wait on a receiver that never answers and on one with the same
   history and none, in turn (five rounds); and one delivery to a healthy receiver meanwhile.

```bash
.venv/bin/python -m bench.webhooks        # about 10 s; writes bench/results/webhooks.json and .md
```
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.load import latency_summary
from bench.machine import describe, summary
from serve_app.config import AppArgs, JobArgs, WebhookArgs
from serve_app.intake.request_rules import build_work_items
from serve_app.jobs.manager import JobManager
from serve_app.jobs.store import MemoryStore
from serve_app.jobs.webhooks import POST_THREADS, WebhookSender
from serve_app.schemas import InferenceRequest, ResultMetadata, StatusResponse
from serve_app.workitems import ItemResult, WorkItem
from tests.support.receiver import Receiver

RESULTS = Path(__file__).parent / "results"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
METADATA = ResultMetadata(model="flux", base_model="black-forest-labs/FLUX.1-dev")
BACKOFF_S = 0.2
ENDED = ("succeeded", "failed", "canceled")


def app_args(**webhooks) -> AppArgs:
    hooks = {"allowed_hosts": ["127.0.0.1"], "allow_private_addresses": True, "backoff_s": BACKOFF_S,
             "timeout_s": 2.0, "max_attempts": 4, **webhooks}
    return AppArgs(jobs=JobArgs(store="memory"), webhooks=WebhookArgs(**hooks))


class Service:
    """A JobManager as FluxJobs holds one, its items answered by a stand-in generator after `work_s`."""

    def __init__(self, args: AppArgs, work_s: float):
        self.args = args
        self.work_s = work_s
        self.jobs = JobManager(MemoryStore(), args, self.generate, models={"flux"},
                               webhooks=WebhookSender(args.webhooks, SECRET))

    async def generate(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult:
        await asyncio.sleep(self.work_s)
        return ItemResult(request_id=item.request_id, index=item.index, seed=item.seed, width=item.key.width,
                          height=item.key.height, format="png", data=b"image")

    async def submit(self, webhook_url: str | None = None) -> str:
        request_id = uuid.uuid4().hex
        request = InferenceRequest(model="flux", prompts=[{"prompt": "bench", "width": 64, "height": 64,
                                                           "sample_steps": 1}])
        items = build_work_items(request, self.args, request_id)
        await self.jobs.submit(request_id, items, METADATA, 60.0, webhook_url=webhook_url)
        return request_id

    async def ended(self, request_id: str, timeout_s: float = 30.0) -> StatusResponse:
        deadline = time.monotonic() + timeout_s
        while (status := await self.jobs.status(request_id)).status not in ENDED:
            if time.monotonic() > deadline:
                raise TimeoutError(request_id)
            await asyncio.sleep(0.001)
        return status

    async def delivered(self, request_id: str, timeout_s: float = 30.0) -> StatusResponse:
        deadline = time.monotonic() + timeout_s
        while not ((status := await self.jobs.status(request_id)).webhook and status.webhook.delivered):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{request_id}: {status.webhook}")
            await asyncio.sleep(0.001)
        return status


def finished_at(status: StatusResponse) -> float:
    assert status.finished_at is not None
    return datetime.strptime(status.finished_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def arrival(receiver: Receiver, request_id: str) -> float:
    """When the receiver got the delivery of this job (its first attempt to arrive)."""
    return min(d.at for d in receiver.deliveries if d.headers.get("webhook-id") == f"msg_{request_id}")


def spread(seconds: list[float]) -> dict:
    """Latencies in ms: min, p50, p95, max, mean and count."""
    base = latency_summary(seconds)
    return {"min_ms": min(seconds) * 1000, "p50_ms": base["p50"] * 1000, "p95_ms": base["p95"] * 1000,
            "max_ms": max(seconds) * 1000, "mean_ms": base["mean"] * 1000, "count": base["count"]}


async def latency(jobs: int, burst: int, work_s: float) -> dict:
    service = Service(app_args(), work_s)
    service.jobs.start()
    try:
        with Receiver() as receiver:
            await service.delivered(await service.submit(receiver.url))  # warm: the first thread, the first DNS
            one_by_one, attempts = [], []
            for _ in range(jobs):
                request_id = await service.submit(receiver.url)
                status = await service.delivered(request_id)
                one_by_one.append(arrival(receiver, request_id) - finished_at(status))
                attempts.append(status.webhook.attempts if status.webhook else None)
            ids = [await service.submit(receiver.url) for _ in range(burst)]
            statuses = [await service.delivered(request_id) for request_id in ids]
            together = [arrival(receiver, r) - finished_at(s) for r, s in zip(ids, statuses, strict=True)]
    finally:
        service.jobs.close()
    return {"one_by_one": {**spread(one_by_one), "attempts": sorted(set(attempts))},
            "burst": {**spread(together), "jobs": burst}}


async def retries(runs: int, work_s: float) -> list[dict]:
    service = Service(app_args(), work_s)
    service.jobs.start()
    out = []
    try:
        for _ in range(runs):
            with Receiver(statuses=(500, 500)) as receiver:
                request_id = await service.submit(receiver.url)
                status = await service.delivered(request_id)
                arrivals = [d.at for d in receiver.deliveries]
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            out.append({"attempts": status.webhook.attempts if status.webhook else None, "gaps_s": gaps,
                        "first_after_finish_ms": (arrivals[0] - finished_at(status)) * 1000})
    finally:
        service.jobs.close()
    return out


async def hung(batch: int, hung_deliveries: int, work_s: float, rounds: int = 5) -> dict:
    """Two services with the same history, one with `hung_deliveries` deliveries hanging: a batch of jobs
    timed on each in turn, so the growing job count and the machine's drift hit both alike."""
    # Attempts that wait far longer than the run: the hung deliveries stay in flight throughout.
    control, stuck_service = (Service(app_args(timeout_s=60.0, max_attempts=1), work_s) for _ in range(2))
    for service in (control, stuck_service):
        service.jobs.start()

    async def timed_batch(service: Service) -> float:
        started = time.perf_counter()
        ids = [await service.submit() for _ in range(batch)]
        statuses = [await service.ended(request_id) for request_id in ids]
        assert all(s.status == "succeeded" for s in statuses), statuses
        return time.perf_counter() - started

    try:
        with Receiver(hang=True) as stuck, Receiver() as healthy:
            for service in (control, stuck_service):
                await timed_batch(service)  # warm
            hooked = [await stuck_service.submit(stuck.url) for _ in range(hung_deliveries)]
            await control.ended(await control.submit())  # the same history: one more job each
            for request_id in hooked:
                await stuck_service.ended(request_id)
            deadline = time.monotonic() + 10
            while len(stuck.deliveries) < hung_deliveries:  # every POST is at the receiver, unanswered
                assert time.monotonic() < deadline, "the hung deliveries never arrived"
                await asyncio.sleep(0.005)
            without, during = [], []
            for _ in range(rounds):
                without.append(await timed_batch(control))
                during.append(await timed_batch(stuck_service))
            request_id = await stuck_service.submit(healthy.url)
            status = await stuck_service.delivered(request_id)
            healthy_ms = (arrival(healthy, request_id) - finished_at(status)) * 1000
            still_hung = [(await stuck_service.jobs.status(r)).webhook for r in hooked]
            assert all(w is not None and not w.delivered for w in still_hung), still_hung
    finally:
        for service in (control, stuck_service):
            service.jobs.close()
    return {"batch_jobs": batch, "hung_deliveries": hung_deliveries, "post_threads": POST_THREADS,
            "batch_s_without": without, "batch_s_while_hung": during,
            "median_s_without": statistics.median(without), "median_s_while_hung": statistics.median(during),
            "healthy_delivery_while_hung_ms": healthy_ms}


def run(opts) -> dict:
    load_start = os.getloadavg()[0]
    work_s = opts.work_ms / 1000
    started = time.perf_counter()
    result = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"jobs": opts.jobs, "burst": opts.burst, "retry_runs": opts.retry_runs, "batch": opts.batch,
                     "hung": opts.hung, "work_ms": opts.work_ms, "backoff_s": BACKOFF_S, "store": "memory",
                     "receiver": "http://127.0.0.1 (tests/support/receiver.py)"},
        "latency": asyncio.run(latency(opts.jobs, opts.burst, work_s)),
        "retries": asyncio.run(retries(opts.retry_runs, work_s)),
        "hung_receiver": asyncio.run(hung(opts.batch, opts.hung, work_s)),
    }
    result["took_s"] = time.perf_counter() - started
    result["machine"] = {**describe(), "load_average_1m_at_start_and_end": [load_start, os.getloadavg()[0]]}
    return result


def markdown(result: dict) -> str:
    s, lat, hang = result["settings"], result["latency"], result["hung_receiver"]
    row = lambda name, x: (f"| {name} | {x['count']} | {x['min_ms']:.1f} | {x['p50_ms']:.1f} | "  # noqa: E731
                           f"{x['p95_ms']:.1f} | {x['max_ms']:.1f} |")
    gaps = "; ".join(f"run {n}: " + " and ".join(f"{g:.3f}" for g in r["gaps_s"])
                     + f" s apart, delivered on attempt {r['attempts']}" for n, r in enumerate(result["retries"], 1))
    attempts = " or ".join(str(n) for n in lat["one_by_one"]["attempts"])
    lines = [
        "# Webhook deliveries: measured",
        "",
        f"`python -m bench.webhooks` on {summary(result['machine'])}, {result['when']} ({result['took_s']:.0f} s). "
        f"The real JobManager over an in-memory job store and the real WebhookSender, delivering to HTTP "
        f"receivers on 127.0.0.1; work items answered by a stand-in generator after {s['work_ms']:g} ms (no "
        f"Ray, no model). 1-minute load average at start and end: "
        f"{', '.join(f'{v:.1f}' for v in result['machine']['load_average_1m_at_start_and_end'])}.",
        "",
        "**Latency**: from the job's `finished_at` to the POST's arrival at a receiver answering 200.",
        "",
        "| jobs | deliveries | min ms | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|---|",
        row("one after another", lat["one_by_one"]),
        row(f"{lat['burst']['jobs']} submitted at once", lat["burst"]),
        "",
        f"Attempts per delivery, one after another: {attempts}.",
        "",
        f"**Retries** (a receiver answering 500, 500, then 200; `backoff_s: {s['backoff_s']}`, doubling): the "
        f"gaps between the attempts' arrivals. {gaps}.",
        "",
        f"**A hung receiver**: {hang['batch_jobs']} jobs without a webhook, submitted at once, took a median "
        f"{hang['median_s_while_hung']:.3f} s ("
        + ", ".join(f"{v:.3f}" for v in hang["batch_s_while_hung"])
        + f" s) on a job service whose {hang['hung_deliveries']} deliveries waited on a receiver that never "
        f"answers, and {hang['median_s_without']:.3f} s ("
        + ", ".join(f"{v:.3f}" for v in hang["batch_s_without"])
        + " s) on one with the same history and no delivery in flight, the two timed in turn; meanwhile a "
        f"delivery to a healthy receiver arrived {hang['healthy_delivery_while_hung_ms']:.1f} ms after its job "
        f"finished (the sender has {hang['post_threads']} POST threads: more hung POSTs than that would make "
        "the next ones wait for a thread).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100, help="hooked jobs run one after another")
    parser.add_argument("--burst", type=int, default=32, help="hooked jobs submitted at once")
    parser.add_argument("--retry-runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="jobs timed before and while deliveries hang")
    parser.add_argument("--hung", type=int, default=3, help="deliveries left hanging")
    parser.add_argument("--work-ms", type=float, default=20.0, help="the stand-in generator's time per image")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    result = run(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "webhooks.json").write_text(json.dumps(result, indent=2) + "\n")
    (opts.out / "webhooks.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {opts.out / 'webhooks.json'}, {opts.out / 'webhooks.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
