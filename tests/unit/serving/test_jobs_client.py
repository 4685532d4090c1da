"""FluxJobsClient without Ray: one typed method per FluxJobs call, each sent again while its replica is replaced."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.serving.jobs_client import FluxJobsClient


class Method:
    """One remote method of a fake FluxJobs handle: each call ends, in order, with the given outcomes."""

    def __init__(self, outcomes: list):
        self.outcomes = outcomes
        self.calls: list[tuple] = []

    def remote(self, *args):
        self.calls.append(args)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return answer()


class FakeHandle:
    def __init__(self, **methods: list):
        for name, outcomes in methods.items():
            setattr(self, name, Method(outcomes))


def test_each_call_goes_to_its_own_method_with_its_arguments():
    handle = FakeHandle(submit=["queued"], status=["s"], result=["r"], image=[(b"x", "png")], cancel=["c"],
                        wait_change=["w"], ping=[True])
    client = FluxJobsClient(handle, retry_after_s=7)

    async def calls():
        return [await client.submit("id", [], None, 5.0, "https://hook", {"k": "t"}),
                await client.status("id"), await client.result("id"), await client.image("id", 2),
                await client.cancel("id"), await client.wait_change("id", "v1", 15.0), await client.ping()]

    assert asyncio.run(calls()) == ["queued", "s", "r", (b"x", "png"), "c", "w", True]
    assert handle.submit.calls == [("id", [], None, 5.0, "https://hook", {"k": "t"})]
    assert handle.image.calls == [("id", 2)]
    assert handle.wait_change.calls == [("id", "v1", 15.0)]


@pytest.mark.parametrize("lost", [RayActorError(), ActorDiedError(), ReplicaUnavailableError("r1")],
                         ids=["actor-error", "actor-died", "replica-unavailable"])
def test_a_call_cut_off_by_a_lost_replica_is_sent_again(lost):
    handle = FakeHandle(status=[lost, "answered"])
    client = FluxJobsClient(handle, retry_after_s=7)
    assert asyncio.run(client.status("id")) == "answered"
    assert handle.status.calls == [("id",)] * 2


def test_past_the_retry_time_the_client_gets_jobs_unavailable():
    handle = FakeHandle(cancel=[RayActorError()])
    client = FluxJobsClient(handle, retry_after_s=7, retry_s=0.5)
    with pytest.raises(ApiError) as caught:
        asyncio.run(client.cancel("id"))
    assert caught.value.code == errors.JOBS_UNAVAILABLE and caught.value.details == {"retry_after_s": 7}
    assert len(handle.cancel.calls) == 2  # sent at 0 and 0.25 s; the next wait (0.5 s) would pass the deadline


def test_an_api_error_is_not_retried():
    handle = FakeHandle(result=[ApiError(errors.REQUEST_NOT_FOUND, "no such request")])
    client = FluxJobsClient(handle, retry_after_s=7)
    with pytest.raises(ApiError) as caught:
        asyncio.run(client.result("id"))
    assert caught.value.code == errors.REQUEST_NOT_FOUND and len(handle.result.calls) == 1


def test_each_answer_of_flux_jobs_is_noted_for_the_health_probe_and_a_lost_call_is_not():
    handle = FakeHandle(status=["answered"], result=[ApiError(errors.REQUEST_NOT_FOUND, "no such request")],
                        cancel=[RayActorError()])
    client = FluxJobsClient(handle, retry_after_s=7, retry_s=0.1)
    assert client.answered_at is None
    with pytest.raises(ApiError):
        asyncio.run(client.cancel("id"))  # its replica lost at every try: no answer
    assert client.answered_at is None
    before = time.monotonic()
    asyncio.run(client.status("id"))
    assert client.answered_at is not None and client.answered_at >= before
    noted = client.answered_at
    with pytest.raises(ApiError):
        asyncio.run(client.result("id"))  # an error of the request's is still an answer
    assert client.answered_at > noted
