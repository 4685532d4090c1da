"""Load generator: N concurrent HTTP clients send sync /v1/generate requests for D seconds.

    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --clients 16 --duration 30 \\
        --shapes 256x256x8,512x512x8 [--weights 3,1] [--prompts 1]

Each client is a closed loop (send, wait for the answer, send again). With no --weights, client i
takes the shapes round-robin starting at shape i, so a mix is interleaved from the first second;
with --weights each request draws its shape at random (seeded). Only requests that finish inside
the measured window count: the first --warmup seconds are excluded, and requests still open at the
end are cancelled (their connections close; Serve cancels their work). Reports throughput
(images/s), latency p50/p95/p99 and errors by HTTP status, overall and per shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    steps: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            width, height, steps = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a shape is WIDTHxHEIGHTxSTEPS, got {text!r}") from None
        return cls(width, height, steps)

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.steps}"

    @property
    def pixels(self) -> int:
        return self.width * self.height


def parse_shapes(text: str) -> list[Shape]:
    return [Shape.parse(part) for part in text.split(",") if part.strip()]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def latency_summary(latencies: list[float]) -> dict:
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "mean": sum(latencies) / len(latencies) if latencies else None,
        "count": len(latencies),
    }


@dataclass
class Sample:
    shape: str
    started: float
    finished: float
    status: int  # HTTP status; 0 for a transport error
    images: int


@dataclass
class Run:
    """The samples of one load run and its measured window (perf_counter seconds)."""

    samples: list[Sample]
    window: tuple[float, float]


def request_body(shape: Shape, prompt: str, seed: int, prompts: int, model: str, output_format: str) -> dict:
    item = {"prompt": prompt, "width": shape.width, "height": shape.height, "sample_steps": shape.steps}
    return {"model": model, "output_format": output_format,
            "prompts": [{**item, "seed": seed + i} for i in range(prompts)]}


async def drive(
    url: str,
    shapes: list[Shape],
    clients: int = 16,
    duration_s: float = 30.0,
    warmup_s: float = 2.0,
    weights: list[float] | None = None,
    prompts: int = 1,
    model: str = "flux",
    output_format: str = "jpeg",
    timeout_s: float = 600.0,
    seed: int = 0,
) -> Run:
    """Run the closed-loop clients; at the end of the window, requests still open are cancelled
    (their connections close, and Serve cancels their work) rather than awaited."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:

        async def client(number: int) -> None:
            sent = 0
            while time.perf_counter() < window[1]:
                if weights:
                    shape = rng.choices(shapes, weights=weights)[0]
                else:
                    shape = shapes[(number + sent) % len(shapes)]
                body = request_body(shape, f"bench client {number} request {sent}", 1000 * number + sent,
                                    prompts, model, output_format)
                sent += 1
                began = time.perf_counter()
                try:
                    answer = await http.post("/v1/generate", json=body)
                    status = answer.status_code
                    images = len(answer.json().get("images", [])) if status == 200 else 0
                except httpx.HTTPError:
                    status, images = 0, 0
                samples.append(Sample(shape.label, began, time.perf_counter(), status, images))

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Run(samples, window)


async def run_load(url: str, shapes: list[Shape], clients: int = 16, **options) -> dict:
    """Drive the server (options as `drive`) and return the summary (see `summarize`)."""
    return summarize([await drive(url, shapes, clients, **options)], shapes, clients)


def summarize(runs: list[Run], shapes: list[Shape], clients: int) -> dict:
    """Throughput and latency over the requests that finished inside each run's window."""
    counted = [s for run in runs for s in run.samples if run.window[0] <= s.finished <= run.window[1]]
    seconds = sum(run.window[1] - run.window[0] for run in runs)

    def block(chosen: list[Sample]) -> dict:
        ok = [s for s in chosen if s.status == 200]
        errors: dict[str, int] = {}
        for s in chosen:
            if s.status != 200:
                errors[str(s.status)] = errors.get(str(s.status), 0) + 1
        images = sum(s.images for s in ok)
        return {
            "requests": len(chosen),
            "images": images,
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            "latency_s": latency_summary([s.finished - s.started for s in ok]),
            "errors": errors,
        }

    summary = {"clients": clients, "window_s": seconds, "shapes": [s.label for s in shapes], **block(counted)}
    if len(shapes) > 1:
        summary["by_shape"] = {shape.label: block([s for s in counted if s.shape == shape.label]) for shape in shapes}
    return summary


def format_summary(summary: dict) -> str:
    def line(name: str, block: dict) -> str:
        lat = block["latency_s"]
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(block["errors"].items())) or "none"
        return (f"{name:<16} {block['images_per_s']:8.2f} img/s  p50 {ms(lat['p50'])} ms  p95 {ms(lat['p95'])} ms  "
                f"p99 {ms(lat['p99'])} ms  requests {block['requests']}  errors {errors}")

    lines = [f"{summary['clients']} clients, {summary['window_s']:.0f} s measured", line("all", summary)]
    for label, block in summary.get("by_shape", {}).items():
        lines.append(line(label, block))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds (after the warm-up)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("256x256x8,512x512x8"),
                        help="comma-separated WIDTHxHEIGHTxSTEPS")
    parser.add_argument("--weights", type=lambda t: [float(w) for w in t.split(",")], default=None,
                        help="comma-separated weights, one per shape (default: round-robin)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts (images) per request")
    parser.add_argument("--model", default="flux")
    parser.add_argument("--format", default="jpeg", choices=["jpeg", "png", "webp"])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.weights and len(args.weights) != len(args.shapes):
        parser.error("--weights needs one weight per shape")
    summary = asyncio.run(run_load(args.url, args.shapes, args.clients, duration_s=args.duration,
                                   warmup_s=args.warmup, weights=args.weights, prompts=args.prompts,
                                   model=args.model, output_format=args.format))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


if __name__ == "__main__":
    main()
