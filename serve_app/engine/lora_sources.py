"""Where a LoRA file comes from: a path under the LoRA root, an http(s) URL, or hf://owner/repo/file.

`canonical` applies the source policy cheaply (no download) and returns the string that is the
LoRA's identity everywhere; `local_file` turns it into a validated local file, downloading URLs
and hf:// files once into a size-bounded LRU disk cache. Plain Python: no Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from serve_app import errors
from serve_app.config import LoraArgs
from serve_app.errors import ApiError

SUFFIX = ".safetensors"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HF_WEB_HOSTS = ("huggingface.co", "hf.co")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_TRANSIENT_STATUS = {408, 429}  # retried like 5xx
_BACKOFF_S = 0.2  # first retry wait; doubles per attempt
_LOCK_STRIPES = 64


class _Transient(Exception):
    """A download failure worth another attempt; carries the ApiError to raise if none is left."""

    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


def _forbidden(path: str, why: str) -> ApiError:
    return ApiError(errors.LORA_SOURCE_FORBIDDEN, f"LoRA source {path!r} is not allowed: {why}", {"path": path})


def _invalid(where: str, why: str) -> ApiError:
    return ApiError(errors.LORA_INVALID, f"LoRA file {where} is invalid: {why}", {"path": where, "reason": why})


def _download_failed(url: str, reason: str) -> ApiError:
    details = {"url": url, "reason": reason}
    return ApiError(errors.LORA_DOWNLOAD_FAILED, f"Downloading LoRA {url} failed: {reason}", details)


class LoraSources:
    """Source policy, download cache and file validation for LoRA files (see module docstring)."""

    def __init__(self, args: LoraArgs):
        self.args = args
        self.root = Path(args.root)
        self.cache_dir = Path(args.cache_dir)
        self.stats = {"url_cache_hits": 0, "url_downloads": 0, "bytes_downloaded": 0, "cache_evictions": 0}
        # Striped locks, so two threads of this process don't fetch the same file twice (a lock per
        # source would grow with every URL ever seen); other processes are kept safe by the
        # temp-file + os.replace pattern instead.
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    # ---- canonical: policy only, no download -------------------------------------------------

    def canonical(self, path: str) -> str:
        """Check a request's `loras[].path` against the policy and return its canonical source."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise _forbidden(str(path), "empty or contains a NUL byte")
        scheme = _SCHEME.match(path)
        if scheme is None:
            return self._canonical_root_path(path)
        kind = scheme.group(1).lower()
        if kind in ("http", "https"):
            return self._canonical_url(path)
        if kind == "hf":
            self._parse_hf(path)
            return "hf://" + path[len("hf://"):]  # the scheme in lower case, the rest as given
        raise _forbidden(path, f"scheme {kind}:// is not supported (use a root-relative path, http(s):// or hf://)")

    def _canonical_root_path(self, path: str) -> str:
        if "\\" in path:
            raise _forbidden(path, "backslashes are not allowed; use '/'")
        if path.startswith("/"):
            raise _forbidden(path, "absolute paths are not allowed; give a path relative to the LoRA root")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise _forbidden(path, "'..' components are not allowed")
        if not parts:
            raise _forbidden(path, "names no file")
        rel = "/".join(parts)
        if not rel.lower().endswith(SUFFIX):
            raise _invalid(rel, f"only {SUFFIX} files are accepted")
        root = os.path.realpath(self.root)
        real = os.path.realpath(os.path.join(root, rel))
        # A symlink inside the root may point anywhere; only its target decides.
        if os.path.commonpath([root, real]) != root:
            raise _forbidden(path, "it resolves (through a symlink) outside the LoRA root")
        if not os.path.isfile(real):
            raise ApiError(errors.LORA_NOT_FOUND, f"LoRA file {rel!r} not found under the LoRA root", {"path": rel})
        return rel

    def _canonical_url(self, url: str) -> str:
        try:
            parts = urlsplit(url)
            host, port = (parts.hostname or "").lower(), parts.port
        except ValueError as exc:  # a bad port or IPv6 literal
            raise _forbidden(url, f"malformed URL ({exc})") from None
        if not host:
            raise _forbidden(url, "the URL has no host")
        if parts.username or parts.password:
            raise _forbidden(url, "credentials in the URL are not allowed")
        host_part = f"[{host}]" if ":" in host else host
        netloc = host_part if port is None else f"{host_part}:{port}"
        if not self._host_allowed(host, netloc):
            raise _forbidden(url, f"host {netloc} is not in loras.allowed_hosts")
        path = parts.path
        if host in _HF_WEB_HOSTS or host.endswith(".huggingface.co"):
            if "/tree/" in path:
                raise _forbidden(url, "a /tree/ link is a folder listing; link the file (/resolve/ or /blob/)")
            path = path.replace("/blob/", "/resolve/", 1)  # the web page -> the file itself
        return urlunsplit((parts.scheme.lower(), netloc, path, parts.query, ""))

    def _host_allowed(self, host: str, netloc: str) -> bool:
        for entry in (e.lower() for e in self.args.allowed_hosts):
            if entry.startswith("."):
                if host.endswith(entry) or host == entry[1:]:
                    return True
            elif entry in (host, netloc):  # "127.0.0.1" matches any port, "127.0.0.1:8000" only that one
                return True
        return False

    def _parse_hf(self, source: str) -> tuple[str, str | None, str]:
        """hf://owner/repo[@revision]/path/in/repo.safetensors -> (repo_id, revision, filename)."""
        if not self.args.hf_enabled:
            raise _forbidden(source, "hf:// sources are disabled (loras.hf_enabled is false)")
        parts = source[len("hf://"):].split("/")
        if not source.lower().startswith("hf://") or len(parts) < 3 or "" in parts or ".." in parts or "\\" in source:
            raise _forbidden(source, "expected hf://owner/repo[@revision]/path/to/file.safetensors")
        repo, _, revision = parts[1].partition("@")
        if not repo:
            raise _forbidden(source, "expected hf://owner/repo[@revision]/path/to/file.safetensors")
        filename = "/".join(parts[2:])
        if not filename.lower().endswith(SUFFIX):
            raise _invalid(source, f"only {SUFFIX} files are accepted")
        return f"{parts[0]}/{repo}", unquote(revision) or None, filename

    # ---- local_file: a validated file on disk --------------------------------------------------

    def local_file(self, source: str) -> Path:
        """A local, validated file for a canonical source (downloads once, then cache hits)."""
        source = self.canonical(source)  # the policy again: cheap, and a symlink may have changed since
        if _SCHEME.match(source) is None:
            path = Path(os.path.realpath(self.root / source))
            self.validate_file(path, label=source)
            return path
        with self._lock_for(source):
            if source.startswith("hf://"):
                return self._hf_file(source)
            return self._url_file(source)

    def _lock_for(self, source: str) -> threading.Lock:
        digest = hashlib.sha256(source.encode()).digest()
        return self._locks[int.from_bytes(digest[:4], "little") % _LOCK_STRIPES]

    def _url_file(self, url: str) -> Path:
        name = hashlib.sha256(url.encode()).hexdigest() + SUFFIX
        dest = self.cache_dir / name
        if dest.is_file():
            os.utime(dest)  # LRU: a hit makes it the most recently used
            self.stats["url_cache_hits"] += 1
            return dest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._download_with_retries(url, out)
            self.validate_file(tmp, label=url)  # before publishing: readers only ever see valid files
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        self.stats["url_downloads"] += 1
        self._evict(keep=dest)
        return dest

    def _download_with_retries(self, url: str, out) -> None:
        for attempt in range(self.args.download_retries):
            if attempt:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
            out.seek(0)
            out.truncate()
            try:
                return self._download_once(url, out)
            except _Transient as exc:
                last = exc.error
        raise last

    def _download_once(self, url: str, out) -> None:
        """One GET streamed into `out`; raises ApiError (final) or _Transient (worth a retry)."""
        limit, timeout = self.args.max_file_bytes, self.args.download_timeout_s
        try:
            with httpx.Client(follow_redirects=True, timeout=timeout) as client:
                with client.stream("GET", url) as resp:
                    self._check_response(url, resp)
                    total, head = 0, b""
                    for chunk in resp.iter_bytes():
                        if len(head) < 64:  # enough to tell an HTML page from a safetensors header
                            head += chunk[: 64 - len(head)]
                        total += len(chunk)
                        if total > limit:
                            raise _download_failed(url, f"larger than {limit} bytes")
                        out.write(chunk)
        except httpx.TimeoutException:
            raise _Transient(_download_failed(url, f"timed out after {timeout:g} s")) from None
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
            raise _Transient(_download_failed(url, reason)) from None
        except httpx.TransportError as exc:  # reset mid-stream, protocol errors...
            raise _Transient(_download_failed(url, f"network error ({type(exc).__name__})")) from None
        if _looks_like_html(head):
            raise _download_failed(url, "got an HTML page, not a file")
        self.stats["bytes_downloaded"] += total

    def _check_response(self, url: str, resp: httpx.Response) -> None:
        """Refuse a bad answer from its status and headers, before reading the body."""
        if resp.status_code >= 400:
            error = _download_failed(url, f"HTTP {resp.status_code}")
            if resp.status_code >= 500 or resp.status_code in _TRANSIENT_STATUS:
                raise _Transient(error)
            raise error
        if resp.headers.get("content-type", "").lower().startswith("text/html"):
            raise _download_failed(url, "got an HTML page, not a file")
        length = resp.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.args.max_file_bytes:
            raise _download_failed(url, f"larger than {self.args.max_file_bytes} bytes ({length} bytes)")

    def _hf_file(self, source: str) -> Path:
        """Download through huggingface_hub into <cache_dir>/hf (its own layout, shared LRU cap)."""
        import huggingface_hub  # heavy import, only for hf:// sources

        repo_id, revision, filename = self._parse_hf(source)
        kwargs = dict(repo_id=repo_id, filename=filename, revision=revision, cache_dir=str(self.cache_dir / "hf"),
                      token=None, etag_timeout=self.args.download_timeout_s,
                      endpoint=os.environ.get("HF_ENDPOINT"))  # read per call, not only at import time
        try:  # A cached copy first: no request at all, like a URL cache hit.
            path = Path(os.path.realpath(huggingface_hub.hf_hub_download(**kwargs, local_files_only=True)))
            os.utime(path)
            self.stats["url_cache_hits"] += 1
            return path
        except Exception:  # noqa: BLE001 - not cached (or unreadable cache): fetch it
            pass
        try:
            info = huggingface_hub.hf_hub_download(**kwargs, dry_run=True)  # one HEAD: learn the size first
            if info.file_size is not None and info.file_size > self.args.max_file_bytes:
                raise _download_failed(source, f"larger than {self.args.max_file_bytes} bytes ({info.file_size} bytes)")
            path = Path(os.path.realpath(huggingface_hub.hf_hub_download(**kwargs)))
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the Hub client is a download failure
            raise _download_failed(source, _hf_reason(exc)) from None
        try:
            self.validate_file(path, label=source)
        except ApiError:
            path.unlink(missing_ok=True)  # the snapshot symlink dangles; huggingface_hub re-fetches then
            raise
        self.stats["url_downloads"] += 1
        self.stats["bytes_downloaded"] += path.stat().st_size
        self._evict(keep=path)
        return path

    # ---- validation and the cache cap ----------------------------------------------------------

    def validate_file(self, path: Path, label: str | None = None) -> None:
        """Check size and safetensors structure (header only; tensors are not read). Raises LORA_INVALID.

        `label` names the file in the error (the source, not a server path) when given.
        """
        where = label or str(path)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise ApiError(errors.LORA_NOT_FOUND, f"LoRA file {where} not found", {"path": where}) from None
        if size > self.args.max_file_bytes:
            raise _invalid(where, f"larger than {self.args.max_file_bytes} bytes ({size} bytes)")
        if size == 0:
            raise _invalid(where, "empty file")
        try:
            f = open(path, "rb")
        except OSError as exc:  # a permission problem, a directory...: the file is unusable, not the replica
            raise _invalid(where, f"cannot be read ({type(exc).__name__})") from None
        with f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _invalid(where, "not a safetensors file (truncated: shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER_BYTES:
                raise _invalid(where, f"not a safetensors file (header length {header_len} is not sane)")
            if header_len > size - 8:
                raise _invalid(where, "truncated (the header runs past the end of the file)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, ValueError):
                raise _invalid(where, "not a safetensors file (the header is not JSON)") from None
        if not isinstance(header, dict):
            raise _invalid(where, "not a safetensors file (the header is not a JSON object)")
        _check_tensors(where, header, size - 8 - header_len)

    def _cache_entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every cached file: URL downloads and huggingface_hub blobs."""
        files = list(self.cache_dir.glob("*" + SUFFIX)) + list((self.cache_dir / "hf").glob("*/blobs/*"))
        entries = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if not f.name.endswith(".incomplete"):
                entries.append((st.st_mtime, st.st_size, f))
        return entries

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used cached files until the cache fits its cap, never `keep`."""
        entries = sorted(self._cache_entries())
        total = sum(size for _, size, _ in entries)
        keep = keep.resolve()  # the hf:// blob comes back as a real path: compare like with like
        for _, size, f in entries:
            if total <= self.args.cache_max_bytes:
                break
            if f.resolve() == keep:
                continue
            f.unlink(missing_ok=True)
            total -= size
            self.stats["cache_evictions"] += 1


def _check_tensors(where: str, header: dict, data_len: int) -> None:
    """Every tensor entry is well-formed and its bytes lie inside the file; there is at least one."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise _invalid(where, "empty (the file holds no tensors)")
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _invalid(where, f"not a safetensors file (tensor {name!r} has no valid data_offsets)")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _invalid(where, f"not a safetensors file (tensor {name!r} has offsets {offsets})")
        if end > data_len:
            raise _invalid(where, f"truncated (tensor {name!r} ends at byte {end} of {data_len} data bytes)")


def _looks_like_html(head: bytes) -> bool:
    """An HTML page starts with '<'. A safetensors file may too (its header length's low byte can be
    0x3C), but then byte 8 opens its JSON header with '{' -- so that case is not HTML."""
    return head[8:9] != b"{" and head.lstrip()[:1] == b"<"


def _hf_reason(exc: Exception) -> str:
    """A short reason for a huggingface_hub failure (classes looked up by name: no hard import here)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "GatedRepoError" in names:
        return "gated repository: accept its terms on the Hub and set HF_TOKEN"
    if "RepositoryNotFoundError" in names:
        return "repository not found (or private: set HF_TOKEN)"
    if "RevisionNotFoundError" in names:
        return "revision not found"
    if "RemoteEntryNotFoundError" in names:
        return "file not found in the repository"
    if "OfflineModeIsEnabled" in names or "LocalEntryNotFoundError" in names:
        return "the Hub is unreachable or offline mode is on (HF_HUB_OFFLINE), and the file is not cached"
    if "TimeoutException" in names:
        return "timed out"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
