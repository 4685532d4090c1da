"""Benchmarks, run from the repository root as `python -m bench.<module>`: `load` drives a running
server, `compare` measures batching against baselines (`make bench`), `flux_fast_gpu` times the speed
tiers (exact, compiled, fp8) on FLUX.1-dev's real architecture on a GPU (`--smoke`: every phase on a CPU)."""
