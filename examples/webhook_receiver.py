"""A webhook receiver that verifies flux-serve's signature, with the standard library only.

Run beside `make serve`: it listens on 127.0.0.1, submits one small async job whose `webhook_url` is
itself, verifies the delivery's `X-Flux-Signature` against the server's secret, prints the job's
status and exits (0 when the signature holds, 1 when it does not or nothing came in time):

    .venv/bin/python examples/webhook_receiver.py --server http://127.0.0.1:8000

The secret is `FLUX_SERVE_WEBHOOK_SECRET` if set, else the text of `.flux-serve/webhook_secret` (the
file `make serve` writes), with surrounding whitespace stripped: the server reads it the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import queue
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def verify(secret: str, header: str, body: bytes, max_age_s: int = 300) -> bool:
    """Check `X-Flux-Signature: t=<unix time>,sha256=<hex HMAC of "<t>." + body>` on the exact bytes received."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if "t" not in fields or "sha256" not in fields or not fields["t"].isdigit():
        return False
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - int(fields["t"])) <= max_age_s and hmac.compare_digest(expected, fields["sha256"])


def read_secret(secret_file: Path) -> str:
    return (os.environ.get("FLUX_SERVE_WEBHOOK_SECRET") or secret_file.read_text()).strip()


def receive(port: int) -> tuple[ThreadingHTTPServer, queue.Queue]:
    """A server on 127.0.0.1 that answers 204 and queues each POST as (signature header, body)."""
    deliveries: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            deliveries.put((self.headers.get("X-Flux-Signature", ""), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, deliveries


def submit(server_url: str, webhook_url: str) -> str:
    job = {"model": "flux", "prompts": [{"prompt": "a webhook test", "width": 64, "height": 64, "sample_steps": 2}],
           "webhook_url": webhook_url}
    request = urllib.request.Request(f"{server_url.rstrip('/')}/v1/inference", data=json.dumps(job).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["request_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description="Verify a flux-serve webhook delivery")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the flux-serve URL")
    parser.add_argument("--port", type=int, default=0, help="the receiver's port (default: any free one)")
    parser.add_argument("--secret-file", type=Path, default=Path(".flux-serve/webhook_secret"))
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the delivery")
    args = parser.parse_args()
    secret = read_secret(args.secret_file)
    server, deliveries = receive(args.port)
    webhook_url = f"http://127.0.0.1:{server.server_address[1]}/done"
    request_id = submit(args.server, webhook_url)
    print(f"submitted job {request_id}; waiting for its webhook at {webhook_url}")
    try:
        header, body = deliveries.get(timeout=args.wait)
    except queue.Empty:
        print(f"error: no delivery within {args.wait:g} s", file=sys.stderr)
        return 1
    finally:
        server.shutdown()
    if not verify(secret, header, body):
        print("error: the signature does not verify with this secret", file=sys.stderr)
        return 1
    result = json.loads(body)
    print(f"verified delivery for job {result['request_id']}: {result['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
