"""The README's first request, run as written: shipped config, dev upstream, curl, then file(1)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.gateway import ROOT, Gateway


@pytest.fixture
def dev_upstream() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "aisix.devupstream", "--listen", "127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+)", line)
    assert m, line
    drain = threading.Thread(target=proc.stdout.read, daemon=True)
    drain.start()
    yield m.group(1)
    proc.terminate()
    proc.wait(10)
    drain.join(5)
    proc.stdout.close()


@pytest.fixture
def shipped_gateway(dev_upstream: str, tmp_path: Path) -> Iterator[Gateway]:
    """etc/aisix/ as shipped, but on free ports: the dev upstream's, and port 0 for the gateway."""
    resources = yaml.safe_load((ROOT / "etc/aisix/resources.yaml").read_text())
    assert resources["provider_keys"][0]["api_base"] == "http://127.0.0.1:3001/v1"
    resources["provider_keys"][0]["api_base"] = dev_upstream + "/v1"
    gw = Gateway(tmp_path, dev_upstream)
    (tmp_path / "resources.yaml").write_text(yaml.safe_dump(resources))
    gw.start()
    yield gw
    gw.stop()


def readme_block(start: str) -> str:
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        if block.startswith(start):
            return block
    raise AssertionError(f"no ```sh block starting with {start!r} in README.md")


def test_readme_curl_writes_mpeg_audio(shipped_gateway: Gateway, tmp_path: Path) -> None:
    block = readme_block("curl -sS -X POST http://127.0.0.1:3000/v1/audio/speech")
    command = block.split("\n\ncurl")[0].replace("http://127.0.0.1:3000", shipped_gateway.url)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "aisix-speech.mp3: MPEG ADTS, layer III" in done.stdout
    assert (tmp_path / "aisix-speech.mp3").stat().st_size > 10_000


def test_readme_transcription_curl(shipped_gateway: Gateway, tmp_path: Path) -> None:
    block = readme_block("curl -sS -X POST http://127.0.0.1:3000/v1/audio/speech")
    first, second = block.split("\n\ncurl")
    url = shipped_gateway.url
    subprocess.run(["bash", "-c", first.replace("http://127.0.0.1:3000", url)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    done = subprocess.run(["bash", "-c", "curl" + second.replace("http://127.0.0.1:3000", url)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "aisix-speech.mp3" in yaml.safe_load(done.stdout)["text"]


async def test_a_live_transcription_session_through_the_shipped_config(shipped_gateway: Gateway) -> None:
    """`make run` as shipped: the SDK's realtime client opens a transcription session with the
    demo key and the whisper-live alias; the development upstream transcribes what it got."""
    client = openai.AsyncOpenAI(base_url=shipped_gateway.url + "/v1", api_key="sk-aisix-demo")
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-live"}}}})
        pcm = bytes(48_000)  # one second of 24 kHz 16-bit silence, in 20 ms frames
        for i in range(0, len(pcm), 960):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 960]).decode())
        await conn.input_audio_buffer.commit()
        deltas = []
        async for event in conn:
            if event.type == "conversation.item.input_audio_transcription.delta":
                deltas.append(event.delta)
            if event.type == "conversation.item.input_audio_transcription.completed":
                break
    assert event.transcript == "Development transcript of 48000 bytes of audio (1.00 s)."
    assert "".join(deltas).strip() == event.transcript
    (record,) = [e for e in shipped_gateway.events(1) if e["route"] == "realtime"]
    assert (record["model"], record["upstream_model"], record["status"]) == ("whisper-live", "gpt-4o-transcribe", 101)
    assert record["total_tokens"] == event.usage.total_tokens
