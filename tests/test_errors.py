"""Every error the gateway answers itself (docs/api.md, "Errors"): exact status, type and code, as an envelope."""

from __future__ import annotations

import asyncio
import json

import socket
from typing import Any

import aiohttp
import pytest

from tests.fakes import Behaviour, FakeUpstream
from tests.gateway import PROVIDER_SECRET, TEAM_A, Gateway
from tests.test_transcriptions import BOUNDARY, form

SPEECH = "/v1/audio/speech"
TRANSCRIBE = "/v1/audio/transcriptions"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(gw: Gateway, path: str, method: str = "POST", **kw: Any) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, **kw) as r:
            assert r.headers["Content-Type"].startswith("application/json"), await r.text()
            assert r.headers["x-aisix-request-id"]
            return r.status, dict(r.headers), await r.json()


def speech(model: str = "tts-prod", key: str = TEAM_A) -> dict[str, Any]:
    return {"json": {"model": model, "input": "hi", "voice": "alloy"}, "headers": bearer(key)}


def transcription(*order: str, key: str = TEAM_A, headers: dict[str, str] | None = None,
                  **values: bytes) -> dict[str, Any]:
    body, ctype = form(*order, **values)
    return {"data": body, "headers": {**bearer(key), "Content-Type": ctype, **(headers or {})}}


CASES = [
    # (id, path, request kwargs, status, type, code, param)
    ("no-key", SPEECH, {"json": {"model": "tts-prod"}}, 401, "authentication_error", "invalid_api_key", None),
    ("basic-auth", SPEECH, {"json": {}, "headers": {"Authorization": "Basic dXNlcjpwdw=="}}, 401,
     "authentication_error", "invalid_api_key", None),
    ("empty-bearer", SPEECH, {"json": {}, "headers": {"Authorization": "Bearer "}}, 401,
     "authentication_error", "invalid_api_key", None),
    ("unknown-key", SPEECH, speech(key="sk-nobody"), 401, "authentication_error", "invalid_api_key", None),
    ("disabled", SPEECH, speech(key="sk-disabled-secret"), 401, "authentication_error", "api_key_disabled", None),
    ("expired", SPEECH, speech(key="sk-expired-secret"), 401, "authentication_error", "api_key_expired", None),
    ("not-allowed", SPEECH, speech(key="sk-restricted-secret"), 403, "permission_error", "model_not_allowed", None),
    ("unknown-alias", SPEECH, speech(model="nope"), 404, "invalid_request_error", "model_not_found", None),
    ("unknown-beats-globs", SPEECH, speech(model="tts-nope", key="sk-restricted-secret"), 404,
     "invalid_request_error", "model_not_found", None),
    ("no-model", SPEECH, {"json": {"input": "hi"}, "headers": bearer(TEAM_A)}, 400, "invalid_request_error",
     "missing_model", "model"),
    ("model-not-string", SPEECH, {"json": {"model": 7}, "headers": bearer(TEAM_A)}, 400, "invalid_request_error",
     "missing_model", "model"),
    ("bad-json", SPEECH, {"data": b'{"model": ', "headers": {**bearer(TEAM_A), "Content-Type": "application/json"}},
     400, "invalid_request_error", "invalid_json", None),
    ("json-array", SPEECH, {"json": ["tts-prod"], "headers": bearer(TEAM_A)}, 400, "invalid_request_error",
     "invalid_json", None),
    ("deep-json", SPEECH, {"data": b"[" * 5000 + b"]" * 5000,
                           "headers": {**bearer(TEAM_A), "Content-Type": "application/json"}},
     400, "invalid_request_error", "invalid_json", None),
    ("speech-form", SPEECH, {"data": {"model": "tts-prod"}, "headers": bearer(TEAM_A)}, 400,
     "invalid_request_error", "unsupported_content_type", None),
    ("form-no-model", TRANSCRIBE, transcription("file"), 400, "invalid_request_error", "missing_model", "model"),
    ("form-no-file", TRANSCRIBE, transcription("model"), 400, "invalid_request_error", "missing_file", "file"),
    ("form-json", TRANSCRIBE, speech(), 400, "invalid_request_error", "unsupported_content_type", None),
    ("form-no-boundary", TRANSCRIBE, {"data": b"x", "headers": {**bearer(TEAM_A), "Content-Type": "multipart/form-data"}},
     400, "invalid_request_error", "invalid_multipart", None),
    ("form-huge-head", TRANSCRIBE, transcription("file", "model", file_name=b"a" * 17000), 400,
     "invalid_request_error", "invalid_multipart", None),
    ("form-not-allowed", TRANSCRIBE, transcription("model", "file", model=b"secret-model"), 403,
     "permission_error", "model_not_allowed", None),
    # A model serves the routes it names: a speech alias is not sent to a provider as a
    # transcription model. After 404 and 403, so it says nothing of an alias the key may not use.
    ("speech-alias-on-transcriptions", TRANSCRIBE, transcription("model", "file", model=b"tts-prod"), 400,
     "invalid_request_error", "model_not_supported", "model"),
    ("speech-alias-file-first", TRANSCRIBE, transcription("file", "model", model=b"tts-prod"), 400,
     "invalid_request_error", "model_not_supported", "model"),
    ("whisper-alias-on-speech", SPEECH, speech(model="whisper-prod"), 400, "invalid_request_error",
     "model_not_supported", "model"),
    ("not-allowed-before-not-supported", SPEECH, speech(model="secret-model", key="sk-restricted-secret"), 403,
     "permission_error", "model_not_allowed", None),
    ("form-unknown-alias", TRANSCRIBE, transcription("file", "model", model=b"nope"), 404,
     "invalid_request_error", "model_not_found", None),
    ("form-hidden-model", TRANSCRIBE, {"data": b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; '
                                       b'name="language"\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
                                       b"gpt-secret\r\n" + form("model", "file")[0],
                                       "headers": {**bearer(TEAM_A), "Content-Type": form("file")[1]}},
     400, "invalid_request_error", "invalid_multipart", None),
    ("form-preamble", TRANSCRIBE, {"data": b"hello\r\n" + form("model", "file")[0],
                                   "headers": {**bearer(TEAM_A), "Content-Type": form("file")[1]}},
     400, "invalid_request_error", "invalid_multipart", None),
    ("form-non-utf8-model", TRANSCRIBE, transcription("model", "file", model=b"\xff\xfe"), 400,
     "invalid_request_error", "invalid_multipart", None),
    # Bodies are forwarded as sent, so a coded one could not be forwarded with a length the
    # gateway can vouch for: refused before it is read (a gzip upload once desynchronised the
    # upstream connection).
    ("speech-gzip", SPEECH, {"data": b"\x1f\x8b", "headers": {**bearer(TEAM_A), "Content-Type": "application/json",
                                                              "Content-Encoding": "gzip"}},
     415, "invalid_request_error", "unsupported_content_encoding", None),
    ("form-br", TRANSCRIBE, transcription("model", "file", headers={"Content-Encoding": "br"}),
     415, "invalid_request_error", "unsupported_content_encoding", None),
    ("form-identity-then-deflate", TRANSCRIBE, transcription("model", "file",
                                                             headers={"Content-Encoding": "identity, deflate"}),
     415, "invalid_request_error", "unsupported_content_encoding", None),
    ("unknown-path", "/v1/chat/completions", {"json": {}}, 404, "invalid_request_error", "not_found", None),
    ("wrong-method", SPEECH, {"method": "GET"}, 405, "invalid_request_error", "method_not_allowed", None),
]


@pytest.mark.parametrize("path, kw, status, type_, code, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_gateway_errors(gateway: Gateway, fake: FakeUpstream, path: str, kw: dict[str, Any], status: int,
                              type_: str, code: str, param: str | None) -> None:
    kw = dict(kw)
    got_status, _, body = await call(gateway, path, kw.pop("method", "POST"), **kw)
    assert got_status == status
    assert body == {"error": {"message": body["error"]["message"], "type": type_, "param": param, "code": code}}
    assert body["error"]["message"]
    assert fake.received == []  # rejected before anything reached the upstream


@pytest.mark.parametrize("path, method, status, allow", [
    (SPEECH, "GET", 405, "POST"), (SPEECH, "PUT", 405, "POST"), ("/v1/models", "POST", 405, "GET, HEAD"),
    ("/livez", "DELETE", 405, "GET, HEAD"), ("/v1/audio/speech/", "POST", 404, None), ("/", "GET", 404, None),
    ("/v1/models/tts-prod", "DELETE", 405, "GET, HEAD"), ("/v1/models/a/b", "POST", 405, "GET, HEAD"),
    ("/v1/models/", "GET", 404, None)])
async def test_unrouted_requests_get_the_envelope_and_our_headers(gateway: Gateway, path: str, method: str,
                                                                 status: int, allow: str | None) -> None:
    got_status, headers, body = await call(gateway, path, method, headers={"x-aisix-request-id": "unrouted-1"})
    assert (got_status, body["error"]["type"]) == (status, "invalid_request_error")
    assert headers.get("Allow") == allow
    lower = {name.lower(): value for name, value in headers.items()}
    assert (lower["server"], lower["x-aisix-request-id"], lower["x-request-id"]) == ("aisix", "unrouted-1", "unrouted-1")


@pytest.mark.parametrize("request_line", [b"GET /v1/models%0a HTTP/1.1", b"GET /nope%0d%0aX HTTP/1.1",
                                          b"OPTIONS * HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1"])
async def test_a_target_no_route_can_match_gets_the_envelope_too(gateway: Gateway, request_line: bytes) -> None:
    # A decoded line break, or no path at all (asterisk and authority forms): aiohttp's plain-text
    # 404 (with its version in Server), no envelope, no request id, no access line.
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 404")
    assert "server: aisix" in lines and any(line.startswith("x-aisix-request-id: ") for line in lines)
    assert json.loads(body)["error"]["code"] == "not_found"


async def test_body_limit(make_gateway, fake: FakeUpstream) -> None:
    gw = make_gateway({"proxy": {"request_body_limit_bytes": 4096}})
    # A declared Content-Length over the cap is 413 before anything else, even auth.
    status, _, body = await call(gw, SPEECH, data=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert (status, body["error"]["code"]) == (413, "request_too_large")

    head = form("model", "file")[0][:300]  # a valid start, then more than the cap allows

    async def chunks():
        yield head
        for _ in range(10):
            yield b"x" * 1000

    kw = transcription("model", "file")
    kw["data"] = chunks()  # chunked: the cap is found while streaming
    status, _, body = await call(gw, TRANSCRIBE, **kw)
    assert (status, body["error"]["code"]) == (413, "request_too_large")


async def test_upstream_unreachable_is_502_without_the_url(make_gateway, fake: FakeUpstream) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = make_gateway(upstream_base=f"http://127.0.0.1:{port}/v1")
    for path, kw in ((SPEECH, speech()), (TRANSCRIBE, transcription("model", "file"))):
        status, _, body = await call(gw, path, **kw)
        assert (status, body["error"]["type"], body["error"]["code"]) == (502, "upstream_error", "upstream_unavailable")
        assert str(port) not in body["error"]["message"] and "127.0.0.1" not in body["error"]["message"]
        assert PROVIDER_SECRET not in str(body)


@pytest.mark.parametrize("fail", ["stall_headers", "reset_before", "garbage"])
async def test_upstream_failures_before_the_answer(make_gateway, fake: FakeUpstream, fail: str) -> None:
    gw = make_gateway({"upstream": {"timeout_ms": 300}})
    fake.behaviour = Behaviour(fail=fail)
    status, _, body = await call(gw, SPEECH, **speech())
    expected = (504, "upstream_timeout") if fail == "stall_headers" else (502, "upstream_unavailable")
    assert (status, body["error"]["code"]) == expected
    assert body["error"]["type"] == "upstream_error"


async def test_models_lists_the_callers_aliases(gateway: Gateway) -> None:
    status, _, body = await call(gateway, "/v1/models", "GET", headers=bearer("sk-restricted-secret"))
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["whisper-prod"]
    status, _, body = await call(gateway, "/v1/models", "GET", headers=bearer(TEAM_A))
    assert [m["id"] for m in body["data"]] == ["tts-prod", "whisper-prod"]
    status, _, body = await call(gateway, "/v1/models", "GET")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_health(gateway: Gateway) -> None:
    for path in ("/livez", "/readyz"):
        status, _, _ = await call(gateway, path, "GET")
        assert status == 200
