"""Shared fixtures: one fake upstream and one default gateway process for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_realtime import FakeRealtime
from tests.fakes import FakeUpstream
from tests.gateway import LEAKS, Gateway
from tests.redis_server import redis_url  # noqa: F401  (a real redis-server, for the whole session)


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def rt() -> Iterator[FakeRealtime]:
    """A fake realtime upstream (WebSocket), one per module that asks for it."""
    fake = FakeRealtime().start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(request: pytest.FixtureRequest) -> None:
    """Each test starts with the fake's default behaviour and an empty record."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture(scope="session")
def gateway(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gateway"), fake.base_url).start()
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(fake: FakeUpstream, tmp_path: Path) -> Iterator:
    """A gateway of the test's own settings, stopped after the test."""
    started: list[Gateway] = []

    def make(settings: dict | None = None, upstream_base: str | None = None, args: list[str] | None = None,
             env: dict[str, str] | None = None, **resources) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        gw = Gateway(d, upstream_base or fake.base_url, settings, **resources)
        gw.args = args or []
        gw.env = env or {}
        gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session", autouse=True)
def _nothing_secret_was_written() -> Iterator[None]:
    """After the whole suite: no gateway wrote a key or a prompt to its log or its usage events."""
    yield
    found = []
    for gw in Gateway.started:
        texts = [("log", gw.log())]
        if gw.usage_file.exists():
            texts.append(("usage", gw.usage_file.read_text(errors="replace")))
        for what, text in texts:
            found += [f"{gw.dir} {what}: {line.strip()}" for line in text.splitlines() if LEAKS.search(line)]
    assert not found, "secrets or prompts written:\n" + "\n".join(found[:20])
