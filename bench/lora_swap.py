"""What does serving many LoRAs cost? The engine alone (no Ray), one request at a time, one run.

On the built-in small model, every request one image of the same shape (so batching plays no
part), each mode with a pipeline of its own, all in this process:
  (a) cached, round robin: 4 ai-toolkit LoRAs held by the replica's adapter cache (AdapterCache +
      an LRU of LoRA sets, as Serve's multiplexed cache holds them); requests cycle over the 4, so
      every request switches the active adapter (`set_adapters`), none loads;
  (b) one LoRA: the same path, every request on the same LoRA;
  (c) reference-style baseline: one adapter slot named "lora", reloaded (`unload_lora_weights` +
      `load_lora_weights`) whenever the LoRA changes, cycling over the same 4 LoRAs;
  (d) the reference's first choice, for information: `load_lora_weights(..., hotswap=True)` into
      the "lora" slot (it falls back to (c) when a hotswap fails); skipped if it fails here.
Each request is generate + JPEG encode (quality 95, as the reference saves it). After a warm-up
the modes take turns by cycles of 4 requests, so drift of a shared machine hits them all alike.

    .venv/bin/python -m bench.lora_swap [--requests 96] [--size 256] [--steps 8] [--rank 16]

Targets: (a)/(b) ≥ 0.95 (a replica serving 4 LoRAs is as fast as one serving one), and (a)/(c) ≥ 1.
Results: bench/results/lora_swap.json and bench/results/lora_swap.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import describe, summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
LORAS = 4
PROMPT = "a photo of a person, golden hour"


class SetLru:
    """The replica's LoRA-set cache, as Serve's `@serve.multiplexed` runs it: an LRU of LoraSets."""

    def __init__(self, adapters, size: int):
        self.adapters = adapters
        self.size = size
        self.sets: OrderedDict = OrderedDict()

    def get(self, sources: tuple[str, ...]):
        if sources in self.sets:
            self.sets.move_to_end(sources)
            return self.sets[sources]
        if len(self.sets) >= self.size:
            _, evicted = self.sets.popitem(last=False)
            evicted.release()
        from serve_app.workitems import LoraUse

        self.sets[sources] = self.adapters.acquire([LoraUse(source, 1.0) for source in sources])
        return self.sets[sources]


def work_item(source: str, width: int, height: int, steps: int, seed: int):
    from serve_app.workitems import BatchKey, LoraUse, WorkItem

    key = BatchKey(model="flux", width=width, height=height, steps=steps, guidance=4.0,
                   loras=(LoraUse(source=source, multiplier=1.0),))
    return WorkItem(request_id="bench", index=0, prompt=PROMPT, seed=seed, key=key, output_format="jpeg")


def cached_mode(engine, sources, root: Path, cache_size: int) -> Callable:
    """(a) and (b): the generator's path for one request, minus Ray."""
    from serve_app.config import LoraArgs
    from serve_app.engine.images import encode_image
    from serve_app.loras.adapters import AdapterCache
    from serve_app.loras.sources import LoraSources

    sources = LoraSources(LoraArgs(root=str(root), cache_dir=str(root / ".cache")))

    def read_file(use):  # root files: held, then read, as a replica's prefetch and adapter load do
        with sources.hold(sources.resolve(use.source)) as held:
            return held.read()

    adapters = AdapterCache(engine, read_file)
    lru = SetLru(adapters, cache_size)

    def run(item) -> bytes:
        lru.get(tuple(u.source for u in item.key.loras))
        image = engine.generate([item], adapters.weights(item.key.loras))[0]
        return encode_image(image, item.output_format)

    run.adapters = adapters  # type: ignore[attr-defined]
    return run


def reference_mode(engine, root: Path, hotswap: bool = False) -> Callable:
    """(c) and (d): one slot named "lora", replaced when the request's LoRA is not the one in it."""
    import torch

    from serve_app.engine.images import encode_image

    pipe = engine.pipe
    current: dict[str, str | None] = {"source": None}

    def run(item) -> bytes:
        source = item.key.loras[0].source
        if source != current["source"]:
            path = root / source
            if current["source"] is not None and not hotswap:
                pipe.unload_lora_weights()
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="lora",
                                   local_files_only=True, hotswap=hotswap and current["source"] is not None)
            current["source"] = source
        key = item.key
        with torch.inference_mode():
            image = pipe(prompt=item.prompt, height=key.height, width=key.width, num_inference_steps=key.steps,
                         guidance_scale=key.guidance, negative_prompt=item.neg,
                         generator=torch.Generator("cpu").manual_seed(item.seed)).images[0]
        return encode_image(image, item.output_format)

    return run


def time_requests(run: Callable, items: list) -> list[float]:
    seconds = []
    for item in items:
        start = time.perf_counter()
        run(item)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_bench(opts) -> dict:
    import warnings

    import torch
    from diffusers.utils import logging as diffusers_logging

    from serve_app.engine.reference import FluxEngine
    from serve_app.tiny import write_aitoolkit_lora

    warnings.filterwarnings("ignore")  # PEFT's "multiple adapters" notice: intended here
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(opts.torch_threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lora-swap-") as tmp:
        root = Path(tmp)
        sources = [f"bench/lora_{i}.safetensors" for i in range(LORAS)]
        for i, source in enumerate(sources):
            write_aitoolkit_lora(root / source, rank=opts.rank, seed=1000 + i)

        def items(cycle: bool, n: int, offset: int = 0) -> list:
            return [work_item(sources[(offset + i) % LORAS] if cycle else sources[0],
                              opts.size, opts.size, opts.steps, seed=offset + i) for i in range(n)]

        modes: dict[str, tuple[Callable, bool]] = {
            "a_cached_round_robin": (cached_mode(FluxEngine.load(device="cpu"), sources, root, LORAS), True),
            "b_one_lora": (cached_mode(FluxEngine.load(device="cpu"), sources, root, LORAS), False),
            "c_reference_reload": (reference_mode(FluxEngine.load(device="cpu"), root), True),
        }
        if not opts.no_hotswap:
            modes["d_reference_hotswap"] = (reference_mode(FluxEngine.load(device="cpu"), root, hotswap=True), True)

        skipped: dict[str, str] = {}
        for name, (run, cycle) in list(modes.items()):  # warm-up: every LoRA seen, caches filled
            try:
                time_requests(run, items(cycle, opts.warmup))
            except Exception as exc:  # noqa: BLE001 - only the optional hotswap mode may fail here
                if not name.startswith("d_"):
                    raise
                skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
                del modes[name]

        # Interleaved by whole cycles: round r runs 4 requests of every mode, the order of the modes
        # rotating, so a burst of load from elsewhere on a shared machine hits every mode alike.
        rounds = max(1, opts.requests // LORAS)
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        names = list(modes)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                run, cycle = modes[name]
                seconds[name] += time_requests(run, items(cycle, LORAS, offset=r * LORAS))

        loads = {name: run.adapters.loads for name, (run, _) in modes.items() if hasattr(run, "adapters")}

    summary = {
        name: {
            "images": len(s),
            "images_per_s": len(s) / sum(s),  # requests run back to back: the time in this mode
            "images_per_s_from_p50": 1 / statistics.median(s),  # robust to bursts of load from elsewhere
            "seconds_per_image_mean": statistics.fmean(s),
            "seconds_per_image_p50": statistics.median(s),
        }
        for name, s in seconds.items()
    }

    def ratio(x: str, y: str) -> dict:
        mx, my = summary[x], summary[y]
        # Paired: cycle r of x against cycle r of y (run moments apart), the median over cycles.
        cycles = [sum(sy[i:i + LORAS]) / sum(sx[i:i + LORAS])
                  for sx, sy in [(seconds[x], seconds[y])] for i in range(0, len(sx), LORAS)]
        return {"throughput": mx["images_per_s"] / my["images_per_s"],
                "from_p50": mx["images_per_s_from_p50"] / my["images_per_s_from_p50"],
                "paired_median": statistics.median(cycles)}

    ratios = {"a_over_b": ratio("a_cached_round_robin", "b_one_lora"),
              "a_over_c": ratio("a_cached_round_robin", "c_reference_reload")}
    if "d_reference_hotswap" in summary:
        ratios["a_over_d"] = ratio("a_cached_round_robin", "d_reference_hotswap")
    return {
        "settings": {"size": opts.size, "steps": opts.steps, "loras": LORAS, "rank": opts.rank,
                     "requests_per_mode": rounds * LORAS, "warmup": opts.warmup,
                     "torch_threads": opts.torch_threads, "output_format": "jpeg", "model": "tiny"},
        "modes": summary,
        "ratios": ratios,
        "adapter_loads_after_warmup_included": loads,
        "skipped": skipped,
        "machine": {**describe(), "load_average_1m_at_start_and_end": [load_start, os.getloadavg()[0]]},
        "finished_at": datetime.now(UTC).isoformat(),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    names = {
        "a_cached_round_robin": "(a) 4 cached LoRAs, round robin",
        "b_one_lora": "(b) one LoRA",
        "c_reference_reload": "(c) reference: one slot, unload + load on change",
        "d_reference_hotswap": "(d) reference: one slot, hotswap on change",
    }
    lines = [
        f"# LoRA swap: the engine, one request at a time ({s['size']}x{s['size']}, {s['steps']} steps, "
        f"{s['loras']} ai-toolkit LoRAs of rank {s['rank']}, tiny model, CPU, {s['torch_threads']} torch thread(s))",
        "",
        f"{s['requests_per_mode']} measured requests per mode after {s['warmup']} warm-up requests, the modes "
        f"interleaved by cycles of {s['loras']}; each request is generate + JPEG encode. "
        f"Finished {result['finished_at']} on {summary(result['machine'])}.",
        "",
        "| mode | images/s | images/s from p50 | s/image mean | s/image p50 |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["modes"].items():
        lines.append(f"| {names[name]} | {m['images_per_s']:.2f} | {m['images_per_s_from_p50']:.2f} | "
                     f"{m['seconds_per_image_mean']:.4f} | {m['seconds_per_image_p50']:.4f} |")
    targets = {"a_over_b": (0.95, "≥ 0.95"), "a_over_c": (1.0, "≥ 1"), "a_over_d": (None, "for information")}
    lines += ["", "| ratio | images/s | from p50 | paired median | target |", "|---|---|---|---|---|"]
    for key, r in result["ratios"].items():
        bound, text = targets[key]
        verdict = "" if bound is None else (" (met)" if r["paired_median"] >= bound else " (not met)")
        label = "(" + key.replace("_over_", ")/(") + ")"
        lines.append(f"| {label} | {r['throughput']:.3f} | {r['from_p50']:.3f} | {r['paired_median']:.3f} "
                     f"| {text}{verdict} |")
    lines += ["", "images/s: images over the seconds spent in the mode. Paired median (the verdict): the median "
              "over cycles of the time ratio of cycle r of one mode to cycle r of the other, run moments apart; "
              "it holds when other work loads the machine in bursts "
              f"(1-minute load average at start and end: {result['machine']['load_average_1m_at_start_and_end']})."]
    for name, why in result["skipped"].items():
        lines += ["", f"{names[name]} skipped: {why}"]
    loads = ", ".join(f"{names[k].split(' ')[0]} {v}" for k, v in result["adapter_loads_after_warmup_included"].items())
    lines += ["", f"Adapter loads, warm-up included: {loads} (the cached modes load each LoRA once).",
              "", "The small model on a CPU shows the mechanism (a switch between cached adapters is one "
              "`set_adapters`; a reload reads, converts and injects the file again), not FLUX.1-dev's numbers: "
              "there a LoRA file is far larger and an image takes seconds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="measured requests per mode (whole cycles of 4)")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests per mode first")
    parser.add_argument("--size", type=int, default=256, help="width = height, a multiple of 16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="rank of the LoRAs written")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--no-hotswap", action="store_true", help="skip mode (d)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.size % 16 or opts.size < 64:
        parser.error("--size must be a multiple of 16, at least 64")

    result = run_bench(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "lora_swap.json").write_text(json.dumps(result, indent=2) + "\n")
    (opts.out / "lora_swap.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {opts.out / 'lora_swap.json'}, {opts.out / 'lora_swap.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
