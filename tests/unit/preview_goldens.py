"""The ai-toolkit preview goldens (tests/golden/preview): outputs of ai-toolkit itself, used as fixtures.

They are never regenerated with this project's code (PROVENANCE.md there says what drew them). Every
`<name>.json` of the directory is a case (bench/preview_goldens.py reads and draws them);
FLUX_SERVE_PREVIEW_GOLDENS points elsewhere.

The goldens were drawn on an AVX-512/AVX512_BF16 CPU. On such a CPU every golden must come out at 0
levels: `EXACT` applies there. On AVX2-only CPUs g1 equals its golden but for a few values one level
off, while g2 and g3 differ by up to 3 and 4 levels (mean 0.26 and 0.39): the size a single 1-ulp bf16
change anywhere in the denoising produces in this small model. RESIDUAL holds those measured figures as
upper bounds there, so a regression fails. A golden measured nowhere yet is held to KERNEL_NOISE on
such CPUs: what swapping torch's vectorized CPU kernels for its plain ones moves the three by
(ATEN_CPU_CAPABILITY=default: up to 4-6 levels, mean 0.48-0.53). That bound still catches a wrong
quantization (15-18 levels, mean 2.3-2.7) or a wrong flag, but not every small slip: the measured
bounds of the known goldens do. Each check says which bound applied.
"""

from __future__ import annotations

import pytest

from bench.preview_goldens import GOLDEN_DIR, Residual, draws_like_the_goldens, golden_names, load_golden

GOLDENS = golden_names()
needs_goldens = pytest.mark.skipif(not GOLDENS, reason=f"no preview goldens at {GOLDEN_DIR}")
EXACT_CPU = draws_like_the_goldens()

RESIDUAL = {"g1": (1, 0.01), "g2": (3, 0.27), "g3": (4, 0.39)}  # max and mean levels, measured on AVX2
KERNEL_NOISE = (6, 0.6)
EXACT = (0, 0.0)


def lora_mode_ran(golden: dict) -> str:
    """What ai-toolkit did with the golden's LoRA, in a result's words: `merged`, `hook` or `none`."""
    if not golden["request"].get("loras"):
        return "none"
    return "merged" if golden["what_ai_toolkit_ran"].get("lora", "").startswith("merged") else "hook"


def bound_for(name: str) -> tuple[tuple[int, float], str]:
    """The bound a golden is held to on this CPU (max and mean levels), and which rule chose it."""
    if EXACT_CPU:
        return EXACT, "exact: this CPU has AVX512_BF16, like the one that drew the goldens"
    if name in RESIDUAL:
        return RESIDUAL[name], "measured residual of an AVX2-only CPU"
    return KERNEL_NOISE, "kernel-noise bound of a golden not yet measured on an AVX2-only CPU"


def assert_within_residual(name: str, residual: Residual) -> None:
    (max_bound, mean_bound), rule = bound_for(name)
    print(f"\n{name}: {residual}; bound max {max_bound} mean {mean_bound} ({rule})")
    assert residual.max <= max_bound and residual.mean <= mean_bound, f"{name}: {residual} ({rule})"


__all__ = ["EXACT_CPU", "GOLDENS", "GOLDEN_DIR", "RESIDUAL", "assert_within_residual", "bound_for", "golden_id", "load_golden", "lora_mode_ran", "needs_goldens"]


def golden_id(name: str) -> str:
    """A golden's test id names the rule it is held to here: `g1-exact` or `g1-bounded`."""
    return f"{name}-{'exact' if EXACT_CPU else 'bounded'}"
