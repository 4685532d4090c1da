"""A command-line client for flux-serve.

    python -m serve_app.client "[trigger] a photo of a person" --trigger sks \\
        --lora demo/demo_lora.safetensors --out person.jpg

Sends one prompt (repeat --prompt-file lines for several) to /v1/generate, or with --async to
/v1/inference, polling until the job ends; writes the images next to --out. The API key, if the
server wants one, comes from the FLUX_SERVE_API_KEY environment variable.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import httpx


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


def run_async(client: httpx.Client, body: dict, poll_s: float = 0.5) -> list[tuple[dict, bytes]]:
    answer = client.post("/v1/inference", json=body)
    _raise_for_error(answer)
    request_id = answer.json()["request_id"]
    while True:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(poll_s)
    if status["status"] != "succeeded":
        raise SystemExit(f"job {request_id} {status['status']}: {status['error_code']}: {status['error']}")
    result = client.get(f"/v1/requests/{request_id}/result").json()
    return [(image, client.get(image["url"]).content) for image in result["outputs"]["images"]]


def _raise_for_error(answer: httpx.Response) -> None:
    if answer.status_code != 200:
        try:
            error = answer.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except Exception:
            message = answer.text[:500]
        raise SystemExit(f"HTTP {answer.status_code}: {message}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
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
    parser.add_argument("--async", dest="use_async", action="store_true", help="submit a job and poll it")
    parser.add_argument("--out", default="image.jpg")
    args = parser.parse_args(argv)

    headers = {}
    if os.environ.get("FLUX_SERVE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['FLUX_SERVE_API_KEY']}"
    with httpx.Client(base_url=args.url, headers=headers, timeout=600) as client:
        body = build_request(args)
        images = run_async(client, body) if args.use_async else run_sync(client, body)
    out = Path(args.out)
    for image, data in images:
        path = out if len(images) == 1 else out.with_stem(f"{out.stem}-{image['index']}")
        path.write_bytes(data)
        print(f"{path}: {image['width']}x{image['height']} seed {image['seed']}", file=sys.stderr)


if __name__ == "__main__":
    main()
