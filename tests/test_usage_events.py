"""One usage event per audio request, on every path, with what the upstream reported and no secret."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import PROVIDER_SECRET, TEAM_A, Gateway
from tests.test_transcriptions import form

SPEECH = {"model": "tts-prod", "input": "Hello there", "voice": "alloy"}


async def request(gw: Gateway, path: str, key: str | None = TEAM_A, **kw) -> tuple[str, int]:
    rid = uuid.uuid4().hex
    headers = {"x-aisix-request-id": rid, **kw.pop("headers", {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, headers=headers, **kw) as r:
            await r.read()
            return rid, r.status


async def test_speech_success(gateway: Gateway, fake: FakeUpstream) -> None:
    rid, _ = await request(gateway, "/v1/audio/speech", json=SPEECH)
    e = gateway.event(rid)
    assert e["ts"].endswith("Z") and len(e["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert {k: e[k] for k in ("route", "api_key", "model", "upstream_model", "provider_key", "status",
                              "error_code", "stream", "bytes_out")} == {
        "route": "speech", "api_key": "team-a", "model": "tts-prod", "upstream_model": "gpt-4o-mini-tts",
        "provider_key": "fake", "status": 200, "error_code": None, "stream": True, "bytes_out": 3 * 4800}
    assert e["bytes_in"] > 0 and e["latency_ms"] >= 0 and e["upstream_ttfb_ms"] >= 0
    # Nothing is inferred from speech audio.
    assert not {"input_tokens", "output_tokens", "total_tokens", "audio_seconds"} & e.keys()


@pytest.mark.parametrize("fields, stream", [([], False), ([("stream", b"true")], True)], ids=["json", "sse"])
async def test_transcription_tokens_from_the_upstream(gateway: Gateway, fake: FakeUpstream, fields, stream) -> None:
    body, ctype = form("file", "model", fields=fields)
    rid, status = await request(gateway, "/v1/audio/transcriptions", data=body, headers={"Content-Type": ctype})
    e = gateway.event(rid)
    assert status == 200
    assert (e["input_tokens"], e["output_tokens"], e["total_tokens"]) == (10, 5, 15)
    assert e["stream"] is stream and e["bytes_in"] == len(body) and e["route"] == "transcriptions"


@pytest.mark.parametrize("key, path, kw, status, code, api_key", [
    (None, "/v1/audio/speech", {"json": SPEECH}, 401, "invalid_api_key", None),
    ("sk-disabled-secret", "/v1/audio/speech", {"json": SPEECH}, 401, "api_key_disabled", "off"),
    ("sk-restricted-secret", "/v1/audio/speech", {"json": SPEECH}, 403, "model_not_allowed", "restricted"),
    (TEAM_A, "/v1/audio/speech", {"json": {"input": "x"}}, 400, "missing_model", "team-a"),
])
async def test_rejections(gateway: Gateway, key, path, kw, status, code, api_key) -> None:
    rid, got = await request(gateway, path, key, **kw)
    e = gateway.event(rid)
    assert (got, e["status"], e["error_code"], e["api_key"], e["stream"]) == (status, status, code, api_key, False)
    assert 80 < e["bytes_out"] < 300  # the envelope the caller got


@pytest.mark.parametrize("route", ["speech", "transcriptions"])
async def test_an_unknown_alias_is_recorded_cut_short(gateway: Gateway, route: str) -> None:
    """The caller chooses the alias: one no model has is recorded as its error message echoes it,
    128 characters and an ellipsis, not a megabyte in the event and the access line."""
    alias = "m" * 60_000  # under the form's 64 KiB cap on a model value
    if route == "speech":
        rid, status = await request(gateway, "/v1/audio/speech", json={**SPEECH, "model": alias})
    else:
        body, ctype = form("model", "file", model=alias.encode())
        rid, status = await request(gateway, "/v1/audio/transcriptions", data=body, headers={"Content-Type": ctype})
    assert status == 404
    event = gateway.event(rid)
    assert event["model"] == "m" * 128 + "…"
    line = gateway.wait_log(f"rid={rid}")
    assert len(line) < 1000, line[:300]
    assert len(orjson.dumps(event)) < 1000


async def test_upstream_error_is_recorded(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(status=503)
    rid, status = await request(gateway, "/v1/audio/speech", json=SPEECH)
    e = gateway.event(rid)
    assert (status, e["status"], e["error_code"], e["stream"]) == (503, 503, "upstream_error", False)


async def test_upstream_abort_mid_answer(gateway: Gateway, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(fail="reset_mid", speech_chunks=4)
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.url + "/v1/audio/speech", json=SPEECH,
                          headers={"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    e = gateway.event(rid)
    assert (e["status"], e["error_code"]) == (200, "upstream_aborted")


async def test_no_events_for_models_and_health(gateway: Gateway) -> None:
    rid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models", "/livez", "/readyz", "/nope"):
            async with s.get(gateway.url + path, headers={"Authorization": f"Bearer {TEAM_A}",
                                                          "x-aisix-request-id": rid}) as r:
                await r.read()
    marker, _ = await request(gateway, "/v1/audio/speech", json=SPEECH)
    gateway.event(marker)  # written after the others would have been
    assert not [e for e in gateway.events() if e["request_id"] == rid]


def test_no_secret_in_any_event(gateway: Gateway) -> None:
    text = gateway.usage_file.read_text()
    assert text  # the tests above wrote events
    for secret in (PROVIDER_SECRET, TEAM_A, "sk-disabled-secret", "sk-restricted-secret", "Hello there"):
        assert secret not in text


async def test_events_land_in_a_redis_stream(make_gateway, redis_url: str) -> None:
    import redis

    stream = f"aisix:usage:test:{uuid.uuid4().hex}"
    gw = make_gateway({"usage": {"sink": f"{redis_url}?stream={stream}&maxlen=1000"}})
    rids = [(await request(gw, "/v1/audio/speech", json=SPEECH))[0] for _ in range(3)]
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        while client.xlen(stream) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)  # the writer task batches events off the request path
        events = [orjson.loads(fields[b"data"]) for _, fields in client.xrange(stream)]
    finally:
        client.close()
    assert [e["request_id"] for e in events] == rids
    assert all(e["status"] == 200 and e["api_key"] == "team-a" for e in events)


async def test_logrotate_then_sighup_reopens_the_usage_file(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway()
    first, _ = await request(gw, "/v1/audio/speech", json=SPEECH)
    gw.event(first)
    rotated = gw.usage_file.with_suffix(".jsonl.1")
    gw.usage_file.rename(rotated)  # what logrotate does (without copytruncate)
    gw.signal(signal.SIGHUP)
    gw.wait_log("reloaded")
    second, _ = await request(gw, "/v1/audio/speech", json=SPEECH)
    assert gw.event(second)["status"] == 200  # read from the new file at the original path
    assert [orjson.loads(line)["request_id"] for line in rotated.read_bytes().splitlines()] == [first]


async def test_a_stdout_nobody_reads_stalls_no_request_and_loses_no_event(fake: FakeUpstream, tmp_path: Path) -> None:
    # The default sink: a journal that stalls, a pipe whose reader stopped. Its write blocked the
    # event loop once the pipe was full (~130 events): requests, /livez and SIGTERM all hung.
    read_end, write_end = os.pipe()
    gw = Gateway(tmp_path, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(tmp_path / "spill")}})
    gw.stdout = write_end
    gw.start()
    os.close(write_end)
    got = bytearray()
    all_in = threading.Event()
    wanted = 400

    def read() -> None:
        while chunk := os.read(read_end, 65536):
            got.extend(chunk)
            if got.count(b"\n") >= wanted:
                all_in.set()

    reader = threading.Thread(target=read)
    try:
        sent = await spoken(gw.url, wanted)  # ~500 bytes an event: four times what the pipe holds
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/livez", timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200
        reader.start()  # stdout is read again: the stalled batch, then the spill, then the rest

        assert await asyncio.to_thread(all_in.wait, 10)  # the spill is replayed within a second of it
        assert gw.stop() == 0
        reader.join(10)
        ids = [orjson.loads(line)["request_id"] for line in bytes(got).splitlines()]
        assert sorted(ids) == sorted(sent) and len(ids) == len(set(ids))  # each once
    finally:
        gw.stop()
        reader.join(10)
        os.close(read_end)


async def test_a_stderr_nobody_reads_stalls_no_request(fake: FakeUpstream, tmp_path: Path) -> None:
    # The log and the access log go to stderr, the journal under systemd: their writes blocked the
    # event loop once a pipe nobody read was full, as stdout's did.
    import re
    import subprocess
    import sys

    from tests.gateway import ROOT

    gw = Gateway(tmp_path, fake.base_url)  # writes the config; started here, its stderr a pipe
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "aisix", "serve", "-c", str(tmp_path / "config.yaml")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    got = bytearray()
    try:
        while not (m := re.search(rb"aisix listening on (http://\S+)", got)):
            chunk = await asyncio.to_thread(os.read, read_end, 65536)
            assert chunk, bytes(got)
            got.extend(chunk)
        url = m.group(1).decode()
        sent = await spoken(url, 600)  # stderr is not read from here on; ~250 bytes an access line: twice the pipe
        async with aiohttp.ClientSession() as s, s.get(url + "/livez", timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        while chunk := await asyncio.to_thread(os.read, read_end, 65536):  # read again: all of it comes
            got.extend(chunk)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        log = bytes(got).decode()
        assert all(f"rid={rid}" in log for rid in sent) and "aisix stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)


def _ids(data: bytes) -> list[str]:
    out = []
    for line in data.splitlines():
        try:
            out.append(orjson.loads(line)["request_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # a line a stop cut short
    return out


async def test_a_stdout_batch_still_in_flight_at_stop_is_not_lost_uncounted(fake: FakeUpstream, tmp_path: Path) -> None:
    # stdout's reader stops; the batch stdout did not take within a second is "written when it is
    # read again", later ones go to the spill. If the gateway stops before stdout is read again,
    # that batch must be spilled (replayed by the next start) or counted as dropped: the docs say
    # stdout's events are never dropped so, and that what is dropped is counted. It is counted as
    # *written* and lost with the process.
    spill = tmp_path / "spill"
    first = tmp_path / "first"
    first.mkdir()
    read_end, write_end = os.pipe()
    gw = Gateway(first, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(spill)}})
    gw.stdout = write_end
    gw.start()
    os.close(write_end)
    got = bytearray()
    try:
        sent = await spoken(gw.url, 300)  # ~450 bytes an event: twice what the pipe holds
        gw.wait_log("usage sink stdout: not being read")
        assert gw.stop() == 0
        summary = gw.wait_log("usage events:")
        m = re.search(r"usage events: (\d+) written, (\d+) spilled, (\d+) dropped", summary)
        assert m, summary
        dropped = int(m.group(3))
        while chunk := os.read(read_end, 65536):  # what reached stdout before the process ended
            got.extend(chunk)
    finally:
        gw.stop()
        os.close(read_end)

    # The next start, with the same spill directory and a stdout that is read, replays the spill.
    second = tmp_path / "second"
    second.mkdir()
    with open(second / "stdout", "wb") as out:
        replay(fake, second, spill, out.fileno())

    seen = _ids(bytes(got)) + _ids((second / "stdout").read_bytes())
    missing = set(sent) - set(seen)
    # Every event reached stdout (now or replayed), or was counted as dropped.
    assert len(missing) <= dropped, (f"{len(missing)} events lost, {dropped} counted as dropped; "
                                     f"the first gateway said: {summary.strip()}")


async def spoken(url: str, n: int) -> list[str]:
    """n speech requests one after the other, each answered 200 within 10 s; their request ids."""
    async with aiohttp.ClientSession() as s:
        return [await _speak(s, url) for _ in range(n)]


async def _speak(s: aiohttp.ClientSession, url: str) -> str:
    rid = uuid.uuid4().hex
    async with s.post(url + "/v1/audio/speech", json=SPEECH, headers={
            "Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid},
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        await r.read()
    return rid


async def test_a_stop_during_a_stall_leaves_no_half_line_for_the_replay_to_join(
        fake: FakeUpstream, tmp_path: Path) -> None:
    # `while :; do aisix serve; done | consumer`: one pipe across restarts, its reader stalled.
    # A batch stdout took only part of (a write larger than PIPE_BUF is not atomic on a pipe)
    # ended in half a line when the gateway stopped; the whole batch went to the spill, and the
    # next start's replay was written straight after that half line: the consumer saw one line
    # made of two events, and lost the replayed one. The batch's lines stdout did take whole were
    # replayed too.
    spill = tmp_path / "spill"
    read_end, write_end = os.pipe()
    sent: list[str] = []
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    gw = Gateway(first, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(spill)}})
    gw.stdout = write_end
    gw.start()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_all(read_end)))
    try:
        while "usage sink stdout: not being read" not in gw.log():  # bursts: batches of many events
            assert len(sent) < 4000, "stdout never stalled"
            sent += await burst(gw.url, 64)
        sent += await burst(gw.url, 64)  # behind the stalled batch: spilled
        assert gw.stop() == 0
        reader.start()  # the consumer reads again, before the next start
        replay(fake, second, spill, write_end)
    finally:
        gw.stop()
        os.close(write_end)
        if reader.ident is None:
            reader.start()
        reader.join(10)
        os.close(read_end)
    lines = bytes(got).splitlines()
    bad = [line[:120] for line in lines if line and _ids(line) == []]
    ids = _ids(bytes(got))
    assert bad == [], bad
    assert set(ids) == set(sent), f"{len(set(sent) - set(ids))} events lost"
    assert len(ids) == len(sent), f"{len(ids) - len(set(ids))} events written twice"


def replay(fake: FakeUpstream, directory: Path, spill: Path, stdout: int) -> None:
    """A gateway started with this spill and stdout: it replays the spill, and is stopped."""
    gw = Gateway(directory, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(spill)}})
    gw.stdout = stdout
    try:
        gw.start()
        gw.wait_log("events replayed from the spill")
        assert gw.stop() == 0
    finally:
        gw.stop()


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, 65536):
        out.extend(chunk)
    return bytes(out)


async def burst(url: str, n: int) -> list[str]:
    """n speech requests at once (their events reach the sink together: one batch); their ids."""
    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(_speak(s, url) for _ in range(n))))


async def test_a_replayed_batch_taken_back_at_stop_is_replayed_before_the_rest_of_its_file(
        fake: FakeUpstream, tmp_path: Path) -> None:
    """A stopped process left a spill file. The next start replays it to a stdout nobody reads:
    its first batch (256 KiB) is taken in part, counted as written when a second passes (its
    offset committed), the rest of the file waits behind it. At stop, the lines stdout had not
    taken are kept by Spill.append_first, "replayed before what was spilled after": but they went
    to a file of this process's own, which sorts after the adopted file, and the start after
    replayed the rest of that file (newer events) before them."""
    spill = tmp_path / "spill"
    spill.mkdir()
    sent = [f"ev-{i:05d}" for i in range(1500)]  # ~450 bytes each: 2.6 batches, 10 pipes
    left = spill / f"spill-99999-{time.time_ns() - 3_600_000_000_000}.jsonl"  # started an hour ago
    left.write_bytes(
        b"".join(orjson.dumps({"request_id": rid, "pad": "x" * 420}) + b"\n" for rid in sent))
    read_end, write_end = os.pipe()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    gw = Gateway(first, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(spill)}})
    gw.stdout = write_end
    got = bytearray()
    try:
        gw.start()
        os.close(write_end)
        gw.wait_log("usage sink stdout: not being read")
        assert gw.stop() == 0
        got += _read_all(read_end)  # what stdout took before the process ended
    finally:
        gw.stop()
        os.close(read_end)
    with open(second / "stdout", "wb") as out:
        replay(fake, second, spill, out.fileno())
    seen = _ids(bytes(got)) + _ids((second / "stdout").read_bytes())
    assert sorted(seen) == sent, f"{len(set(sent) - set(seen))} lost, {len(seen) - len(set(seen))} twice"
    assert seen == sent, "replayed out of order: " + ", ".join(
        f"{a} after {b}" for a, b in zip(seen[1:], seen[:-1], strict=True) if a < b)


async def test_the_written_counter_never_goes_down_when_a_stalled_stdout_breaks(
        fake: FakeUpstream, tmp_path: Path) -> None:
    """aisix_usage_events_written_total is a counter: Prometheus reads any decrease as a restart
    and counts the whole value again (a spike of `increase()`). The batch stdout had not taken
    within a second was counted as written at once and taken back when stdout then failed (its
    reader gone: EPIPE), so the scrape went down."""
    from tests.test_operations import scrape, value

    read_end, write_end = os.pipe()
    gw = Gateway(tmp_path, fake.base_url, {"usage": {"sink": "stdout", "spill_dir": str(tmp_path / "spill")},
                                           "metrics": {"listen": "127.0.0.1:0"}})
    gw.stdout = write_end
    try:
        gw.start()
        os.close(write_end)
        await spoken(gw.url, 300)  # ~450 bytes an event: twice what the pipe holds
        gw.wait_log("usage sink stdout: not being read")
        samples, _ = await scrape(gw)
        before = value(samples["aisix_usage_events_written"], "aisix_usage_events_written_total")
        spilled = value(samples["aisix_usage_events_spilled"], "aisix_usage_events_spilled_total")
        os.close(read_end)  # stdout's reader is gone: the stalled write fails with EPIPE
        read_end = -1
        deadline = time.monotonic() + 10
        sent = 0
        while True:  # the sink finds the stalled batch failed and spills it again, with the new ones
            sent += len(await spoken(gw.url, 1))
            samples, _ = await scrape(gw)
            if value(samples["aisix_usage_events_spilled"], "aisix_usage_events_spilled_total") > spilled + sent:
                break
            assert time.monotonic() < deadline, gw.log()
        after = value(samples["aisix_usage_events_written"], "aisix_usage_events_written_total")
        assert after >= before, f"aisix_usage_events_written_total went down: {before} -> {after}"
    finally:
        gw.stop()
        if read_end >= 0:
            os.close(read_end)


async def test_a_usage_file_that_filled_up_mid_line_loses_no_event_after_a_restart(
        fake: FakeUpstream, tmp_path: Path) -> None:
    """The disk holding the usage file fills up in the middle of a batch (here: the process's file
    size limit, RLIMIT_FSIZE, which fails a write as a full disk does: in part, then not at all).
    The batch is kept in the spill; the gateway is restarted while the disk is still full, then
    there is room again. The next gateway appended the spill's first event to what the failed
    write had left of a line: one line that is no JSON, and the event lost to every reader."""
    import resource

    old = [orjson.dumps({"ts": "2026-01-01T00:00:00.000Z", "request_id": f"old-{i}", "status": 200})
           for i in range(100)]
    usage = tmp_path / "usage.jsonl"
    usage.write_bytes(b"\n".join(old) + b"\n")
    settings = {"usage": {"spill_dir": str(tmp_path / "spill")}}
    gw = Gateway(tmp_path, fake.base_url, settings)
    try:
        gw.start()
        # Room for half an event more in any file: the spill's new file takes the whole batch.
        resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (usage.stat().st_size + 200, resource.RLIM_INFINITY))
        sent = await burst(gw.url, 5)
        gw.wait_log("kept in the spill")
        assert gw.stop() == 0  # the disk still full: the file ends inside a line
    finally:
        gw.stop()
    assert usage.read_bytes()[-1:] != b"\n"
    again = Gateway(tmp_path, fake.base_url, settings)  # room again
    try:
        again.start()
        again.wait_log("replayed from the spill")
        assert again.stop() == 0
    finally:
        again.stop()
    ids = []
    for line in usage.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):  # what the failed write left: no event
            ids.append(orjson.loads(line)["request_id"])
    assert set(sent) <= set(ids), f"lost: {set(sent) - set(ids)}"
