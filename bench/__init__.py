"""Benchmarks, run from the repository root as `python -m bench.<module>`: `load` drives a running
server, `compare` measures batching against baselines (`make bench`), `flux_fast_gpu` times the speed
tiers (exact, compiled, fp8) on FLUX.1-dev's real architecture on a GPU (`--smoke`: every phase on a CPU),
`lora_swap` times switching between cached LoRAs, `preview_goldens` draws ai-toolkit's preview goldens and
`webhooks` times webhook deliveries. `machine.describe` is the machine each CPU result file in
bench/results/ names."""
