"""The host policy both allow-lists share: its refusals name the section whose settings decide them."""

from __future__ import annotations

import pytest

from serve_app.net.url_policy import HostPolicy, UrlRefused, split_url


@pytest.mark.parametrize("section", ["loras", "webhooks"])
def test_a_private_address_refusal_names_the_sections_switch(section):
    policy = HostPolicy(["127.0.0.1"], allow_private=False, section=section)
    parts = split_url("http://127.0.0.1:9/x")
    assert policy.allows(parts)
    with pytest.raises(UrlRefused) as refused:
        policy.resolve(parts)
    assert f"{section}.allow_private_addresses" in refused.value.reason


def test_a_malformed_entry_is_refused_by_the_policy_too():
    with pytest.raises(ValueError, match="port"):
        HostPolicy(["127.0.0.1:99999"], allow_private=True)
