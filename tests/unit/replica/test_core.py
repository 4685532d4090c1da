"""GeneratorReplica without Ray: batching, cancellation, failure splitting and encoding on the small model.

The replica gets the real FluxEngine, wrapped by a spy that records each pipeline call (and fails a
call holding a marked prompt), so what is checked is what a user relies on: which items shared a
call, which calls stopped early, and which images came back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from pydantic import ValidationError

from serve_app import errors
from serve_app.config import BatchSettings, LoraArgs
from serve_app.engine.images import encode_image
from serve_app.engine.reference import FluxEngine
from serve_app.errors import ApiError
from serve_app.loras.sources import LoraSources
from serve_app.replica.core import GeneratorReplica
from serve_app.workitems import BatchKey, ItemResult, LoraUse, WorkItem

FAIL = "[[fail]]"


class SpyEngine:
    """The real engine, plus a record of each call: its items, its steps, and when it ran."""

    def __init__(self, engine: FluxEngine):
        self.engine = engine
        self.device = engine.device
        self.calls: list[dict] = []

    def __getattr__(self, name):  # adapters and the rest: the real engine's
        return getattr(self.engine, name)

    def generate(self, items, adapters=(), should_stop=None, on_step=None):
        call = {"refs": [item.ref for item in items], "keys": {item.key for item in items}, "steps": 0,
                "start": time.perf_counter(), "thread": threading.current_thread().name}
        self.calls.append(call)

        def count(step, total):
            call["steps"] = step
            if on_step is not None:
                on_step(step, total)

        try:
            if any(FAIL in item.prompt for item in items):
                raise RuntimeError("a marked prompt")
            return self.engine.generate(items, adapters, should_stop, count)
        finally:
            call["end"] = time.perf_counter()


@pytest.fixture(scope="module")
def flux_engine(tiny_dir) -> FluxEngine:
    return FluxEngine.load(str(tiny_dir), device="cpu")


@pytest.fixture
def spy(flux_engine) -> SpyEngine:
    return SpyEngine(flux_engine)


@pytest.fixture
def fresh_spy(tiny_dir) -> SpyEngine:
    """An engine of its own, for tests that load LoRAs (adapters stay in the pipeline they load into)."""
    return SpyEngine(FluxEngine.load(str(tiny_dir), device="cpu"))


def make_replica(spy, lora_root, **settings) -> GeneratorReplica:
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(lora_root / ".cache")))
    return GeneratorReplica(spy, sources, BatchSettings(**settings), max_lora_sets=2)


def item(request_id: str, index: int = 0, prompt: str = "a photo", seed: int = 1, size: int = 64, steps: int = 2,
         guidance: float = 4.0, loras: tuple[LoraUse, ...] = (), deadline: float | None = None) -> WorkItem:
    key = BatchKey(model="flux", width=size, height=size, steps=steps, guidance=guidance, loras=loras)
    return WorkItem(request_id=request_id, index=index, prompt=prompt, seed=seed, key=key, output_format="png",
                    deadline=deadline)


async def batch(replica: GeneratorReplica, items: list[WorkItem]) -> list:
    """One batch as the Serve shell runs it: each item's prefetch holds its LoRA files until its end."""
    for one in items:
        assert await replica.prefetch(one) is None
    try:
        return await replica.run_batch(items)
    finally:
        for one in items:
            replica.release(one)


def run(replica: GeneratorReplica, items: list[WorkItem]) -> list:
    async def go():
        try:
            return await batch(replica, items)
        finally:
            replica.close()

    return asyncio.run(go())


def test_items_of_different_batch_keys_never_share_a_call(fresh_spy, lora_root):
    spy = fresh_spy
    style = (LoraUse("aitk/style.safetensors", 0.8),)
    items = [item("a", 0), item("b", 0, guidance=2.5), item("c", 0), item("d", 0, loras=style), item("e", 0, size=80),
             item("f", 0, loras=style), item("g", 0, steps=1)]
    outcomes = run(make_replica(spy, lora_root, pixel_budget=10**9), items)
    assert all(isinstance(o, ItemResult) for o in outcomes), outcomes
    assert all(len(call["keys"]) == 1 for call in spy.calls)
    assert sorted(sorted(r for r, _ in call["refs"]) for call in spy.calls) == [
        ["a", "c"], ["b"], ["d", "f"], ["e"], ["g"]]
    assert [(o.request_id, o.width) for o in outcomes] == [(i.request_id, i.key.width) for i in items]


def test_the_pixel_budget_cuts_calls(spy, lora_root):
    items = [item(f"r{i}", seed=i) for i in range(5)]
    run(make_replica(spy, lora_root, pixel_budget=2 * 64 * 64), items)
    assert [len(call["refs"]) for call in spy.calls] == [2, 2, 1]
    spy.calls.clear()
    run(make_replica(spy, lora_root, pixel_budget=1), [item("big", size=128), item("big2", size=128)])
    assert [len(call["refs"]) for call in spy.calls] == [1, 1]  # an image over the budget runs alone


def test_a_deployments_user_config_overrides_the_models_batching_and_an_unknown_key_is_named():
    base = BatchSettings(max_batch_size=4, batch_wait_timeout_s=0.0)
    assert base.updated({"max_batch_size": 2}) == BatchSettings(max_batch_size=2, batch_wait_timeout_s=0.0)
    with pytest.raises(ValidationError, match="max_batch_sise"):  # a typo fails the deploy, never ignored
        base.updated({"max_batch_sise": 8})


def test_each_denoising_step_is_reported_with_the_calls_items_on_the_engine_thread(spy, lora_root):
    reports = []
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(lora_root / ".cache")))
    replica = GeneratorReplica(spy, sources, BatchSettings(pixel_budget=10**9),
                               on_steps=lambda items, step, steps: reports.append(
                                   ([i.ref for i in items], step, steps, threading.current_thread().name)))
    run(replica, [item("a", steps=3), item("b", steps=3)])
    assert [(refs, step, steps) for refs, step, steps, _ in reports] == [
        ([("a", 0), ("b", 0)], step, 3) for step in (1, 2, 3)]
    assert {thread for *_, thread in reports} == {spy.calls[-1]["thread"]}


def test_a_cancelled_item_stops_a_call_that_serves_nobody_else(spy, lora_root):
    replica = make_replica(spy, lora_root)
    lone = item("lone", steps=40, size=128)

    async def go():
        running = asyncio.create_task(batch(replica, [lone]))
        while not spy.calls or spy.calls[-1]["steps"] < 2:
            await asyncio.sleep(0.01)
        replica.cancel(lone)
        return await running

    outcome = asyncio.run(go())[0]
    replica.close()
    assert isinstance(outcome, ApiError) and outcome.code == errors.CANCELED
    assert 2 <= spy.calls[-1]["steps"] < 40


def test_a_cancelled_item_does_not_stop_its_call_mates(spy, lora_root):
    replica = make_replica(spy, lora_root)
    keep, drop = item("keep", steps=12, seed=1), item("drop", steps=12, seed=2)

    async def go():
        running = asyncio.create_task(batch(replica, [keep, drop]))
        while not spy.calls or spy.calls[-1]["steps"] < 2:
            await asyncio.sleep(0.01)
        replica.cancel(drop)
        return await running

    kept, dropped = asyncio.run(go())
    replica.close()
    assert isinstance(kept, ItemResult) and dropped.code == errors.CANCELED
    assert spy.calls[-1]["steps"] == 12  # the call ran to the end for the item still wanted


def test_an_item_past_its_deadline_never_runs_and_times_out(spy, lora_root):
    late = item("late", deadline=time.time() - 1)
    outcome = run(make_replica(spy, lora_root), [late])[0]
    assert outcome.code == errors.TIMEOUT
    assert spy.calls == []


def test_a_failing_item_does_not_fail_its_call_mates(spy, lora_root):
    items = [item("ok1", seed=1), item("bad", prompt=f"{FAIL} broken"), item("ok2", seed=2)]
    ok1, bad, ok2 = run(make_replica(spy, lora_root), items)
    assert isinstance(ok1, ItemResult) and isinstance(ok2, ItemResult)
    assert isinstance(bad, ApiError) and bad.code == errors.GENERATION_FAILED
    assert len(spy.calls[0]["refs"]) == 3  # they did share the failed call, then ran one by one
    assert [len(call["refs"]) for call in spy.calls[1:]] == [1, 1, 1]


def test_images_are_encoded_after_the_pipeline_lock_is_released(spy, lora_root):
    """A slow encoder never holds up the pipeline: the next call starts while images encode."""
    encoded: list[tuple[float, float, bool]] = []

    def slow_encode(image, fmt):
        start = time.perf_counter()
        time.sleep(0.5)
        encoded.append((start, time.perf_counter()))
        return encode_image(image, fmt)

    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(lora_root / ".cache")))
    replica = GeneratorReplica(spy, sources, BatchSettings(), encode=slow_encode)
    outcomes = run(replica, [item("first", size=64), item("second", size=80)])
    assert all(isinstance(o, ItemResult) for o in outcomes)
    first, second = spy.calls
    (first_encode_start, first_encode_end), _ = sorted(encoded)
    assert first_encode_start >= first["end"]
    assert second["start"] < first_encode_end  # the second call did not wait for the first one's encoding


def test_pipeline_calls_run_on_one_engine_thread(spy, lora_root):
    replica = make_replica(spy, lora_root)

    async def go():
        for i in range(3):
            await batch(replica, [item(f"r{i}", size=64 + 16 * i)])
        replica.close()

    asyncio.run(go())
    assert {call["thread"] for call in spy.calls} == {"flux-engine_0"}


def test_lora_sets_are_cached_and_the_least_recent_is_unloaded(fresh_spy, lora_root):
    spy = fresh_spy
    replica = make_replica(spy, lora_root)  # at most 2 sets
    a, b = LoraUse("aitk/style.safetensors", 1.0), LoraUse("aitk/other.safetensors", 1.0)
    stack = (a, b)

    async def go():
        for loras in ((a,), (a,), (b,), stack):
            outcome = (await batch(replica, [item("r", loras=loras)]))[0]
            assert isinstance(outcome, ItemResult), outcome
        state = await replica.lora_state()
        replica.close()
        return state

    state = asyncio.run(go())
    # {a} loads style (then a hit), {b} loads other; the stack evicts {a} first (as Serve's LRU does),
    # which unloads style, then loads style again and shares other with {b}.
    assert state.adapter_loads == 3
    assert state.loaded == sorted([a.key, b.key])
    assert len(state.adapters) == 2


def test_a_bad_lora_file_fails_only_its_item_before_the_batch(spy, lora_root):
    replica = make_replica(spy, lora_root)
    missing = replace(item("m"), key=replace(item("m").key, loras=(LoraUse("nope/missing.safetensors", 1.0),)))

    async def go():
        error = await replica.prefetch(missing)
        fine = await replica.prefetch(item("f"))
        replica.close()
        return error, fine

    error, fine = asyncio.run(go())
    assert isinstance(error, ApiError) and error.code == errors.LORA_NOT_FOUND
    assert fine is None


def test_results_name_the_speed_tier_and_lora_mode_that_drew_them(tiny_dir, lora_root):
    """The exact tier runs PEFT adapters; the compiled tier writes the set into its slot (docs/performance.md)."""
    from serve_app.engine.compiled.fast import CompiledFluxEngine
    from serve_app.engine.compiled.speed import SpeedArgs, WarmupShape

    speed = SpeedArgs(speed="compiled", compile_backend="eager", lora_slot_rank=8, torch_threads=1,
                      warmup_shapes=(WarmupShape(width=64, height=64),), warmup_steps=1)
    compiled = CompiledFluxEngine.load(str(tiny_dir), "cpu", speed=speed)
    style = (LoraUse("aitk/style.safetensors", 0.7),)
    exact_out = run(make_replica(SpyEngine(FluxEngine.load(str(tiny_dir), device="cpu")), lora_root),
                    [item("e", loras=style)])[0]
    compiled_out = run(make_replica(compiled, lora_root), [item("c", loras=style)])[0]
    assert (exact_out.speed_tier, exact_out.lora_mode) == ("exact", "peft")
    assert (compiled_out.speed_tier, compiled_out.lora_mode) == ("compiled", "slot")


EVICT_ALL = r"""
import sys
from pathlib import Path
from serve_app.loras.cache import DownloadCache

cache = DownloadCache(Path(sys.argv[1]), cap_bytes=0, stale_part_s=3600)
try:
    cache.make_room()  # a cap of 0: every complete file goes, as another process's downloads would make it
except Exception:
    pass
print(cache.evictions)
"""


@pytest.mark.slow  # a subprocess of its own
def test_a_file_evicted_between_prefetch_and_load_is_loaded_from_the_held_bytes(fresh_spy, lora_root, tmp_path):
    """Another real process empties the shared download cache after an item's prefetch: the item's adapter
    still loads, from the bytes prefetch held, with no request to the network, and the item beside it in
    the batch does not wait for any download."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.unit.lora_host import LoraHost, slow

    body = (lora_root / "aitk" / "style.safetensors").read_bytes()
    host = LoraHost()
    url = host.file("/style.safetensors", body)
    cache_dir = tmp_path / "cache"
    sources = LoraSources(LoraArgs(root=str(lora_root), cache_dir=str(cache_dir),
                                   allowed_hosts=["127.0.0.1"], allow_private_addresses=True))
    replica = GeneratorReplica(fresh_spy, sources, BatchSettings(), max_lora_sets=2)
    styled = item("styled", loras=(LoraUse(sources.canonical(url), 0.8),))
    plain = item("plain", seed=2)

    async def go():
        assert await replica.prefetch(styled) is None and await replica.prefetch(plain) is None
        repo_root = Path(__file__).resolve().parents[3]
        evicted = subprocess.run([sys.executable, "-c", EVICT_ALL, str(cache_dir)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(repo_root)}, check=True, timeout=120)
        host.route("/style.safetensors", slow(body, 30.0))  # a download now would take 30 s
        start = time.monotonic()
        outcomes = await replica.run_batch([styled, plain])
        seconds = time.monotonic() - start
        replica.release(styled)
        replica.release(plain)
        state = await replica.lora_state()
        replica.close()
        return int(evicted.stdout), outcomes, seconds, state

    try:
        evictions, outcomes, seconds, state = asyncio.run(go())
    finally:
        host.close()
    assert evictions == 1 and not list(cache_dir.glob("*.safetensors"))  # the file was gone before the load
    assert all(isinstance(o, ItemResult) for o in outcomes), outcomes
    assert outcomes[0].lora_modules and outcomes[0].lora_modules[0][1] > 0  # the adapter loaded and matched
    assert host.counts["/style.safetensors"] == 1  # prefetch's download, and nothing after it
    assert seconds < 15, seconds  # neither item waited for a download
    assert state.adapter_loads == 1 and len(replica.held) == 0  # the held file was let go with its item
