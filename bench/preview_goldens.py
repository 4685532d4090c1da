r"""ai-toolkit's own preview goldens, drawn on this machine: how many levels its CPU kernels are off.

The goldens (tests/golden/preview: a request, what ai-toolkit ran and the PNG it drew; PROVENANCE.md
there says how they were made) come from ai-toolkit's `sample()`/`generate_images()` on the small
model, on a CPU with AVX-512 and AVX512_BF16. torch's CPU bf16 kernels differ by instruction set (the
order of sums in a matmul, attention's blocking), and in this small model one bf16 rounding flip early
in the denoising moves pixels by a few levels. So a correct implementation shows 0 levels only on a
CPU whose kernels match the goldens'. This script draws every golden with the preview engine (no Ray,
no server) and reports, for each, the largest and mean difference in 0-255 levels and the share of
values that differ, beside the CPU's capability:

```bash
.venv/bin/python -m bench.preview_goldens --out bench/results      # about 10 s
.venv/bin/python -m bench.preview_goldens --goldens DIR --out OUT  # another directory of goldens
```

The committed results are named by the kernels that drew them (`--name`): `preview_goldens_avx512_bf16`,
`preview_goldens_avx2`, and `preview_goldens_default_kernels`, drawn with torch's unvectorized kernels:

```bash
ATEN_CPU_CAPABILITY=default .venv/bin/python -m bench.preview_goldens --out bench/results \
    --name preview_goldens_default_kernels
```
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.machine import CPU_FLAGS, cpu_flags, describe
from serve_app import tiny
from serve_app.config import AppArgs, ModelArgs
from serve_app.engine.preview.model import PreviewModel
from serve_app.engine.preview.sampling import PreviewEngine
from serve_app.engine.protocol import AdapterWeight
from serve_app.intake.request_rules import build_work_items
from serve_app.loras.files import LoraFile, read_lora
from serve_app.schemas import InferenceRequest
from serve_app.workitems import WorkItem

GOLDEN_DIR = Path(
    os.environ.get("FLUX_SERVE_PREVIEW_GOLDENS", Path(__file__).resolve().parents[1] / "tests/golden/preview")
)


def golden_names(directory: Path = GOLDEN_DIR) -> tuple[str, ...]:
    """Every golden in the directory (`<name>.json` beside its PNG), in name order."""
    return tuple(sorted(path.stem for path in directory.glob("*.json"))) if directory.is_dir() else ()


def load_golden(name: str, directory: Path = GOLDEN_DIR) -> dict:
    return json.loads((directory / f"{name}.json").read_text())


def is_quantized(golden: dict) -> bool:
    return golden["ai_toolkit_quantize"] != "none"


def work_item(golden: dict) -> WorkItem:
    """A golden's request as the server reads it: ai-toolkit's flags applied, merged or hooked as it decides."""
    request = InferenceRequest.model_validate(golden["request"])
    model = ModelArgs(id=request.model, kind="preview", quantize=is_quantized(golden))
    [item] = build_work_items(request, AppArgs(models=[model]), request_id=f"golden-{request.model}")
    return item


def draw(model: PreviewModel, lora: LoraFile | None, golden: dict) -> Image.Image:
    """One golden's request drawn as a generator replica draws it (PreviewModel), without Serve."""
    item = work_item(golden)
    adapters = []
    if item.key.loras:
        if lora is None:
            raise ValueError("this golden was drawn with a LoRA: pass the demo LoRA")
        [use] = item.key.loras
        model.load_adapter(use.source, lora)
        adapters = [AdapterWeight(use.source, use.multiplier)]
    [image] = model.generate([item], adapters)
    return image


def demo_lora(directory: Path) -> LoraFile:
    """The demo LoRA the goldens were drawn with (`python -m serve_app.tiny --lora`), read as the server reads it."""
    path = tiny.write_aitoolkit_lora(directory / "demo_lora.safetensors")
    with path.open("rb") as f:
        return read_lora(f, "demo/demo_lora.safetensors", max_bytes=path.stat().st_size)


def png_pixels(image: Image.Image | bytes | Path) -> np.ndarray:
    """RGB levels as int16, through PNG as a client sees them (an image is encoded first)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    data = image.read_bytes() if isinstance(image, Path) else image
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB")).astype(np.int16)


@dataclass(frozen=True)
class Residual:
    """How far one image is from its golden, in 0-255 levels."""

    max: int
    mean: float
    share_differing: float

    @classmethod
    def between(cls, ours: np.ndarray, theirs: np.ndarray) -> Residual:
        if ours.shape != theirs.shape:
            raise ValueError(f"image shapes differ: {ours.shape} vs {theirs.shape}")
        difference = np.abs(ours - theirs)
        return cls(int(difference.max()), float(difference.mean()), float(np.mean(difference > 0)))

    def __str__(self) -> str:
        return f"max {self.max} mean {self.mean:.4f} levels, {self.share_differing:.2%} of values differ"


def draws_like_the_goldens() -> bool:
    """Whether this CPU has the bf16 kernels the goldens were drawn with (AVX512_BF16): there, 0 levels."""
    return "avx512_bf16" in cpu_flags()


def measure(directory: Path) -> dict:
    """Draw every golden of `directory`, one model per quantize setting, with the demo LoRA they were drawn with."""
    model_dir = tiny.ensure_tiny_dir()
    with tempfile.TemporaryDirectory() as scratch:
        lora = demo_lora(Path(scratch))
    models: dict[bool, PreviewModel] = {}
    results = {}
    for name in golden_names(directory):
        golden = load_golden(name, directory)
        quantized = is_quantized(golden)
        if quantized not in models:
            models[quantized] = PreviewModel(PreviewEngine.load(model_dir, device="cpu", quantized=quantized))
        residual = Residual.between(png_pixels(draw(models[quantized], lora, golden)),
                                    png_pixels(directory / golden["expected_png"]))
        print(f"{name}: {residual}", flush=True)
        results[name] = {**asdict(residual), "exact": residual.max == 0, "golden_cpu": golden.get("cpu")}
    return {"machine": describe(), "goldens": results}


def markdown(report: dict) -> str:
    machine_ = report["machine"]
    flags = ", ".join(flag for flag, present in machine_["cpu_flags"].items() if present) or "none of " + str(CPU_FLAGS)
    lines = [
        "# ai-toolkit's preview goldens drawn here",
        "",
        f"CPU: {machine_['cpu']}, {machine_['cpus']} cores ({flags}); "
        f"torch kernels: {machine_['torch_cpu_capability']}, {machine_['torch_threads']} threads; "
        f"versions: {machine_['versions']}",
        "",
        "| golden | max levels | mean levels | values differing | exact |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["goldens"].items():
        lines.append(f"| {name} | {row['max']} | {row['mean']:.4f} | {row['share_differing']:.2%} | {row['exact']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goldens", type=Path, default=GOLDEN_DIR, help="a directory of <name>.json + PNG goldens")
    parser.add_argument("--out", type=Path, help="write NAME.json and NAME.md here")
    parser.add_argument("--name", default="preview_goldens", help="the result files' name (default: %(default)s)")
    args = parser.parse_args(argv)
    if not golden_names(args.goldens):
        parser.error(f"no goldens (*.json) in {args.goldens}")
    report = measure(args.goldens)
    print(json.dumps(report["machine"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
