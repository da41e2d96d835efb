"""Parser differentials the gateway must not forward: a caller's body that the gateway reads with
one `model` (or one prompt) and a common upstream parser reads with another.

The gateway checks one `model` value and rewrites only that one; whatever else it forwards
unchanged is read by the provider's own parser. Each case here is a layout that a mainstream
reader decodes into a `model` part, a `model` key or a prompt other than the one the gateway
checked: Go's mime.ParseMediaType (RFC 2231 continuations), readers that match names without case
(Go's encoding/json, ASP.NET's form collection), readers that undo a part's
Content-Transfer-Encoding (Go: quoted-printable; python-multipart: base64 too). No correct encoder
produces any of them, so each is a 400 and nothing reaches the upstream.
"""

from __future__ import annotations

import base64
import os
import quopri
import re
import urllib.parse

import pytest

from tests.fakes import FakeUpstream
from tests.gateway import Gateway
from tests.test_hostile import (
    END,
    FILE,
    FORM_TYPE,
    MODEL,
    PASSWORD_RULE,
    TRANSCRIBE,
    chunked,
    envelope,
    json_post,
    part,
    post,
)
from tests.test_transcriptions import no_complete_request_reached

_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)')


def go_form_name(disposition: str) -> str | None:
    """The part name Go's mime/multipart (Part.FormName, mime.ParseMediaType) reads from a
    Content-Disposition value: RFC 2231 parameters (`name*`, `name*0`, `name*0*`, ...) are
    stitched together and replace a plain `name`. A port of the stitching, for the cases here."""
    params: dict[str, str] = {}
    pieces: dict[str, dict[str, str]] = {}
    for key, value in _PARAM.findall(disposition):
        key = key.lower()
        value = value[1:-1] if value.startswith('"') else value
        if "*" in key:
            pieces.setdefault(key.partition("*")[0], {})[key] = value
        else:
            params[key] = value
    for base, parts in pieces.items():
        if base + "*" in parts:
            params[base] = urllib.parse.unquote(parts[base + "*"].split("'", 2)[2])
            continue
        stitched, n = [], 0
        while True:
            if f"{base}*{n}" in parts:
                stitched.append(parts[f"{base}*{n}"])
            elif f"{base}*{n}*" in parts:
                v = parts[f"{base}*{n}*"]
                stitched.append(urllib.parse.unquote(v.split("'", 2)[2] if n == 0 else v))
            else:
                break
            n += 1
        if stitched:
            params[base] = "".join(stitched)
    return params.get("name")


CONTINUED_NAMES = {
    "continuation": 'form-data; name="voice"; name*0="model"',
    "encoded-continuation": "form-data; name=\"voice\"; name*0*=utf-8''model",
    "two-pieces": 'form-data; name="voice"; name*0="mo"; name*1="del"',
    "empty-plain-name": 'form-data; name=""; name*0="model"',
    "upper-case-key": 'form-data; name="voice"; NAME*0="model"',
}


@pytest.mark.parametrize("disposition", CONTINUED_NAMES.values(), ids=CONTINUED_NAMES.keys())
async def test_a_continued_name_parameter_is_refused(gateway: Gateway, fake: FakeUpstream, disposition: str) -> None:
    """The gateway read this part as `voice` (or ``) and forwarded it untouched; Go reads it as
    `model`, so a Go upstream got gpt-secret (secret-model's upstream id, which this key may not
    use) next to the whisper-1 the gateway wrote, and takes one of the two."""
    assert go_form_name(disposition) == "model"  # the ambiguity is real
    hidden = part(b"Content-Disposition: " + disposition.encode(), b"gpt-secret")
    status, headers, out = await post(gateway, TRANSCRIBE, data=hidden + MODEL + FILE + END, ctype=FORM_TYPE)
    envelope(status, out, headers, 400, "invalid_multipart")
    assert fake.received == []


@pytest.mark.parametrize("name", ["Model", "MODEL", "mOdEl"])
@pytest.mark.parametrize("where", ["before-model", "between-model-and-file", "after-file"])
async def test_a_part_named_model_in_another_case_is_refused(gateway: Gateway, fake: FakeUpstream,
                                                             name: str, where: str) -> None:
    """Forwarded untouched before: a reader matching names without case (ASP.NET's
    IFormCollection) reads two model values, one of them never checked. Refused wherever it is:
    before the model (the state machine), in the usual prologue (its fast path), after the file
    (the upload is streaming, and is aborted)."""
    hidden = part(f'Content-Disposition: form-data; name="{name}"'.encode(), b"gpt-secret")
    if where == "before-model":
        body = hidden + MODEL + FILE + END
    elif where == "between-model-and-file":
        body = MODEL + hidden + FILE + END
    else:
        body = MODEL + part(b'Content-Disposition: form-data; name="file"; filename="a.wav"',
                            os.urandom(300_000)) + hidden + END
    status, headers, out = await post(gateway, TRANSCRIBE, data=chunked(body), ctype=FORM_TYPE)
    envelope(status, out, headers, 400, "invalid_multipart")
    await no_complete_request_reached(gateway, fake)


@pytest.mark.parametrize("key", ["MODEL", "Model", "mOdel", "Response_Format"])
async def test_a_speech_key_that_is_model_in_another_case_is_refused(gateway: Gateway, fake: FakeUpstream,
                                                                    key: str) -> None:
    """The gateway rewrote `model` and re-serialised `MODEL` as it came; Go's encoding/json (and
    .NET's web defaults) match keys without case, the last one winning: a Go upstream read
    gpt-secret. Likewise `response_format`, which says how an untyped or SSE answer is measured:
    read as another format upstream, the answer went unmeasured and unpriced."""
    data = b'{"model":"tts-prod","input":"x","voice":"a","%s":"gpt-secret"}' % key.encode()
    status, headers, out = await post(gateway, "/v1/audio/speech", **json_post(data))
    envelope(status, out, headers, 400, "invalid_json")
    assert fake.received == []


CODED_PROMPTS = {
    "base64": (b"base64", base64.b64encode(b"my password is swordfish")),
    "quoted-printable": (b"quoted-printable", quopri.encodestring(b"my password is swordfish").replace(b"a", b"=61")),
}


@pytest.mark.parametrize("coding", CODED_PROMPTS.values(), ids=CODED_PROMPTS.keys())
async def test_a_part_with_a_content_transfer_encoding_is_refused(make_gateway, fake: FakeUpstream,
                                                                  coding: tuple[bytes, bytes]) -> None:
    """The guardrail screened the encoded text and passed it; Go's reader undoes quoted-printable
    and python-multipart base64 too, so the upstream read the prompt the guardrail blocks."""
    name, value = coding
    assert b"password" not in value
    gw = make_gateway(guardrails=PASSWORD_RULE)
    prompt = part(b'Content-Disposition: form-data; name="prompt"\r\nContent-Transfer-Encoding: ' + name, value)
    status, headers, out = await post(gw, TRANSCRIBE, data=MODEL + prompt + FILE + END, ctype=FORM_TYPE)
    envelope(status, out, headers, 400, "invalid_multipart")
    assert fake.received == []


async def test_plain_forms_and_documents_still_pass(gateway: Gateway, fake: FakeUpstream) -> None:
    """What the SDKs send is untouched by the refusals above: other names and keys holding
    "model" (a filename, a nested key, `model_name`), 8bit and binary transfer encodings."""
    body = (MODEL + part(b'Content-Disposition: form-data; name="model_name"', b"x")
            + part(b'Content-Disposition: form-data; name="notes"\r\nContent-Transfer-Encoding: 8bit', b"y")
            + part(b'Content-Disposition: form-data; name="file"; filename="Model.wav"\r\n'
                   b"Content-Transfer-Encoding: binary", b"RIFF") + END)
    status, _, out = await post(gateway, TRANSCRIBE, data=body, ctype=FORM_TYPE)
    assert status == 200, out
    assert fake.wait_received()[0].body == body.replace(b"whisper-prod", b"whisper-1")
    fake.reset()
    data = b'{"model":"tts-prod","input":"x","voice":"a","extra":{"MODEL":"m"},"model_name":"n"}'
    status, _, out = await post(gateway, "/v1/audio/speech", **json_post(data))
    assert status == 200, out
    assert fake.wait_received()[0].body == data.replace(b'"tts-prod"', b'"gpt-4o-mini-tts"')


@pytest.mark.parametrize("key", ["INPUT", "Input"])
async def test_a_speech_key_that_is_input_in_another_case_is_refused(make_gateway, fake: FakeUpstream,
                                                                    key: str) -> None:
    """The same differential for the text the gateway screens and prices: it read `input` ("hi":
    2 characters, passed by the guardrail) and forwarded `INPUT` as it came; Go's encoding/json
    reads the last of the two, so a Go upstream spoke the text the guardrail blocks, and the caller
    paid for 2 characters of it."""
    gw = make_gateway(guardrails=PASSWORD_RULE)
    data = b'{"model":"tts-prod","input":"hi","voice":"a","%s":"my password is swordfish"}' % key.encode()
    status, headers, out = await post(gw, "/v1/audio/speech", **json_post(data))
    envelope(status, out, headers, 400, "invalid_json")
    assert fake.received == []


@pytest.mark.parametrize("name", ["Prompt", "PROMPT"])
async def test_a_part_named_prompt_in_another_case_is_refused(make_gateway, fake: FakeUpstream, name: str) -> None:
    """ASP.NET's form collection reads `Prompt` as `prompt`: the gateway captured and screened
    only `prompt`, so the prompt the guardrail blocks reached such an upstream unscreened."""
    gw = make_gateway(guardrails=PASSWORD_RULE)
    hidden = part(f'Content-Disposition: form-data; name="{name}"'.encode(), b"my password is swordfish")
    status, headers, out = await post(gw, TRANSCRIBE, data=MODEL + hidden + FILE + END, ctype=FORM_TYPE)
    envelope(status, out, headers, 400, "invalid_multipart")
    assert fake.received == []
