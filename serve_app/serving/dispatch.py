"""Sending work items to the generator deployment, with LoRA affinity.

Every call that uses LoRAs carries the LoRA-set id as Serve's multiplexed model id, so the router
prefers replicas that already hold the set (Serve does not pass the id downstream by itself).
Base-model calls carry none and are load-balanced. Configured handles are cached, as Ray Serve
LLM does: creating a handle per call costs the event loop.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import errors
from serve_app.engine.workitems import ItemResult, WorkItem
from serve_app.errors import ApiError

_MAX_CACHED_HANDLES = 256


class GeneratorClient:
    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
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

    def submit(self, item: WorkItem) -> DeploymentResponse:
        return self._handle_for(item.key.lora_set_id).generate.remote(item)

    async def run_one(self, item: WorkItem) -> ItemResult | ApiError:
        """Generate one item; errors (including a lost replica) come back as values."""
        response = self.submit(item)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # make sure the replica hears of it (queued work then never runs)
            raise
        except ApiError as exc:
            return exc
        except Exception as exc:  # the replica died or Serve refused the call
            return ApiError(errors.REPLICA_FAILED, f"the generator replica failed: {type(exc).__name__}: {exc}"[:500])

    async def run(self, items: list[WorkItem]) -> list[ItemResult | ApiError]:
        return list(await asyncio.gather(*(self.run_one(item) for item in items)))
