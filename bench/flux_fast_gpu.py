r"""FLUX.1-dev's speed tiers on one GPU: exact (eager PEFT) against compiled (LoRA slot) and fp8.

FLUX.1-dev's real architecture with random weights in bf16 (bench/flux_dev_random.py: no download)
and random ai-toolkit-style LoRAs (every Linear of the blocks, A and B non-zero). Phases, with the
JSON and the table rewritten after each, so a run cut short still reports:

    env         versions, cuDNN, SDPA kernels timed at FLUX's attention shapes; the model; LoRAs A (r16), B (r32)
    exact       (a) FluxEngine eager, LoRA A at 1.0, 1024², 28 steps; the base model; the reference
                transformer forward; then 512² at batch 1, 2, 4
    compiled    (b) CompiledFluxEngine: warm-up 1024², 512², 512²x2 (compile seconds per shape), LoRA A in
                the slot, slot-vs-PEFT and compiled-vs-exact on one forward, 1024² timed
    swap        (c) LoRA B, multiplier 0.6, the base model, back to A: swap seconds; recompiles (must be 0)
    new_shapes  512² at batch 4 and 768², never warmed up: the recompiles they cost (expected 0)
    batches     compiled 512² at batch 1, 2, 4
    fp8         (d) fp8 base Linears + slot + compile at 1024²; "not supported" with the reason below CC 8.9

    python -m bench.flux_fast_gpu --out DIR           # CUDA: DIR/flux_fast_gpu.json and .md, about 6-7 min
    python -m bench.flux_fast_gpu --smoke --out DIR   # CPU, small model, fp32, aot_eager: every phase

JSON: device, phases.{exact,compiled,fp8}.s_per_image (null where not run), recompiles_after_warmup,
recompiles_new_shapes, slot_vs_peft_max_abs, swap_s, compile_s, peak_gib, rows (every timing), errors, skipped.

Device command. The device image has torch 2.11, transformers, accelerate and safetensors but no diffusers,
pydantic or this peft: they travel as wheels (about 13 MB). Once, in the checkout's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
        diffusers==0.42.1 peft==0.21.2 torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==10.2.0

Then one `run` with carry [".whl"] and timeout_s 540:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \
        PYTHONUNBUFFERED=1 python3 -m bench.flux_fast_gpu --out $OUT --budget-s 450

and `give_back` unless rerunning at once. Budget: optional phases (new_shapes, batches, fp8) are skipped
when less of --budget-s is left than they and the fp8 phase after them need.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

from bench.flux_dev_random import build_flux_dev_random, build_flux_transformer, probe_inputs, random_lora
from serve_app.engine.compiled.fast import CompiledFluxEngine
from serve_app.engine.compiled.fp8 import SpeedTierUnavailable, check_fp8_device
from serve_app.engine.compiled.speed import SpeedArgs, WarmupShape
from serve_app.engine.protocol import AdapterWeight
from serve_app.engine.reference import FluxEngine
from serve_app.loras.files import LoraFile
from serve_app.tiny import build_tiny_pipeline
from serve_app.workitems import BatchKey, WorkItem

LORA_A, LORA_B = [AdapterWeight("a", 1.0)], [AdapterWeight("b", 1.0)]


@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one run: the real one on a GPU, or the CPU smoke run of the same code."""

    smoke: bool
    device: str
    dtype: torch.dtype
    backend: str
    size: int = 1024  # the main size (exact vs compiled vs fp8)
    small: int = 512  # the batching size
    novel: int = 768  # a size no warm-up compiled
    steps: int = 28
    repeats: int = 2
    batches: tuple[int, ...] = (1, 2, 4)
    ranks: tuple[int, int] = (16, 32)  # LoRA A, LoRA B
    threads: int = 4


FULL = Plan(smoke=False, device="cuda", dtype=torch.bfloat16, backend="inductor")
SMOKE = Plan(
    smoke=True, device="cpu", dtype=torch.float32, backend="aot_eager", size=64, small=32, novel=48, steps=2,
    repeats=1, threads=1,
)  # fmt: skip


def forward(transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():  # as FluxEngine.generate: the same grad mode, so the same compiled graph
        return transformer(**inputs)[0].float()


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def work(batch: int, size: int, steps: int) -> list[WorkItem]:
    key = BatchKey(model="bench", width=size, height=size, steps=steps, guidance=3.5)
    return [WorkItem(request_id="bench", index=i, prompt=f"a photo number {i}", seed=i, key=key) for i in range(batch)]


def on_cuda(plan: Plan) -> bool:
    return plan.device.startswith("cuda")


def peak_gib(plan: Plan) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda(plan) else None


def reset_peak(plan: Plan) -> None:
    if on_cuda(plan):
        torch.cuda.reset_peak_memory_stats()


def timed(plan: Plan, fn) -> float:
    """Seconds `fn` takes, the GPU's queued work included."""
    if on_cuda(plan):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_cuda(plan):
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass
class Bench:
    """The run's state and report; `save` writes the JSON and the table after every phase."""

    plan: Plan
    out: Path
    started: float = field(default_factory=time.perf_counter)
    report: dict = field(default_factory=dict)
    pipe: FluxPipeline | None = None
    loras: dict = field(default_factory=dict)
    probe: dict | None = None
    reference: torch.Tensor | None = None  # the exact tier's transformer output with LoRA A
    engine: CompiledFluxEngine | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def row(self, phase: str, size: int, batch: int, lora: str, s_per_call: float) -> dict:
        row = {"phase": phase, "size": size, "batch": batch, "lora": lora, "s_per_call": round(s_per_call, 4),
               "s_per_image": round(s_per_call / batch, 4), "peak_gib": peak_gib(self.plan)}  # fmt: skip
        self.report["rows"].append(row)
        print(json.dumps(row), flush=True)
        return row

    def time_calls(self, engine, phase: str, batch: int, size: int, adapters, lora: str, warm: bool = True) -> dict:
        """One untimed call (unless `warm` is False), then `repeats` timed calls; a row per s/call."""
        items = work(batch, size, self.plan.steps)
        if warm:
            engine.generate(items, adapters)
        seconds = timed(self.plan, lambda: [engine.generate(items, adapters) for _ in range(self.plan.repeats)])
        return self.row(phase, size, batch, lora, seconds / self.plan.repeats)

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "flux_fast_gpu.json").write_text(json.dumps(self.report, indent=2, default=str))
        (self.out / "flux_fast_gpu.md").write_text(markdown(self.report))


def sdpa_microbench(plan: Plan) -> list[dict] | None:
    """SDPA kernels at FLUX's attention shapes (1024² and 512² plus 512 text tokens) in bf16: ms and TFLOP/s."""
    if not on_cuda(plan):
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    results = []
    for seq in (4608, 1536):
        q = torch.randn(1, 24, seq, 128, device=plan.device, dtype=torch.bfloat16)

        def attend(n: int, q=q) -> None:
            for _ in range(n):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)

        for name, kernel in kernels.items():
            try:
                with sdpa_kernel([kernel]) if kernel is not None else nullcontext():
                    attend(3)
                    seconds = timed(plan, lambda: attend(10)) / 10
                tflops = 4 * 24 * seq * seq * 128 / seconds / 1e12
                results.append({"seq": seq, "kernel": name, "ms": round(seconds * 1e3, 3), "tflops": round(tflops, 1)})
            except RuntimeError as exc:  # a kernel that cannot run this shape on this GPU
                results.append({"seq": seq, "kernel": name, "error": str(exc)[:160]})
            print(json.dumps(results[-1]), flush=True)
    return results


def versions() -> dict:
    found = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    for package in ("diffusers", "peft", "torchao", "transformers", "pydantic"):
        try:  # metadata only: torchao is never imported unless the fp8 phase runs
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def phase_env(bench: Bench) -> None:
    """Versions, the SDPA microbenchmark, the model (random FLUX.1-dev, or the small one), two LoRAs."""
    plan = bench.plan
    torch.set_num_threads(plan.threads)
    device = torch.cuda.get_device_name() if on_cuda(plan) else "cpu (small model smoke run)"
    bench.report.update({"device": device, "smoke": plan.smoke, "versions": versions(), "sdpa": sdpa_microbench(plan)})
    bench.pipe = build_tiny_pipeline() if plan.smoke else build_flux_dev_random(plan.device, plan.dtype)
    bench.pipe.set_progress_bar_config(disable=True)
    transformer = bench.pipe.transformer
    bench.loras = {
        "a": random_lora(transformer, plan.ranks[0], 11, plan.device, plan.dtype),
        "b": random_lora(transformer, plan.ranks[1], 12, plan.device, plan.dtype),
    }
    bench.probe = probe_inputs(transformer, plan.size, plan.device, plan.dtype)


def phase_exact(bench: Bench) -> None:
    """(a) The exact tier with LoRA A, the base model, the reference forward; then 512² batches."""
    plan = bench.plan
    reset_peak(plan)
    exact = FluxEngine(bench.pipe, plan.device)
    bench.pipe.load_lora_weights(dict(bench.loras["a"]), adapter_name="a")
    main = bench.time_calls(exact, "exact", 1, plan.size, LORA_A, "A r16")
    base = bench.time_calls(exact, "exact", 1, plan.size, [], "none", warm=False)
    exact.activate(LORA_A)
    bench.reference = forward(bench.pipe.transformer, bench.probe)
    bench.report["phases"]["exact"] = {
        "s_per_image": main["s_per_image"], "base_s_per_image": base["s_per_image"], "peak_gib": peak_gib(plan),
    }  # fmt: skip
    bench.save()
    for batch in plan.batches:
        bench.time_calls(exact, "exact", batch, plan.small, LORA_A, "A r16")
    bench.pipe.unload_lora_weights()  # the compiled tier starts from the bare model


def phase_compiled(bench: Bench) -> None:
    """(b) Compile with the warm-up shapes, LoRA A in the slot, parity on one forward, the main size timed."""
    plan = bench.plan
    reset_peak(plan)
    shapes = (
        WarmupShape(width=plan.size, height=plan.size),
        WarmupShape(width=plan.small, height=plan.small),
        WarmupShape(width=plan.small, height=plan.small, batch=2),
    )
    speed = SpeedArgs(speed="compiled", compile_backend=plan.backend, torch_threads=plan.threads, warmup_shapes=shapes)
    engine = bench.engine = CompiledFluxEngine(bench.pipe, plan.device, speed)
    compiles = []
    for shape in shapes:
        warm = engine.compile_shapes([shape])
        compiles.append({**shape.model_dump(), "seconds": round(warm.seconds, 1), "compiles": warm.compiles})
        print(json.dumps({"warmup": compiles[-1]}), flush=True)
    load_s = timed(plan, lambda: engine.load_adapter("a", LoraFile("a", bench.loras["a"], {}, 0)))
    engine.activate(LORA_A)
    with torch.compiler.set_stance("force_eager"):
        slot_eager = forward(bench.pipe.transformer, bench.probe)
    compiled = forward(bench.pipe.transformer, bench.probe)
    bench.report.update({
        "attention": {"backend": engine.attention_backend, "kernel": engine.attention_kernel},
        "compile_shapes": compiles, "compile_s": round(sum(c["seconds"] for c in compiles), 1),
        "load_lora_s": round(load_s, 4),
        "slot_vs_peft_max_abs": (slot_eager - bench.reference).abs().max().item(),
        "slot_vs_peft_rel_l2": rel_l2(slot_eager, bench.reference),
        "compiled_vs_exact_rel_l2": rel_l2(compiled, bench.reference),
    })  # fmt: skip
    main = bench.time_calls(engine, "compiled", 1, plan.size, LORA_A, "A r16 (slot)")
    bench.report["phases"]["compiled"] = {
        "s_per_image": main["s_per_image"], "peak_gib": peak_gib(plan), "speedup_vs_exact": speedup(bench, main),
    }  # fmt: skip


def speedup(bench: Bench, row: dict) -> float | None:
    exact = bench.report["phases"]["exact"].get("s_per_image")
    return round(exact / row["s_per_image"], 3) if exact else None


def phase_swap(bench: Bench) -> None:
    """(c) LoRA B (another rank), multiplier 0.6, the base model, back to A: swap seconds and recompiles."""
    plan, engine = bench.plan, bench.engine
    before = engine.compile_counter.compiles
    load_s = timed(plan, lambda: engine.load_adapter("b", LoraFile("b", bench.loras["b"], {}, 0)))
    steps = {"B r32": LORA_B, "B r32 x0.6": [AdapterWeight("b", 0.6)], "none": [], "A r16 again": LORA_A}
    swaps, images = {}, {}
    for label, adapters in steps.items():
        swaps[label] = round(timed(plan, lambda adapters=adapters: engine.activate(adapters)), 5)
        items = work(1, plan.size, plan.steps)
        start = time.perf_counter()
        images[label] = np.asarray(engine.generate(items, adapters)[0])
        bench.row("swap", plan.size, 1, label, time.perf_counter() - start)
    bench.report.update({
        "swap_s": swaps["B r32"], "swaps_s": swaps, "load_lora_b_s": round(load_s, 4),
        "swap_changes_image": bool((images["B r32"] != images["none"]).any()),
        "recompiles_after_warmup": engine.compile_counter.compiles - before,
    })  # fmt: skip


def phase_new_shapes(bench: Bench) -> None:
    """Compiled calls of shapes no warm-up ran (512² at batch 4, 768²): the recompiles they cost."""
    plan, engine = bench.plan, bench.engine
    before = engine.compile_counter.compiles
    bench.time_calls(engine, "new shape", max(plan.batches), plan.small, LORA_A, "A r16 (slot)", warm=False)
    bench.time_calls(engine, "new shape", 1, plan.novel, LORA_A, "A r16 (slot)", warm=False)
    bench.report["recompiles_new_shapes"] = engine.compile_counter.compiles - before


def phase_batches(bench: Bench) -> None:
    """Compiled 512² at batch 1, 2, 4, timed as the exact tier's are."""
    for batch in bench.plan.batches:
        bench.time_calls(bench.engine, "compiled", batch, bench.plan.small, LORA_A, "A r16 (slot)")


def phase_fp8(bench: Bench) -> None:
    """(d) The fp8 tier at the main size on a rebuilt (same-seed) transformer: fp8 goes on before the slot."""
    plan = bench.plan
    try:
        check_fp8_device(plan.device)
    except SpeedTierUnavailable as exc:
        bench.report["phases"]["fp8"] = {"s_per_image": None, "supported": False, "reason": str(exc)}
        return
    fresh_transformer(bench)
    reset_peak(plan)
    shapes = (WarmupShape(width=plan.size, height=plan.size),)
    speed = SpeedArgs(speed="fp8", compile_backend=plan.backend, torch_threads=plan.threads, warmup_shapes=shapes)
    engine = bench.engine = CompiledFluxEngine(bench.pipe, plan.device, speed)
    warm = engine.compile_shapes()
    engine.load_adapter("a", LoraFile("a", bench.loras["a"], {}, 0))
    engine.activate(LORA_A)
    out = forward(bench.pipe.transformer, bench.probe)
    main = bench.time_calls(engine, "fp8", 1, plan.size, LORA_A, "A r16 (slot)", warm=False)
    before = engine.compile_counter.compiles
    engine.load_adapter("b", LoraFile("b", bench.loras["b"], {}, 0))
    engine.generate(work(1, plan.size, plan.steps), [AdapterWeight("b", 0.6)])
    bench.report["phases"]["fp8"] = {
        "s_per_image": main["s_per_image"], "supported": True, "compile_s": round(warm.seconds, 1),
        "peak_gib": peak_gib(plan), "speedup_vs_exact": speedup(bench, main),
        "fp8_vs_exact_rel_l2": rel_l2(out, bench.reference) if bench.reference is not None else None,
        "finite": bool(torch.isfinite(out).all()), "recompiles_on_swap": engine.compile_counter.compiles - before,
    }  # fmt: skip


def fresh_transformer(bench: Bench) -> None:
    """Replace the compiled, slotted transformer by a bare one with the same weights (freed first: 24 GB)."""
    old = bench.pipe
    if bench.engine is not None:
        bench.engine.compile_counter.close()
    bench.engine = None
    components = {name: getattr(old, name) for name in ("scheduler", "vae", "text_encoder", "tokenizer")}
    components |= {"text_encoder_2": old.text_encoder_2, "tokenizer_2": old.tokenizer_2}
    bench.pipe = old = None
    torch.compiler.reset()  # compiled code holds the old blocks
    gc.collect()
    torch.cuda.empty_cache()
    bench.pipe = FluxPipeline(**components, transformer=build_flux_transformer(bench.plan.device, bench.plan.dtype))
    bench.pipe.set_progress_bar_config(disable=True)


PHASES = {
    "env": phase_env, "exact": phase_exact, "compiled": phase_compiled, "swap": phase_swap,
    "new_shapes": phase_new_shapes, "batches": phase_batches, "fp8": phase_fp8,
}  # fmt: skip
REQUIRED = ("env", "compiled")  # later phases need what these build
# Seconds of the budget an optional phase must find left on an H100/H200 [est]: its own plus fp8's.
NEEDS_S = {"new_shapes": 135, "batches": 165, "fp8": 120}


def run(plan: Plan, out: Path, budget_s: float = float("inf")) -> dict:
    """Run every phase in order, writing the report after each; return it."""
    bench = Bench(plan, out)
    bench.report.update({
        "plan": {**asdict(plan), "dtype": str(plan.dtype)}, "rows": [], "errors": {}, "skipped": {},
        "phases": {"exact": {"s_per_image": None}, "compiled": {"s_per_image": None}, "fp8": {"s_per_image": None}},
        "recompiles_after_warmup": None, "recompiles_new_shapes": None, "slot_vs_peft_max_abs": None,
        "swap_s": None, "compile_s": None, "peak_gib": None,
    })  # fmt: skip
    torch.compiler.reset()  # count this run's compiles only
    for name, phase in PHASES.items():
        left = budget_s - bench.elapsed()
        if name in NEEDS_S and left < NEEDS_S[name]:
            bench.report["skipped"][name] = f"{left:.0f} s of the budget left, it needs about {NEEDS_S[name]} s"
            continue
        try:
            phase(bench)
        except Exception as exc:  # noqa: BLE001 - report it and keep what the other phases measured
            bench.report["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
            if name in REQUIRED:
                bench.save()
                break
        bench.report["peak_gib"] = max((r["peak_gib"] for r in bench.report["rows"] if r["peak_gib"]), default=None)
        bench.save()
        print(f"phase {name} done at {bench.elapsed():.0f} s", flush=True)
    return bench.report


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report.get('device')}; versions: {report.get('versions')}.",
        "",
        "| phase | size | batch | LoRA | s / call | s / image | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.get("rows", []):
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(
            f"| {r['phase']} | {r['size']}² | {r['batch']} | {r['lora']} | {r['s_per_call']:.3f} | "
            f"{r['s_per_image']:.3f} | {peak} |"
        )
    lines.append("")
    lines += [f"- {tier}: {report.get('phases', {}).get(tier)}" for tier in ("exact", "compiled", "fp8")]
    keys = ("compile_s", "swap_s", "recompiles_after_warmup", "recompiles_new_shapes", "slot_vs_peft_max_abs",
            "slot_vs_peft_rel_l2", "compiled_vs_exact_rel_l2", "attention", "peak_gib", "skipped",
            "errors")  # fmt: skip
    lines += [f"- {key}: {report.get(key)}" for key in keys]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, small model, fp32, aot_eager: every phase")
    parser.add_argument("--out", required=True, help="directory for flux_fast_gpu.json and flux_fast_gpu.md")
    parser.add_argument("--budget-s", type=float, default=450.0, help="optional phases are skipped past it (GPU)")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --smoke for a CPU run of every phase on the small model)")
    plan = SMOKE if args.smoke else FULL
    if args.backend:
        plan = replace(plan, backend=args.backend)
    return run(plan, Path(args.out), float("inf") if args.smoke else args.budget_s)


if __name__ == "__main__":
    main()
