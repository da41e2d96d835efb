"""What an operator relies on: metrics scraped and parsed, SIGHUP reload, SIGTERM drain (the access
log: test_access_log.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aisix.config import hash_key
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import PROVIDER_SECRET, TEAM_A, Gateway
from tests.test_transcriptions import form

SPEECH = {"model": "tts-prod", "input": "Hello there", "voice": "alloy"}
AUTH = {"Authorization": f"Bearer {TEAM_A}"}
UPLOAD, UPLOAD_TYPE = form("model", "file")


RECEIVED: list[int] = []  # body bytes of every answer post() read, for the bytes_total check


async def post(gw: Gateway, json: dict = SPEECH, key: str = TEAM_A, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=json,
                          headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
            RECEIVED.append(len(await r.read()))
            return r.status


async def scrape(gw: Gateway) -> dict[str, list]:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.metrics_url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}, text


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_are_scraped_with_bounded_labels(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}},
                      api_keys=[{"display_name": "lim", "key_hash": hash_key("sk-lim-m"), "allowed_models": ["*"],
                                 "rate_limit": {"rpd": 1}}],
                      guardrails=[{"name": "watch", "kind": "keyword", "hook_point": "input",
                                   "enforcement_mode": "monitor", "patterns": [{"kind": "literal", "value": "there"}]}])
    RECEIVED.clear()
    assert await post(gw) == 200
    assert await post(gw, {**SPEECH, "model": "made-up-" + uuid.uuid4().hex}) == 404
    assert await post(gw, key="sk-lim-m") == 200 and await post(gw, key="sk-lim-m") == 429
    body, ctype = form("model", "file")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/transcriptions", data=body,
                          headers={**AUTH, "Content-Type": ctype}) as r:
            assert r.status == 200
    families, text = await scrape(gw)
    req = families["aisix_requests"]
    assert value(req, "aisix_requests_total", route="speech", model="tts-prod", status="200") == 2
    assert value(req, "aisix_requests_total", route="speech", model="", status="404") == 1
    assert value(req, "aisix_requests_total", route="speech", status="429") == 1
    assert value(families["aisix_request_duration_seconds"], "aisix_request_duration_seconds_count",
                 route="speech") == 4
    assert value(families["aisix_upstream_ttfb_seconds"], "aisix_upstream_ttfb_seconds_count", route="speech") == 2
    assert value(families["aisix_in_flight_requests"], "aisix_in_flight_requests", route="speech") == 0
    assert value(families["aisix_bytes"], "aisix_bytes_total", route="speech", direction="out") == sum(RECEIVED)
    assert sum(RECEIVED) > 2 * 3 * 4800  # two audio answers and two envelopes
    assert value(families["aisix_bytes"], "aisix_bytes_total", route="transcriptions", direction="in") == len(body)
    assert value(families["aisix_rate_limited"], "aisix_rate_limited_total", scope="key") == 1
    assert value(families["aisix_guardrail_hits"], "aisix_guardrail_hits_total", guardrail="watch",
                 action="monitored") == 3
    assert value(families["aisix_tokens"], "aisix_tokens_total", model="whisper-prod", kind="input") == 10
    assert value(families["aisix_tokens"], "aisix_tokens_total", model="whisper-prod", kind="output") == 5
    assert value(families["aisix_usage_events_dropped"], "aisix_usage_events_dropped_total") == 0
    for secret in ("made-up", TEAM_A, "sk-lim-m", "team-a", "lim\"", PROVIDER_SECRET):
        assert secret not in text


async def test_the_scrape_passes_promtool(make_gateway, fake: FakeUpstream) -> None:
    """Prometheus' own checker on a scrape after successes, errors of both kinds and a 429; and
    no ``_created`` series, which would double what is stored."""
    gw = make_gateway({"metrics": {"listen": "127.0.0.1:0"}},
                      api_keys=[{"display_name": "lim", "key_hash": hash_key("sk-lim-p"), "allowed_models": ["*"],
                                 "rate_limit": {"rpd": 1}}],
                      guardrails=[{"name": "watch", "kind": "keyword", "hook_point": "input",
                                   "enforcement_mode": "monitor", "patterns": [{"kind": "literal", "value": "there"}]}])
    assert await post(gw) == 200
    assert await post(gw, key="sk-nobody") == 401
    assert await post(gw, key="sk-lim-p") == 200 and await post(gw, key="sk-lim-p") == 429
    fake.behaviour = Behaviour(status=503)
    assert await post(gw) == 503
    families, text = await scrape(gw)
    assert value(families["aisix_requests"], "aisix_requests_total") == 5
    assert "_created" not in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make system-tools` installs it (Debian's prometheus package)"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


async def test_reload_swaps_resources_all_or_nothing(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway()
    path = gw.dir / "resources.yaml"
    doc = yaml.safe_load(path.read_text())
    assert await post(gw, {**SPEECH, "model": "tts-new"}) == 404

    doc["models"].append({"display_name": "tts-new", "provider_key": "fake", "model_name": "m-new"})
    path.write_text(yaml.safe_dump(doc))
    gw.signal(signal.SIGHUP)
    gw.wait_log("reloaded")
    assert await post(gw, {**SPEECH, "model": "tts-new"}) == 200

    bad = dict(doc, models=doc["models"] + [{"display_name": "broken", "provider_key": "nowhere",
                                             "model_name": "x"}])
    path.write_text(yaml.safe_dump(bad))
    gw.signal(signal.SIGHUP)
    line = gw.wait_log("reload refused")
    assert "models[broken]" in line and "provider_key" in line
    assert await post(gw, {**SPEECH, "model": "tts-new"}) == 200  # the previous resources still serve


def test_a_sighup_while_starting_is_a_reload_once_up(tmp_path: Path, fake: FakeUpstream) -> None:
    """A SIGHUP that comes before the server's handler (a reload, or logrotate's, sent as the
    service starts) ended the process, its default action. It is remembered and done once the
    server is up. config.yaml is a FIFO here, so the signal lands while it is being read."""
    gw = Gateway(tmp_path, fake.base_url)
    config = tmp_path / "config.yaml"
    text = config.read_bytes()
    config.unlink()
    os.mkfifo(config)

    def feed() -> None:
        with open(config, "wb") as f:  # returns once the gateway has opened it to read
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            f.write(text)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        gw.start()
    finally:
        feeder.join(10)
    try:
        assert "reloaded" in gw.wait_log("reloaded")
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        gw.stop()


async def test_a_request_in_flight_keeps_the_config_it_started_with(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway()
    path = gw.dir / "resources.yaml"
    doc = yaml.safe_load(path.read_text())
    fake.behaviour = Behaviour(speech_chunks=4, chunk_delay=0.3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
            await r.content.readany()
            doc["models"] = [m for m in doc["models"] if m["display_name"] != "tts-prod"]
            path.write_text(yaml.safe_dump(doc))
            gw.signal(signal.SIGHUP)
            gw.wait_log("reloaded")
            assert await post(gw) == 404  # new requests see the new file
            rest = await r.read()
    assert r.status == 200 and len(rest) == 3 * 4800


async def test_sigterm_drains_then_exits_zero(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway()
    fake.behaviour = Behaviour(speech_chunks=6, chunk_delay=0.3)
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH,
                          headers={**AUTH, "x-aisix-request-id": rid}) as r:
            await r.content.readany()
            gw.signal(signal.SIGTERM)
            gw.wait_log("draining")
            async with s.get(gw.url + "/readyz") as ready:
                assert ready.status == 503
                assert ready.headers["Connection"] == "close"
            audio = await r.read()
    assert len(audio) == 5 * 4800  # the stream in flight finished whole
    assert gw.wait(30) == 0
    assert gw.event(rid, timeout=1)["status"] == 200  # its usage event was flushed before exit


async def test_drain_deadline_cuts_what_is_left(make_gateway, fake: FakeUpstream) -> None:
    # Cut by the gateway's stop, not left by their callers: the records say so (they said 499
    # client_closed, which bills and blames the caller for the gateway's own stop).
    gw = make_gateway({"proxy": {"drain_timeout_ms": 300}})
    fake.behaviour = Behaviour(speech_chunks=40, chunk_delay=0.25)
    answering, uploading = uuid.uuid4().hex, uuid.uuid4().hex
    gate = asyncio.Event()

    async def slow_upload() -> AsyncIterator[bytes]:
        yield UPLOAD[:100]
        await gate.wait()  # the rest never comes before the cut

    async with aiohttp.ClientSession() as s:
        upload = asyncio.create_task(s.post(gw.url + "/v1/audio/transcriptions", data=slow_upload(), headers={
            **AUTH, "x-aisix-request-id": uploading, "Content-Type": UPLOAD_TYPE}))
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers={**AUTH, "x-aisix-request-id": answering}) as r:
            await r.content.readany()
            gw.signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        with pytest.raises(aiohttp.ClientError):
            await upload
        gate.set()
    assert gw.wait(30) == 0
    log = gw.log()
    assert "drain deadline reached with 2 requests in flight" in log and "drain over: cutting 2 requests" in log
    assert "drained" not in log
    assert (gw.event(answering, timeout=1)["status"], gw.event(answering)["error_code"]) == (200, "shutting_down")
    assert (gw.event(uploading)["status"], gw.event(uploading)["error_code"]) == (503, "shutting_down")
    assert f'" 503 rid={uploading}' in log  # its access line


async def test_a_busy_drain_stops_accepting_after_the_grace(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"proxy": {"drain_grace_ms": 200}})
    fake.behaviour = Behaviour(speech_chunks=5, chunk_delay=0.3)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/audio/speech", json=SPEECH, headers=AUTH) as r:
            await r.content.readany()
            gw.signal(signal.SIGTERM)
            gw.wait_log("stopped accepting: 1 requests in flight")
            with pytest.raises(aiohttp.ClientConnectorError):  # new callers go elsewhere
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(gw.url + "/livez")
            audio = await r.read()
    assert len(audio) == 4 * 4800  # what was in flight still finished
    assert gw.wait(30) == 0


async def test_a_caller_that_leaves_while_the_drain_cuts_is_recorded_as_leaving(make_gateway, fake: FakeUpstream) -> None:
    # live.cutting is set when the drain's deadline passes, but the cut itself is the runner's
    # cleanup, which first waits shutdown_timeout (1 s; plus SESSION_CLOSE_S, 5 s, when realtime
    # sessions are open) for handlers to finish. A caller that closes its connection in that
    # window is cancelled by aiohttp as any caller that leaves, and is recorded shutting_down:
    # the gateway's stop is blamed for (and the record loses) the caller's own leaving.
    gw = make_gateway({"proxy": {"drain_timeout_ms": 300}})
    fake.behaviour = Behaviour(speech_chunks=40, chunk_delay=0.25)
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/v1/audio/speech", json=SPEECH,
                         headers={**AUTH, "x-aisix-request-id": rid})
        await r.content.readany()
        gw.signal(signal.SIGTERM)
        gw.wait_log("drain over: cutting 1 requests")  # the deadline passed; nothing cut yet
        r.close()  # the caller leaves on its own (closes its connection)
    assert gw.wait(30) == 0
    event = gw.event(rid, timeout=1)
    assert event["error_code"] == "client_closed", event
