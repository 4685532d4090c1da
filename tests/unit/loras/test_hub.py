"""hf:// sources against a stand-in Hub (a local server reached through HF_ENDPOINT) and its CDN.

The Hub answers /{owner}/{repo}/resolve/{revision}/{path} the way huggingface.co does: small files
directly, large ones by a redirect to a CDN on another host (here another port), private repos
only with the right token (401 RepoNotFound otherwise). Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path
from urllib.parse import quote, unquote

import huggingface_hub.constants  # imported before any test sets HF_ENDPOINT, so nothing leaks into it
import pytest

from serve_app.loras.hub import HfToken, parse_hf
from tests.unit.lora_host import LoraHost
from tests.unit.loras.test_sources import cache_files, fetch, make, raises, read, safetensors_bytes

REPO_ROOT = Path(__file__).resolve().parents[3]
PRIVATE = {"alice/private": "tok-alice", "org/secret": "tok-server"}  # repo -> the token that may read it
REVISIONS = {"main", "v1", "refs/pr/1", "c" * 40}


class Hub:
    """The stand-in Hub and its CDN, with the files they serve."""

    def __init__(self, tmp: Path):
        self.hub, self.cdn = LoraHost(), LoraHost()
        self.small, self.large = safetensors_bytes(tmp, 2), safetensors_bytes(tmp, 3)
        self.hub.fallback = self._resolve
        self.cdn.file("/blobs/large", self.large)

    def _resolve(self, h) -> None:
        path = h.path.split("?")[0]
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        if not sep or repo not in ("alice/lora", *PRIVATE):
            return h.send(404, b"", X_Error_Code="RepoNotFound")
        if repo in PRIVATE and h.headers.get("Authorization") != f"Bearer {PRIVATE[repo]}":
            return h.send(401, b"", X_Error_Code="RepoNotFound")
        if unquote(revision) not in REVISIONS:
            return h.send(404, b"", X_Error_Code="RevisionNotFound")
        if filename == "x.safetensors":
            return h.send(200, self.small, X_Repo_Commit="c" * 40)
        if filename == "sub/large.safetensors":  # LFS: the Hub sends the client to its CDN
            return h.send(302, b"", Location=f"{self.cdn.base}/blobs/large")
        if filename == "bad.safetensors":
            return h.send(200, b"\x00" * 100)
        return h.send(404, b"", X_Error_Code="EntryNotFound")

    def requests(self) -> int:
        return sum(self.hub.counts.values()) + sum(self.cdn.counts.values())

    def close(self) -> None:
        self.hub.close()
        self.cdn.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in (tests/conftest.py turns offline mode on)."""
    stand_in = Hub(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", stand_in.hub.base)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield stand_in
    stand_in.close()


def hub_sources(tmp_path, hub: Hub, **overrides):
    """LoraSources that allow the CDN (as the defaults allow .hf.co), not the Hub port itself."""
    return make(tmp_path, allowed_hosts=[f"127.0.0.1:{hub.cdn.port}"], **overrides)


# ---- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, canonical, revision, path",
    [
        ("hf://alice/lora/x.safetensors", "hf://alice/lora/x.safetensors", None, "x.safetensors"),
        ("HF://alice/lora@v1/sub/y.safetensors", "hf://alice/lora@v1/sub/y.safetensors", "v1", "sub/y.safetensors"),
        (
            "hf://alice/lora@refs%2Fpr%2F1/x.safetensors",
            "hf://alice/lora@refs%2Fpr%2F1/x.safetensors",
            "refs/pr/1",
            "x.safetensors",
        ),
        (
            "hf://Alice-1/my.lora_v2@" + "c" * 40 + "/a%20b/é.safetensors",
            "hf://Alice-1/my.lora_v2@" + "c" * 40 + "/a b/é.safetensors",
            "c" * 40,
            "a b/é.safetensors",
        ),
    ],
)
def test_valid_sources_parse_to_one_canonical_spelling(tmp_path, source, canonical, revision, path):
    parsed = parse_hf(source)
    assert (parsed.source, parsed.revision, parsed.path) == (canonical, revision, path)
    assert make(tmp_path).canonical(source) == canonical == make(tmp_path).canonical(canonical)


REFUSED = [
    "hf://alice/x.safetensors",
    "hf://alice/lora/",
    "hf:///lora/x.safetensors",
    "hf://alice//x.safetensors",
    "hf://../lora/x.safetensors",
    "hf://%2e%2e/lora/x.safetensors",
    "hf://alice/%2E%2E/x.safetensors",
    "hf://alice/lora/../x.safetensors",
    "hf://alice/lora/..%2Fx.safetensors",
    "hf://alice/lora/a/%2e%2e/x.safetensors",
    "hf://alice/lora/%252e%252e/x.safetensors",
    "hf://alice/lora/%2Fetc%2Fx.safetensors",
    "hf://alice/lora/a%00b.safetensors",
    "hf://alice/lora/a%0Ab.safetensors",
    "hf://alice/lora/%ff.safetensors",
    "hf://alice/lora/a\\b.safetensors",
    "hf://alice/lora/~root.safetensors",
    "hf://alice/lora/.x.safetensors",
    "hf://alice/lora@../x.safetensors",
    "hf://alice/lora@..%2F..%2Fetc/x.safetensors",
    "hf://alice/lora@%2Fetc%2Fpasswd/x.safetensors",
    "hf://alice/lora@/x.safetensors",
    "hf://alice/lora@main%2F..%2F..%2Fx/x.safetensors",
    "hf://alice/lora@%252Fetc/x.safetensors",
    "hf://alice/lora@.hidden/x.safetensors",
    "hf://alice/lora@a b/x.safetensors",
    "hf://al--ice/lora/x.safetensors",
    "hf://alice/lora.git/x.safetensors",
    "hf://alice/-lora/x.safetensors",
    "hf://alice/lora/x.bin",
    "hf://alice/lora?x=1/x.safetensors",
    "hf://alice@v1/lora/x.safetensors",
    "hf://a/" + "b" * 97 + "/x.safetensors",
]


@pytest.mark.parametrize("source", REFUSED)
def test_every_component_is_validated_after_decoding(tmp_path, hub, source):
    src = hub_sources(tmp_path, hub)
    for call in (src.canonical, partial(fetch, src), partial(read, src)):
        raises({"LORA_SOURCE_FORBIDDEN", "LORA_INVALID"}, call, source)
    assert hub.requests() == 0 and cache_files(tmp_path) == []


MEASURE = r"""
import json, resource, sys
import psutil, huggingface_hub, huggingface_hub.utils, safetensors.torch  # imported before measuring
from serve_app.config import LoraArgs
from functools import partial
from serve_app.loras.sources import LoraSources
from serve_app.errors import ApiError
from tests.unit.loras.test_sources import fetch, read

root, cache, sources = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
src = LoraSources(LoraArgs(root=root, cache_dir=cache, allow_private_addresses=True))
me = psutil.Process()
before = (me.io_counters().read_chars, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, me.memory_info().rss)
answers = []
for source in sources:
    for call in (src.canonical, partial(fetch, src), partial(read, src)):
        try:
            call(source)
            answers.append(["ok", ""])
        except ApiError as exc:
            answers.append([exc.code, exc.message])
after = (me.io_counters().read_chars, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, me.memory_info().rss)
print(json.dumps({"read": after[0] - before[0], "peak_kib": after[1] - before[1], "rss": after[2] - before[2],
                  "answers": answers}))
"""


@pytest.mark.slow  # a subprocess of its own
def test_a_revision_or_path_that_decodes_to_a_local_file_reads_nothing(tmp_path, hub):
    """The first release let huggingface_hub read `refs/<revision>` as a local file: a request naming a
    300 MiB file grew the replica by GBs and echoed the file in the error. Now nothing is even opened."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(300 * 2**20)  # sparse: costs no disk, but 300 MiB of memory to whoever reads it
    cache = tmp_path / "cache"
    refs = cache / "hf" / "models--alice--lora" / "refs"  # where huggingface_hub looked for the revision
    rel = os.path.relpath(big, refs)
    sources = [
        f"hf://alice/lora@{quote(rel, safe='')}/x.safetensors",
        f"hf://alice/lora@{quote(str(big), safe='')}/x.safetensors",
        f"hf://alice/lora@{quote(quote(rel, safe=''), safe='')}/x.safetensors",
        f"hf://alice/lora/{quote(rel, safe='')}.safetensors",
        f"hf://alice/lora/{quote(str(big), safe='')}.safetensors",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_ENDPOINT": hub.hub.base, "HF_HUB_OFFLINE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "root"), str(cache), json.dumps(sources)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    measured = json.loads(out.stdout)
    assert all(code in ("LORA_SOURCE_FORBIDDEN", "LORA_INVALID") for code, _ in measured["answers"]), measured
    assert measured["read"] < 4 * 2**20, measured  # bytes read by this process: not the file's 300 MiB
    assert measured["peak_kib"] < 64 * 1024 and measured["rss"] < 64 * 2**20, measured
    assert not any(str(cache) in message or "\x00" in message for _, message in measured["answers"])
    assert hub.requests() == 0


# ---- downloads from the stand-in Hub -------------------------------------------------------------


def test_download_then_cache_hit_through_the_hub_and_its_cdn(tmp_path, hub):
    src = hub_sources(tmp_path, hub)
    for source, body in (
        ("hf://alice/lora/x.safetensors", hub.small),
        ("hf://alice/lora@refs%2Fpr%2F1/sub/large.safetensors", hub.large),
    ):
        assert not fetch(src, source).cached
        before = hub.requests()
        lora = read(src, source)
        assert lora.size == len(body) and hub.requests() == before  # a cache hit: no request at all
    assert hub.hub.counts["/alice/lora/resolve/refs%2Fpr%2F1/sub/large.safetensors"] == 1
    assert hub.cdn.counts["/blobs/large"] == 1


def test_hub_refusals_in_our_words(tmp_path, hub, monkeypatch):
    src = hub_sources(tmp_path, hub)
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, "hf://bob/none/x.safetensors")
    assert "repository not found" in err.message and err.details["url"] == "hf://bob/none/x.safetensors"
    assert "file not found" in raises("LORA_DOWNLOAD_FAILED", fetch, src, "hf://alice/lora/no.safetensors").message
    assert "revision not found" in raises("LORA_DOWNLOAD_FAILED", fetch, src, "hf://alice/lora@v9/x.safetensors").message
    raises("LORA_INVALID", fetch, src, "hf://alice/lora/bad.safetensors")
    raises("LORA_SOURCE_FORBIDDEN", make(tmp_path, hf_enabled=False).canonical, "hf://alice/lora/x.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "offline" in raises("LORA_DOWNLOAD_FAILED", fetch, src, "hf://alice/lora@v1/x.safetensors").message


def test_the_hubs_redirect_is_checked_like_any_hop(tmp_path, hub):
    src = make(tmp_path, allowed_hosts=["huggingface.co"])  # the CDN's port is not allowed
    err = raises("LORA_SOURCE_FORBIDDEN", fetch, src, "hf://alice/lora/sub/large.safetensors")
    assert "redirect" in err.message and str(hub.cdn.port) not in err.message
    assert hub.cdn.counts["/blobs/large"] == 0


# ---- tokens -------------------------------------------------------------------------------------


def test_the_servers_token_goes_only_to_repos_the_args_name(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok-server")
    src = hub_sources(tmp_path, hub, hf_token_repos=["org/*"])
    fetch(src, "hf://org/secret/x.safetensors")
    assert hub.hub.headers["/org/secret/resolve/main/x.safetensors"]["authorization"] == "Bearer tok-server"
    fetch(src, "hf://alice/lora/x.safetensors")
    assert "authorization" not in hub.hub.headers["/alice/lora/resolve/main/x.safetensors"]
    none = hub_sources(tmp_path / "b", hub)  # by default no repo gets it
    raises("LORA_DOWNLOAD_FAILED", fetch, none, "hf://org/secret/x.safetensors")


def test_a_requests_token_is_used_for_it_only_and_never_shows(tmp_path, hub, caplog):
    caplog.set_level(logging.INFO)
    src = hub_sources(tmp_path, hub)
    private = "hf://alice/private/sub/large.safetensors"
    assert read(src, private, token="tok-alice").size == len(hub.large)
    assert "authorization" not in hub.cdn.headers["/blobs/large"]  # the token stays with the Hub's origin
    # Cached under the token's hash: a request without it, or with another, is not served that file.
    for token in (None, "tok-bob"):
        err = raises("LORA_DOWNLOAD_FAILED", read, src, private, token=token)
        assert "tok-" not in err.message + json.dumps(err.details)
    assert len(cache_files(tmp_path)) == 1
    assert fetch(src, private, token="tok-alice").cached
    malformed = raises("LORA_SOURCE_FORBIDDEN", fetch, src, private, token="tok-alice\r\nX-Evil: 1")
    assert "tok-alice" not in malformed.message
    assert "tok-alice" not in caplog.text and "tok-bob" not in caplog.text


def test_a_token_hides_its_text():
    token = HfToken("hf_secret_value")
    assert "hf_secret_value" not in repr(token) + str(token) + f"{token}" + repr([token])
    assert pickle.loads(pickle.dumps(token)) == token
    with pytest.raises(ValueError) as info:
        HfToken("bad token\n")
    assert "bad token" not in str(info.value)
