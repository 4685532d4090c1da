"""Downloads from hosts that misbehave: redirects to other hosts, ports and loops, bytes that drip,
answers that lie about their encoding or framing. Real servers on 127.0.0.1, no mocks.

Every failure must come back as a coded 4xx whose message names the source and a reason in our
words, and says nothing of a redirect target (its address, port, status or first bytes).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time

import httpcore
import pytest

from serve_app.net.fetch import PinnedBackend
from tests.unit.lora_host import LoraHost, drip, raw, redirect
from tests.unit.loras.test_sources import TIMEOUT_S, fetch, make, raises, safetensors_bytes

SECRET = b"INTERNAL-ADMIN-PAGE-42"


@pytest.fixture
def hosts():
    """The allowed LoRA host, and an internal service on another port that nobody allowed."""
    allowed, internal = LoraHost(), LoraHost()
    internal.fallback = lambda h: h.send(200, SECRET + b" " * 100)
    yield allowed, internal
    allowed.close()
    internal.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_reveals_nothing(message: str, *secrets: object) -> None:
    # A number only counts as revealed standing alone: the allowed host's own random port may hold "503".
    for secret in (SECRET.decode(), "Traceback", *map(str, secrets)):
        assert not re.search(rf"(?<![0-9]){re.escape(secret)}(?![0-9])", message), (secret, message)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{internal}/admin",  # another port of an allowed address
        "http://localhost:{allowed}/x",  # other spellings of the allowed address and port
        "http://2130706433:{allowed}/x",
        "http://127.0.0.1.:{allowed}/x",
        "http://[::1]:{allowed}/x",
        "http://169.254.169.254/latest/meta-data/",  # a cloud metadata address
        "file:///etc/passwd",
        "ftp://127.0.0.1:{allowed}/x",
    ],
)
def test_a_redirect_outside_the_policy_is_refused_before_any_connection(tmp_path, hosts, target):
    allowed, internal = hosts
    src = make(tmp_path, allowed_hosts=[f"127.0.0.1:{allowed.port}"])
    location = target.format(internal=internal.port, allowed=allowed.port)
    url = allowed.route("/lora.safetensors", redirect(location))
    err = raises("LORA_SOURCE_FORBIDDEN", fetch, src, url)
    assert url in err.message and "redirect" in err.message
    assert_reveals_nothing(err.message + str(err.details), internal.port, "169.254")
    assert sum(internal.counts.values()) == 0 and allowed.counts["/lora.safetensors"] == 1


def test_a_redirect_target_that_is_allowed_reveals_nothing_of_its_answer(tmp_path, hosts):
    allowed, internal = hosts
    internal.route("/fail", lambda h: h.send(503, SECRET, "text/plain"))
    src = make(tmp_path, allowed_hosts=[f"127.0.0.1:{allowed.port}", f"127.0.0.1:{internal.port}"])
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, allowed.route("/a", redirect(f"{internal.base}/fail")))
    assert_reveals_nothing(err.message + str(err.details), "503", internal.port)
    assert internal.counts["/fail"] == 2  # a 5xx is retried, through the whole redirect chain


def test_whether_a_redirect_targets_port_is_open_does_not_show(tmp_path, hosts):
    allowed, internal = hosts
    closed = free_port()
    src = make(
        tmp_path, allowed_hosts=[f"127.0.0.1:{allowed.port}", f"127.0.0.1:{internal.port}", f"127.0.0.1:{closed}"]
    )
    answers = []
    for port, path in ((closed, "/closed"), (internal.port, "/missing")):
        internal.route("/missing", lambda h: h.send(404, SECRET))
        err = raises(
            "LORA_DOWNLOAD_FAILED", fetch, src, allowed.route(path, redirect(f"http://127.0.0.1:{port}/missing"))
        )
        assert_reveals_nothing(err.message, port, "refused", "404")
        answers.append(err.message.replace(path, ""))
    assert "refused" not in answers[0]


def test_redirect_loops_and_chains_end_as_a_coded_failure(tmp_path, hosts):
    allowed, _ = hosts
    src = make(tmp_path, allowed_hosts=[f"127.0.0.1:{allowed.port}"])
    allowed.route("/loop-a", redirect("/loop-b"))
    allowed.route("/loop-b", redirect("/loop-a"))
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, f"{allowed.base}/loop-a")
    assert "redirected more than" in err.message
    assert allowed.counts["/loop-a"] + allowed.counts["/loop-b"] == 6  # not retried: a loop stays a loop
    raises("LORA_DOWNLOAD_FAILED", fetch, src, allowed.route("/empty-location", lambda h: h.send(302, b"")))


def test_a_dripping_host_is_cut_off_at_the_download_deadline(tmp_path, hosts):
    allowed, _ = hosts
    src = make(tmp_path)  # 0.5 s per read, 2 attempts: the whole download may take about 2.2 s
    body = safetensors_bytes(tmp_path) + b"\0" * 400
    url = allowed.route("/drip.safetensors", drip(body, every_s=TIMEOUT_S / 5))  # ~50 s at this pace
    start = time.monotonic()
    err = raises("LORA_DOWNLOAD_FAILED", fetch, src, url)
    elapsed = time.monotonic() - start
    assert "timed out" in err.message
    assert src.fetcher.budget_s - 0.1 <= elapsed < src.fetcher.budget_s + 1.0, elapsed
    assert allowed.counts["/drip.safetensors"] == 1  # the deadline covers retries: none was left


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\nnot gzip!!",  # lies about encoding
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\n\x00\x01\x02\x03",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",  # broken chunk size
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nshort",  # ends before its length
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Length: 99\r\n\r\n",  # two lengths
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 999 Weird\r\nContent-Length: 0\r\n\r\n",
        b"",
    ],
)
def test_broken_answers_are_coded_failures(tmp_path, hosts, answer):
    allowed, _ = hosts
    src = make(tmp_path)
    err = raises({"LORA_DOWNLOAD_FAILED", "LORA_INVALID"}, fetch, src, allowed.route("/broken", raw(answer)))
    assert_reveals_nothing(err.message, "gzip", "chunk", "h11", "Errno")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/a b c.safetensors",
        "http://127.0.0.1:{port}/é.safetensors",
        "http://127.0.0.1:{port}/x?q=\u2603",
        "http://127.0.0.1:{port}/%zz",
        "http://127.0.0.1:{port}/x\r\nX: y",
        "http://127.0.0.1:{port}/x\tx",
        "http://127.0.0.1:{port}" + "/a" * 5000,
        "http://127.0.0.1:{port}:{port}/",
        "http://[127.0.0.1]:{port}/",
        "http://127.0.0.1:{port}#frag",
        "HTTP://127.0.0.1:{port}/X",
    ],
)
def test_a_url_the_policy_accepts_can_always_be_sent(tmp_path, hosts, url):
    """Whatever the URL: a download (here a 404) or a coded refusal, never an unexpected exception."""
    allowed, _ = hosts
    src = make(tmp_path)
    raises({"LORA_DOWNLOAD_FAILED", "LORA_SOURCE_FORBIDDEN"}, fetch, src, url.format(port=allowed.port))


@pytest.mark.slow  # a subprocess of its own
def test_the_connection_goes_to_the_checked_address_whatever_the_name(hosts):
    """A pinned connection never asks DNS again: a name that resolves nowhere still reaches the checked
    address, and the request carries the name as its Host."""
    allowed, _ = hosts
    allowed.route("/pinned", lambda h: h.send(200, b"ok"))
    backend = PinnedBackend(("127.0.0.1",), time.monotonic() + 5)
    with httpcore.ConnectionPool(network_backend=backend) as pool:
        answer = pool.request("GET", f"http://lora.invalid:{allowed.port}/pinned")
    assert answer.status == 200 and answer.content == b"ok"
    assert allowed.headers["/pinned"]["host"] == f"lora.invalid:{allowed.port}"


# ---- https: verified against the name, connected to the checked address --------------------------


def self_signed(tmp_path, name: str) -> tuple[str, str]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


def test_https_checks_the_certificate_of_the_name_while_connecting_to_the_checked_address(tmp_path, monkeypatch):
    good = safetensors_bytes(tmp_path)
    cert = self_signed(tmp_path, "localhost")
    other = self_signed(tmp_path, "other.test")
    monkeypatch.setenv("SSL_CERT_FILE", cert[0])  # trust the test's own certificate, as httpx does
    for tls, code in ((cert, None), (other, "LORA_DOWNLOAD_FAILED")):
        server = LoraHost(tls=tls)
        try:
            server.file("/x.safetensors", good)
            src = make(tmp_path, allowed_hosts=[f"localhost:{server.port}"])
            url = f"https://localhost:{server.port}/x.safetensors"
            if code is None:
                assert fetch(src, url).bytes_downloaded == len(good)  # SNI and hostname check: "localhost"
            else:  # a certificate for another name: refused, whatever address it answers on
                assert "cannot connect" in raises(code, fetch, src, url).message
        finally:
            server.close()


def test_a_redirect_from_https_to_plain_http_is_refused(tmp_path, monkeypatch, hosts):
    _, internal = hosts
    cert = self_signed(tmp_path, "localhost")
    monkeypatch.setenv("SSL_CERT_FILE", cert[0])
    server = LoraHost(tls=cert)
    try:
        url = server.route("/x.safetensors", redirect(f"http://localhost:{internal.port}/x.safetensors"))
        src = make(tmp_path, allowed_hosts=["localhost"])
        err = raises("LORA_SOURCE_FORBIDDEN", fetch, src, url.replace("127.0.0.1", "localhost"))
        assert "redirect" in err.message and sum(internal.counts.values()) == 0
    finally:
        server.close()
