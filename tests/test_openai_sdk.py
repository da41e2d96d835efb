"""The official openai Python SDK as the client: what real callers run against the gateway."""

from __future__ import annotations

import io
from pathlib import Path

import openai
import pytest

from aisix.devupstream import MP3_FRAME
from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import TEAM_A, Gateway


@pytest.fixture
def client(gateway: Gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0, timeout=30) as c:
        yield c


def test_speech_to_file(client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path) -> None:
    out = tmp_path / "speech.mp3"
    with client.audio.speech.with_streaming_response.create(
            model="tts-prod", voice="alloy", input="Hello from AISIX.") as r:
        r.stream_to_file(out)
    assert out.read_bytes().startswith(MP3_FRAME[:4])
    assert out.stat().st_size == 3 * 4800
    assert b'"model":"gpt-4o-mini-tts"' in fake.wait_received()[0].body


def test_transcription_with_a_file(client: openai.OpenAI, fake: FakeUpstream) -> None:
    audio = ("speech.wav", io.BytesIO(b"RIFF" + bytes(5000)), "audio/wav")
    result = client.audio.transcriptions.create(model="whisper-prod", file=audio, language="en")
    assert result.text == "hello from the fake"
    got = fake.wait_received()[0]
    assert got.path == "/v1/audio/transcriptions"
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in got.body
    assert b'filename="speech.wav"' in got.body and b"RIFF" + bytes(5000) in got.body


# The SDK marks translations.create deprecated; the route is still served by OpenAI and by us.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_translation(client: openai.OpenAI, fake: FakeUpstream) -> None:
    result = client.audio.translations.create(model="whisper-prod", file=("a.mp3", b"ID3" + bytes(100)))
    assert result.text == "hello from the fake"
    assert fake.wait_received()[0].path == "/v1/audio/translations"


def test_streamed_transcription(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(transcript="streamed words here")
    events = list(client.audio.transcriptions.create(
        model="whisper-prod", file=("a.wav", b"RIFF" + bytes(100)), stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    assert events[-1].text == "streamed words here"


@pytest.mark.parametrize("key, model, exc", [
    ("sk-wrong", "tts-prod", openai.AuthenticationError),
    ("sk-restricted-secret", "tts-prod", openai.PermissionDeniedError),
    (TEAM_A, "no-such-model", openai.NotFoundError),
])
def test_gateway_errors_raise_the_sdk_exceptions(gateway: Gateway, key: str, model: str, exc: type) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0) as c:
        with pytest.raises(exc) as info:
            c.audio.speech.create(model=model, voice="alloy", input="hi")
    assert info.value.code in ("invalid_api_key", "model_not_allowed", "model_not_found")


def test_upstream_errors_reach_the_sdk(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.behaviour = Behaviour(status=429)
    with pytest.raises(openai.RateLimitError):
        client.audio.transcriptions.create(model="whisper-prod", file=("a.wav", b"RIFF"))


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tts-prod", "whisper-prod"]
