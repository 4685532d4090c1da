"""The job store's bounds, without Ray: finished jobs are dropped by age, count and image bytes."""

from __future__ import annotations

import time

import pytest

from serve_app.config import AppArgs, JobArgs
from serve_app.engine.workitems import ItemResult
from serve_app.schemas import ResultMetadata
from serve_app.serving.jobs import FluxJobs, Job, iso

METADATA = ResultMetadata(model="flux", base_model="black-forest-labs/FLUX.1-dev")


def store(**jobs_args) -> FluxJobs:
    return FluxJobs(generators={}, args=AppArgs(jobs=JobArgs(**jobs_args)))


def finished_job(request_id: str, image_bytes: int, finished_ago_s: float = 0.0) -> Job:
    result = ItemResult(request_id=request_id, index=0, seed=1, width=64, height=64, format="png",
                        data=b"x" * image_bytes)
    job = Job(request_id=request_id, items=[], metadata=METADATA, results=[result])
    job.finish("succeeded")
    job.finished_at -= finished_ago_s
    return job


def add(jobs: FluxJobs, *new: Job) -> None:
    for job in new:
        jobs.jobs[job.request_id] = job


def test_the_oldest_finished_jobs_go_first_past_the_count():
    jobs = store(max_jobs=3)
    add(jobs, *(finished_job(f"j{i}", 10, finished_ago_s=10 - i) for i in range(5)))
    jobs._prune()
    assert sorted(jobs.jobs) == ["j2", "j3", "j4"]


def test_pruning_goes_by_finish_time_not_submit_time_and_spares_the_job_just_finished():
    jobs = store(max_jobs=2)
    # Submitted first, finished last: a long job. It must not vanish the moment it succeeds.
    add(jobs, finished_job("long", 10, finished_ago_s=0), finished_job("a", 10, finished_ago_s=5),
        finished_job("b", 10, finished_ago_s=3))
    jobs._prune(keep="long")
    assert sorted(jobs.jobs) == ["b", "long"]
    jobs = store(max_jobs=1)
    add(jobs, finished_job("old", 10, finished_ago_s=5), finished_job("just", 10))
    jobs._prune(keep="just")
    assert list(jobs.jobs) == ["just"]


def test_finished_jobs_past_their_time_are_dropped():
    jobs = store(ttl_s=60)
    add(jobs, finished_job("old", 10, finished_ago_s=61), finished_job("new", 10))
    jobs._prune()
    assert list(jobs.jobs) == ["new"]


def test_image_bytes_are_bounded():
    jobs = store(max_result_bytes=2500)
    add(jobs, *(finished_job(f"j{i}", 1000, finished_ago_s=10 - i) for i in range(4)))
    jobs._prune()
    assert sorted(jobs.jobs) == ["j2", "j3"]


def test_unfinished_jobs_are_never_dropped():
    jobs = store(max_jobs=1, max_result_bytes=1)
    running = Job(request_id="running", items=[], metadata=METADATA)
    add(jobs, running, finished_job("done", 10))
    jobs._prune()
    assert list(jobs.jobs) == ["running"]


@pytest.mark.parametrize("ts,text", [(0.0, "1970-01-01T00:00:00.000000Z"), (1.5, "1970-01-01T00:00:01.500000Z")])
def test_timestamps_are_iso_utc_with_one_zone_suffix(ts, text):
    assert iso(ts) == text
    assert iso(time.time()).count("Z") == 1 and "+" not in iso(time.time())
