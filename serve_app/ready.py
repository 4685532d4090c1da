"""Say when a served config answers: `flux-serve ready: http://HOST:PORT/ (playground), /docs (API), in N s`.

`make serve` runs this beside `serve run`: it reads the config's `http_options`, polls `/health`
until it answers 200, then prints one line with the seconds it took, and exits. A first start on a
fresh machine takes longer than later ones (Ray's start and the small model's first build). It gives
up quietly when the service does not come up within `--within` seconds or it is interrupted.

    .venv/bin/python -m serve_app.ready deploy/local.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import yaml

POLL_S = 1.0


def base_url(config: Path) -> str:
    """The service's address from a Serve config's `http_options` (Serve's defaults where absent)."""
    options = (yaml.safe_load(config.read_text()) or {}).get("http_options") or {}
    return f"http://{options.get('host', '127.0.0.1')}:{options.get('port', 8000)}/"


def wait_ready(url: str, within_s: float) -> float | None:
    """Seconds until `url`/health answered 200, or None when it did not within `within_s`."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        try:
            if httpx.get(url + "health", timeout=5.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # not listening yet, or still starting
        time.sleep(POLL_S)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.ready", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the Serve config being served (deploy/local.yaml)")
    parser.add_argument("--within", type=float, default=900.0, help="seconds to wait before giving up")
    args = parser.parse_args(argv)
    url = base_url(args.config)
    try:
        seconds = wait_ready(url, args.within)
    except KeyboardInterrupt:  # Ctrl-C stops `make serve`: nothing to say
        return 0
    if seconds is None:
        print(f"flux-serve: {url}health did not answer 200 within {args.within:g} s", file=sys.stderr, flush=True)
        return 1
    print(f"flux-serve ready: {url} (playground), /docs (API), in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
