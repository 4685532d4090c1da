"""The shipped Serve config YAMLs: they validate, and `serve run deploy/local.yaml` really serves."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs
from serve_app.jobs.webhooks import SIGNATURE_HEADER, verify
from tests.serve.helpers import free_port
from tests.support.doc_commands import doc_commands
from tests.support.receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["deploy/local.yaml", "deploy/flux-dev.yaml", "deploy/cluster-local.yaml"]
DASHBOARD = ROOT / "deploy/grafana/flux-serve.json"


@pytest.mark.parametrize("path", CONFIGS)
def test_config_validates_against_serve_and_our_args(path):
    config = yaml.safe_load((ROOT / path).read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    args = AppArgs.model_validate(app.args)
    # Every deployment section names a deployment the app has: a typo would size nothing.
    names = {d.name for d in app.deployments}
    assert names == {"FluxIngress", "FluxJobs"} | {model.deployment_name for model in args.models}
    assert "flux" in {model.id for model in args.models}


def test_gpu_config_autoscales_generators_on_gpus():
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/flux-dev.yaml").read_text()))
    deployments = {d.name: d for d in config.applications[0].deployments}
    generator = deployments["FluxGenerator-flux"]
    assert generator.ray_actor_options.num_gpus == 1
    assert generator.autoscaling_config["max_replicas"] > generator.autoscaling_config["min_replicas"]
    assert generator.graceful_shutdown_timeout_s >= 120
    assert deployments["FluxIngress"].max_ongoing_requests >= 100
    assert deployments["FluxIngress"].num_replicas >= 2


@pytest.mark.parametrize("path", CONFIGS)
def test_flux_stays_the_exact_reference_model_everywhere(path):
    config = yaml.safe_load((ROOT / path).read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    flux = args.model("flux")
    assert flux is not None and flux.kind == "reference" and flux.speed == "exact"


def test_the_one_machine_cluster_config_keeps_flux_dev_shape_on_a_test_cluster():
    """cluster-local.yaml (tests/cluster/ deploy it): the ingress and FluxJobs on the head, one generator
    replica per GPU worker, no key and loopback only, its files under .flux-serve/cluster/."""
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/cluster-local.yaml").read_text()))
    assert config.proxy_location == "HeadOnly" and config.http_options.host == "127.0.0.1"
    app = config.applications[0]
    deployments = {d.name: d for d in app.deployments}
    for name in ("FluxIngress", "FluxJobs"):
        assert deployments[name].ray_actor_options.num_cpus == 0
        assert "node:__internal_head__" in deployments[name].ray_actor_options.resources
    generator = deployments["FluxGenerator-flux"]
    assert (generator.num_replicas, generator.max_replicas_per_node) == (2, 1)
    assert generator.ray_actor_options.num_gpus == 1
    args = AppArgs.model_validate(app.args)
    assert [(m.id, m.source, m.device) for m in args.models] == [("flux", "tiny", "cpu")]
    assert not (args.auth.api_key_env or args.auth.api_key_file)
    for path in (args.loras.root, args.loras.cache_dir, args.jobs.store):
        assert path.startswith(".flux-serve/cluster/")


def test_the_cluster_config_adds_a_compiled_model_beside_flux():
    config = yaml.safe_load((ROOT / "deploy/flux-dev.yaml").read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.model("flux-fast").speed == "compiled"


def test_the_cluster_config_requires_an_api_key(monkeypatch):
    """flux-dev.yaml listens on every node and fetches remote LoRAs: it must not start without a key."""
    from serve_app.web.guards import load_api_key

    config = yaml.safe_load((ROOT / "deploy/flux-dev.yaml").read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.auth.api_key_env or args.auth.api_key_file
    if args.auth.api_key_env:
        monkeypatch.delenv(args.auth.api_key_env, raising=False)
        with pytest.raises(RuntimeError, match=args.auth.api_key_env):
            load_api_key(args.auth)
        monkeypatch.setenv(args.auth.api_key_env, "a-key")
        assert load_api_key(args.auth) == "a-key"


def test_a_wrong_args_field_fails_at_start_with_its_name():
    with pytest.raises(Exception) as info:
        AppArgs.model_validate({"models": [{"source": "tiny"}], "lora": {"root": "x"}})
    assert "lora" in str(info.value)
    with pytest.raises(Exception) as info:
        AppArgs.model_validate({"models": [{"id": "flux", "batching": {"max_batch_sise": 2}}]})
    assert "max_batch_sise" in str(info.value)


@pytest.mark.parametrize("models,words", [
    ([], "at least 1"),
    ([{"id": "a"}, {"id": "a"}], "unique"),
    ([{"id": "has#hash"}], "pattern"),
    ([{"id": "flux", "kind": "sdxl"}], "kind"),
])
def test_bad_model_lists_fail_at_start(models, words):
    with pytest.raises(Exception) as info:
        AppArgs.model_validate({"models": models})
    assert words in str(info.value)


def test_serve_run_of_local_yaml_answers_the_example_request_then_stops(tmp_path, flux_cache):
    """What `make serve` does, on another port, in a fresh directory, ended by SIGTERM to its PID; its metrics
    feed every panel of the Grafana dashboard."""
    config = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "FLUX_SERVE_CACHE": str(flux_cache), "PYTHONPATH": str(ROOT),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    serve_bin = Path(sys.executable).parent / "serve"
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([str(serve_bin), "run", "--address", "local", "local.yaml"], cwd=tmp_path, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, tmp_path / "serve.log")
        example = {"model": "flux", "trigger_word": "sks",
                   "prompts": [{"prompt": "[trigger] a photo of a person", "width": 1024, "height": 1024,
                                "seed": 42, "sample_steps": 25, "guidance_scale": 4.0, "neg": ""}],
                   "loras": [{"path": "demo/demo_lora.safetensors", "network_multiplier": 1.0}]}
        answer = httpx.post(f"{url}/v1/generate", json=example, timeout=180)
        assert answer.status_code == 200, answer.text
        image = answer.json()["images"][0]
        assert (image["width"], image["height"], image["seed"]) == (1024, 1024, 42)
        assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == (1024, 1024)
        assert (tmp_path / ".flux-serve/loras/demo/demo_lora.safetensors").exists()
        _assert_goldens_reproduced(url)
        _check_a_job_is_stored_and_its_webhook_signed(url, tmp_path)
        _run_the_documented_commands(port, tmp_path)
        _check_the_dashboards_metrics_are_exported(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own process group only
            raise
        log.close()
    assert process.returncode is not None


def _assert_goldens_reproduced(url: str) -> None:
    """`make serve` answers ai-toolkit's golden preview requests with the golden images (within this CPU's
    residual: tests/unit/preview_goldens.py)."""
    from bench.preview_goldens import Residual, png_pixels
    from tests.unit.preview_goldens import GOLDEN_DIR, GOLDENS, assert_within_residual, load_golden

    for name in GOLDENS:
        golden = load_golden(name)
        answer = httpx.post(f"{url}/v1/generate", json=golden["request"], timeout=180)
        assert answer.status_code == 200, answer.text
        ours = png_pixels(base64.b64decode(answer.json()["images"][0]["data"]))
        assert_within_residual(name, Residual.between(ours, png_pixels(GOLDEN_DIR / golden["expected_png"])))


def _check_a_job_is_stored_and_its_webhook_signed(url: str, start_dir: Path) -> None:
    """local.yaml keeps jobs in .flux-serve/jobs and signs webhooks to loopback with a generated secret."""
    with Receiver() as receiver:
        request = {"model": "flux", "prompts": [{"prompt": "a job", "width": 64, "height": 64, "sample_steps": 2}],
                   "webhook_url": receiver.url}
        request_id = httpx.post(f"{url}/v1/inference", json=request, timeout=30).json()["request_id"]
        [delivery] = receiver.wait_for(1, timeout_s=60)
    secret = (start_dir / ".flux-serve/webhook_secret").read_text().strip()
    assert verify(secret, delivery.headers[SIGNATURE_HEADER], delivery.body)
    assert json.loads(delivery.body)["status"] == "succeeded"
    assert (start_dir / f".flux-serve/jobs/records/{request_id}.json").exists()
    assert (start_dir / f".flux-serve/jobs/images/{request_id}/0").exists()


def _run_the_documented_commands(port: int, start_dir: Path) -> None:
    """Every command the README and docs/ mark as runnable against `make serve` works as printed (only the
    port differs), from a directory laid out like the repository's root, and writes only under `out/`."""
    for name in (".venv", "examples"):
        (start_dir / name).symlink_to(ROOT / name)
    commands = doc_commands(ROOT)
    assert {c.page for c in commands} >= {"README.md", "docs/api.md", "docs/jobs.md", "docs/models.md"}
    before = set(os.listdir(start_dir))
    for command in commands:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command.for_port(port)], cwd=start_dir,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "FLUX_SERVE_URL": f"http://127.0.0.1:{port}"})  # the client's
        assert done.returncode == 0, (command.page, command.script, done.stdout[-2000:], done.stderr[-2000:])
        assert "error" not in done.stderr.lower(), (command.page, done.stderr[-2000:])
    assert set(os.listdir(start_dir)) - before == {"out"}  # what the examples write lands in out/
    assert (start_dir / "out/first.jpg").stat().st_size > 0 and list((start_dir / "out/previews").iterdir())


def _check_the_dashboards_metrics_are_exported(url: str, serve_pid: int) -> None:
    """Every metric the Grafana dashboard queries (deploy/grafana/flux-serve.json) is at Ray's metrics endpoint,
    with the label values its queries match, once the server has answered a generation with a LoRA and an
    async job (above) and a bad request (here). What never happened (compiles, downloads, most error codes)
    is there at 0."""
    bad = httpx.post(f"{url}/v1/generate", json={"model": "no-such-model", "prompts": [{"prompt": "a"}]}, timeout=30)
    assert bad.json()["error"]["code"] == "MODEL_NOT_FOUND", bad.text
    session = _ray_session_dir(serve_pid)
    assert (session / "metrics/grafana/dashboards/serve_grafana_dashboard.json").exists()  # as docs/monitoring.md says
    [port_file] = session.glob("metrics_export_port_*")  # one node
    endpoint = f"http://127.0.0.1:{int(port_file.read_text())}/metrics"
    wanted = _dashboard_series()
    assert {name for name, _ in wanted} >= {"ray_flux_request_errors_total", "ray_flux_compiles", "ray_flux_jobs"}
    counted = [("ray_flux_request_errors_total", {"code": "MODEL_NOT_FOUND"}),  # the bad request
               ("ray_flux_lora_adapter_loads_total", {"model": "flux"}),  # the generation with a LoRA
               ("ray_flux_jobs_ended_total", {"status": "succeeded"})]  # the job
    deadline = time.time() + 60  # Ray exports every 10 s
    while True:
        exported = _exported_series(httpx.get(endpoint, timeout=10).text)
        missing = [(name, labels) for name, labels in wanted
                   if not any(dict(labels).items() <= series.items() for series, _ in exported.get(name, []))]
        zero = [(name, labels) for name, labels in counted
                if not any(labels.items() <= series.items() and value >= 1 for series, value in exported.get(name, []))]
        if not missing and not zero:
            return
        assert time.time() < deadline, f"not exported: {missing}; still 0: {zero}"
        time.sleep(2)


def _dashboard_series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Each metric the dashboard's queries read (panels and variables), with the labels they match literally."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    selectors = [found for query in queries for found in re.findall(r"\b(ray_\w+)\s*(\{[^}]*\})?", query)]
    return {(name, tuple(re.findall(r'(\w+)="([^"$]*)"', labels))) for name, labels in selectors}


def _exported_series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a Prometheus text page: each metric's series, as labels and value."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in re.findall(r"^(\w+)(?:\{(.*)\})? (\S+)", text, re.MULTILINE):
        series.setdefault(name, []).append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)), float(value)))
    return series


def _ray_session_dir(driver_pid: int) -> Path:
    """The session directory of the Ray that `serve run --address local` started in its own process: Ray names
    it `session_<date>_<pid of that process>`, under $RAY_TMPDIR/ray (else $TMPDIR/ray, else /tmp/ray)."""
    temp = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
    sessions = sorted(temp.glob(f"session_*_{driver_pid}"))
    assert sessions, f"no Ray session of pid {driver_pid} under {temp}"
    return sessions[-1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve run exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")
