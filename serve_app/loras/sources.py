"""Where a LoRA file comes from: a path under the LoRA root, an http(s) URL, hf://owner/repo/file or s3://bucket/key.

One action each, on a `LoraRef` resolved once:
- `resolve(path, token)` applies the source policy cheaply (no download, no DNS) and names the
  file: its canonical source (the LoRA's identity everywhere) and its download-cache key. The
  ingress only calls `canonical` (the same check), so a bad source is a 4xx of its request.
- `pin(ref)` asks the store which version of an s3:// object is current (one HEAD): the version is
  part of its cache key, so an overwritten object is fetched again. Other sources need no pin.
- `fetch(ref)` makes a remote file local: downloaded once into the disk cache (a hit returns at
  once, a remembered failure raises again). Only the replica's `Downloader` calls it, on its own
  threads, before an item joins a batch: it is the one place that touches the network.
- `hold(ref)` opens the checked file on this node, without any network: the open descriptor is
  the file's bytes from then on, whatever another process evicts or swaps into the root after.
  The replica holds it from prefetch until its adapter is loaded.

The parts live beside this module: `net.url_policy` (hosts and addresses), `net.fetch` (one
download), `hub` (hf:// parsing and tokens), `s3` (s3:// buckets, versions and GETs), `cache` (the
disk cache and its cap), `files` (checks, safe open, reading), `failure_memory`. Plain Python: no Ray here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from serve_app.config import LoraArgs
from serve_app.errors import ApiError
from serve_app.loras.cache import CacheFull, DownloadCache, PartFile, cache_key
from serve_app.loras.errors import display_source, download_failed, forbidden, invalid, not_found
from serve_app.loras.failure_memory import FailureMemory
from serve_app.loras.files import LoraFile, check_safetensors, open_in_root, read_lora, resolve_in_root
from serve_app.loras.hub import DEFAULT_ENDPOINT, HfToken, HubTokens, hub_reason, parse_hf
from serve_app.loras.s3 import S3Object, S3Store, S3Version, parse_s3
from serve_app.net.fetch import Fetcher, FetchRequest, http_status_reason
from serve_app.net.url_policy import HostPolicy, UrlRefused, split_url

logger = logging.getLogger("ray.serve")

SUFFIX = ".safetensors"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HF_WEB_HOSTS = ("huggingface.co", "hf.co")
_MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class LoraRef:
    """A source the policy allowed, resolved once: what every later step of its file works from.

    Attributes:
        source: the canonical source.
        key: its name in the download cache (with the hash of the token it is fetched with); the
            canonical source itself for a file under the LoRA root.
        url: where a remote file is downloaded from ("" for a root file).
        hub: an hf:// source (the Hub's token and error messages apply).
        token: the token a hub download sends, if any.
        s3: an s3:// source's bucket and key, and once pinned its version (its key names that version).
    """

    source: str
    key: str
    url: str = ""
    hub: bool = False
    token: HfToken | None = field(default=None, repr=False)
    s3: S3Object | None = None

    @property
    def remote(self) -> bool:
        return bool(self.url)

    @property
    def pinned(self) -> bool:
        """Its cache key names the bytes it stands for: always, but for an s3:// source before its `pin`."""
        return self.s3 is None or self.s3.version is not None

    def pinned_to(self, version: S3Version) -> LoraRef:
        """This s3:// source at one version of its object, under a cache key of that version."""
        assert self.s3 is not None
        return replace(self, key=cache_key(self.source, version.digest), s3=replace(self.s3, version=version))


@dataclass(frozen=True)
class FetchResult:
    """What one `fetch` did, for metrics (no shared counters to diff).

    Attributes:
        source: the canonical source.
        cached: nothing was downloaded: a cache hit, or a file under the LoRA root.
        bytes_downloaded: bytes this call downloaded (0 on a hit).
        held: with `fetch(keep=True)` and a download, the downloaded file held open since before it was
            published, so no other process's eviction can take it first (the caller closes it).
    """

    source: str
    cached: bool
    bytes_downloaded: int = 0
    held: HeldLora | None = field(default=None, compare=False, repr=False)


class HeldLora:
    """A checked LoRA file held open on this node: its bytes can no longer change or vanish.

    `read` turns them into tensors (disk only, never the network); `close` lets them go. Read from
    one thread at a time (the replica's engine thread).
    """

    def __init__(self, source: str, file: BinaryIO, max_bytes: int):
        self.source = source
        self._file = file
        self._max_bytes = max_bytes

    def read(self) -> LoraFile:
        """The file's tensors. Raises ApiError (LORA_INVALID) for a file whose tensors cannot be read."""
        return read_lora(self._file, self.source, self._max_bytes)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HeldLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_remote(source: str) -> bool:
    return _SCHEME.match(source) is not None


class LoraSources:
    """Source policy, downloads, the disk cache and file checks for LoRA files (see module docstring).

    One instance per process (ingress or replica); instances of several processes may share
    `cache_dir`. Thread-safe; downloads of one source are shared by the process's `Downloader`.
    """

    def __init__(self, args: LoraArgs):
        self.args = args
        self.policy = HostPolicy(args.allowed_hosts, args.allow_private_addresses)
        self.fetcher = Fetcher(self.policy, args.download_timeout_s, args.download_retries, args.max_file_bytes)
        # A .part file untouched for longer than any download may take belongs to a process that died.
        self.cache = DownloadCache(Path(args.cache_dir), args.cache_max_bytes, self.fetcher.budget_s + 60)
        self.failures = FailureMemory(args.failure_ttl_s)
        self.hub_endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        try:
            self.hub_origin = split_url(self.hub_endpoint).origin  # the Hub's token goes to this origin only
        except UrlRefused as exc:
            raise ValueError(f"HF_ENDPOINT is not a usable http(s) URL: {exc.reason}") from None
        self.hub_tokens = HubTokens(os.environ.get("HF_TOKEN"), args.hf_token_repos)
        self.s3 = S3Store(args.s3_options, self.fetcher)

    # ---- the policy: no download -----------------------------------------------------------------

    def canonical(self, path: str) -> str:
        """Check a request's `loras[].path` against the policy and return its canonical source.

        Args:
            path: a root-relative path, an http(s) URL, an hf:// or an s3:// source, as the client sent it.

        Returns:
            The canonical source: the LoRA's identity in work items, caches and adapter names.

        Raises:
            ApiError: LORA_SOURCE_FORBIDDEN, LORA_NOT_FOUND or LORA_INVALID.
        """
        if not isinstance(path, str) or not path or len(path) > _MAX_PATH_CHARS or not path.isprintable():
            raise forbidden(str(path)[:200], "empty, too long, or holds control characters")
        scheme = _SCHEME.match(path)
        if scheme is None:
            return self._canonical_root_path(path)
        kind = scheme.group(1).lower()
        if kind in ("http", "https"):
            return self._canonical_url(path)
        if kind == "hf":
            if not self.args.hf_enabled:
                raise forbidden(path, "hf:// sources are disabled (loras.hf_enabled is false)")
            return parse_hf(path).source
        if kind == "s3":
            return parse_s3(path, self.args.allowed_buckets).source
        raise forbidden(
            path, f"scheme {kind}:// is not supported (use a root-relative path, http(s)://, hf:// or s3://)"
        )

    def resolve(self, path: str, token: str | HfToken | None = None) -> LoraRef:
        """`canonical`, and the file's cache key and download URL, with the token it is fetched with.

        Args:
            path: as `canonical`.
            token: the request's own hf_token (hf:// only; a server token may apply instead).

        Raises:
            ApiError: as `canonical`; LORA_SOURCE_FORBIDDEN for a malformed token.
        """
        source = self.canonical(path)
        if not is_remote(source):
            return LoraRef(source, source)
        if source.startswith("s3://"):  # its key names no version yet: `pin` asks the store
            return LoraRef(source, cache_key(source), url=source, s3=parse_s3(source, self.args.allowed_buckets))
        if not source.startswith("hf://"):
            return LoraRef(source, cache_key(source), url=source)
        hf_file = parse_hf(source)
        chosen = self.hub_tokens.for_repo(hf_file.repo_id, _as_token(source, token))
        key = cache_key(source, chosen.digest if chosen else None)
        return LoraRef(source, key, url=hf_file.url(self.hub_endpoint), hub=True, token=chosen)

    def _canonical_root_path(self, path: str) -> str:
        if "\\" in path:
            raise forbidden(path, "backslashes are not allowed; use '/'")
        if path.startswith("/"):
            raise forbidden(path, "absolute paths are not allowed; give a path relative to the LoRA root")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise forbidden(path, "'..' components are not allowed")
        if not parts:
            raise forbidden(path, "names no file")
        rel = "/".join(parts)
        if not rel.lower().endswith(SUFFIX):
            raise invalid(rel, f"only {SUFFIX} files are accepted")
        real = resolve_in_root(self._root(), rel)  # a symlink inside the root may point anywhere: its target decides
        if not os.path.isfile(real):
            raise not_found(rel, "not found under the LoRA root")
        return rel

    def _canonical_url(self, url: str) -> str:
        try:
            parts = split_url(url)
            if not self.policy.allows(parts):
                raise UrlRefused(f"host {parts.netloc} is not in loras.allowed_hosts")
            if _is_ip_literal(parts.host):  # no DNS needed to apply the address rule now
                self.policy.check_address(parts.host)
        except UrlRefused as exc:
            raise forbidden(url, exc.reason) from None
        target = parts.target
        if parts.host in _HF_WEB_HOSTS or parts.host.endswith(".huggingface.co"):
            if "/tree/" in target:
                raise forbidden(url, "a /tree/ link is a folder listing; link the file (/resolve/ or /blob/)")
            target = target.replace("/blob/", "/resolve/", 1)  # the web page -> the file itself
        return f"{parts.scheme}://{parts.netloc}{target}"

    def _root(self) -> str:
        return os.path.realpath(self.args.root)

    # ---- hold: the checked file, opened on this node, no network ---------------------------------

    def hold(self, ref: LoraRef) -> HeldLora | None:
        """Open the checked file: a root file, or a remote file in the download cache; None if it is not cached
        (or, for an s3:// source not pinned yet, not known to be).

        Raises:
            ApiError: a broken root file, or a failure remembered for this source.
        """
        if not ref.pinned:
            remembered = self.failures.recall(ref.key)
            if remembered is not None:
                raise remembered
            return None
        if not ref.remote:
            f = open_in_root(self._root(), ref.source)  # the policy's target now: a symlink may have changed
            try:
                check_safetensors(f, os.fstat(f.fileno()).st_size, ref.source, self.args.max_file_bytes)
            except BaseException:
                f.close()
                raise
            return HeldLora(ref.source, f, self.args.max_file_bytes)
        cached = self.cache.open(ref.key)
        if cached is not None:
            return HeldLora(ref.source, cached, self.args.max_file_bytes)
        remembered = self.failures.recall(ref.key)
        if remembered is not None:
            raise remembered
        return None

    # ---- pin: an s3:// object's current version ---------------------------------------------------

    def pin(self, ref: LoraRef, deadline: float | None = None, request_id: str | None = None) -> LoraRef:
        """The source at its object's current version: one HEAD, no body (a source that needs no pin as it is).

        Runs on the caller's thread; the `Downloader` runs it on its own threads, shared like a download.

        Args:
            ref: the resolved source.
            deadline: as `fetch`.
            request_id: names the request in server-side log lines.

        Raises:
            ApiError: LORA_NOT_FOUND for a missing object, else LORA_DOWNLOAD_FAILED (remembered, like a download's).
        """
        if ref.pinned or ref.s3 is None:
            return ref
        remembered = self.failures.recall(ref.key)
        if remembered is not None:
            raise remembered
        until, callers_own = self._until(deadline)
        log_id = f"[{request_id or '-'}] {display_source(ref.source)}"
        with self._failures_remembered(ref, log_id, until, callers_own):
            version = self.s3.version(ref.s3, log_id, until)
        return ref.pinned_to(version)

    # ---- fetch: the one download ---------------------------------------------------------------

    def fetch(
        self, ref: LoraRef, deadline: float | None = None, request_id: str | None = None, *, keep: bool = False
    ) -> FetchResult:
        """Make a remote file local: download it once into the cache (a root file needs nothing).

        Runs on the caller's thread; the `Downloader` runs it on threads of its own and shares one
        call among the callers of a source. An s3:// source not pinned yet is pinned first.

        Args:
            ref: the resolved source.
            deadline: `time.time()` by which the caller needs an answer; the download itself is
                bounded by its own budget (`download_timeout_s` x `download_retries` + backoff).
            request_id: names the request in server-side log lines.
            keep: hold the downloaded file open for the caller (`FetchResult.held`).

        Raises:
            ApiError: a coded 4xx (LORA_SOURCE_FORBIDDEN, LORA_NOT_FOUND, LORA_INVALID, LORA_DOWNLOAD_FAILED).
        """
        ref = self.pin(ref, deadline, request_id)
        if not ref.remote or self.cache.contains(ref.key):
            return FetchResult(ref.source, cached=True)
        remembered = self.failures.recall(ref.key)
        if remembered is not None:
            raise remembered
        until, callers_own = self._until(deadline)
        size, held = self._download(ref, until, callers_own, request_id, keep)
        return FetchResult(ref.source, cached=False, bytes_downloaded=size, held=held)

    def _download(
        self, ref: LoraRef, until: float, callers_own: bool, request_id: str | None, keep: bool
    ) -> tuple[int, HeldLora | None]:
        """Download into a .part file, check it, publish it. A failure that is the source's fault is remembered."""
        log_id = f"[{request_id or '-'}] {display_source(ref.source)}"
        with self._failures_remembered(ref, log_id, until, callers_own):
            if ref.hub:
                _check_hub_online(ref.source)
            with self.cache.part(ref.key) as part:
                size = self._transfer(ref, log_id, part, until)
                part.seal()
                check_safetensors(part.file, part.size, ref.source, self.args.max_file_bytes)
                # Opened before it is published: no other process can evict it before we hold it.
                held = HeldLora(ref.source, os.fdopen(os.dup(part.file.fileno()), "rb"), self.args.max_file_bytes)
                try:
                    part.publish()
                except BaseException:
                    held.close()
                    raise
        if not keep:
            held.close()
            return size, None
        return size, held

    def _transfer(self, ref: LoraRef, log_id: str, part: PartFile, until: float) -> int:
        """The bytes into the part file: from the object store, or over HTTP."""
        if ref.s3 is not None:
            return self.s3.download(ref.s3, log_id, part, until)
        request = FetchRequest(
            url=ref.url,
            label=ref.source,
            log_id=log_id,
            token=ref.token,
            trusted_origin=self.hub_origin if ref.hub else None,
            describe_status=hub_reason if ref.hub else http_status_reason,
        )
        return self.fetcher.download(request, part, until)

    @contextmanager
    def _failures_remembered(self, ref: LoraRef, log_id: str, until: float, callers_own: bool) -> Iterator[None]:
        """A failure of the block as a coded error, remembered when it is the source's fault."""
        try:
            yield
        except CacheFull:  # a passing state of this node, not the source's fault: not remembered
            logger.warning("LoRA download %s: the download cache is full of downloads in flight", log_id)
            raise download_failed(ref.source, "the server's download cache has no room for it now") from None
        except ApiError as error:
            if not (callers_own and time.monotonic() >= until):  # the caller's short deadline is no fault of the source
                self.failures.remember(ref.key, error)
            logger.warning("LoRA download %s failed: %s", log_id, error.message)
            raise
        except Exception:
            logger.exception("LoRA download %s failed unexpectedly", log_id)
            failure = download_failed(ref.source, "the server could not complete the download")
            self.failures.remember(ref.key, failure)
            raise failure from None

    def _until(self, deadline: float | None) -> tuple[float, bool]:
        """The download's deadline on the monotonic clock, and whether it is the caller's (shorter) one."""
        own = time.monotonic() + self.fetcher.budget_s
        if deadline is None:
            return own, False
        callers = time.monotonic() + (deadline - time.time())
        return (callers, True) if callers < own else (own, False)


def _as_token(source: str, token: str | HfToken | None) -> HfToken | None:
    if token is None or isinstance(token, HfToken):
        return token
    try:
        return HfToken(token)
    except ValueError as exc:  # the message holds no part of the token
        raise forbidden(source, f"the request's hf_token is malformed ({exc})") from None


def _is_ip_literal(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_hub_online(source: str) -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise download_failed(source, "the Hub is offline on this server (HF_HUB_OFFLINE) and the file is not cached")
