"""Webhooks without Ray: the URL policy, the signature, and deliveries to real local receivers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import time

import pytest
from pydantic import ValidationError

from serve_app import errors
from serve_app.config import WebhookArgs
from serve_app.errors import ApiError
from serve_app.jobs.webhooks import (
    SIGNATURE_HEADER,
    WebhookPolicy,
    WebhookSender,
    load_secret,
    sign,
    verify,
    write_secret_file,
)
from serve_app.schemas import InferenceRequest, WebhookStatus
from tests.support.receiver import Receiver

SECRET = "test-secret-é"  # non-ASCII on purpose: the key is the secret's text in UTF-8
LOCAL = WebhookArgs(allowed_hosts=["127.0.0.1"], allow_private_addresses=True, backoff_s=0.1, timeout_s=1.0,
                    max_attempts=4)


# ---- signature and secret ----------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_and_verifies():
    body = b'{"request_id": "x", "status": "succeeded"}'
    expected = hmac.new(SECRET.encode("utf-8"), b"1700000000." + body, hashlib.sha256).hexdigest()
    header = sign(SECRET, body, 1700000000)
    assert header == f"t=1700000000,sha256={expected}"
    assert verify(SECRET, header, body, now=1700000010)
    assert not verify(SECRET, header, body + b" ", now=1700000010)  # another body
    assert not verify("another secret", header, body, now=1700000010)
    assert not verify(SECRET, header, body, now=1700000000 + 3600)  # too old: a replay


def test_the_secret_comes_from_the_environment_else_the_file_and_is_generated_once(tmp_path, monkeypatch):
    path = tmp_path / "flux" / "webhook_secret"
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    with pytest.raises(RuntimeError, match="no signing secret"):
        load_secret(args)
    assert write_secret_file(str(path)) and not write_secret_file(str(path))  # never overwritten
    generated = load_secret(args)
    assert len(generated) == 64 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv("FLUX_TEST_WEBHOOK_SECRET", "from the environment")
    assert load_secret(args) == "from the environment"
    assert load_secret(WebhookArgs()) is None  # webhooks off: no secret needed


def test_the_generated_secret_file_is_the_secret_alone_and_signs_as_its_exact_text(tmp_path, monkeypatch):
    """What `make serve` writes (app.py's _generate_webhook_secret calls write_secret_file) has no
    trailing newline, so a receiver keying its HMAC with the file's raw bytes verifies the server's
    signature; the server signs with exactly that text."""
    path = tmp_path / "webhook_secret"
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    assert write_secret_file(str(path))
    raw = path.read_bytes()
    assert raw == raw.strip() and not raw.endswith(b"\n") and len(raw) == 64
    text = raw.decode("utf-8")
    secret = load_secret(args)
    assert secret == text
    body = b'{"request_id": "x", "status": "succeeded"}'
    header = sign(secret, body, 1700000000)
    assert verify(text, header, body, now=1700000000)
    expected = hmac.new(raw, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,sha256={expected}"


@pytest.mark.parametrize("written", ["s3cret\n", "  s3cret\r\n", "\ts3cret \n\n"])
def test_a_secret_file_or_variable_is_read_with_surrounding_whitespace_stripped(tmp_path, monkeypatch, written):
    """The one rule for a hand-written secret: `echo s3cret > file` and an editor's final newline sign as
    `s3cret`, from the file and from the environment alike."""
    path = tmp_path / "webhook_secret"
    path.write_text(written)
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    assert load_secret(args) == "s3cret"
    monkeypatch.setenv("FLUX_TEST_WEBHOOK_SECRET", written)
    assert load_secret(args) == "s3cret"


# ---- the URL policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http://", "not a url", "http://user:pw@127.0.0.1/x",
                                 "http://127.0.0.1:99999/x", "http://[::1/x"])
def test_a_malformed_webhook_url_is_a_validation_error(url):
    with pytest.raises(ValidationError):
        InferenceRequest(model="flux", prompts=[{"prompt": "x"}], webhook_url=url)


@pytest.mark.parametrize("allowed,private,url,ok", [
    (["127.0.0.1"], True, "http://127.0.0.1:8080/hook", True),
    (["127.0.0.1:8080"], True, "http://127.0.0.1:8080/hook", True),
    (["127.0.0.1:8080"], True, "http://127.0.0.1:8081/hook", False),  # another port
    (["127.0.0.1"], True, "http://2130706433/hook", False),  # another spelling of it
    (["127.0.0.1"], True, "http://localhost/hook", False),
    (["127.0.0.1"], False, "http://127.0.0.1/hook", False),  # loopback needs allow_private_addresses
    (["example.com"], True, "https://evil.com/hook", False),
    ([], True, "http://127.0.0.1/hook", False),  # webhooks off
])
def test_the_policy_allows_hosts_only_as_spelled_and_private_addresses_only_when_allowed(allowed, private, url, ok):
    policy = WebhookPolicy(WebhookArgs(allowed_hosts=allowed, allow_private_addresses=private))
    if ok:
        assert policy.check(url).addresses == ("127.0.0.1",)
    else:
        with pytest.raises(ApiError) as refused:
            policy.check(url)
        assert refused.value.code == errors.WEBHOOK_FORBIDDEN and refused.value.status_code == 400


def test_refusals_name_the_webhooks_settings_not_the_loras():
    policy = WebhookPolicy(WebhookArgs(allowed_hosts=["127.0.0.1", "example.com"]))
    for url, setting in (("http://127.0.0.1/hook", "webhooks.allow_private_addresses"),
                         ("http://evil.com/hook", "webhooks.allowed_hosts")):
        with pytest.raises(ApiError) as refused:
            policy.check(url)
        assert setting in refused.value.message and "loras." not in refused.value.message


# ---- delivery ---------------------------------------------------------------------------------------


def deliver(receiver: Receiver, body: bytes, args: WebhookArgs = LOCAL) -> tuple[WebhookStatus, list]:
    seen: list[WebhookStatus] = []

    async def on_attempt(state):
        seen.append(state)

    sender = WebhookSender(args, SECRET)
    state = WebhookStatus(delivered=False, attempts=0)
    return asyncio.run(sender.deliver(receiver.url, body, state, on_attempt)), seen


def test_a_receiver_that_answers_500_twice_gets_the_signed_body_on_the_third_attempt():
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver(statuses=(500, 503)) as receiver:
        final, seen = deliver(receiver, body)
    assert final == WebhookStatus(delivered=True, attempts=3, last_error=None)
    assert [s.last_error for s in seen] == ["HTTP 500", "HTTP 503", None]
    assert [d.body for d in receiver.deliveries] == [body] * 3
    for delivery in receiver.deliveries:
        assert delivery.path == "/hooks/flux" and delivery.headers["Content-Type"] == "application/json"
        assert verify(SECRET, delivery.headers[SIGNATURE_HEADER], delivery.body)
    gaps = [b.at - a.at for a, b in zip(receiver.deliveries, receiver.deliveries[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # backoff, doubling


def test_redirects_are_not_followed():
    with Receiver(redirect_to="/elsewhere") as receiver:
        final, _ = deliver(receiver, b"{}", LOCAL.model_copy(update={"max_attempts": 2}))
    assert not final.delivered and final.attempts == 2
    assert "redirects are not followed" in final.last_error
    assert {d.path for d in receiver.deliveries} == {"/hooks/flux"}


def test_a_hung_receiver_costs_an_attempt_its_timeout_and_no_more():
    args = LOCAL.model_copy(update={"max_attempts": 2, "timeout_s": 0.5})
    started = time.monotonic()
    with Receiver(hang=True) as receiver:
        final, _ = deliver(receiver, b"{}", args)
    assert time.monotonic() - started < 3
    assert (final.delivered, final.attempts, final.last_error) == (False, 2, "no answer within 0.5 s")


def test_a_closed_port_is_retried_and_reported():
    with Receiver() as receiver:
        url = receiver.url
    sender = WebhookSender(LOCAL.model_copy(update={"max_attempts": 2}), SECRET)

    async def nothing(state):
        pass

    final = asyncio.run(sender.deliver(url, b"{}", WebhookStatus(delivered=False, attempts=0), nothing))
    assert (final.delivered, final.attempts, final.last_error) == (False, 2, "cannot connect")
