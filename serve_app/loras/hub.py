"""hf://owner/repo[@revision]/path sources: strict parsing, tokens, and the Hub's answers in our words.

Every component is percent-decoded once and then validated; a component that still holds a `%`
(encoded twice), a `..`, a control character or anything outside the names the Hub itself accepts
is refused. huggingface_hub only builds the file's URL (`hf_hub_url`): it never sees a client's
value as a local path, and the download goes through `safe_fetch` like any URL. The server's own
token (`HF_TOKEN`) is sent only for repos that `loras.hf_token_repos` names; a request's own
`hf_token` is used for that request only and never shows in a message, a log line or a repr.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from serve_app.loras.errors import forbidden, invalid

SCHEME = "hf://"
SUFFIX = ".safetensors"
DEFAULT_ENDPOINT = "https://huggingface.co"
_USAGE = "expected hf://owner/repo[@revision]/path/to/file.safetensors"
# The Hub's own rules for user, org and repo names (huggingface_hub's validate_repo_id is checked too).
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# A branch, tag, `refs/pr/N` or commit: git ref characters only, no component starting with '.'.
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
# A file or folder name in a repo: letters and digits of any script, and a few safe punctuation marks.
_PATH_PART = re.compile(r"^[\w][\w .+=,@()\[\]-]*$")
_MAX_REVISION, _MAX_PART, _MAX_PATH = 200, 255, 1024
# The Hub's X-Error-Code values we know, in our words.
_HUB_REASONS = {
    "RepoNotFound": "repository not found (or private: send an hf_token that can read it)",
    "GatedRepo": "gated repository: accept its terms on the Hub and send an hf_token",
    "RevisionNotFound": "revision not found",
    "EntryNotFound": "file not found in the repository",
}


@dataclass(frozen=True)
class HfFile:
    """A validated hf:// source."""

    owner: str
    repo: str
    revision: str | None
    path: str

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def source(self) -> str:
        """The canonical spelling: the revision percent-encoded (it may hold '/'), the rest as validated."""
        revision = "" if self.revision is None else "@" + quote(self.revision, safe="")
        return f"{SCHEME}{self.repo_id}{revision}/{self.path}"

    def url(self, endpoint: str) -> str:
        """The file's /resolve/ URL on the Hub at `endpoint` (huggingface_hub builds it)."""
        from huggingface_hub import hf_hub_url  # heavy import, only for hf:// sources

        return hf_hub_url(self.repo_id, self.path, revision=self.revision, endpoint=endpoint)


def parse_hf(source: str) -> HfFile:
    """Parse and validate `hf://owner/repo[@revision]/path` after decoding each component once.

    Raises:
        ApiError: LORA_SOURCE_FORBIDDEN for any component outside the rules, LORA_INVALID for a
            file that is not a .safetensors file.
    """
    if source[: len(SCHEME)].lower() != SCHEME:
        raise forbidden(source, _USAGE)
    raw = source[len(SCHEME) :].split("/")
    if len(raw) < 3:
        raise forbidden(source, _USAGE)
    owner_raw, (repo_raw, at, revision_raw) = raw[0], raw[1].partition("@")
    owner, repo = _decoded(source, owner_raw), _decoded(source, repo_raw)
    for name in (owner, repo):
        if not _NAME.match(name) or "--" in name or ".." in name:
            raise forbidden(source, "the owner or repository name is not a valid Hub name")
    _check_repo_id(source, f"{owner}/{repo}")
    revision = _revision(source, revision_raw) if at else None
    path = _path(source, raw[2:])
    return HfFile(owner, repo, revision, path)


def _decoded(source: str, part: str) -> str:
    try:
        value = unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise forbidden(source, "a component is not valid UTF-8 once decoded") from None
    if "%" in value:
        raise forbidden(source, "a component is percent-encoded more than once")
    if not value.isprintable():
        raise forbidden(source, "a component holds control characters")
    return value


def _check_repo_id(source: str, repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise forbidden(source, "the owner or repository name is not a valid Hub name") from None


def _revision(source: str, raw: str) -> str:
    revision = _decoded(source, raw)
    if not revision or len(revision) > _MAX_REVISION or not _REVISION.match(revision) or ".." in revision:
        raise forbidden(source, "the revision is not a branch, tag or commit name")
    return revision


def _path(source: str, raw_parts: list[str]) -> str:
    parts = [_decoded(source, p) for p in raw_parts]
    for part in parts:
        if part in ("", ".", "..") or "/" in part or len(part) > _MAX_PART or not _PATH_PART.match(part):
            raise forbidden(source, "the path in the repository holds an empty, '.', '..' or unusual component")
    path = "/".join(parts)
    if len(path) > _MAX_PATH:
        raise forbidden(source, "the path in the repository is too long")
    if not path.lower().endswith(SUFFIX):
        raise invalid(source, f"only {SUFFIX} files are accepted")
    return path


def hub_reason(status: int, error_code: str | None) -> str:
    """The Hub's refusal in our words; the status is the Hub's own, which the client named."""
    if error_code in _HUB_REASONS:
        return _HUB_REASONS[error_code]
    if status in (401, 403):
        return "access denied (a private or gated repository needs an hf_token that can read it)"
    return f"HTTP {status}"


class HfToken:
    """A Hugging Face token. Its text shows in no repr, str, log line or error; only `header` holds it.

    Args:
        value: the token as the request or the environment gave it.

    Raises:
        ValueError: with a message that does not hold the token, if it could not be a header value.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str) or not 0 < len(value) <= 1024 or not value.isascii() or not value.isprintable():
            raise ValueError("an hf_token must be 1-1024 printable ASCII characters")
        if " " in value:
            raise ValueError("an hf_token holds no spaces")
        self._value = value

    @property
    def digest(self) -> str:
        """A SHA-256 of the token: what cache keys hold instead of the token."""
        return hashlib.sha256(self._value.encode()).hexdigest()

    @property
    def header(self) -> bytes:
        return b"Bearer " + self._value.encode()

    def __repr__(self) -> str:
        return "HfToken(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HfToken) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self.digest)

    def __reduce__(self):
        return (HfToken, (self._value,))


class HubTokens:
    """Chooses the token a download of one repo sends.

    Args:
        server_token: the server's own token (HF_TOKEN), or None.
        token_repos: repos that may use it: `owner/name`, or `owner/*` for all of an owner's repos.
    """

    def __init__(self, server_token: str | None, token_repos: list[str]):
        self._server = HfToken(server_token) if server_token else None
        self._repos = {r.lower() for r in token_repos}

    def for_repo(self, repo_id: str, request_token: HfToken | None) -> HfToken | None:
        """The request's own token if it brought one, else the server's for an allowed repo, else none."""
        if request_token is not None:
            return request_token
        owner = repo_id.split("/", 1)[0].lower()
        if self._server is not None and (repo_id.lower() in self._repos or f"{owner}/*" in self._repos):
            return self._server
        return None
