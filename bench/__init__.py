"""Benchmarks, run from the repository root as `python -m bench.<module>`: `load` drives a running
server, `compare` measures batching against baselines (`make bench`), `flux_dev_gpu` times the real
FLUX.1-dev architecture on a GPU."""
