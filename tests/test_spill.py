"""Usage events are billing data: when the sink cannot take them they wait on local disk and are
replayed in order, each once, when it is back; a killed process's spill is replayed by the next.
Against a real redis-server that is stopped and started, and real gateway processes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from aisix.specs import parse_sink
from aisix.spill import Spill
from aisix.usage import UsageSink
from tests.fakes import FakeUpstream
from tests.gateway import TEAM_A, Gateway
from tests.test_usage import RedisServer, events, redis_server, until  # noqa: F401  (a fixture)


def stream(server: RedisServer, name: str = "s") -> list[dict]:
    with server.client() as r:
        return [orjson.loads(fields[b"data"]) for _, fields in r.xrange(name)]


async def test_redis_down_under_load_loses_nothing(redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    sink = UsageSink.create(parse_sink(redis_server.url("stream=s")), spill_dir=str(tmp_path / "spill"))
    await sink.start()
    sent = events(3000)
    for event in sent[:500]:
        sink.emit(event)
    await until(lambda: sink.written_total == 500)
    redis_server.stop()
    for i in range(500, 2500, 100):  # bursts while the backend is down
        for event in sent[i:i + 100]:
            sink.emit(event)
        await asyncio.sleep(0)
    await until(lambda: sink.spilled_total == 2000)
    assert sink.dropped_total == 0 and list((tmp_path / "spill").glob("spill-*.jsonl"))
    redis_server.start()
    for event in sent[2500:]:  # new events queue behind the spill: the order is kept
        sink.emit(event)
    await until(lambda: sink.written_total == 3000, timeout=15)
    await sink.close()
    assert (sink.written_total, sink.dropped_total) == (3000, 0)
    assert stream(redis_server) == sent[500:]  # every event since the restart (it starts empty), once, in order
    assert not list((tmp_path / "spill").iterdir())  # replayed to the end: nothing left


async def test_an_event_written_twice_lands_once(redis_server: RedisServer) -> None:  # noqa: F811
    """A batch that half-landed before the connection broke is replayed whole: the markers keep
    the stream to one entry per event."""
    sink = UsageSink.create(parse_sink(redis_server.url("stream=s")))
    await sink.start()
    lines = [orjson.dumps(e) for e in events(5)]
    await sink._write(lines[:3])  # what landed before the break
    await sink._write(lines)  # the replay of the whole batch
    await sink.close()
    assert stream(redis_server) == events(5)


def test_a_torn_last_line_is_skipped_and_the_rest_replayed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "spill-1-1.jsonl").write_bytes(b'{"n":1}\n{"n":2}\n{"n":')  # killed mid-write
    spill = Spill(str(tmp_path))
    spill.open()
    assert spill.pending
    got = []
    while batch := spill.batch():
        got += batch
        spill.done()
    assert [orjson.loads(x) for x in got] == [{"n": 1}, {"n": 2}]
    assert "without its newline" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_replay_that_fails_sends_the_same_batch_again(tmp_path: Path) -> None:
    spill = Spill(str(tmp_path))
    spill.open()
    assert spill.append([b'{"n":1}', b'{"n":2}'])
    first = spill.batch()
    assert spill.batch() == first  # not done(): the same events again
    spill.done()
    assert spill.batch() == [] and not spill.pending


def test_a_batch_taken_back_at_stop_is_replayed_before_what_was_spilled_after_it(tmp_path: Path) -> None:
    # A stdout batch that never finished was put in the spill at stop after the batches spilled
    # behind it: the next start replayed the newer events first.
    (tmp_path / "spill-1-1.jsonl").write_bytes(b'{"n":0}\n')  # a stopped process's, older still
    spill = Spill(str(tmp_path))
    spill.open()
    assert spill.append([b'{"n":3}', b'{"n":4}'])
    assert spill.append_first([b'{"n":1}', b'{"n":2}'])
    assert spill.append_first([b'{"n":2.5}'])  # a later one: after it, still before the rest
    assert spill.spilled_total == 5
    spill.close()
    later = Spill(str(tmp_path))
    later.open()
    got = []
    while batch := later.batch():
        got += batch
        later.done()
    later.close()
    assert [orjson.loads(x)["n"] for x in got] == [0, 1, 2, 2.5, 3, 4]
    assert not list(tmp_path.glob("spill-*"))


def test_a_living_processs_spill_is_not_adopted(tmp_path: Path) -> None:
    mine = Spill(str(tmp_path))
    mine.open()
    assert mine.append([b'{"n":1}'])
    other = Spill(str(tmp_path))
    other.open()  # the first still holds its lock
    assert not other.pending
    mine.close()  # released: a process that stopped
    later = Spill(str(tmp_path))
    later.open()
    assert later.batch() == [b'{"n":1}']
    later.close()
    other.close()


async def test_a_running_sink_adopts_a_spill_left_while_it_runs(tmp_path: Path) -> None:
    # A process that stopped and is not restarted (scaled down) leaves its spill behind; the ones
    # still running look for such files every ADOPT_S (here made short), not only when they start.
    out, spilled = tmp_path / "usage.jsonl", tmp_path / "spill"
    sink = UsageSink.create(parse_sink(f"file:{out}"), spill_dir=str(spilled))
    sink.adopt_every_s = 0.05
    await sink.start()
    (spilled / "spill-99999-1.jsonl").write_bytes(b'{"n":1}\n{"n":2}\n')  # no process holds its lock
    await until(lambda: out.exists() and out.read_bytes().count(b"\n") == 2)
    await sink.close()
    assert [orjson.loads(line) for line in out.read_bytes().splitlines()] == [{"n": 1}, {"n": 2}]
    assert not list(spilled.glob("spill-*"))


def test_an_adoption_during_a_replay_of_our_own_file_loses_nothing(tmp_path: Path) -> None:
    # The sink failed mid-replay of this process's own file (the reader stays on it); then the
    # minute's look adopts a stopped process's file, queued in front. Both are replayed, each
    # once, and our file is not taken for the other one and deleted while still written to.
    spill = Spill(str(tmp_path))
    spill.open()
    assert spill.append([b'{"own":1}', b'{"own":2}'])
    assert spill.batch() == [b'{"own":1}', b'{"own":2}']  # not done(): the sink failed
    (tmp_path / "spill-99999-1.jsonl").write_bytes(b'{"dead":1}\n')
    spill.adopt()
    got = []
    while batch := spill.batch():
        got += batch
        spill.done()
    assert spill.append([b'{"own":3}'])  # a new file of its own, replayed too
    while batch := spill.batch():
        got += batch
        spill.done()
    assert sorted(orjson.loads(x)["own" if b"own" in x else "dead"] for x in got) == [1, 1, 2, 3]
    assert got.count(b'{"own":3}') == 1 and got.count(b'{"dead":1}') == 1
    spill.close()
    assert not list(tmp_path.iterdir())


async def _speech_with_ids(gw: Gateway, ids: list[str]) -> None:
    """One speech request per request id, one after another, each answered 200."""
    async with aiohttp.ClientSession() as s:
        for rid in ids:
            async with s.post(gw.url + "/v1/audio/speech", json={"model": "tts-prod", "input": "x", "voice": "a"},
                              headers={"Authorization": f"Bearer {TEAM_A}", "x-aisix-request-id": rid}) as r:
                assert r.status == 200
                await r.read()


async def test_a_killed_gateways_spill_is_replayed_by_the_next(fake: FakeUpstream, make_gateway, tmp_path: Path,
                                                               redis_server: RedisServer) -> None:  # noqa: F811
    server = redis_server
    settings = {"usage": {"sink": server.url("stream=usage"), "spill_dir": str(tmp_path / "spill")}}
    try:
        gw = make_gateway(settings)
        server.stop()
        ids = [f"spilled-{i}" for i in range(40)]
        await _speech_with_ids(gw, ids)
        spilled = tmp_path / "spill"
        deadline = time.monotonic() + 10
        while sum(p.read_bytes().count(b"\n") for p in spilled.glob("spill-*.jsonl")) < len(ids):
            assert time.monotonic() < deadline, "the events never reached the spill"
            await asyncio.sleep(0.02)  # polling the disk for a condition, bounded
        gw.signal(signal.SIGKILL)
        gw.wait()
        server.start()
        again = make_gateway(settings)  # adopts the dead process's spill and replays it
        deadline = time.monotonic() + 10
        while len(stream(server, "usage")) < len(ids):
            assert time.monotonic() < deadline, f"replayed {len(stream(server, 'usage'))} of {len(ids)}"
            await asyncio.sleep(0.05)
        assert [e["request_id"] for e in stream(server, "usage")] == ids  # in order, once each
        again.wait_log("replayed from the spill")
        assert not list(spilled.glob("spill-*.jsonl"))
    finally:
        server.stop()


async def test_a_spill_that_cannot_be_sent_says_why(fake: FakeUpstream, make_gateway, tmp_path: Path) -> None:
    """A gateway restarted while Redis is down finds the spill its predecessor left. Each replay
    fails, and new events queue behind the spill ("the sink is behind"): nothing logged what was
    wrong with the sink (refused, a wrong password, Redis out of memory), although the docs send
    the operator to "the journal's warnings" for why events are spilled."""
    from tests.redis_server import free_port

    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / f"spill-99999-{time.time_ns() - 60_000_000_000}.jsonl").write_bytes(
        b"".join(orjson.dumps(e) + b"\n" for e in events(3)))
    gw = make_gateway({"usage": {"sink": f"redis://127.0.0.1:{free_port()}/0?stream=usage",
                                 "spill_dir": str(spill)}})
    gw.wait_log("left by a process that stopped")
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/audio/speech", json={"model": "tts-prod", "input": "x", "voice": "a"},
            headers={"Authorization": f"Bearer {TEAM_A}"}) as r:
        assert r.status == 200
        await r.read()
    line = gw.wait_log("Connection refused")
    assert "aisix.usage" in line and "spill" in line, line


async def test_a_batch_redis_refuses_half_way_is_not_marked_as_landed(fake: FakeUpstream, make_gateway,
                                                                      redis_server: RedisServer) -> None:  # noqa: F811
    """The stream's name held another kind of key (a name reused by mistake): XADD failed with
    WRONGTYPE after the script had set each event's marker, "landed once". The batch was kept in
    the spill, and its replay, a millisecond later, found the markers and added nothing: the
    events were lost, counted as written, and the operator's fix of the key came too late."""
    server = redis_server
    with server.client() as r:
        r.set("usage", "not a stream")
    gw = make_gateway({"usage": {"sink": server.url("stream=usage")}})
    ids = [f"wrongtype-{i}" for i in range(3)]
    await _speech_with_ids(gw, ids)
    gw.wait_log("WRONGTYPE")
    with server.client() as r:
        r.delete("usage")  # the operator mends it: what waits in the spill lands
    deadline = time.monotonic() + 10
    while len(stream(server, "usage")) < len(ids):
        assert time.monotonic() < deadline, f"{len(stream(server, 'usage'))} of {len(ids)} landed:\n{gw.log()}"
        await asyncio.sleep(0.05)  # polling Redis for a condition, bounded
    assert [e["request_id"] for e in stream(server, "usage")] == ids
