"""The applications the serve and browser tests deploy: one shared app, and one that needs a deploy of its own.

A deploy from Python restarts every replica of the app (Serve gives each deployment a new version), at
10-30 s on 2 cores, so the session deploys the shared app once (`app_url` in tests/conftest.py) and every
module talks to it. Its models differ where tests need them to; a test that kills or reconfigures
something uses a model of its own, or runs last in its module:

| model | who | what differs |
|---|---|---|
| `flux` | most tests | the small model and the recording engine; adapter cache of 4 (the app's) |
| `flux-b` | test_api, test_loras | other defaults (steps 3, guidance 2.5); its own adapter cache of 2 (a per-model setting) |
| `flux-idle` | test_api | scales to zero: no replica until a request comes |
| `flux-preview`, `flux-preview-bf16` | test_previews, browser | ai-toolkit's previews, quantized and bf16 |
| `flux-affinity` | test_loras | two replicas with a cache of 2 each, used by no other test |
| `flux-faults` | test_resilience | one replica the tests kill |

The app-wide parts serve every module at once: two ingress replicas (status and result must not depend on
which answers; test_resilience kills one last), a directory job store with a short lease and webhooks
(test_jobs kills FluxJobs last), and the LoRA settings of test_loras (download timeout, file cap).

The app of its own, `auth_app`, replaces the shared one, so the tests that use it run after every other
(`pytest_collection_modifyitems` in tests/conftest.py orders them). It needs its own deploy twice over: the API
key is read once, at a replica's start (test_guards and the browser's key flow), and its `flux` has another
`user_config` than the shared app's, which is what test_batching checks a deploy applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.config import AppArgs
from tests.serve.helpers import app_args, model_args

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JOB_TIMEOUT_S = 60  # FluxJobs fails a job after this: none can stay in progress
LEASE_S = 3.0  # the job store's lease: a new FluxJobs takes over this long after one is killed
LORA_TIMEOUT_S = 0.5  # the whole-download deadline of URL LoRAs (test_loras' slow hosts pass it)
MAX_LORA_FILE = 100_000  # bytes: a bigger URL LoRA is refused (every test LoRA is < 25 kB)
IDLE_AUTOSCALING = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
                    "downscale_delay_s": 600, "look_back_period_s": 2, "metrics_interval_s": 0.5}
PREVIEW = {**model_args("flux-preview", kind="preview", description="ai-toolkit's training preview",
                        default_steps=20, default_guidance_scale=3.5), "engine": None}
PREVIEW_BF16 = {**model_args("flux-preview-bf16", kind="preview", quantize=False), "engine": None}
# The models whose deployment options differ from one replica of each.
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "FluxGenerator-flux-idle": {"autoscaling_config": IDLE_AUTOSCALING},
    "FluxGenerator-flux-affinity": {"num_replicas": 2},
}


def shared_app(lora_root: Path, state_dir: Path) -> AppArgs:
    """The args of the session's shared app (module docstring)."""
    models = [
        model_args(),
        model_args("flux-b", description="a second model", default_steps=3, default_guidance_scale=2.5,
                   max_adapters_per_replica=2),
        model_args("flux-idle", description="scales to zero"),
        PREVIEW,
        PREVIEW_BF16,
        model_args("flux-affinity", max_adapters_per_replica=2),
        model_args("flux-faults"),
    ]
    return app_args(
        lora_root,
        models=models,
        loras={"download_timeout_s": LORA_TIMEOUT_S, "download_retries": 2, "max_file_bytes": MAX_LORA_FILE},
        jobs={"store": str(state_dir / "store"), "lease_s": LEASE_S, "timeout_s": JOB_TIMEOUT_S},
        webhooks={"allowed_hosts": ["127.0.0.1"], "allow_private_addresses": True, "secret_env": "FLUX_TEST_UNSET",
                  "secret_file": str(state_dir / "webhook_secret"), "generate_secret": True, "backoff_s": 0.2,
                  "timeout_s": 2.0, "max_attempts": 4},
    )


def auth_app(lora_root: Path, key_file: Path) -> tuple[AppArgs, dict[str, dict[str, Any]]]:
    """`flux` with a `user_config` of 2 items per batch (the shared app's runs the default 4) and a batch window
    (two jobs submitted together share a pipeline call), and a preview model that scales to zero (listed, never
    started), behind the API key in `key_file`."""
    args = app_args(lora_root, models=[model_args(), PREVIEW], auth={"api_key_file": str(key_file)})
    return args, {"FluxGenerator-flux": {"user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.3}},
                  "FluxGenerator-flux-preview": {"autoscaling_config": IDLE_AUTOSCALING}}
