"""Fixtures of the unit tests that need a server of their own."""

from __future__ import annotations

import pytest

from tests.support.s3 import s3_server


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1, shared by the tests that use it (each takes a fresh prefix)."""
    with s3_server() as server:
        yield server
