"""The ingress's service with fake clients, for the HTTP tests that need no Ray (tests/unit/web/).

`fake_app(args)` builds the real `IngressService` (web/service.py) and the real routes (`build_api`) over:
- `FakeGenerators`: a GeneratorsClient that answers each WorkItem with a real small image drawn with PIL
  (its size and format, a colour from its seed), or with the ApiError a test asked for (`fail`); a test can
  hold every item in flight (`hold`) to fill the sync in-flight bound or to run past a timeout;
- `InMemoryJobs`: a JobsClient that is the real JobManager over the in-memory job store, running its items
  on the same FakeGenerators; `down` makes every call answer JOBS_UNAVAILABLE, as FluxJobsClient does once
  FluxJobs has not come back in time;
- a health function that calls every model ready and pings the jobs client.

Drive `app.api` with starlette's TestClient inside a `with` block: the block's one event loop runs the jobs.
mypy checks this module against the Protocols (pyproject's [tool.mypy] files).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

from serve_app import errors
from serve_app.config import AppArgs
from serve_app.engine.images import encode_image
from serve_app.errors import ApiError
from serve_app.jobs.events import JobUpdate
from serve_app.jobs.manager import JobManager
from serve_app.jobs.store import open_store
from serve_app.schemas import HealthResponse, ModelHealth, ResultMetadata, ResultResponse, StatusResponse
from serve_app.states import LoraMode
from serve_app.web.guards import load_api_key
from serve_app.web.health import health_response
from serve_app.web.routes import build_api
from serve_app.web.service import IngressService
from serve_app.workitems import ItemResult, WorkItem
from tests.support.requests_corpus import merged_args

MATCHED_MODULES = 7  # what every fake LoRA "matches"


def draw(item: WorkItem) -> ItemResult:
    """A real image of the item's size and format: one colour, from its seed."""
    colour = (item.seed % 251, (item.seed // 251) % 251, 100)
    data = encode_image(Image.new("RGB", (item.key.width, item.key.height), colour), item.output_format)
    loras = item.key.loras
    return ItemResult(
        request_id=item.request_id, index=item.index, seed=item.seed, width=item.key.width,
        height=item.key.height, format=item.output_format, data=data,
        lora_modules=tuple((use.key, MATCHED_MODULES) for use in loras),
        lora_mode=item.key.lora_mode if item.key.lora_mode != LoraMode.UNSET else LoraMode.PEFT,
        prompt=item.prompt, steps=item.key.steps, guidance=item.key.guidance,
        multiplier=loras[0].multiplier if loras else None,
    )


@dataclass
class FakeGenerators:
    """A GeneratorsClient (web/service.py); also the JobManager's dispatch (`run_one`)."""

    items: list[WorkItem] = field(default_factory=list)  # every item run, in arrival order
    tokens: list[dict[str, str] | None] = field(default_factory=list)  # the tokens beside each item
    in_flight: int = 0  # items being answered now
    cancelled: int = 0  # items whose caller gave up while they were held
    _held: threading.Event = field(default_factory=threading.Event)
    _failures: list[tuple[Callable[[WorkItem], bool], ApiError]] = field(default_factory=list)

    def fail(self, match: str | Callable[[WorkItem], bool], error: ApiError) -> None:
        """Answer `error` for each item whose prompt holds `match` (or for which `match(item)` is true)."""
        test = (lambda item: match in item.prompt) if isinstance(match, str) else match
        self._failures.append((test, error))

    def hold(self) -> None:
        """Keep every item in flight, unanswered, until `release`."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def wait_in_flight(self, count: int, timeout_s: float = 10) -> None:
        """From the test's thread: wait until `count` items are in flight."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight < count:
            assert time.monotonic() < deadline, f"{self.in_flight} items in flight, never {count}"
            time.sleep(0.005)

    async def run_one(self, item: WorkItem, tokens: dict[str, str] | None = None) -> ItemResult | ApiError:
        self.items.append(item)
        self.tokens.append(tokens)
        self.in_flight += 1
        try:
            while self._held.is_set():
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        for test, error in self._failures:
            if test(item):
                return error
        return draw(item)

    async def run(self, items: list[WorkItem], tokens: dict[str, str] | None = None) -> list[ItemResult | ApiError]:
        return list(await asyncio.gather(*(self.run_one(item, tokens) for item in items)))


class InMemoryJobs:
    """A JobsClient (web/service.py): the real JobManager over the in-memory store (module docstring)."""

    def __init__(self, args: AppArgs, generators: FakeGenerators):
        store = open_store(args.jobs.model_copy(update={"store": "memory"}))
        self.manager = JobManager(store, args, generators.run_one, {m.id for m in args.models})
        self.retry_after_s = args.limits.retry_after_s
        self.down = False

    def _answer(self) -> None:
        if self.down:
            raise ApiError(errors.JOBS_UNAVAILABLE, "the job service is restarting; retry later",
                           {"retry_after_s": self.retry_after_s})

    async def submit(self, request_id: str, items: list[WorkItem], metadata: ResultMetadata, timeout_s: float,
                     webhook_url: str | None = None, tokens: dict[str, str] | None = None) -> StatusResponse:
        self._answer()
        return await self.manager.submit(request_id, items, metadata, timeout_s, webhook_url, tokens)

    async def status(self, request_id: str) -> StatusResponse:
        self._answer()
        return await self.manager.status(request_id)

    async def result(self, request_id: str) -> ResultResponse:
        self._answer()
        return await self.manager.result(request_id)

    async def image(self, request_id: str, index: int) -> tuple[bytes, str]:
        self._answer()
        return await self.manager.image(request_id, index)

    async def cancel(self, request_id: str) -> StatusResponse:
        self._answer()
        return await self.manager.cancel(request_id)

    async def wait_change(self, request_id: str, version: str | None, timeout_s: float) -> JobUpdate:
        self._answer()
        return await self.manager.wait_change(request_id, version, timeout_s)

    async def ping(self) -> bool:
        return not self.down


@dataclass
class FakeApp:
    args: AppArgs
    generators: FakeGenerators
    jobs: InMemoryJobs
    service: IngressService
    api: FastAPI


def fake_app(args: AppArgs, replica: str = "replica-0") -> FakeApp:
    """The real service and routes over the fakes (module docstring); the API key as the args configure it."""
    generators = FakeGenerators()
    jobs = InMemoryJobs(args, generators)

    async def health() -> HealthResponse:
        models = {m.id: ModelHealth(state="ready", replicas=1) for m in args.models}
        return health_response(models, jobs_ok=await jobs.ping())

    service = IngressService(args, generators, jobs, health)
    return FakeApp(args, generators, jobs, service, build_api(service, args, load_api_key(args.auth), replica))


LORA_FILES = ("aitk/style.safetensors", "aitk/other.safetensors")


def write_lora_root(root: Path) -> Path:
    """A LoRA root for the ingress's policy, which only checks that a file is there: empty files."""
    for name in LORA_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def args_with(lora_root: Path, **overrides: Any) -> AppArgs:
    """Args for the HTTP tests: the model `flux`, the LoRA root, local URLs allowed. An override of a section
    (loras, limits, jobs...) is merged into it; `models` replaces the list (as tests/serve/helpers.app_args)."""
    base: dict[str, Any] = {
        "models": [{"id": "flux"}],
        "loras": {"root": str(lora_root), "cache_dir": str(lora_root / ".url-cache"), "allowed_hosts": ["127.0.0.1"],
                  "allow_private_addresses": True},
        "jobs": {"store": "memory"},
    }
    return merged_args(base, overrides)
