"""A command-line client for flux-serve.

    python -m serve_app.client "[trigger] a photo of a person" --trigger sks \\
        --lora demo/demo_lora.safetensors --out out/person.jpg
    python -m serve_app.client preview --config my_job.yaml --lora my_job/my_job.safetensors --out out/previews

The first sends one prompt to /v1/generate, or with --async to /v1/inference, following the job's
event stream with a progress bar until it ends, and writes the image to --out. `preview` reads an
ai-toolkit job config (its trigger word, `sample:` section, `model.quantize` and name) and asks
/v1/previews for the run's sample grid (with the same progress bar), on the preview model that
matches the run (`flux-preview` when quantized, else `flux-preview-bf16`); the LoRA is a source the
server can read (nothing is uploaded). The API key, if the server wants one, comes from the
FLUX_SERVE_API_KEY environment variable, the server's address from --url or FLUX_SERVE_URL. Images
go under out/ unless --out says otherwise.

A failure (a config it cannot read, an error answer from the server, a server it cannot reach)
prints one line to stderr, `error: ...` (an error answer as `error: <code>: <message>`), and exits 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import httpx

from serve_app.states import JobStatus

STREAM_ATTEMPTS = 5  # a broken event stream is opened again: it starts with the job's status
BAR_WIDTH = 30
EXTENSIONS = {"jpeg": "jpg"}  # a file name's extension for an output_format, where the two differ


class ClientError(Exception):
    """A failure the client reports as one line, `error: <message>`, and exit status 1 (main())."""


def build_request(args: argparse.Namespace) -> dict:
    prompt = {"prompt": args.prompt, "width": args.width, "height": args.height, "sample_steps": args.steps,
              "guidance_scale": args.guidance}
    if args.seed is not None:
        prompt["seed"] = args.seed
    body = {"model": args.model, "prompts": [prompt], "output_format": args.format,
            "loras": [{"path": path, "network_multiplier": args.scale} for path in args.lora]}
    if args.trigger:
        body["trigger_word"] = args.trigger
    return body


def run_sync(client: httpx.Client, body: dict) -> list[tuple[dict, bytes]]:
    answer = client.post("/v1/generate", json=body)
    _raise_for_error(answer)
    return [(image, base64.b64decode(image["data"])) for image in answer.json()["images"]]


def run_async(client: httpx.Client, body: dict, out: TextIO | None = None, path: str = "/v1/inference"
              ) -> list[tuple[dict, bytes]]:
    answer = client.post(path, json=body)
    _raise_for_error(answer)
    request_id = answer.json()["request_id"]
    status = follow_events(client, request_id, out or sys.stderr)
    if status["status"] != JobStatus.SUCCEEDED:
        raise ClientError(f"job {request_id} {status['status']}: {status.get('error_code')}: {status.get('error')}")
    answer = client.get(f"/v1/requests/{request_id}/result")
    _raise_for_error(answer)
    return [(image, _fetch(client, image["url"])) for image in answer.json()["outputs"]["images"]]


def _fetch(client: httpx.Client, url: str) -> bytes:
    answer = client.get(url)
    _raise_for_error(answer)
    return answer.content


def follow_events(client: httpx.Client, request_id: str, out: TextIO) -> dict:
    """Draw a progress bar from the job's event stream until its `end` event; return the final status."""
    for _ in range(STREAM_ATTEMPTS):
        try:
            with client.stream("GET", f"/v1/requests/{request_id}/events") as answer:
                if answer.status_code != 200:
                    answer.read()
                    _raise_for_error(answer)
                for event, data in iter_sse(answer.iter_lines()):
                    status = json.loads(data)
                    out.write("\r" + progress_bar(status))
                    out.flush()
                    if event == "end":
                        out.write("\n")
                        return status
        except httpx.TransportError as exc:
            out.write(f"\nthe event stream broke off ({type(exc).__name__}); reopening it\n")
    raise ClientError(f"job {request_id}: the event stream kept breaking off")


def iter_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Events message; comments (keep-alives) are skipped."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


def progress_bar(status: dict) -> str:
    """One line: a bar over all the job's denoising steps, the image and step running, and the status."""
    progress = status.get("progress") or {}
    images = max(progress.get("images", 1), 1)
    done, step, steps = progress.get("images_done", 0), progress.get("step", 0), progress.get("steps", 0)
    running = step / steps if steps and done < images and status["status"] == JobStatus.IN_PROGRESS else 0.0
    fraction = 1.0 if status["status"] == JobStatus.SUCCEEDED else min((done + running) / images, 1.0)
    filled = round(fraction * BAR_WIDTH)
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}  image {min(done + 1, images)}/{images}"
            f"  step {step}/{steps}  {status['status']:<11}")


def _raise_for_error(answer: httpx.Response) -> None:
    """A non-200 answer as a ClientError: `<code>: <message>` from our error envelope, else the status
    and the start of the body."""
    if answer.status_code != 200:
        try:
            error = answer.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except Exception:
            message = f"HTTP {answer.status_code}: {answer.text[:500] or answer.reason_phrase}"
        raise ClientError(message)


def preview_request(config: dict, lora: str | None, model: str | None, output_format: str) -> dict:
    """The /v1/previews body for an ai-toolkit job config (as yaml.safe_load reads the job file).

    Raises:
        ValueError: the file is not an ai-toolkit job config with a `sample:` section.
    """
    job = config.get("config") if isinstance(config, dict) else None
    job = job if isinstance(job, dict) else {}
    processes = job.get("process")
    if (not isinstance(processes, list) or not processes or not isinstance(processes[0], dict)
            or not isinstance(processes[0].get("sample"), dict)):
        raise ValueError("no `sample:` section; an ai-toolkit job config has one at config.process[0].sample")
    process = processes[0]
    quantized = bool((process.get("model") or {}).get("quantize", False))
    body = {"model": model or ("flux-preview" if quantized else "flux-preview-bf16"), "sample": process["sample"],
            "output_format": output_format}
    for field, value in (("lora", lora), ("trigger_word", process.get("trigger_word")), ("job_name", job.get("name"))):
        if value:
            body[field] = value
    return body


def run_preview(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.client preview",
                                     description="Reproduce an ai-toolkit run's sample previews")
    parser.add_argument("--config", required=True, help="the ai-toolkit job config (YAML)")
    parser.add_argument("--lora", help="the LoRA, as the server reads it: a path under its LoRA root, a URL or hf://")
    parser.add_argument("--model", help="the preview model (default: from the config's model.quantize)")
    _add_url(parser)
    parser.add_argument("--format", choices=["jpeg", "png", "webp"], default="jpeg")
    parser.add_argument("--out", default="out/previews", help="directory for the images")
    args = parser.parse_args(argv)
    body = _preview_body(args)
    with httpx.Client(base_url=args.url, headers=_auth_headers(), timeout=600) as client:
        images = run_async(client, body, path="/v1/previews")
    out = Path(args.out)
    stem = body.get("job_name", "preview")
    extension = EXTENSIONS.get(args.format, args.format)
    for image, data in images:
        path = out / f"{stem}_{image['index']:02d}.{extension}"
        _save(path, data)
        effective = image.get("effective") or {}
        print(f"{path}: {image['width']}x{image['height']} seed {image['seed']} {effective.get('prompt', '')!r}",
              file=sys.stderr)


def _preview_body(args: argparse.Namespace) -> dict:
    """The /v1/previews body for `preview`'s arguments, from the job config file they name."""
    import yaml

    try:
        with open(args.config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        return preview_request(config, args.lora, args.model, args.format)
    except OSError as exc:
        raise ClientError(f"cannot read config {args.config}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ClientError(f"config {args.config} is not YAML: {exc}") from None
    except ValueError as exc:
        raise ClientError(f"config {args.config}: {exc}") from None


def _save(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None


def _unreachable(exc: httpx.TransportError) -> str:
    """One line for a request that got no answer (connection refused, timeout, a bad --url)."""
    try:
        url = exc.request.url
    except RuntimeError:  # no request attached
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        origin = f"{url.scheme}://{url.netloc.decode()}"
        return f"cannot connect to {origin} ({str(exc) or type(exc).__name__}); is the server running (`make serve`)?"
    return f"request to {url} failed ({type(exc).__name__}): {exc}"


def _auth_headers() -> dict:
    key = os.environ.get("FLUX_SERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("FLUX_SERVE_URL", "http://127.0.0.1:8000"),
                        help="the server (default: $FLUX_SERVE_URL, else http://127.0.0.1:8000)")


def main(argv: list[str] | None = None) -> None:
    """Run the client. The one place failures are reported: a ClientError, or a request that got no
    answer, prints one line to stderr (`error: ...`) and exits 1, with no traceback."""
    try:
        _run(sys.argv[1:] if argv is None else argv)
    except (ClientError, httpx.TransportError) as exc:
        message = str(exc) if isinstance(exc, ClientError) else _unreachable(exc)
        print("error: " + " ".join(message.split()), file=sys.stderr)
        raise SystemExit(1) from None


def _run(argv: list[str]) -> None:
    if argv[:1] == ["preview"]:
        return run_preview(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    _add_url(parser)
    parser.add_argument("--model", default="flux")
    parser.add_argument("--trigger", help="trigger word replacing [trigger]")
    parser.add_argument("--lora", action="append", default=[], help="LoRA path, URL or hf://; repeatable")
    parser.add_argument("--scale", type=float, default=1.0, help="network_multiplier of every --lora")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--format", choices=["jpeg", "png", "webp"], default="jpeg")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="submit a job and follow its progress until it ends")
    parser.add_argument("--out", help="the image file (default: out/image.<format's extension>)")
    args = parser.parse_args(argv)

    with httpx.Client(base_url=args.url, headers=_auth_headers(), timeout=600) as client:
        body = build_request(args)
        images = run_async(client, body) if args.use_async else run_sync(client, body)
    out = Path(args.out or f"out/image.{EXTENSIONS.get(args.format, args.format)}")
    for image, data in images:
        path = out if len(images) == 1 else out.with_stem(f"{out.stem}-{image['index']}")
        _save(path, data)
        print(f"{path}: {image['width']}x{image['height']} seed {image['seed']}", file=sys.stderr)


if __name__ == "__main__":
    main()
