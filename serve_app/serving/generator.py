"""FluxGenerator: the generator deployment of one model, a thin Serve shell around GeneratorReplica.

The replica's logic (batching, cancellation, failure splitting, encoding) is `serve_app.replica.core`,
tested without Ray. This shell wires it to Serve:
- `@serve.batch` feeds `GeneratorReplica.run_batch`. Two batches may be in flight, so the next one
  can take the pipeline while the previous one encodes its images; the replica's pipeline lock
  keeps calls one at a time.
- `@serve.multiplexed` is the replica's LoRA-set cache (`ServeLoraSets`), keyed by the set id the
  ingress also puts on its handle call, so Serve routes each request to replicas that hold its set.
- `reconfigure` validates the deployment's `user_config` as `BatchSettings` (an unknown key fails
  the deploy with its name) and applies it live.
- `ray.serve.metrics` (serving/metrics.py) observes the replica; a task sets its gauges again every
  few seconds, so Ray keeps exporting them.
- each denoising step of an async job's image goes to FluxJobs through a `ProgressForwarder`
  (serving/progress.py): coalesced, sent from the event loop, never waited for by the engine. The
  FluxJobs handle is looked up at run time: binding it here would make the app a cycle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import JOBS_DEPLOYMENT, TINY_SOURCE, LoraArgs, ModelArgs
from serve_app.engine.factory import build_engine
from serve_app.errors import ApiError
from serve_app.jobs.progress import ItemProgress, ProgressForwarder
from serve_app.loras.adapters import LoraSet
from serve_app.loras.sources import LoraSources
from serve_app.replica.core import GeneratorReplica, LoadSet, LoraState, ReplicaState
from serve_app.serving.metrics import GeneratorMetrics, keep_exporting
from serve_app.workitems import ItemResult, LoraUse, WorkItem

MAX_CONCURRENT_BATCHES = 2  # one generating, one encoding (the pipeline lock serializes generation)


class ServeLoraSets:
    """The replica's LoRA-set cache as Serve's `@serve.multiplexed` (LRU, affinity routing)."""

    def __init__(self, load: LoadSet, max_sets: int):
        self._pending: dict[str, tuple[LoraUse, ...]] = {}

        async def load_set(set_id: str) -> LoraSet:
            return await load(self._pending[set_id])

        # A closure, not a method: Serve fixes a decorated method's cache size at import time.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_sets)(load_set)

    async def get(self, set_id: str, loras: tuple[LoraUse, ...]) -> LoraSet:
        # Serve's loader takes the id only, so the set's LoRAs wait here for it. No lock of its own
        # is needed: the replica asks under its pipeline lock, one set at a time.
        self._pending[set_id] = loras
        try:
            return await self._multiplexed(set_id)
        finally:
            self._pending.pop(set_id, None)


@dataclass(frozen=True)
class GeneratorState:
    """A generator replica's identity and state (`FluxGenerator.state()`)."""

    model: str
    replica: str
    actor_name: str | None
    asyncio_tasks: int
    batching: ReplicaState
    loras: LoraState | None = None  # when asked for: read between pipeline calls


class FluxGenerator:
    def __init__(self, model: ModelArgs, loras: LoraArgs):
        if model.torch_threads:
            import torch  # here, not at the top: Serve's app build imports this module and needs no torch

            torch.set_num_threads(model.torch_threads)
        self.model = model
        self.metrics = GeneratorMetrics(model.id)
        engine = build_engine(model)
        engine.warmup()  # a compiled engine compiles its warm-up shapes before the replica reports healthy
        if loras.write_demo and model.source == TINY_SOURCE:
            # Here, not when the app is built: writing it needs diffusers, which this replica has loaded already,
            # and the app's build is on the critical path of every deploy (6 s more on 2 cores).
            from serve_app.tiny import ensure_demo_lora

            ensure_demo_lora(loras.root)
        self._jobs: DeploymentHandle | None = None
        self.progress = ProgressForwarder(self._send_progress, asyncio.get_running_loop())
        self.replica = GeneratorReplica(
            engine,
            LoraSources(loras),
            model.batching,
            max_lora_sets=model.max_adapters_per_replica or loras.max_adapters_per_replica,
            lora_sets=ServeLoraSets,
            observer=self.metrics,
            on_steps=self.progress.report,
        )

        self._metrics_task = asyncio.get_running_loop().create_task(keep_exporting(self.metrics.export))

        async def run_batch(items: list[WorkItem]) -> list[ItemResult | ApiError]:
            return await self.replica.run_batch(items)

        # A closure for the same reason as the multiplexed loader: sizes come from the args.
        self._batch = serve.batch(
            max_batch_size=model.batching.max_batch_size,
            batch_wait_timeout_s=model.batching.batch_wait_timeout_s,
            max_concurrent_batches=MAX_CONCURRENT_BATCHES,
        )(run_batch)

    def reconfigure(self, user_config: dict) -> None:
        """Apply the deployment's `user_config` (BatchSettings fields) over the model's batching args."""
        settings = self.model.batching.updated(user_config)
        # Public setters of Serve's batch wrapper, which Ray's annotations type as the plain function.
        self._batch.set_max_batch_size(settings.max_batch_size)  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.replica.configure(settings)

    async def generate(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult | ApiError:
        """Generate one work item; an error comes back as a value (it survives any pickling).

        Args:
            item: the work item.
            tokens: the request's own hf_token per LoRA key, when it sent one (kept in memory only).
        """
        return await self.replica.generate(item, tokens, self._batch)

    async def _send_progress(self, updates: list[ItemProgress]) -> None:
        if self._jobs is None:
            self._jobs = serve.get_deployment_handle(JOBS_DEPLOYMENT, serve.get_replica_context().app_name)
        await self._jobs.progress.remote(updates)

    async def ready(self) -> bool:
        """Answered by the event loop, never behind the pipeline: the health probe's ping."""
        return True

    async def state(self, loras: bool = False) -> GeneratorState:
        """This replica's identity and batching state, for operators and tests.

        Args:
            loras: also report the LoRA adapters held, which waits for a running pipeline call.
        """
        return GeneratorState(
            model=self.model.id,
            replica=serve.get_replica_context().replica_id.unique_id,
            actor_name=ray.get_runtime_context().get_actor_name(),
            asyncio_tasks=len(asyncio.all_tasks()),
            batching=self.replica.state(),
            loras=await self.replica.lora_state() if loras else None,
        )
