"""Sending work items to their model's generator deployment, with LoRA affinity and one retry on a lost replica.

Every call that uses LoRAs carries the LoRA-set id as Serve's multiplexed model id, so the router
prefers replicas that already hold the set (Serve does not pass the id downstream by itself).
Base-model calls carry none and are load-balanced. Configured handles are cached, as Ray Serve
LLM does: creating a handle per call costs the event loop.

Both callers (the ingress for /v1/generate, FluxJobs for async jobs) go through `Generators.run_one`,
so the retry rule below holds for every work item of every model.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import cast

from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import errors
from serve_app.errors import ApiError
from serve_app.web.guards import overloaded
from serve_app.workitems import ItemResult, WorkItem

logger = logging.getLogger("ray.serve")

_MAX_CACHED_HANDLES = 256
REPLICA_ATTEMPTS = 2  # the first call and one retry


class GeneratorClient:
    def __init__(self, handle: DeploymentHandle, retry_after_s: int):
        self._handle = handle
        self._retry_after_s = retry_after_s
        self._by_set: OrderedDict[str, DeploymentHandle] = OrderedDict()

    def _handle_for(self, set_id: str) -> DeploymentHandle:
        if not set_id:
            return self._handle
        handle = self._by_set.get(set_id)
        if handle is None:
            handle = self._handle.options(multiplexed_model_id=set_id)
            self._by_set[set_id] = handle
            while len(self._by_set) > _MAX_CACHED_HANDLES:
                self._by_set.popitem(last=False)
        else:
            self._by_set.move_to_end(set_id)
        return handle

    def submit(self, item: WorkItem, tokens: dict[str, str] | None = None) -> DeploymentResponse:
        # Ray types .remote() for streaming handles too (a DeploymentResponseGenerator); these never stream.
        return cast(DeploymentResponse, self._handle_for(item.key.lora_set_id).generate.remote(item, tokens))

    async def run_one(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult | ApiError:
        """Generate one item; every failure comes back as a value, never raised.

        `tokens` (a request's own hf_token per LoRA key) go with the call, never with the item.

        The retry rule: an exception that is not an ApiError means the call, not the item, failed:
        the replica died (ActorDiedError / RayActorError), was unreachable (ActorUnavailableError)
        or Serve lost the call (its other errors). Serve's router drops a dead replica from its
        set, so the item is sent once more, as a new call, and goes to another replica or waits
        for the replacement Serve starts. If that call fails too, the item ends REPLICA_FAILED.
        Never retried: an ApiError (raised or returned; the item itself is at fault, or it
        timed out or was cancelled), a cancellation (the caller gave up: asyncio's, or Ray's
        TaskCancelledError / Serve's RequestCancelledError), and Serve's BackPressureError
        (the generator's queue is full: the item ends OVERLOADED, and a retry would only add load).
        """
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            response = self.submit(item, tokens)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()  # make sure the replica hears of it (queued work then never runs)
                raise
            except ApiError as exc:
                return exc
            except TaskCancelledError:  # includes RequestCancelledError: cancelled on the way
                return ApiError(errors.CANCELED, "the request was cancelled")
            except BackPressureError as exc:  # args: num_queued, max_queued, status, retry_after_s
                max_queued = exc.args[1] if len(exc.args) > 1 else -1
                return overloaded("generator queue full", "max_queued_requests", max_queued, self._retry_after_s)
            except Exception as exc:  # the replica died or Serve lost the call
                if attempt < REPLICA_ATTEMPTS:
                    logger.warning("work item %s[%d] lost its generator replica (%s); retrying once",
                                   item.request_id, item.index, type(exc).__name__)
                    continue
                logger.error("work item %s[%d] failed on %d replicas: %s", item.request_id, item.index,
                             REPLICA_ATTEMPTS, type(exc).__name__)
                return ApiError(errors.REPLICA_FAILED, "the generator replica failed; the request was not completed")
        raise AssertionError("unreachable")


class Generators:
    """One GeneratorClient per model: routes each work item to its model's generator deployment."""

    def __init__(self, handles: dict[str, DeploymentHandle], retry_after_s: int):
        self._clients = {model: GeneratorClient(handle, retry_after_s) for model, handle in handles.items()}

    async def run_one(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult | ApiError:
        return await self._clients[item.key.model].run_one(item, tokens)

    async def run(self, items: list[WorkItem], tokens: dict[str, str] | None = None) -> list[ItemResult | ApiError]:
        return list(await asyncio.gather(*(self.run_one(item, tokens) for item in items)))
