"""The command-line client: its reading of an ai-toolkit job config, the shipped example config, and
its failures, each one line on stderr (the client runs as a real subprocess against a tiny local
HTTP server, or none)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from serve_app.client import preview_request
from serve_app.config import AppArgs
from serve_app.intake import request_rules
from serve_app.schemas import PreviewRequest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "preview_job.yaml"
PNG = b"\x89PNG\r\n\x1a\n not really"


def test_the_clients_request_for_a_job_config():
    config = {"config": {"name": "run", "process": [{"trigger_word": "ohwx", "model": {"quantize": False},
                                                     "sample": {"prompts": ["x"]}}]}}
    assert preview_request(config, "a/b.safetensors", None, "jpeg") == {
        "model": "flux-preview-bf16", "sample": {"prompts": ["x"]}, "output_format": "jpeg",
        "lora": "a/b.safetensors", "trigger_word": "ohwx", "job_name": "run"}
    with pytest.raises(ValueError):
        preview_request({"config": {"process": [{}]}}, None, None, "jpeg")


# ---- the shipped example -------------------------------------------------------------------------------


@pytest.mark.slow  # the client as a subprocess of its own
def test_the_shipped_example_is_a_preview_make_serve_accepts():
    """examples/preview_job.yaml with the demo LoRA is a valid /v1/previews body, and deploy/local.yaml's
    server turns it into work: a served preview model, small images, the demo LoRA where the app writes it."""
    from serve_app.config import DEMO_LORA

    local = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    args = AppArgs.model_validate(local["applications"][0]["args"])
    assert args.loras.write_demo  # its tiny generators write DEMO_LORA under loras.root on start
    body = preview_request(yaml.safe_load(EXAMPLE.read_text()), DEMO_LORA, None, "png")
    preview = PreviewRequest.model_validate(body)
    model = args.model(preview.model)
    assert model is not None and model.is_preview and model.quantize
    items = request_rules.build_work_items(request_rules.preview_request(preview), args, "example")
    assert [(item.key.width, item.key.height, item.key.steps, item.seed) for item in items] == [
        (128, 128, 4, 42), (128, 128, 4, 7)]  # walk_seed: 42 + 0; the second prompt's --seed wins
    assert items[0].prompt == "a photo of ohwx holding a sign that says 'demo_preview'"
    assert {use.source for item in items for use in item.key.loras} == {DEMO_LORA}


# ---- failures: one line on stderr, no traceback --------------------------------------------------------


class TinyServer:
    """A stand-in flux-serve on 127.0.0.1: /v1/generate serves the model `flux` (any other is answered
    400 MODEL_NOT_FOUND in our error envelope); a test sets fixed answers for other paths."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                status, content_type, body = owner.answer(self.path, request)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, path: str, request: dict) -> tuple[int, str, bytes]:
        if path in self.answers:
            return self.answers[path]
        if path == "/v1/generate" and request["model"] != "flux":
            return error_answer(400, "MODEL_NOT_FOUND", f"model {request['model']!r} is not served here; "
                                "available: ['flux']", {"model": request["model"], "available": ["flux"]})
        if path == "/v1/generate":
            image = {"index": 0, "width": 64, "height": 64, "seed": 1, "data": base64.b64encode(PNG).decode()}
            return 200, "application/json", json.dumps({"images": [image]}).encode()
        return error_answer(404, "NOT_FOUND", f"no route {path}")


def error_answer(status: int, code: str, message: str, details: dict | None = None) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(
        {"error": {"code": code, "message": message, "details": details or {}}}).encode()


@pytest.fixture
def server() -> Iterator[TinyServer]:
    tiny = TinyServer()
    thread = threading.Thread(target=tiny.httpd.serve_forever, daemon=True)
    thread.start()
    yield tiny
    tiny.httpd.shutdown()
    tiny.httpd.server_close()
    thread.join()


def run_client(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("FLUX_SERVE_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "serve_app.client", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The client failed, said so in exactly one `error: ` line on stderr, and showed no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


@pytest.mark.slow  # the client as a subprocess of its own
def test_a_missing_config_file(tmp_path):
    missing = tmp_path / "x.yaml"
    line = one_error_line(run_client("preview", "--config", str(missing)))
    assert line == f"error: cannot read config {missing}: No such file or directory"


@pytest.mark.slow  # the client as a subprocess of its own
def test_an_unreadable_config_file(tmp_path):
    line = one_error_line(run_client("preview", "--config", str(tmp_path)))  # a directory
    assert line == f"error: cannot read config {tmp_path}: Is a directory"


@pytest.mark.slow  # the client as a subprocess of its own
def test_a_config_that_is_not_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("config: [\n  name: x\n")
    assert one_error_line(run_client("preview", "--config", str(config))).startswith(
        f"error: config {config} is not YAML: ")


@pytest.mark.parametrize("text", ["config:\n  name: x\n  process:\n    - type: sd_trainer\n",
                                  "just a string\n", "config:\n  process: {sample: {prompts: [x]}}\n", ""])
@pytest.mark.slow  # the client as a subprocess of its own
def test_a_config_without_a_sample_section(tmp_path, text):
    config = tmp_path / "job.yaml"
    config.write_text(text)
    line = one_error_line(run_client("preview", "--config", str(config)))
    assert line.startswith(f"error: config {config}: no `sample:` section") and "config.process[0].sample" in line


@pytest.mark.slow  # the client as a subprocess of its own
def test_an_unknown_model_prints_the_servers_code_and_message(server, tmp_path):
    line = one_error_line(run_client("a cat", "--url", server.url, "--model", "nope", "--out", str(tmp_path / "a.jpg")))
    assert line == "error: MODEL_NOT_FOUND: model 'nope' is not served here; available: ['flux']"
    assert not (tmp_path / "a.jpg").exists()


@pytest.mark.slow  # the client as a subprocess of its own
def test_any_error_answer_prints_its_code_and_message(server, tmp_path):
    server.answers["/v1/previews"] = error_answer(
        422, "VALIDATION_ERROR", "body.sample.width: Input should be less than or equal to 4096\n(one more line)")
    line = one_error_line(run_client("preview", "--config", str(EXAMPLE), "--url", server.url,
                                     "--out", str(tmp_path)))
    assert line == ("error: VALIDATION_ERROR: body.sample.width: Input should be less than or equal to 4096 "
                    "(one more line)")
    server.answers["/v1/generate"] = (502, "text/html", b"<html>\n<h1>Bad Gateway</h1>\n</html>\n")
    line = one_error_line(run_client("a cat", "--url", server.url, "--out", str(tmp_path / "a.jpg")))
    assert line == "error: HTTP 502: <html> <h1>Bad Gateway</h1> </html>"


@pytest.mark.slow  # the client as a subprocess of its own
def test_an_unreachable_server(tmp_path):
    port = closed_port()
    for argv in (["a cat"], ["preview", "--config", str(EXAMPLE)]):
        line = one_error_line(run_client(*argv, "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "o")))
        assert line.startswith(f"error: cannot connect to http://127.0.0.1:{port} (") and "refused" in line


@pytest.mark.slow  # the client as a subprocess of its own
def test_images_land_under_out_by_default(server, tmp_path):
    """What the examples write goes to out/ (ignored by git) unless --out says otherwise."""
    result = run_client("a cat", "--url", server.url, "--format", "png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "image.png").read_bytes() == PNG
