"""GeneratorClient.run_one without Ray: which failures are retried once, and what each ends as."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.serving.dispatch import GeneratorClient
from serve_app.workitems import BatchKey, ItemResult, WorkItem

ITEM = WorkItem(request_id="r", index=0, prompt="p", seed=1, key=BatchKey("flux", 64, 64, 1, 4.0))
IMAGE = ItemResult(request_id="r", index=0, seed=1, width=64, height=64, format="jpeg", data=b"x")


class FakeResponse:
    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __await__(self):
        async def resolve():
            if self.outcome == "hang":
                await asyncio.sleep(3600)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return resolve().__await__()


class FakeHandle:
    """A DeploymentHandle whose calls end, in order, with the given outcomes."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.responses: list[FakeResponse] = []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, item, tokens=None):
        response = FakeResponse(self.outcomes.pop(0))
        self.responses.append(response)
        return response


def run(handle, item=ITEM):
    return asyncio.run(GeneratorClient(handle, retry_after_s=7).run_one(item))


@pytest.mark.parametrize("fault", [ActorDiedError(), ActorUnavailableError("gone", None), RuntimeError("lost")],
                         ids=["died", "unavailable", "other"])
def test_a_lost_replica_is_retried_once_and_the_retry_can_succeed(fault):
    handle = FakeHandle(fault, IMAGE)
    assert run(handle) == IMAGE
    assert len(handle.responses) == 2


def test_a_second_loss_ends_replica_failed():
    handle = FakeHandle(ActorDiedError(), ActorDiedError())
    outcome = run(handle)
    assert isinstance(outcome, ApiError) and outcome.code == errors.REPLICA_FAILED
    assert outcome.message == "the generator replica failed; the request was not completed"  # no internals
    assert len(handle.responses) == 2


@pytest.mark.parametrize("error", [ApiError(errors.GENERATION_FAILED, "bad"), ApiError(errors.TIMEOUT, "late")])
def test_an_api_error_is_never_retried_raised_or_returned(error):
    for outcome in (error, error):  # raised by the call, then returned as a value
        handle = FakeHandle(outcome)
        assert run(handle).code == error.code
        assert len(handle.responses) == 1


@pytest.mark.parametrize("cancelled", [RequestCancelledError("r"), TaskCancelledError()], ids=["serve", "ray"])
def test_a_cancelled_call_is_not_retried(cancelled):
    handle = FakeHandle(cancelled)
    assert run(handle).code == errors.CANCELED
    assert len(handle.responses) == 1


def test_backpressure_is_overloaded_with_retry_after_and_not_retried():
    handle = FakeHandle(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    outcome = run(handle)
    assert outcome.code == errors.OVERLOADED and outcome.details["retry_after_s"] == 7
    assert len(handle.responses) == 1


def test_the_callers_cancellation_reaches_the_replica_and_is_not_retried():
    handle = FakeHandle("hang")

    async def main():
        task = asyncio.create_task(GeneratorClient(handle, retry_after_s=7).run_one(ITEM))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(handle.responses) == 1 and handle.responses[0].cancelled
