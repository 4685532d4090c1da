"""Where a LoRA file comes from: a path under the LoRA root, an http(s) URL, or hf://owner/repo/file.

- `canonical(path)` applies the source policy cheaply (no download, no DNS) and returns the string
  that is the LoRA's identity everywhere. The ingress calls it for every request.
- `fetch(...)` makes a remote file local (downloaded once into the disk cache, then cache hits) and
  checks a root file; a replica calls it (through `Downloader`, on its own threads) before an item
  joins a batch, and the sync path before it queues.
- `read(...)` is the hand-over to a loader: the file opened safely and read into memory as tensors
  (`LoraFile`), so neither cache eviction nor a symlink swapped into the root can change it after.

The policy is SPEC section 8; the parts live beside this module: `url_policy` (hosts and
addresses), `safe_fetch` (one download), `hf_sources` (hf:// parsing and tokens), `download_cache`
(the disk cache and its cap), `lora_files` (checks, safe open, reading), `failure_memory`.
Plain Python: no Ray here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serve_app.config import LoraArgs
from serve_app.errors import ApiError
from serve_app.loras.cache import CacheFull, DownloadCache, cache_key
from serve_app.loras.errors import display_source, download_failed, forbidden, invalid, not_found
from serve_app.loras.failure_memory import FailureMemory
from serve_app.loras.files import LoraFile, check_safetensors, open_in_root, read_lora, resolve_in_root
from serve_app.loras.hub import DEFAULT_ENDPOINT, HfToken, HubTokens, hub_reason, parse_hf
from serve_app.net.fetch import DEADLINE_PASSED, Fetcher, FetchRequest, http_status_reason
from serve_app.net.url_policy import HostPolicy, UrlRefused, split_url

logger = logging.getLogger("ray.serve")

SUFFIX = ".safetensors"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HF_WEB_HOSTS = ("huggingface.co", "hf.co")
_MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class FetchResult:
    """What one `fetch` did, for metrics (no shared counters to diff).

    Attributes:
        source: the canonical source.
        cached: nothing was downloaded: a cache hit, or a file under the LoRA root.
        bytes_downloaded: bytes this call downloaded (0 on a hit).
    """

    source: str
    cached: bool
    bytes_downloaded: int = 0


@dataclass(frozen=True)
class _Remote:
    source: str  # canonical
    key: str  # its name in the disk cache (with the hash of the token it is fetched with)
    url: str
    hub: bool
    token: HfToken | None


def is_remote(source: str) -> bool:
    return _SCHEME.match(source) is not None


class LoraSources:
    """Source policy, downloads, the disk cache and file checks for LoRA files (see module docstring).

    One instance per process (ingress or replica); instances of several processes may share
    `cache_dir`. Thread-safe.
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
        self.stats = {"url_cache_hits": 0, "url_downloads": 0, "bytes_downloaded": 0}
        # Downloads in flight in this process, by cache key: a second caller waits for the first
        # instead of downloading again. Entries leave when their download ends.
        self._inflight: dict[str, threading.Event] = {}
        self._inflight_lock = threading.Lock()

    # ---- canonical: policy only, no download ---------------------------------------------------

    def canonical(self, path: str) -> str:
        """Check a request's `loras[].path` against the policy and return its canonical source.

        Args:
            path: a root-relative path, an http(s) URL or an hf:// source, as the client sent it.

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
        raise forbidden(path, f"scheme {kind}:// is not supported (use a root-relative path, http(s):// or hf://)")

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

    # ---- fetch: a checked file on this node ----------------------------------------------------

    def fetch(
        self,
        source: str,
        token: str | HfToken | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> FetchResult:
        """Make a source's file available on this node: download it once into the cache, or check a root file.

        A cache hit returns at once; a source that failed within `loras.failure_ttl_s` raises its
        error again without a new attempt; a download already in flight in this process is waited
        for, not repeated.

        Args:
            source: a source as the client sent it, or canonical.
            token: the request's own hf_token (hf:// only; used for this call only).
            deadline: `time.time()` by which the caller needs an answer; the download itself is
                bounded by its own budget (`download_timeout_s` x `download_retries` + backoff).
            request_id: names the request in server-side log lines.

        Raises:
            ApiError: a coded 4xx (LORA_SOURCE_FORBIDDEN, LORA_NOT_FOUND, LORA_INVALID, LORA_DOWNLOAD_FAILED).
        """
        source = self.canonical(source)  # the policy again: cheap, and a symlink may have changed since
        if not is_remote(source):
            with open_in_root(self._root(), source) as f:
                check_safetensors(f, os.fstat(f.fileno()).st_size, source, self.args.max_file_bytes)
            return FetchResult(source, cached=True)
        return self._fetch_remote(self._remote(source, token), deadline, request_id)[0]

    def lookup(self, source: str, token: str | HfToken | None = None) -> FetchResult | None:
        """What `fetch` answers without downloading: a checked root file or a cache hit, else None.

        Raises:
            ApiError: the policy's refusal, a broken root file, or a failure remembered for this source.
        """
        source = self.canonical(source)
        if not is_remote(source):
            return self.fetch(source)
        remote = self._remote(source, token)
        if self.cache.contains(remote.key):
            self.stats["url_cache_hits"] += 1
            return FetchResult(source, cached=True)
        remembered = self.failures.recall(remote.key)
        if remembered is not None:
            raise remembered
        return None

    def key(self, source: str, token: str | HfToken | None = None) -> str:
        """The identity of a download: its cache key (canonical source and the hash of the token it is sent with)."""
        source = self.canonical(source)
        return self._remote(source, token).key if is_remote(source) else source

    def read(
        self,
        source: str,
        token: str | HfToken | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
    ) -> LoraFile:
        """The hand-over to a loader: the file's tensors, read from bytes held at this moment.

        A remote file not in the cache (or evicted by another process since it was fetched) is
        fetched first, within `deadline`. Once the file is open its bytes are this process's: a
        later eviction or a symlink swap in the root cannot change what is loaded.

        Args: as `fetch`.

        Returns:
            The LoraFile (canonical source, tensors, metadata, size).

        Raises:
            ApiError: as `fetch`, and LORA_INVALID for a file whose tensors cannot be read.
        """
        for _ in range(3):
            lora = self.read_local(source, token)
            if lora is not None:
                return lora
            # Downloaded here, the file is read before it is published: no other process can evict it first.
            remote = self._remote(self.canonical(source), token)
            _, lora = self._fetch_remote(remote, deadline, request_id, self._reader(remote.source))
            if lora is not None:
                return lora
        raise download_failed(source, "the file left the download cache before it could be read; try again")

    def read_local(self, source: str, token: str | HfToken | None = None) -> LoraFile | None:
        """`read` without any download: None when a remote file is not in the cache now.

        Raises:
            ApiError: as `read`.
        """
        source = self.canonical(source)
        if not is_remote(source):
            with open_in_root(self._root(), source) as f:
                return read_lora(f, source, self.args.max_file_bytes)
        f = self.cache.open(self._remote(source, token).key)
        if f is None:
            return None
        with f:
            return read_lora(f, source, self.args.max_file_bytes)

    def _reader(self, source: str) -> Callable[[BinaryIO], LoraFile]:
        return lambda f: read_lora(f, source, self.args.max_file_bytes)

    # ---- remote files --------------------------------------------------------------------------

    def _remote(self, source: str, token: str | HfToken | None) -> _Remote:
        if not source.startswith("hf://"):
            return _Remote(source, cache_key(source), source, hub=False, token=None)
        hf_file = parse_hf(source)
        chosen = self.hub_tokens.for_repo(hf_file.repo_id, _as_token(source, token))
        key = cache_key(source, chosen.digest if chosen else None)
        return _Remote(source, key, hf_file.url(self.hub_endpoint), hub=True, token=chosen)

    def _fetch_remote(
        self,
        remote: _Remote,
        deadline: float | None,
        request_id: str | None,
        hand_over: Callable[[BinaryIO], LoraFile] | None = None,
    ) -> tuple[FetchResult, LoraFile | None]:
        """Cache hit, remembered failure, another thread's download, or ours (read by `hand_over` if given)."""
        until, callers_own = self._until(deadline)
        while True:
            if self.cache.contains(remote.key):
                self.stats["url_cache_hits"] += 1
                return FetchResult(remote.source, cached=True), None
            remembered = self.failures.recall(remote.key)
            if remembered is not None:
                raise remembered
            with self._inflight_lock:
                event = self._inflight.get(remote.key)
                leader = event is None
                if leader:
                    event = self._inflight[remote.key] = threading.Event()
            if leader:
                try:
                    size, lora = self._download(remote, until, callers_own, request_id, hand_over)
                finally:
                    with self._inflight_lock:
                        del self._inflight[remote.key]
                    event.set()
                return FetchResult(remote.source, cached=False, bytes_downloaded=size), lora
            if not event.wait(max(0.0, until - time.monotonic())):
                raise download_failed(remote.source, DEADLINE_PASSED)

    def _download(
        self,
        remote: _Remote,
        until: float,
        callers_own: bool,
        request_id: str | None,
        hand_over: Callable[[BinaryIO], LoraFile] | None,
    ) -> tuple[int, LoraFile | None]:
        """Download into a .part file, check it (and read it, with `hand_over`), publish it.

        A failure that is the source's fault is remembered for `failure_ttl_s`.
        """
        log_id = f"[{request_id or '-'}] {display_source(remote.source)}"
        request = FetchRequest(
            url=remote.url,
            label=remote.source,
            log_id=log_id,
            token=remote.token,
            trusted_origin=self.hub_origin if remote.hub else None,
            describe_status=hub_reason if remote.hub else http_status_reason,
        )
        try:
            if remote.hub:
                _check_hub_online(remote.source)
            with self.cache.part(remote.key) as part:
                size = self.fetcher.download(request, part, until)
                part.seal()
                check_safetensors(part.file, part.size, remote.source, self.args.max_file_bytes)
                lora = hand_over(part.file) if hand_over is not None else None
                part.publish()
        except CacheFull:  # a passing state of this node, not the source's fault: not remembered
            logger.warning("LoRA download %s: the download cache is full of downloads in flight", log_id)
            raise download_failed(remote.source, "the server's download cache has no room for it now") from None
        except ApiError as error:
            if not (callers_own and time.monotonic() >= until):  # the caller's short deadline is no fault of the source
                self.failures.remember(remote.key, error)
            logger.warning("LoRA download %s failed: %s", log_id, error.message)
            raise
        except Exception:
            logger.exception("LoRA download %s failed unexpectedly", log_id)
            error = download_failed(remote.source, "the server could not complete the download")
            self.failures.remember(remote.key, error)
            raise error from None
        self.stats["url_downloads"] += 1
        self.stats["bytes_downloaded"] += size
        return size, lora

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
