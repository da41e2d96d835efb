"""CORS: cors.py as plain functions, then the headers a real gateway answers with, over plain HTTP
(test_browser.py has Chromium make the same requests and enforce them)."""

from __future__ import annotations

import aiohttp
import pytest

from aisix import cors
from aisix.config import hash_key
from tests.gateway import TEAM_A, Gateway

APP = "https://app.example.com"
EXPOSED = {"x-aisix-request-id", "x-request-id", "x-upstream-request-id", "retry-after", "retry-after-ms",
           "x-should-retry",
           "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
           "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}
SDK_HEADERS = ("authorization,content-type,openai-organization,openai-project,openai-beta,x-stainless-os,"
               "x-stainless-lang,x-stainless-package-version,x-stainless-runtime,x-stainless-retry-count")
LIMITED = "sk-cors-limited-secret"
LIMITED_KEY = {"display_name": "cors-limited", "key_hash": hash_key(LIMITED), "allowed_models": ["tts-*"],
               "rate_limit": {"rpd": 1}}
ROUTES = [("/v1/audio/speech", "POST"), ("/v1/audio/transcriptions", "POST"),
          ("/v1/audio/translations", "POST"), ("/v1/models", "GET, HEAD")]


# -- cors.py ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "origins"), [
    (["https://app.example.com"], {"https://app.example.com"}),
    (["HTTPS://App.Example.COM", "http://127.0.0.1:8080"], {"https://app.example.com", "http://127.0.0.1:8080"}),
    (["http://[::1]:3000"], {"http://[::1]:3000"}),
])
def test_origins_are_kept_as_browsers_send_them(given: list[str], origins: set[str]) -> None:
    policy = cors.parse(tuple(given), ())
    assert policy is not None and policy.origins == origins and not policy.any_origin


@pytest.mark.parametrize("bad", ["https://app.example.com/", "https://app.example.com:443", "http://a.example:80",
                                 "app.example.com", "ftp://app.example.com", "https://user@app.example.com",
                                 "https://app.example.com?x=1", "null", "https://*.example.com", "https://a:99999"])
def test_what_is_not_an_origin(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^must be '\*' or origins as browsers send them"):
        cors.parse((bad,), ())


def test_star_is_any_origin_and_alone() -> None:
    policy = cors.parse(("*",), ())
    assert policy is not None and policy.any_origin and policy.allows("https://anything.example")
    with pytest.raises(ValueError, match=r"^must be \['\*'\] alone"):
        cors.parse(("*", APP), ())
    assert cors.parse((), ()) is None  # no origins: CORS off


def test_grant_depends_on_the_origin_only_when_origins_are_listed() -> None:
    listed = cors.parse((APP,), ())
    anyone = cors.parse(("*",), ())
    assert listed is not None and anyone is not None
    granted = dict(listed.grant(APP))
    assert granted["Access-Control-Allow-Origin"] == APP and granted["Vary"] == "Origin"
    assert {h.strip().lower() for h in granted["Access-Control-Expose-Headers"].split(",")} >= EXPOSED
    assert dict(listed.grant("https://other.example")) == {"Vary": "Origin"}
    assert dict(listed.grant(None)) == {"Vary": "Origin"}  # a cache must not hand it to a browser
    assert dict(anyone.grant(None)) == dict(anyone.grant(APP))
    assert dict(anyone.grant(None))["Access-Control-Allow-Origin"] == "*" and "Vary" not in dict(anyone.grant(None))
    assert "Access-Control-Allow-Credentials" not in granted


@pytest.mark.parametrize(("requested", "granted"), [
    (SDK_HEADERS, SDK_HEADERS.replace(",", ", ")),
    ("Authorization, Content-Type", "authorization, content-type"),
    ("x-aisix-request-id,x-trace", "x-aisix-request-id"),
    ("cookie,x-forwarded-for,x-api-key", None),
    ("x-stainless-new-telemetry,openai-something-new", "x-stainless-new-telemetry, openai-something-new"),
    ("openai-beta\x00x", None),
    (None, None),
])
def test_preflight_grants_the_requested_headers_the_sdks_send(requested: str | None, granted: str | None) -> None:
    policy = cors.parse((APP,), ("x-aisix-request-id",))
    assert policy is not None
    headers = policy.preflight("POST", requested)
    assert headers["Access-Control-Allow-Methods"] == "POST" and headers["Access-Control-Max-Age"] == "7200"
    assert headers.get("Access-Control-Allow-Headers") == granted


# -- a gateway ----------------------------------------------------------------------------------

async def send(gw: Gateway, method: str, path: str, headers: dict[str, str] | None = None,
               **kw: object) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as s, s.request(method, gw.url + path, headers=headers, **kw) as r:
        return r, await r.read()


def exposed(r: aiohttp.ClientResponse) -> set[str]:
    return {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",") if h.strip()}


@pytest.fixture
def listed(make_gateway) -> Gateway:
    return make_gateway({"proxy": {"cors": {"allowed_origins": [APP, "http://127.0.0.1:5173"]}}},
                        api_keys=[LIMITED_KEY])


@pytest.mark.parametrize(("path", "methods"), ROUTES)
async def test_preflight_of_every_route_needs_no_key(listed: Gateway, path: str, methods: str) -> None:
    r, body = await send(listed, "OPTIONS", path, {
        "Origin": APP, "Access-Control-Request-Method": methods.split(",")[0],
        "Access-Control-Request-Headers": SDK_HEADERS + ",x-not-ours"})
    assert r.status == 204 and body == b""
    assert r.headers["Access-Control-Allow-Origin"] == APP and r.headers["Vary"] == "Origin"
    assert r.headers["Access-Control-Allow-Methods"] == methods
    assert r.headers["Access-Control-Allow-Headers"] == SDK_HEADERS.replace(",", ", ")
    assert r.headers["Access-Control-Max-Age"] == "7200" and r.headers["x-aisix-request-id"]
    assert "Access-Control-Allow-Credentials" not in r.headers


async def test_preflight_from_an_origin_not_listed_is_403(listed: Gateway) -> None:
    r, body = await send(listed, "OPTIONS", "/v1/audio/speech", {
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status == 403 and r.content_type == "application/json"
    assert b'"code":"cors_origin_not_allowed"' in body and b"evil" not in body
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    assert r.headers["Vary"] == "Origin" and r.headers["x-aisix-request-id"]


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/audio/speech", {}, 405),  # no preflight headers: not a preflight
    ("/v1/audio/speech", {"Origin": APP}, 405),
    ("/livez", {"Origin": APP, "Access-Control-Request-Method": "GET"}, 405),  # not an API route
    ("/v1/nope", {"Origin": APP, "Access-Control-Request-Method": "GET"}, 404),
])
async def test_other_options_requests_are_what_they_were(listed: Gateway, path: str, headers: dict[str, str],
                                                         status: int) -> None:
    r, body = await send(listed, "OPTIONS", path, headers)
    assert r.status == status and b'"error"' in body
    assert "Access-Control-Allow-Methods" not in r.headers


async def test_every_answer_to_a_listed_origin_is_readable(listed: Gateway) -> None:
    page = {"Origin": "http://127.0.0.1:5173"}
    speech = {"model": "tts-prod", "input": "hi", "voice": "alloy"}
    answers = {
        "speech 200": await send(listed, "POST", "/v1/audio/speech", {**page, "Authorization": f"Bearer {TEAM_A}"},
                                 json=speech),
        "models 200": await send(listed, "GET", "/v1/models", {**page, "Authorization": f"Bearer {TEAM_A}"}),
        "401": await send(listed, "GET", "/v1/models", page),
        "404 model": await send(listed, "POST", "/v1/audio/speech", {**page, "Authorization": f"Bearer {TEAM_A}"},
                                json={**speech, "model": "nope"}),
        "404 route": await send(listed, "GET", "/v1/nope", page),
    }
    limited = [await send(listed, "POST", "/v1/audio/speech", {**page, "Authorization": f"Bearer {LIMITED}"},
                          json=speech) for _ in range(3)]
    answers["429"] = next(a for a in limited if a[0].status == 429)  # rpd 1, whatever midnight does
    for what, (r, _) in answers.items():
        assert r.headers.get("Access-Control-Allow-Origin") == "http://127.0.0.1:5173", what
        assert r.headers.get("Vary") == "Origin" and exposed(r) >= EXPOSED, what
    window = {h.lower() for h in answers["429"][0].headers}
    assert {"retry-after", "x-ratelimit-limit-requests", "x-ratelimit-reset-requests"} <= window


@pytest.mark.parametrize("origin", [None, "https://evil.example", "https://app.example.com.evil.example"])
async def test_no_grant_without_a_listed_origin(listed: Gateway, origin: str | None) -> None:
    r, _ = await send(listed, "GET", "/v1/models",
                      {"Authorization": f"Bearer {TEAM_A}", **({"Origin": origin} if origin else {})})
    assert r.status == 200 and r.headers["Vary"] == "Origin"
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]


async def test_any_origin(make_gateway) -> None:
    gw = make_gateway({"proxy": {"cors": {"allowed_origins": ["*"]},
                                 "request_id_headers": ["x-request-id", "x-aisix-request-id"]}})
    r, _ = await send(gw, "OPTIONS", "/v1/audio/transcriptions", {
        "Origin": "https://anyone.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,x-request-id"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Headers"] == "authorization, x-request-id"  # a request-id header
    for headers in ({}, {"Origin": "https://anyone.example"}):  # the same answer for all: no Vary
        r, _ = await send(gw, "GET", "/v1/models", headers)
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*" and exposed(r) >= EXPOSED
        assert "Vary" not in r.headers


async def test_off_by_default(gateway: Gateway) -> None:
    r, body = await send(gateway, "OPTIONS", "/v1/audio/speech", {
        "Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert r.status == 405 and r.headers["Allow"] == "POST" and b"method_not_allowed" in body
    r, _ = await send(gateway, "GET", "/v1/models", {"Origin": APP, "Authorization": f"Bearer {TEAM_A}"})
    assert r.status == 200 and "Vary" not in r.headers
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
