"""s3://bucket/key sources: the bucket policy, the object's version, and its download through s3fs.

A source names an object in a bucket that `loras.allowed_buckets` lists exactly as spelled (empty: s3://
is off). Its key is taken literally (nothing is decoded) and must name a .safetensors file. The store's
endpoint and credentials come from `loras.s3_options` over the node's environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, ...), never from a request.

An object may be overwritten under the same key, so its cache entry is named by the version the store
reports (`S3Store.version`: one HEAD, s3fs's `info()`: the ETag and, in a versioned bucket, the
VersionId). An unchanged object is then a cache hit with no GET; a changed one is fetched again. The GET
asks for that very version (its VersionId, and If-Match on its ETag), so the bytes cached under a version
are that version's.

Both requests go through the URL path's attempt loop, deadline and size cap (`net.fetch.Fetcher`): s3fs
and botocore retry nothing themselves, and every call waits at most what is left of the deadline.
Messages name the source as the client sent it, with a reason in our words; the store's own answers, the
endpoint and anything about the credentials go to the server's log only. Plain Python: no Ray here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from serve_app.loras.errors import download_failed, forbidden, invalid, not_found
from serve_app.net.fetch import DEADLINE_PASSED, Failure, Fetcher, Sink

logger = logging.getLogger("ray.serve")

SCHEME = "s3://"
SUFFIX = ".safetensors"
NOT_FOUND = "not found in its bucket"
_USAGE = "expected s3://bucket/path/to/file.safetensors"
_MAX_KEY_BYTES = 1024  # S3's own limit
_CHUNK_BYTES = 2**20  # one read of the GET's body
T = TypeVar("T")


@dataclass(frozen=True)
class S3Version:
    """One version of an object, as its HEAD reports it.

    Attributes:
        etag: the ETag, quotes included (changes with the content).
        version_id: the VersionId in a versioned bucket, else None.
    """

    etag: str
    version_id: str | None

    @property
    def digest(self) -> str:
        """What the cache key holds besides the source (`cache.cache_key`)."""
        return hashlib.sha256(f"s3 version\n{self.version_id or ''}\n{self.etag}".encode()).hexdigest()

    @property
    def get_arguments(self) -> dict[str, str]:
        """GetObject's arguments that ask for this version and nothing else."""
        arguments = {"IfMatch": self.etag} if self.etag else {}
        if self.version_id:
            arguments["VersionId"] = self.version_id
        return arguments


@dataclass(frozen=True)
class S3Object:
    """A validated s3:// source; `version` is set once the store said which version is current."""

    bucket: str
    key: str
    version: S3Version | None = None

    @property
    def source(self) -> str:
        """The canonical spelling."""
        return f"{SCHEME}{self.bucket}/{self.key}"


def parse_s3(source: str, allowed_buckets: Sequence[str]) -> S3Object:
    """Check `s3://bucket/key` against the bucket policy and the key rules: no network.

    Raises:
        ApiError: LORA_SOURCE_FORBIDDEN for a bucket not allowed or a key outside the rules, LORA_INVALID
            for a file that is not a .safetensors file.
    """
    if source[: len(SCHEME)].lower() != SCHEME:
        raise forbidden(source, _USAGE)
    if not allowed_buckets:
        raise forbidden(source, "s3:// sources are disabled (loras.allowed_buckets is empty)")
    bucket, slash, key = source[len(SCHEME) :].partition("/")
    if not bucket or not slash or not key:
        raise forbidden(source, _USAGE)
    if bucket not in allowed_buckets:
        raise forbidden(source, f"bucket {bucket!r} is not in loras.allowed_buckets")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise forbidden(source, f"the key is longer than S3 allows ({_MAX_KEY_BYTES} bytes)")
    # s3fs reads '?versionId=' in a path as a version, and URL tools read '?' and '#': never a key's.
    if any(c in key for c in "?#\\"):
        raise forbidden(source, "a key holding '?', '#' or '\\' is not supported")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise forbidden(source, "the key holds an empty, '.' or '..' component")
    if not key.lower().endswith(SUFFIX):
        raise invalid(source, f"only {SUFFIX} files are accepted")
    return S3Object(bucket, key)


class S3Store:
    """The S3 client of s3:// sources: made on first use, so a process that only checks sources never makes one.

    Args:
        options: `loras.s3_options` (s3fs's `S3FileSystem` arguments).
        fetcher: the URL path's attempt loop, deadline and size cap (and `download_timeout_s`).
    """

    def __init__(self, options: dict[str, Any], fetcher: Fetcher):
        self.options = dict(options)
        self.fetcher = fetcher
        self._fs: Any = None
        self._lock = threading.Lock()

    def version(self, obj: S3Object, log_id: str, until: float) -> S3Version:
        """The object's current version: one HEAD (s3fs `info`), retried like a download, before `until`.

        Raises:
            ApiError: LORA_NOT_FOUND for a missing object, else LORA_DOWNLOAD_FAILED.
        """
        fs = self._filesystem()
        path = f"{obj.bucket}/{obj.key}"

        def attempt() -> S3Version:
            info = self._call(obj, log_id, until, lambda left: fs.info(path, refresh=True, timeout=left))
            if info.get("type") != "file":  # a "folder": the key is a prefix of other keys
                raise Failure(not_found(obj.source, NOT_FOUND))
            return S3Version(etag=str(info.get("ETag") or ""), version_id=info.get("VersionId") or None)

        return self.fetcher.retrying(obj.source, attempt, until)

    def download(self, obj: S3Object, log_id: str, sink: Sink, until: float) -> int:
        """GET the object's pinned version into `sink` before `until`; return its size.

        Raises:
            ApiError: LORA_NOT_FOUND for an object gone since its HEAD, else LORA_DOWNLOAD_FAILED (the size
                cap's refusal included).
        """
        if obj.version is None:
            raise ValueError("an s3:// object is downloaded at the version its HEAD reported (LoraSources.pin)")
        version = obj.version
        fs = self._filesystem()

        def attempt() -> int:
            sink.restart()
            response = self._call(obj, log_id, until, lambda left: fs.call_s3(
                "get_object", Bucket=obj.bucket, Key=obj.key, **version.get_arguments, timeout=left))
            body = response["Body"]
            try:
                if isinstance(response.get("ContentLength"), int):
                    self.fetcher.expect_size(obj.source, sink, response["ContentLength"])
                while chunk := self._call(obj, log_id, until, lambda left: _read(fs, body, left)):
                    self.fetcher.receive(obj.source, sink, chunk)
            finally:
                body.close()
            return sink.size

        return self.fetcher.retrying(obj.source, attempt, until)

    def _filesystem(self) -> Any:
        with self._lock:
            if self._fs is None:
                import fsspec  # s3fs and botocore: only for s3:// sources

                timeout = self.fetcher.timeout_s
                # One attempt per call, each wait bounded like a URL's: the attempt loop is `Fetcher.retrying`.
                config = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"total_max_attempts": 1},
                          **self.options.get("config_kwargs", {})}
                # An instance of our own: the one fsspec would share may be the job store's, with its own settings.
                fs = fsspec.filesystem("s3", **{**self.options, "config_kwargs": config, "skip_instance_cache": True})
                fs.retries = 1  # s3fs's own retry loop around each call
                self._fs = fs
            return self._fs

    def _call(self, obj: S3Object, log_id: str, until: float, call: Callable[[float], T]) -> T:
        """One call to the store, given what is left of the deadline; its failure as a `Failure` in our words."""
        left = until - time.monotonic()
        if left <= 0:
            raise Failure(download_failed(obj.source, DEADLINE_PASSED))
        try:
            return call(left)
        except Exception as exc:
            failure = self._failure(obj, exc, until)
            if failure is None:
                raise
            logger.warning("LoRA download %s: %r", log_id, exc)  # the store's own words: the log only
            raise failure from None

    def _failure(self, obj: S3Object, exc: Exception, until: float) -> Failure | None:
        """What a store error means for the client, and whether another attempt may succeed; None: not the store's."""
        from aiohttp import ClientConnectorError
        from aiohttp import ClientError as HttpClientError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )
        from fsspec.exceptions import FSTimeoutError

        source = obj.source
        if isinstance(exc, FSTimeoutError) and time.monotonic() >= until - 0.05:
            return Failure(download_failed(source, DEADLINE_PASSED))
        if isinstance(exc, FileNotFoundError):  # no such key, or no such bucket
            return Failure(not_found(source, NOT_FOUND))
        if isinstance(exc, PermissionError):
            return Failure(download_failed(source, "access denied (the server's S3 credentials cannot read it)"))
        if isinstance(exc, NoCredentialsError):
            return Failure(download_failed(source, "the server has no S3 credentials"))
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ClientConnectorError)):
            return Failure(download_failed(source, "cannot connect to the store"), transient=True)
        if isinstance(exc, (ReadTimeoutError, TimeoutError, FSTimeoutError)):
            reason = f"timed out after {self.fetcher.timeout_s:g} s without data"
            return Failure(download_failed(source, reason), transient=True)
        if isinstance(exc, OSError) and exc.errno == errno.EINVAL:  # s3fs's 400 and 412: the request itself
            if len(exc.args) > 1 and "pre-conditions" in str(exc.args[1]):  # If-Match: overwritten since its HEAD
                return Failure(download_failed(source, "the object changed while it was fetched; try again"))
            return Failure(download_failed(source, "the store refused the request"))
        if isinstance(exc, (OSError, BotoCoreError, ClientError, HttpClientError)):  # 5xx, a transfer cut short
            return Failure(download_failed(source, "the store did not deliver it"), transient=True)
        return None


def _read(fs: Any, body: Any, left: float) -> bytes:
    """The next bytes of a GET's body (aiobotocore's, read on s3fs's event loop), waiting at most `left` s."""
    from fsspec.asyn import sync

    return sync(fs.loop, body.read, _CHUNK_BYTES, timeout=left)
