"""Every error the gateway itself answers with, and the one OpenAI envelope renderer.

[core] No I/O. Handlers raise a ``GatewayError``; the envelope middleware renders it. Messages
are written for callers: they never carry an upstream URL, a secret, a prompt or a path.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An answer the gateway gives on its own behalf (never a relayed upstream answer)."""

    __slots__ = ("status", "type", "code", "message", "param", "headers", "_body")

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
        if self._body is None:  # rendered once: the usage event counts it, the middleware sends it
            self._body = render(self.message, self.type, self.param, self.code)
        return self._body

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r})"


def render(message: str, type: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def invalid_request(code: str, message: str, param: str | None = None, status: int = 400) -> GatewayError:
    return GatewayError(status, "invalid_request_error", code, message, param)


def invalid_api_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, "authentication_error", "invalid_api_key", message)


def key_disabled() -> GatewayError:
    return GatewayError(401, "authentication_error", "api_key_disabled", "This API key is disabled.")


def key_expired() -> GatewayError:
    return GatewayError(401, "authentication_error", "api_key_expired", "This API key has expired.")


def model_not_allowed(alias: str) -> GatewayError:
    return GatewayError(
        403, "permission_error", "model_not_allowed",
        f"This API key may not use the model '{alias}'.",
    )


def model_not_found(alias: str) -> GatewayError:
    return invalid_request("model_not_found", f"The model '{alias}' does not exist.", status=404)


def missing_model() -> GatewayError:
    return invalid_request("missing_model", "The 'model' field is required and must be a non-empty string.", "model")


def missing_file() -> GatewayError:
    return invalid_request("missing_file", "The 'file' field is required.", "file")


def invalid_json(message: str) -> GatewayError:
    return invalid_request("invalid_json", message)


def invalid_multipart(message: str) -> GatewayError:
    return invalid_request("invalid_multipart", message)


def unsupported_content_type(expected: str) -> GatewayError:
    return invalid_request("unsupported_content_type", f"Content-Type must be {expected}.")


def unsupported_content_encoding() -> GatewayError:
    exc = invalid_request("unsupported_content_encoding",
                          "Request bodies must not be compressed: send them without Content-Encoding.", status=415)
    exc.headers["Accept-Encoding"] = "identity"  # RFC 7694: the codings this resource accepts
    return exc


def request_too_large(limit: int) -> GatewayError:
    return invalid_request("request_too_large", f"The request body is over the limit of {limit} bytes.", status=413)


def upstream_unavailable() -> GatewayError:
    return GatewayError(502, "upstream_error", "upstream_unavailable", "The upstream provider could not be reached.")


def upstream_timeout() -> GatewayError:
    return GatewayError(504, "upstream_error", "upstream_timeout", "The upstream provider did not answer in time.")


def client_timeout() -> GatewayError:
    return invalid_request("client_timeout", "The request body did not arrive in time.", status=408)


def client_closed() -> GatewayError:
    """The caller went away; never seen by anyone, but it ends the exchange as a 499."""
    return invalid_request("client_closed", "The client closed the connection.", status=499)


def not_found() -> GatewayError:
    return invalid_request("not_found", "No such route.", status=404)


def method_not_allowed() -> GatewayError:
    return invalid_request("method_not_allowed", "Method not allowed on this route.", status=405)


def internal_error() -> GatewayError:
    return GatewayError(500, "server_error", "internal_error", "The gateway failed to handle this request.")
