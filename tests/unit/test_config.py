"""AppArgs validation: every allow-list takes exactly the same entries, and a model setting its kind
never reads is refused by name. The shipped YAMLs validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import AppArgs, LoraArgs, ModelArgs, WebhookArgs
from serve_app.net.url_policy import HostPolicy, parse_host_entry

ROOT = Path(__file__).resolve().parents[2]

VALID_ENTRIES = [
    "huggingface.co",
    ".hf.co",
    "HuggingFace.CO",
    " civitai.com ",
    "localhost:8000",
    "127.0.0.1",
    "127.0.0.1:1",
    "10.0.0.1:65535",
    "::1",
    "[::1]",
    "[2001:db8::1]:8443",
    "under_score.internal",
]
INVALID_ENTRIES = [
    "foo bar",
    "a/b",
    "127.0.0.1:99999",
    "host:0",
    "host:",
    "host:80x",
    "",
    " ",
    ".",
    ".example.com:443",
    "-leading-dash.com",
    "user@host",
    "http://host",
    "[::1",
    "[::1]x",
    "[fe80::1%eth0]",
    "[not-v6]:80",
    "1:2:3",
    "é.com",
]


def allow_lists():
    return [
        pytest.param(lambda hosts: LoraArgs(allowed_hosts=hosts), id="loras"),
        pytest.param(lambda hosts: WebhookArgs(allowed_hosts=hosts), id="webhooks"),
    ]


@pytest.mark.parametrize("make", allow_lists())
@pytest.mark.parametrize("entry", VALID_ENTRIES)
def test_both_allow_lists_take_the_same_valid_forms(make, entry):
    assert make([entry]).allowed_hosts == [entry]  # kept as written; the policy normalizes it
    HostPolicy([entry], allow_private=False)


@pytest.mark.parametrize("make", allow_lists())
@pytest.mark.parametrize("entry", INVALID_ENTRIES)
def test_both_allow_lists_refuse_the_same_malformed_entries(make, entry):
    with pytest.raises(ValidationError) as refused:
        make(["example.com", entry])
    assert refused.value.errors()[0]["loc"] == ("allowed_hosts", 1)


@pytest.mark.parametrize("entry", ["foo bar", "a/b", "127.0.0.1:99999"])
def test_the_webhook_list_refuses_what_the_lora_list_refuses(entry):
    for section in ("loras", "webhooks"):
        with pytest.raises(ValidationError, match="allowed_hosts"):
            AppArgs.model_validate({section: {"allowed_hosts": [entry]}})


def test_an_entry_parses_to_what_the_policy_matches():
    assert parse_host_entry(" .HF.co ") == parse_host_entry(".hf.co")
    entry = parse_host_entry("[2001:DB8::1]:8443")
    assert (entry.host, entry.port, entry.subdomains) == ("2001:db8::1", 8443, False)
    entry = parse_host_entry("localhost")
    assert (entry.host, entry.port, entry.subdomains) == ("localhost", None, False)


# ---- model kinds ---------------------------------------------------------------------------------------


def test_the_kind_is_read_in_one_place():
    assert ModelArgs(kind="preview").is_preview
    assert not ModelArgs().is_preview and not ModelArgs(kind="reference").is_preview


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"kind": "preview", "speed": "compiled"}, "speed"),
        ({"kind": "preview", "speed": "fp8"}, "speed"),
        ({"kind": "preview", "fast_path": {"lora_slot_rank": 32}}, "fast_path"),
        ({"kind": "preview", "revision": "main"}, "revision"),
        ({"kind": "reference", "quantize": False}, "quantize"),
        ({"quantize": False}, "quantize"),
    ],
)
def test_a_setting_the_models_kind_never_reads_is_refused_by_name(fields, named):
    with pytest.raises(ValidationError) as refused:
        ModelArgs(id="m", **fields)
    message = str(refused.value)
    assert named in message and "'m'" in message


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "preview", "quantize": False},
        {"kind": "preview", "quantize": True, "speed": "exact"},
        {"kind": "reference", "speed": "compiled", "fast_path": {"lora_slot_rank": 32}, "revision": "main"},
        {"kind": "reference", "quantize": True},  # the default, as a dump of the args writes it
    ],
)
def test_settings_that_fit_the_kind_are_taken_as_given(fields):
    model = ModelArgs(**fields)
    for name, value in fields.items():
        taken = getattr(model, name)
        assert (taken.model_dump(include=set(value)) if name == "fast_path" else taken) == value  # not patched
    assert ModelArgs.model_validate(model.model_dump()) == model  # a dump of valid args validates again


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_validate(path):
    config = yaml.safe_load(path.read_text())
    apps = config.get("applications", [])
    assert apps
    for app in apps:
        AppArgs.model_validate(app.get("args") or {})
