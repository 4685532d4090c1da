"""Webhooks without Ray: the URL policy, the signature, and deliveries to real local receivers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from serve_app import errors
from serve_app.config import WebhookArgs
from serve_app.errors import ApiError
from serve_app.jobs.webhooks import (
    SIGNATURE_HEADER,
    WebhookPolicy,
    WebhookSender,
    load_secret,
    message_id,
    sign,
    sign_standard,
    standard_key,
    verify,
    write_secret_file,
)
from serve_app.schemas import InferenceRequest, WebhookStatus
from tests.support.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"flux-serve webhook tests' key 32").decode()  # the documented form
TEXT_KEY = "test-secret-é"  # non-ASCII on purpose: the X-Flux-Signature key is the secret's text in UTF-8
MSG_ID = message_id("abc")
ROOT = Path(__file__).resolve().parents[3]
LOCAL = WebhookArgs(allowed_hosts=["127.0.0.1"], allow_private_addresses=True, backoff_s=0.1, timeout_s=1.0,
                    max_attempts=4)


# ---- signature and secret ----------------------------------------------------------------------------


def datetime_of(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_and_verifies():
    body = b'{"request_id": "x", "status": "succeeded"}'
    expected = hmac.new(TEXT_KEY.encode("utf-8"), b"1700000000." + body, hashlib.sha256).hexdigest()
    header = sign(TEXT_KEY, body, 1700000000)
    assert header == f"t=1700000000,sha256={expected}"
    assert verify(TEXT_KEY, header, body, now=1700000010)
    assert not verify(TEXT_KEY, header, body + b" ", now=1700000010)  # another body
    assert not verify("another secret", header, body, now=1700000010)
    assert not verify(TEXT_KEY, header, body, now=1700000000 + 3600)  # too old: a replay


def test_the_standard_signature_is_what_the_standardwebhooks_package_signs():
    body = b'{"request_id": "abc", "status": "succeeded"}'
    expected = standardwebhooks.Webhook(SECRET).sign(MSG_ID, datetime_of(1700000000), body)
    assert sign_standard(standard_key(SECRET), MSG_ID, 1700000000, body) == expected
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(raw, f"{MSG_ID}.1700000000.".encode() + body, hashlib.sha256).digest()
    assert expected == "v1," + base64.b64encode(digest).decode()  # the signed content, by hand


@given(st.one_of(st.text(max_size=40), st.text("0123456789abcdef", max_size=70),
                 st.from_regex(r"(whsec_)?[A-Za-z0-9+/=_ -]{0,40}", fullmatch=True)))
def test_the_standard_key_of_any_text_is_the_packages(text):
    """One rule with the reference: a secret the package takes gives its key, one it refuses is refused."""
    body = b"{}"
    try:
        expected = standardwebhooks.Webhook(text).sign("msg_x", datetime_of(1700000000), body)
    except Exception:  # binascii.Error, ValueError (not ASCII), EmptyWebhookSecretError
        with pytest.raises(ValueError, match="whsec_"):
            standard_key(text)
        return
    assert sign_standard(standard_key(text), "msg_x", 1700000000, body) == expected


def test_the_secret_comes_from_the_environment_else_the_file_and_is_generated_once(tmp_path, monkeypatch):
    path = tmp_path / "flux" / "webhook_secret"
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    with pytest.raises(RuntimeError, match="no signing secret"):
        load_secret(args)
    assert write_secret_file(str(path)) and not write_secret_file(str(path))  # never overwritten
    generated = load_secret(args)
    assert generated.startswith("whsec_") and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv("FLUX_TEST_WEBHOOK_SECRET", "from the environment")
    assert load_secret(args) == "from the environment"
    assert load_secret(WebhookArgs()) is None  # webhooks off: no secret needed


def test_the_generated_secret_file_is_the_secret_alone_and_signs_as_its_exact_text(tmp_path, monkeypatch):
    """What `make serve` writes (app.py's _generate_webhook_secret calls write_secret_file) is `whsec_` +
    base64 with no trailing newline: the file's exact text is the secret `standardwebhooks.Webhook`
    takes, and a receiver keying its HMAC with the file's raw bytes verifies X-Flux-Signature as before."""
    path = tmp_path / "webhook_secret"
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    assert write_secret_file(str(path))
    raw = path.read_bytes()
    assert raw == raw.strip() and not raw.endswith(b"\n")
    assert re.fullmatch(rb"whsec_[A-Za-z0-9+/]{43}=", raw)  # base64 of 32 bytes
    text = raw.decode("utf-8")
    assert len(base64.b64decode(text.removeprefix("whsec_"), validate=True)) == 32
    secret = load_secret(args)
    assert secret == text
    body = b'{"request_id": "x", "status": "succeeded"}'
    header = sign(secret, body, 1700000000)
    assert verify(text, header, body, now=1700000000)
    expected = hmac.new(raw, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,sha256={expected}"
    now = int(time.time())
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(now),
               "webhook-signature": sign_standard(standard_key(secret), MSG_ID, now, body)}
    assert standardwebhooks.Webhook(text).verify(body, headers) == {"request_id": "x", "status": "succeeded"}


@pytest.mark.parametrize("bad", ["a", "whsec_", "whsec_a", "!!!!", "sécret", "whsec_abcde"])
def test_a_secret_that_does_not_decode_is_refused_at_start_naming_the_form(tmp_path, monkeypatch, bad):
    """FluxJobs' start calls load_secret: a secret the Standard Webhooks key cannot come from fails it."""
    path = tmp_path / "webhook_secret"
    path.write_text(bad)
    args = WebhookArgs(allowed_hosts=["127.0.0.1"], secret_env="FLUX_TEST_WEBHOOK_SECRET", secret_file=str(path))
    monkeypatch.delenv("FLUX_TEST_WEBHOOK_SECRET", raising=False)
    with pytest.raises(RuntimeError, match=f"{re.escape(str(path))} does not decode.*expected `whsec_` followed by"):
        load_secret(args)
    monkeypatch.setenv("FLUX_TEST_WEBHOOK_SECRET", bad)
    with pytest.raises(RuntimeError, match=r"\$FLUX_TEST_WEBHOOK_SECRET does not decode.*`whsec_` followed by base64"):
        load_secret(args)
    with pytest.raises(ValueError, match="whsec_"):
        WebhookSender(LOCAL, bad)
    with pytest.raises(Exception):  # noqa: B017 (the package's own: binascii.Error, ValueError, empty secret)
        standardwebhooks.Webhook(bad)


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


def deliver(receiver: Receiver, body: bytes, args: WebhookArgs = LOCAL, secret: str = SECRET,
            msg_id: str = MSG_ID) -> tuple[WebhookStatus, list]:
    seen: list[WebhookStatus] = []

    async def on_attempt(state):
        seen.append(state)

    sender = WebhookSender(args, secret)
    state = WebhookStatus(delivered=False, attempts=0)
    return asyncio.run(sender.deliver(receiver.url, body, state, on_attempt, msg_id)), seen


def assert_both_signatures_verify(secret: str, delivery) -> None:
    """X-Flux-Signature with the server's own `verify`; the Standard Webhooks headers with the reference package."""
    assert verify(secret, delivery.headers[SIGNATURE_HEADER], delivery.body)
    assert standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers, json_parse=False) is None


def test_a_receiver_that_answers_500_twice_gets_the_signed_body_on_the_third_attempt():
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver(statuses=(500, 503)) as receiver:
        final, seen = deliver(receiver, body)
    assert final == WebhookStatus(delivered=True, attempts=3, last_error=None)
    assert [s.last_error for s in seen] == ["HTTP 500", "HTTP 503", None]
    assert [d.body for d in receiver.deliveries] == [body] * 3
    for delivery in receiver.deliveries:
        assert delivery.path == "/hooks/flux" and delivery.headers["Content-Type"] == "application/json"
        assert_both_signatures_verify(SECRET, delivery)
        assert 0 <= delivery.at - int(delivery.headers["webhook-timestamp"]) < 10  # made as it was sent
        assert delivery.headers[SIGNATURE_HEADER].startswith(f"t={delivery.headers['webhook-timestamp']},")
        assert delivery.headers["webhook-signature"].startswith("v1,")
    assert [d.headers["webhook-id"] for d in receiver.deliveries] == ["msg_abc"] * 3  # one message, retried
    gaps = [b.at - a.at for a, b in zip(receiver.deliveries, receiver.deliveries[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # backoff, doubling


def test_each_attempt_is_signed_at_its_own_time_and_the_id_stays(monkeypatch):
    """A clock a minute further on at each attempt: every attempt's webhook-timestamp (and X-Flux-Signature's
    t) is its own, every one verifies, and the webhook-id is the delivery's."""
    from serve_app.jobs import webhooks

    start, calls = int(time.time()) - 120, []

    def clock() -> float:
        calls.append(None)
        return start + 60 * (len(calls) - 1)

    monkeypatch.setattr(webhooks, "time", SimpleNamespace(time=clock, monotonic=time.monotonic))
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver(statuses=(500, 500)) as receiver:
        final, _ = deliver(receiver, body)
    assert final.delivered and len(receiver.deliveries) == 3
    stamps = [delivery.headers["webhook-timestamp"] for delivery in receiver.deliveries]
    assert stamps == [str(start), str(start + 60), str(start + 120)]
    for delivery, stamp in zip(receiver.deliveries, stamps):
        assert delivery.headers[SIGNATURE_HEADER].startswith(f"t={stamp},")
        assert delivery.headers["webhook-id"] == MSG_ID
        assert_both_signatures_verify(SECRET, delivery)


def test_a_delivery_that_does_not_verify_is_refused_by_the_package():
    """The reference verifier checks what it should: another secret, body or id fails."""
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver() as receiver:
        deliver(receiver, body)
    delivery = receiver.deliveries[0]
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    for secret, data, headers in ((other, body, delivery.headers), (SECRET, body + b" ", delivery.headers),
                                  (SECRET, body, {**delivery.headers, "webhook-id": "msg_other"})):
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(secret).verify(data, headers)


def test_a_legacy_64_hex_secret_still_signs_both_ways():
    """A secret file of earlier versions (64 hex digits): hex digits are base64, so the package takes
    the same text, and X-Flux-Signature keeps its text key."""
    legacy = secrets.token_hex(32)
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver(statuses=(500,)) as receiver:
        final, _ = deliver(receiver, body, secret=legacy)
    assert final.delivered and len(receiver.deliveries) == 2
    for delivery in receiver.deliveries:
        assert_both_signatures_verify(legacy, delivery)


def test_the_docs_standardwebhooks_receiver_verifies_a_delivery():
    """docs/jobs.md's ```python receiver, run as printed with the secret it reads replaced."""
    page = (ROOT / "docs" / "jobs.md").read_text()
    section = page.split("### Verifying a delivery", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)\n```", section.split("\n## ", 1)[0], re.DOTALL)
    body = b'{"request_id": "abc", "status": "succeeded"}'
    with Receiver() as receiver:
        deliver(receiver, body)
    delivery = receiver.deliveries[0]
    namespace: dict = {}
    exec(compile(code.replace('open(".flux-serve/webhook_secret").read()', repr(SECRET)), "docs/jobs.md", "exec"),
         namespace)
    assert namespace["receive"](delivery.body, delivery.headers) == (204, {"request_id": "abc", "status": "succeeded"})
    assert namespace["receive"](body + b" ", delivery.headers) == (400, None)


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

    final = asyncio.run(sender.deliver(url, b"{}", WebhookStatus(delivered=False, attempts=0), nothing, MSG_ID))
    assert (final.delivered, final.attempts, final.last_error) == (False, 2, "cannot connect")
