"""s3:// sources against a real S3-compatible server (moto's, tests/support/s3.py), no mocks of the network.

The bucket policy as the ingress applies it (`canonical`); the replica's way to a file (`Downloader.hold`:
pin to the object's version, then the cache or one GET); the URL path's size cap, deadline, retries and
error codes; and messages that name the source, never the credentials, the endpoint or other keys.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from serve_app.config import AppArgs
from serve_app.errors import ApiError
from serve_app.loras.downloader import Downloader, Held
from serve_app.loras.sources import LoraSources
from tests.support.s3 import REGION
from tests.unit.loras.test_sources import MAX_FILE, make, raises, safetensors_bytes

BUCKET = "flux-loras"
VERSIONED = "flux-loras-versioned"
KEY_ID, SECRET = "AKIAFLUXTESTKEYID", "flux-test-secret-value"  # moto takes any credentials
TENSOR = "transformer.x.lora_A.weight"


@pytest.fixture(scope="module")
def store(s3):
    """The test server, with a plain and a versioned bucket, and an s3fs client to put objects with."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.options)
    for bucket in (BUCKET, VERSIONED):
        if not fs.exists(bucket):
            fs.mkdir(bucket, region_name=REGION)
    fs.call_s3("put_bucket_versioning", Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    fs.pipe_file(f"{BUCKET}/private/unlisted-neighbour.safetensors", b"not for clients' eyes")
    return s3, fs


def options(server, **extra) -> dict:
    opts = {**server.options, "key": KEY_ID, "secret": SECRET}
    return {**opts, **extra}


def sources(tmp_path: Path, server, **overrides) -> LoraSources:
    """LoraSources reading the test server; its timeout leaves moto (a thread of this process) room on a busy machine."""
    overrides.setdefault("s3_options", options(server))
    overrides.setdefault("download_timeout_s", 5.0)
    return make(tmp_path, allowed_buckets=[BUCKET, VERSIONED], **overrides)


def put(fs, bucket: str, body: bytes) -> str:
    """A new object holding `body`; its s3:// source."""
    key = f"loras/{uuid.uuid4().hex[:10]}.safetensors"
    fs.pipe_file(f"{bucket}/{key}", body)
    return f"s3://{bucket}/{key}"


class GetCounter:
    """Counts the GETs of an S3Store (its `download`: the only place an object's body is requested)."""

    def __init__(self, src: LoraSources, monkeypatch):
        self.count = 0
        real = src.s3.download

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(src.s3, "download", counted)


def hold(downloader: Downloader, source: str) -> tuple[Held, torch.Tensor]:
    """Hold a source as a replica's prefetch does; its tensor, read from the held bytes."""

    async def go():
        got = await downloader.hold(source, deadline=time.time() + 30)
        with got.lora as held:
            return got, held.read().tensors[TENSOR]

    return asyncio.run(go())


def failure(downloader: Downloader, source: str) -> ApiError:
    async def go():
        try:
            got = await downloader.hold(source, deadline=time.time() + 30)
        except ApiError as exc:
            return exc
        got.lora.close()
        raise AssertionError(f"{source} was held")

    return asyncio.run(go())


def cached_bytes(src: LoraSources, source: str) -> bytes:
    return src.cache.path(src.pin(src.resolve(source)).key).read_bytes()


# ---- the policy, as the ingress applies it -----------------------------------------------------


@pytest.mark.parametrize(
    "path, code, reason",
    [
        ("s3://other-bucket/a.safetensors", "LORA_SOURCE_FORBIDDEN", "not in loras.allowed_buckets"),
        ("s3://Flux-Loras/a.safetensors", "LORA_SOURCE_FORBIDDEN", "not in loras.allowed_buckets"),  # as spelled
        ("s3://flux-loras./a.safetensors", "LORA_SOURCE_FORBIDDEN", "not in loras.allowed_buckets"),
        ("s3://flux-loras", "LORA_SOURCE_FORBIDDEN", "expected s3://bucket/"),
        ("s3://flux-loras/", "LORA_SOURCE_FORBIDDEN", "expected s3://bucket/"),
        ("s3:///flux-loras/a.safetensors", "LORA_SOURCE_FORBIDDEN", "expected s3://bucket/"),
        ("s3://flux-loras/a/../b.safetensors", "LORA_SOURCE_FORBIDDEN", "'..' component"),
        ("s3://flux-loras/a//b.safetensors", "LORA_SOURCE_FORBIDDEN", "empty"),
        ("s3://flux-loras/a.safetensors?versionId=1", "LORA_SOURCE_FORBIDDEN", "'?'"),
        ("s3://flux-loras/a.safetensors?X-Amz-Signature=s3cr3t", "LORA_SOURCE_FORBIDDEN", "X-Amz-Signature=***"),
        ("s3://flux-loras/a#b.safetensors", "LORA_SOURCE_FORBIDDEN", "'#'"),
        ("s3://flux-loras/" + "k" * 1100 + ".safetensors", "LORA_SOURCE_FORBIDDEN", "longer than S3 allows"),
        ("s3://flux-loras/a.bin", "LORA_INVALID", "only .safetensors"),
    ],
)
def test_the_ingress_refuses_buckets_and_keys_outside_the_policy(tmp_path, path, code, reason):
    src = make(tmp_path, allowed_buckets=[BUCKET])
    err = raises(code, src.canonical, path)
    assert reason in err.message, err.message


def test_s3_sources_are_off_until_buckets_are_listed(tmp_path):
    err = raises("LORA_SOURCE_FORBIDDEN", make(tmp_path).canonical, "s3://flux-loras/a.safetensors")
    assert "loras.allowed_buckets is empty" in err.message


def test_canonical_spelling_and_no_network_at_the_ingress(tmp_path):
    src = make(tmp_path, allowed_buckets=[BUCKET], s3_options={"endpoint_url": "http://127.0.0.1:9"})
    assert src.canonical("S3://flux-loras/dir/My LoRA (v2).safetensors") == "s3://flux-loras/dir/My LoRA (v2).safetensors"
    assert src.s3._fs is None  # checking a source made no client, let alone a request


@pytest.mark.parametrize("name", ["Flux-Loras", "ab", "a" * 64, "-flux", "flux-", "flux..loras", "192.168.5.4", "flux_loras"])
def test_allowed_buckets_must_be_bucket_names(name):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate({"loras": {"allowed_buckets": [name]}})
    assert "allowed_buckets" in str(info.value) and "not an S3 bucket name" in str(info.value)


def test_valid_bucket_names_are_taken_as_spelled():
    names = ["flux-loras", "my.bucket.example", "abc", "a" * 63, "123"]
    assert AppArgs.model_validate({"loras": {"allowed_buckets": names}}).loras.allowed_buckets == names


# ---- the replica's way to a file: pin, cache, one GET -------------------------------------------


def test_a_lora_in_an_allowed_bucket_is_fetched_once_then_served_from_the_cache(tmp_path, store, monkeypatch):
    server, fs = store
    body = safetensors_bytes(tmp_path, 3)
    source = put(fs, BUCKET, body)
    src = sources(tmp_path, server)
    gets = GetCounter(src, monkeypatch)
    downloader = Downloader(src)
    try:
        first, tensor = hold(downloader, source)
        again, _ = hold(downloader, source)
    finally:
        downloader.close()
    assert first.remote and first.bytes_downloaded == len(body) and torch.equal(tensor, torch.full((3, 3), 3.0))
    assert cached_bytes(src, source) == body
    assert again.bytes_downloaded == 0 and gets.count == 1  # the second hold asked for the version only (HEAD)


@pytest.mark.parametrize("bucket", [BUCKET, VERSIONED])
def test_an_overwritten_object_is_fetched_again(tmp_path, store, monkeypatch, bucket):
    server, fs = store
    source = put(fs, bucket, safetensors_bytes(tmp_path, 2))
    src = sources(tmp_path, server)
    gets = GetCounter(src, monkeypatch)
    downloader = Downloader(src)
    try:
        _, before = hold(downloader, source)
        newer = safetensors_bytes(tmp_path, 4)
        fs.pipe_file(source.removeprefix("s3://"), newer)  # a new ETag (and VersionId in a versioned bucket)
        got, after = hold(downloader, source)
        _, still = hold(downloader, source)
    finally:
        downloader.close()
    assert torch.equal(before, torch.full((2, 2), 2.0)) and torch.equal(after, torch.full((4, 4), 4.0))
    assert got.bytes_downloaded == len(newer) and torch.equal(still, after) and gets.count == 2
    assert cached_bytes(src, source) == newer


def test_the_prompts_of_a_request_share_one_version_lookup_and_one_download(tmp_path, store, monkeypatch):
    server, fs = store
    body = safetensors_bytes(tmp_path)
    source = put(fs, BUCKET, body)
    src = sources(tmp_path, server)
    gets = GetCounter(src, monkeypatch)
    pins = 0
    real_pin = src.pin

    def counted_pin(ref, *args, **kwargs):
        nonlocal pins
        if not ref.pinned:  # fetch passes its pinned ref through pin too: that asks the store nothing
            pins += 1
            time.sleep(0.1)  # long enough for every prompt to ask while it runs
        return real_pin(ref, *args, **kwargs)

    monkeypatch.setattr(src, "pin", counted_pin)
    downloader = Downloader(src)

    async def scenario():
        held = await asyncio.gather(*(downloader.hold(source) for _ in range(6)))
        for got in held:
            got.lora.close()
        return held

    try:
        held = asyncio.run(scenario())
    finally:
        downloader.close()
    assert pins == 1 and gets.count == 1
    assert sorted(got.bytes_downloaded for got in held) == [0] * 5 + [len(body)]


def test_a_missing_key_is_not_found_and_remembered(tmp_path, store, monkeypatch):
    server, _ = store
    src = sources(tmp_path, server)
    downloader = Downloader(src)
    source = f"s3://{BUCKET}/loras/missing-{uuid.uuid4().hex[:8]}.safetensors"
    try:
        err = failure(downloader, source)
        monkeypatch.setattr(src.s3, "version", lambda *a: pytest.fail("a remembered failure asked the store again"))
        again = failure(downloader, source)
    finally:
        downloader.close()
    assert err.code == "LORA_NOT_FOUND" and "not found in its bucket" in err.message and source in err.message
    assert (again.code, again.message) == (err.code, err.message)


def test_a_key_that_is_a_folder_is_not_found(tmp_path, store):
    server, fs = store
    folder = f"loras/{uuid.uuid4().hex[:8]}.safetensors"
    fs.pipe_file(f"{BUCKET}/{folder}/inside.safetensors", b"x")
    src = sources(tmp_path, server)
    err = raises("LORA_NOT_FOUND", src.fetch, src.resolve(f"s3://{BUCKET}/{folder}"))
    assert "not found in its bucket" in err.message


def test_an_object_over_max_file_bytes_fails_like_an_oversized_url(tmp_path, store, monkeypatch):
    server, fs = store
    source = put(fs, BUCKET, b"x" * (MAX_FILE + 1))
    src = sources(tmp_path, server)
    err = raises("LORA_DOWNLOAD_FAILED", src.fetch, src.resolve(source))
    assert f"larger than {MAX_FILE} bytes" in err.message and err.details == {"url": source, "reason": err.details["reason"]}
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nothing partial kept


def test_a_file_that_is_not_safetensors_is_invalid(tmp_path, store):
    server, fs = store
    source = put(fs, BUCKET, b"\x93" * 200)
    src = sources(tmp_path, server)
    err = raises("LORA_INVALID", src.fetch, src.resolve(source))
    assert source in err.message


def test_an_object_overwritten_between_its_head_and_its_get_is_never_cached_as_the_old_version(tmp_path, store):
    server, fs = store
    source = put(fs, BUCKET, safetensors_bytes(tmp_path, 2))
    src = sources(tmp_path, server)
    pinned = src.pin(src.resolve(source))
    fs.pipe_file(source.removeprefix("s3://"), safetensors_bytes(tmp_path, 3))
    err = raises("LORA_DOWNLOAD_FAILED", src.fetch, pinned)
    assert "changed while it was fetched" in err.message
    fresh = src.pin(src.resolve(source))
    assert fresh.key != pinned.key and src.fetch(fresh).bytes_downloaded > 0


def silent_port() -> tuple[socket.socket, int]:
    """A port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_store_that_is_down_fails_within_the_deadline(tmp_path, kind):
    listener, port = silent_port() if kind == "silent" else (None, closed_port())
    endpoint = f"http://127.0.0.1:{port}"
    src = make(tmp_path, allowed_buckets=[BUCKET], s3_options={
        "key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}})
    downloader = Downloader(src)
    source = f"s3://{BUCKET}/a.safetensors"
    try:
        start = time.monotonic()
        err = failure(downloader, source)
        seconds = time.monotonic() - start
    finally:
        downloader.close()
        if listener is not None:
            listener.close()
    assert err.code == "LORA_DOWNLOAD_FAILED", err
    # A silent store times out each attempt, or (on a busy machine) the whole download's deadline first.
    reason = "cannot connect to the store" if kind == "refused" else "timed out"
    assert reason in err.message, err.message
    assert seconds < src.fetcher.budget_s + 1.0, seconds  # the deadline of one download, retries included
    assert endpoint not in err.message and str(port) not in err.message + repr(err.details)


def test_messages_never_show_credentials_the_endpoint_or_other_keys(tmp_path, store, monkeypatch):
    server, fs = store
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret-value")
    src = sources(tmp_path, server, cache_max_bytes=10 * MAX_FILE)
    downloader = Downloader(src)
    cases = [
        f"s3://{BUCKET}/private/missing.safetensors",  # beside an object it must not reveal
        put(fs, BUCKET, b"x" * (MAX_FILE + 1)),
        put(fs, BUCKET, b"\x93" * 100),
        f"s3://{BUCKET}/private",
        "s3://not-allowed/private/unlisted-neighbour.safetensors",
    ]
    try:
        errors = [failure(downloader, source) for source in cases]
    finally:
        downloader.close()
    assert [err.code for err in errors] == ["LORA_NOT_FOUND", "LORA_DOWNLOAD_FAILED", "LORA_INVALID", "LORA_INVALID",
                                            "LORA_SOURCE_FORBIDDEN"]
    host = server.endpoint.removeprefix("http://")
    for source, err in zip(cases, errors):
        text = err.message + repr(err.details)
        assert source in text  # the source as the client sent it, and nothing of the store's
        hidden = [KEY_ID, SECRET, "AKIAENVIRONMENTKEY", "environment-secret-value", host, "unlisted-neighbour"]
        assert not [word for word in hidden if word in text.replace(source, "")], text


def test_an_endpoint_in_the_options_and_credentials_from_the_environment(tmp_path, store, monkeypatch):
    server, fs = store
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret-value")
    body = safetensors_bytes(tmp_path)
    source = put(fs, BUCKET, body)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    src = sources(tmp_path, server, s3_options={"endpoint_url": server.endpoint})  # as docs/loras.md shows it
    assert src.fetch(src.resolve(source)).bytes_downloaded == len(body)


def test_downloads_of_several_threads_share_one_client(tmp_path, store):
    server, fs = store
    bodies = {put(fs, BUCKET, safetensors_bytes(tmp_path, n)): n for n in (2, 3, 4, 5)}
    src = sources(tmp_path, server)
    results: dict[str, int] = {}

    def fetch(source: str) -> None:
        results[source] = src.fetch(src.resolve(source)).bytes_downloaded

    threads = [threading.Thread(target=fetch, args=(source,)) for source in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(results[source] > 0 for source in bodies) and len(results) == 4
