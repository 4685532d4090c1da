"""The machine a benchmark ran on, as every bench script records it in its result files.

`describe()` is the record (the CPU's model and the flags torch's bf16 kernels pick by, its core count,
the platform, Python's and the packages' versions, torch's CPU kernels and threads); `summary()` is the
one line a result's markdown names the machine with. Linux's /proc/cpuinfo gives the CPU; elsewhere
the model falls back to `platform.machine()` and the flags are empty.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones torch's and oneDNN's bf16 kernels pick by
PACKAGES = ("torch", "diffusers", "transformers", "optimum-quanto")
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_lines() -> list[str]:
    return CPUINFO.read_text().splitlines() if CPUINFO.exists() else []


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    return {flag for line in _cpuinfo_lines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_model() -> str:
    """The CPU's model name (the last CPU's in /proc/cpuinfo; all are alike), else the architecture."""
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in _cpuinfo_lines()
                                                            if ":" in line)}
    return fields.get("model name") or platform.machine()


def describe() -> dict:
    """What a result file records about the machine it was measured on (imports torch)."""
    import torch

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "versions": {name: _version(name) for name in PACKAGES},
    }


def summary(machine: dict) -> str:
    """One line naming the machine, e.g. "AMD EPYC, 2 cores (avx2, avx512f); Python 3.11.7, torch 2.13.0+cpu".

    Reads what `describe()` wrote; a record of an older run (no CPU model, no flags) gives what it has.
    """
    flags = [flag for flag, present in machine.get("cpu_flags", {}).items() if present]
    cores = f"{machine['cpus']} cores" if machine.get("cpus") else ""
    line = ", ".join(part for part in (machine.get("cpu"), cores) if part) or "an unnamed CPU"
    if not machine.get("cpu") and cores:
        line = f"{machine['cpus']} CPU cores"
    if flags:
        line += f" ({', '.join(flags)})"
    versions = [f"{name} {machine[key]}" for name, key in (("Python", "python"), ("torch", "torch"))
                if machine.get(key)]
    return line + (f"; {', '.join(versions)}" if versions else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
