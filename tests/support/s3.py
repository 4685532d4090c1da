"""An S3-compatible server for tests: moto's standalone server, on 127.0.0.1 and a free port.

Nothing here talks to AWS: the credentials are fake and the endpoint is local.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

REGION = "eu-west-1"  # moto refuses a location constraint of us-east-1 when s3fs creates a bucket


BUCKET = "flux-jobs"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options (jobs.store_options) for this server."""
        return {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    def new_store_url(self) -> str:
        """The URL of a store no one used yet (a fresh prefix of the test bucket)."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        s3 = S3Server(endpoint=f"http://{host}:{port}")
        import s3fs

        s3fs.S3FileSystem(**s3.options).mkdir(BUCKET, region_name=REGION)
        yield s3
    finally:
        server.stop()
