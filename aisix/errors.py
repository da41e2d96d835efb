"""Every error the gateway answers on its own behalf, the one OpenAI envelope renderer, and the one
mapping from what went wrong during a request to the status and code it ends with.

[core] No I/O. Stages raise a ``GatewayError``; the route wrapper (responses.py) renders it.
Messages are written for callers: they never carry an upstream URL, a secret, a prompt or a
path. docs/api.md, "Errors", is the table callers see.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


class GatewayError(Exception):
    """An answer the gateway gives on its own behalf (never a relayed upstream answer)."""

    __slots__ = ("_body", "code", "headers", "message", "param", "status", "type")

    def __init__(
        self,
        status: int,
        type: str,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self._body: bytes | None = None

    def body(self) -> bytes:
        if self._body is None:  # rendered once: the usage event counts it, the wrapper sends it
            self._body = render(self.message, self.type, self.param, self.code)
        return self._body

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r})"


# The longest Retry-After the OpenAI SDKs wait for: past it they retry after a second or so of
# their own backoff, sure to be refused again (a budget spent until midnight).
SDK_RETRY_AFTER_MAX_S = 60


class RateLimited(GatewayError):
    """A 429 from a gateway limit; ``scope`` ("key" or "model") names whose limit refused it.
    One whose Retry-After the SDKs would not wait for also says ``x-should-retry: false``."""

    __slots__ = ("scope",)

    def __init__(self, scope: str, code: str, message: str, headers: dict[str, str]) -> None:
        if int(headers.get("Retry-After", "0")) > SDK_RETRY_AFTER_MAX_S:
            headers["x-should-retry"] = "false"
        super().__init__(429, "rate_limit_error", code, message, None, headers)
        self.scope = scope


class UpstreamFailed(GatewayError):
    """No answer from an upstream: ``failure`` says how ("connect", "timeout" or "reset"), for
    routing's record of the attempt; the caller sees only the 502 or 504."""

    __slots__ = ("failure",)

    def __init__(self, status: int, code: str, message: str, failure: str) -> None:
        super().__init__(status, "upstream_error", code, message)
        self.failure = failure


class GuardrailBlocked(GatewayError):
    """A 422 from a blocking guardrail; ``guardrail`` names it (never the text it matched)."""

    __slots__ = ("guardrail",)

    def __init__(self, guardrail: str) -> None:
        super().__init__(422, "content_filter", "guardrail_blocked",
                         f"The request was blocked by the guardrail '{guardrail}'.")
        self.guardrail = guardrail


def render(message: str, type: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


# -- what a caller did ---------------------------------------------------------------------------

def invalid_request(code: str, message: str, param: str | None = None, status: int = 400) -> GatewayError:
    return GatewayError(status, "invalid_request_error", code, message, param)


def invalid_api_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, "authentication_error", "invalid_api_key", message)


def key_disabled() -> GatewayError:
    return GatewayError(401, "authentication_error", "api_key_disabled", "This API key is disabled.")


def key_expired() -> GatewayError:
    return GatewayError(401, "authentication_error", "api_key_expired", "This API key has expired.")


def model_not_allowed(alias: str) -> GatewayError:
    return GatewayError(403, "permission_error", "model_not_allowed", f"This API key may not use the model '{alias}'.")


def model_not_found(alias: str) -> GatewayError:
    return invalid_request("model_not_found", f"The model '{alias}' does not exist.", status=404)


def model_not_supported(alias: str, route: str) -> GatewayError:
    """The alias exists and the key may use it (so naming it leaks nothing), but not here."""
    path = "/v1/realtime" if route == "realtime" else f"/v1/audio/{route}"
    return invalid_request("model_not_supported", f"The model '{alias}' cannot be used with {path}.", "model")


def _digits(seconds: float, bound: float) -> int:
    """The fewest decimals (a tenth, a millisecond, a microsecond) at which ``seconds`` reads as
    more than ``bound`` (20.04 s over 20 is "20.0" to a tenth; 20.0004 s is "20.000" to the ms)."""
    for digits in (1, 3):
        if float(f"{seconds:.{digits}f}") > float(f"{bound:.{digits}f}"):
            return digits
    return 6


def _over(seconds: float, limit: float) -> str:
    """A length to a tenth, unless that would read as within ``limit``: then to as many decimals
    as it takes."""
    return f"{seconds:.{_digits(seconds, limit)}f}"


def audio_too_long(seconds: float, limit: int, at_least: bool = False) -> GatewayError:
    """``at_least``: the length is the audio seen so far (no header stated it), not the file's."""
    length = f"{'at least ' if at_least else ''}{_over(seconds, limit)}"
    return invalid_request("audio_too_long", f"The audio file is {length} seconds long; this model takes at most "
                           f"{limit} seconds.", "file")


def missing_model() -> GatewayError:
    return invalid_request("missing_model", "The 'model' field is required and must be a non-empty string.", "model")


def missing_file() -> GatewayError:
    return invalid_request("missing_file", "The 'file' field is required.", "file")


def invalid_json(message: str) -> GatewayError:
    return invalid_request("invalid_json", message)


def invalid_multipart(message: str) -> GatewayError:
    return invalid_request("invalid_multipart", message)


def invalid_body() -> GatewayError:
    return invalid_request("invalid_body", "The request body is malformed.")


def invalid_http_request() -> GatewayError:
    return invalid_request("invalid_http_request",
                           "The request is not valid HTTP: its request line or a header is malformed or too long.")


def invalid_header() -> GatewayError:
    return invalid_request("invalid_header", "A header value contains a line break.")


def unsupported_content_type(expected: str) -> GatewayError:
    return invalid_request("unsupported_content_type", f"Content-Type must be {expected}.")


def unsupported_content_encoding() -> GatewayError:
    exc = invalid_request("unsupported_content_encoding",
                          "Request bodies must not be compressed: send them without Content-Encoding.", status=415)
    exc.headers["Accept-Encoding"] = "identity"  # RFC 7694: the codings this resource accepts
    return exc


def unsupported_transfer_encoding() -> GatewayError:
    return invalid_request("unsupported_transfer_encoding",
                           "Request bodies may only be chunked: send them without another Transfer-Encoding.",
                           status=501)


def request_too_large(limit: int) -> GatewayError:
    return invalid_request("request_too_large", f"The request body is over the limit of {limit} bytes.", status=413)


def window_exceeded(scope: str, who: str, limit: int, unit: str, period: str, reset: int) -> RateLimited:
    """A request or token window is spent; the headers describe that window."""
    after = str(reset)
    return RateLimited(scope, "rate_limit_exceeded", f"Rate limit of {limit} {unit} per {period} exceeded for {who}.",
                       {"Retry-After": after, f"x-ratelimit-limit-{unit}": str(limit),
                        f"x-ratelimit-remaining-{unit}": "0", f"x-ratelimit-reset-{unit}": after})


def budget_exceeded(scope: str, who: str, limit_usd: float, period: str, reset: int) -> RateLimited:
    """A cost budget (UTC day or month) is spent; Retry-After: to the window's end."""
    amount = f"{limit_usd:.6f}".rstrip("0").rstrip(".")  # 0.00001, never 1e-05
    return RateLimited(scope, "budget_exceeded", f"Budget of {amount} USD per {period} exceeded for {who}.",
                       {"Retry-After": str(reset)})


def audio_quota_exceeded(scope: str, who: str, limit: int, period: str, reset: int) -> RateLimited:
    """An audio-seconds quota is spent."""
    return RateLimited(scope, "rate_limit_exceeded",
                       f"Audio quota of {limit} seconds per {period} exceeded for {who}.", {"Retry-After": str(reset)})


def audio_quota_too_short(scope: str, who: str, limit: int, period: str, reset: int,
                          seconds: float, left: float, at_least: bool) -> RateLimited:
    """An upload longer than what an audio quota has left (the quota itself is not spent: a
    shorter upload is still taken, so the message says how much is left, not "exceeded")."""
    left = max(0.0, left)
    digits = _digits(seconds, left)  # never "39.8 left, and 39.8 long"
    return RateLimited(scope, "rate_limit_exceeded",
                       f"Audio quota of {limit} seconds per {period} for {who}: {left:.{digits}f} seconds left, "
                       f"and the audio file is {'at least ' if at_least else ''}{seconds:.{digits}f} seconds long.",
                       {"Retry-After": str(reset)})


def concurrency_exceeded(scope: str, who: str, limit: int) -> RateLimited:
    return RateLimited(scope, "concurrency_limit_exceeded",
                       f"Concurrency limit of {limit} requests in flight exceeded for {who}.", {"Retry-After": "1"})


def origin_not_allowed() -> GatewayError:
    """A browser's preflight from an origin proxy.cors does not list (the page sees only a CORS error)."""
    return GatewayError(403, "permission_error", "cors_origin_not_allowed",
                        "Cross-origin requests from this origin are not allowed.")


def client_timeout() -> GatewayError:
    return invalid_request("client_timeout", "The request body did not arrive in time.", status=408)


def not_found() -> GatewayError:
    return invalid_request("not_found", "No such route.", status=404)


def method_not_allowed(allow: str) -> GatewayError:
    exc = invalid_request("method_not_allowed", "Method not allowed on this route.", status=405)
    exc.headers["Allow"] = allow
    return exc


# -- what an upstream or the gateway did ---------------------------------------------------------

def upstream_unavailable(failure: str = "reset") -> UpstreamFailed:
    return UpstreamFailed(502, "upstream_unavailable", "The upstream provider could not be reached.", failure)


def upstream_auth_failed() -> GatewayError:
    """The provider refused the key the gateway holds for it (401): its body is not relayed (OpenAI's
    names the key's last characters), nor its status (the caller's own key is fine). The SDKs are
    told not to retry: the key stays refused until the operator mends it."""
    return GatewayError(502, "upstream_error", "upstream_auth_failed",
                        "The upstream provider refused the gateway's credentials for this model.",
                        headers={"x-should-retry": "false"})


def upstream_timeout(failure: str = "timeout") -> UpstreamFailed:
    return UpstreamFailed(504, "upstream_timeout", "The upstream provider did not answer in time.", failure)


def answer_too_large() -> GatewayError:
    """The SDKs are told not to retry: the provider transcribed (and bills) the upload, and would
    make the same transcript, too large again, of each upload sent again."""
    return GatewayError(502, "upstream_error", "upstream_answer_too_large",
                        "The upstream answer is too large to be checked by the guardrails.",
                        headers={"x-should-retry": "false"})


def internal_error() -> GatewayError:
    return GatewayError(500, "server_error", "internal_error", "The gateway failed to handle this request.")


# -- the one mapping -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outcome:
    """How a failed request ends: the status and code its usage event records, and the envelope
    the caller gets (None when nobody can be answered: the caller left, or has the status line
    of an answer already, and is cut off instead)."""

    status: int
    code: str
    reply: GatewayError | None


def outcome(exc: BaseException, waiting_on_client: bool, answered: bool) -> Outcome:
    """The one mapping from what ended a request to its status and code.

    ``waiting_on_client``: the request was waiting on the caller (reading its body, or writing
    to it) rather than on the upstream. ``answered``: the caller has the status line already;
    the status recorded is then the one sent.
    """
    reply: GatewayError
    if isinstance(exc, GatewayError):
        reply = exc
    elif isinstance(exc, TimeoutError):
        if waiting_on_client:
            reply = client_timeout()
        elif answered:
            return Outcome(504, "upstream_aborted", None)
        else:
            reply = upstream_timeout()
    elif isinstance(exc, ConnectionError):
        if waiting_on_client:
            return Outcome(499, "client_closed", None)
        if answered:
            return Outcome(502, "upstream_aborted", None)
        reply = upstream_unavailable()
    else:
        reply = internal_error()
    return Outcome(reply.status, reply.code, None if answered else reply)
