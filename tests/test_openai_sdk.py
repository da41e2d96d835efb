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


def test_speech_as_events(client: openai.OpenAI, gateway: Gateway, fake: FakeUpstream) -> None:
    # stream_format="sse", as the SDK sends it: relayed as events, the audio measured from them.
    with client.audio.speech.with_streaming_response.create(
            model="tts-prod", voice="alloy", input="Hello from AISIX.", stream_format="sse") as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
        rid = r.headers["x-aisix-request-id"]
    assert len(lines) == 4 and '"speech.audio.done"' in lines[-1]
    assert b'"stream_format":"sse"' in fake.wait_received()[0].body
    event = gateway.event(rid)
    assert event["audio_seconds_out"] == 0.72  # 3 x 4800 bytes of 480-byte frames of 24 ms
    assert event["output_tokens"] == 120


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


# -- request ids: the SDKs read x-request-id -----------------------------------------------------


def test_the_request_id_of_a_success(client: openai.OpenAI) -> None:
    """The gateway's id in x-request-id, the SDK's request_id; the provider's stays apart."""
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-prod", file=("a.wav", b"RIFF"))
    assert raw.request_id == raw.headers["x-aisix-request-id"]
    assert len(raw.request_id) == 32 and raw.request_id != "req_fake"
    assert raw.headers["x-upstream-request-id"] == "req_fake"  # the fake's own x-request-id
    assert raw.headers.get_list("x-request-id") == [raw.request_id]  # one, not the provider's too
    result = client.audio.transcriptions.create(model="whisper-prod", file=("a.wav", b"RIFF"))
    assert result._request_id is not None and len(result._request_id) == 32


def test_the_request_id_is_the_callers_when_kept(client: openai.OpenAI, gateway: Gateway) -> None:
    rid = "caller-chosen-id-" + "7" * 8
    raw = client.audio.speech.with_raw_response.create(
        model="tts-prod", voice="alloy", input="hi", extra_headers={"x-aisix-request-id": rid})
    assert raw.request_id == rid
    assert gateway.event(rid)["status"] == 200


@pytest.mark.parametrize("key, model, exc", [
    ("sk-wrong", "tts-prod", openai.AuthenticationError),  # the gateway's own envelope
    (TEAM_A, "no-such-model", openai.NotFoundError),
])
def test_the_request_id_of_an_error(gateway: Gateway, key: str, model: str, exc: type) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0) as c, pytest.raises(exc) as info:
        c.audio.speech.create(model=model, voice="alloy", input="hi")
    rid = info.value.request_id
    assert rid is not None and rid == info.value.response.headers["x-aisix-request-id"]
    assert gateway.event(rid)["error_code"] in ("invalid_api_key", "model_not_found")


def test_the_request_id_of_an_upstream_error(client: openai.OpenAI, gateway: Gateway, fake: FakeUpstream) -> None:
    """A relayed provider error: the id the user quotes is the gateway's, which finds the usage
    event; the provider's is in x-upstream-request-id."""
    fake.behaviour = Behaviour(status=500)
    with pytest.raises(openai.InternalServerError) as info:
        client.audio.transcriptions.create(model="whisper-prod", file=("a.wav", b"RIFF"))
    rid = info.value.request_id
    assert rid is not None and rid != "req_fake"
    assert info.value.response.headers["x-upstream-request-id"] == "req_fake"
    assert gateway.event(rid)["error_code"] == "upstream_error"


# -- models.retrieve -----------------------------------------------------------------------------


def test_models_retrieve(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    for alias in ("tts-prod", "whisper-prod"):
        model = client.models.retrieve(alias)
        assert model == listed[alias]
        assert (model.id, model.object, model.created, model.owned_by) == (alias, "model", 0, "openai")
        assert model._request_id is not None


@pytest.mark.parametrize("alias", ["no-such-model", "secret-model"], ids=["unknown", "not-allowed"])
def test_models_retrieve_unknown_or_not_allowed_is_404(client: openai.OpenAI, alias: str) -> None:
    """An alias the key may not use is as absent as one that does not exist: the list does not
    show it and the answer does not tell it exists."""
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve(alias)
    assert info.value.code == "model_not_found" and info.value.param is None
    assert info.value.request_id is not None


def test_models_retrieve_needs_a_key(gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.retrieve("tts-prod")


def test_models_retrieve_an_alias_with_a_slash(make_gateway) -> None:
    gw = make_gateway(models=[{"display_name": "tts-org/v2", "provider_key": "fake", "model_name": "tts-1"}])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEAM_A, max_retries=0) as c:
        assert [m.id for m in c.models.list()] == ["tts-org/v2", "tts-prod", "whisper-prod"]
        assert c.models.retrieve("tts-org/v2").id == "tts-org/v2"


# -- retries: what the SDKs do again on their own ------------------------------------------------


def test_a_transcript_too_large_to_check_is_not_retried(make_gateway, fake: FakeUpstream) -> None:
    """A 502 the SDKs would retry (twice by default), each time a new upload the provider
    transcribes and bills, to the same over-1-MiB transcript and the same 502: the gateway tells
    them not to, as for upstream_auth_failed."""
    gw = make_gateway(guardrails=[{"name": "clean-output", "kind": "keyword", "hook_point": "output",
                                   "enforcement_mode": "block", "patterns": [{"kind": "literal", "value": "x"}]}])
    fake.behaviour = Behaviour(transcript="word " * 250_000)  # over the 1 MiB a held transcript may be
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=TEAM_A, timeout=30) as c, \
            pytest.raises(openai.InternalServerError) as info:  # the SDK's default retries
        c.audio.transcriptions.create(model="whisper-prod", file=("a.wav", b"RIFF" + bytes(100)))
    assert (info.value.status_code, info.value.code) == (502, "upstream_answer_too_large")
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(fake.received) == 1  # once transcribed, once billed
