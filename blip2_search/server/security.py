"""Who may talk to the server: the bind rule, the token, and one ASGI guard in front of every request.

The guard (outermost application middleware) does, in order:
1. Host check while bound to loopback without a token: only `localhost`/loopback names are served,
   which defeats DNS rebinding (a web page making the browser call 127.0.0.1 under its own name).
2. Cross-site check: a POST whose `Origin` is not this server is refused (CSRF).
3. Token check on `/api/...` when a token is set: `Authorization: Bearer T` or the cookie set by
   opening `/?token=T` once; compared in constant time. Browsers send a host's cookies to all its
   ports, so the cookie is this server's own: its port is in the name, and its value is derived
   from the token and the port (other services on the host never see the token itself).
4. Body size: `Content-Length` over the limit is refused at once; a chunked body is counted as it
   is read and refused when it passes the limit.
It also adds security headers (CSP, nosniff, no framing, no referrer) to every response, and drops
the body of an answer to HEAD (its headers, Content-Length included, stay the GET's).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
from urllib.parse import unquote_plus, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidInputError, Spelled
from .limits import MAX_JSON_BYTES, MAX_QUERY_BYTES, MAX_RERANK_IDS, ApiError

TOKEN_COOKIE = "blip2_search_token"
"""Start of the name of the cookie that logs the web page in (its <img> tags cannot send a header);
`token_cookie` adds the server's port."""
MIN_TOKEN_CHARS = 16
# URL-unreserved characters only: the token travels in a query string (?token=) and a cookie unquoted.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]+")
_LOOPBACK_NAMES = ("localhost", "localhost.")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1), which other machines cannot reach."""
    name = host.strip().lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None, source: str = "--token") -> str | None:
    """None (no token) or a token fit for URLs, headers and cookies: >= 16 characters of `A-Za-z0-9._~-`.
    `source` is where it came from, for the message (`--token`, or `BLIP2_SEARCH_TOKEN` for the env var)."""
    if token is None:
        return None
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
        raise InvalidInputError(
            f"{source} must be at least {MIN_TOKEN_CHARS} characters of letters, digits and -._~; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return token


def check_bind(host: str, token: str | None, token_source: str = "--token", *, bound: bool = False) -> None:
    """Refuse to listen beyond this machine without a token (InvalidInputError naming both fixes, as options on the
    command line and as `serve`'s keywords to Python callers). `bound`: `host` is the address of the socket a
    Python caller passed (`serve(sock=...)`), which the message names instead of `host=`."""
    check_token(token, token_source)
    if not is_loopback(host) and not token:
        where, default = ((f"the socket bound to {host!r}", "a socket bound to '127.0.0.1', e.g. sock=bind_socket('127.0.0.1', port)")
                          if bound else (f"host={host!r}", "keep the default host='127.0.0.1'"))
        raise InvalidInputError(
            "refusing to serve on {where} without a token: other machines could read your photos; pass {token}, e.g. "
            "{example}, or {default}",
            where=Spelled(where, f"--host {host}"),
            token=Spelled("token=T", "--token T (or set BLIP2_SEARCH_TOKEN)"),
            example=Spelled("token=secrets.token_urlsafe(24)", "--token $(python -c 'import secrets; print(secrets.token_urlsafe(24))')"),
            default=Spelled(default, "keep the default --host 127.0.0.1"),
        )


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison (the time taken does not reveal how much of the token was right)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogatepass"))


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer T` header, if any."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def token_cookie(scope: Scope, token: str) -> tuple[str, str]:
    """(name, value) of this server's login cookie: `blip2_search_token_PORT`, PORT being the port the
    request came in on, and an HMAC of the token for that port (the token itself stays out of cookies)."""
    server = scope.get("server") or ()
    port = server[1] if len(server) > 1 and server[1] else ""
    value = hmac.new(token.encode("utf-8"), f"blip2-search cookie {port}".encode(), hashlib.sha256).hexdigest()
    return (f"{TOKEN_COOKIE}_{port}" if port else TOKEN_COOKIE), value


def cookie_value(headers: Headers, name: str) -> str | None:
    """The value of cookie `name`, if any (parsed by hand: a malformed Cookie header must not raise)."""
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def allowed_host_names(host: str, token: str | None) -> frozenset[str] | None:
    """Host header names served: loopback names when bound to loopback without a token, else any (None)."""
    if token or not is_loopback(host):
        return None
    return frozenset({*_LOOPBACK_NAMES, "127.0.0.1", "::1", host.strip().lower().strip("[]")})


class Guard:
    """The request guard described in the module docstring, as plain ASGI middleware."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: frozenset[str] | None, max_body: int):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        send = _with_security_headers(send, api=path.startswith("/api/"), head=scope["method"] == "HEAD")
        refusal = self._refusal(scope, headers, path)
        if refusal is not None:
            status, message, extra = refusal
            await _send_json(send, status, message, extra)
            return
        await self.app(scope, _counting(receive, self.max_body, headers), send)

    def _refusal(self, scope: Scope, headers: Headers, path: str) -> tuple[int, str, dict] | None:
        host = _host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return 403, (f"Host {host!r} is not this server's name; open it as {_own_url(scope)} "
                         "(other names are refused to stop DNS-rebinding attacks)"), {}
        origin = headers.get("origin")
        if scope["method"] not in _SAFE_METHODS and origin and (origin == "null" or _netloc(origin) != headers.get("host", "").lower()):
            return 403, f"cross-site request from {origin} refused; call the API from this server's own page or without an Origin header", {}
        if self.token and (path == "/api" or path.startswith("/api/")):
            cookie_name, expected_cookie = token_cookie(scope, self.token)
            bearer, cookie = bearer_token(headers), cookie_value(headers, cookie_name)
            if bearer is None and cookie is None:
                return 401, ("this server needs a token: send 'Authorization: Bearer TOKEN', or open /?token=TOKEN once "
                             "in the browser (TOKEN is the --token the server was started with)"), {"www-authenticate": "Bearer"}
            if not (token_matches(self.token, bearer) if bearer is not None else token_matches(expected_cookie, cookie)):
                return 401, ("the token is wrong; use the --token the server was started with "
                             "(in the browser open /?token=TOKEN again)"), {"www-authenticate": 'Bearer error="invalid_token"'}
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, f"Content-Length {length!r} is not a number; send a valid HTTP request", {}
            if int(length) > self.max_body:
                return 413, _too_large(int(length), self.max_body, headers), {}
        return None


def _own_url(scope: Scope) -> str:
    """http://ADDRESS:PORT/ of the socket the request came in on (a loopback address here)."""
    address, port = (tuple(scope.get("server") or ()) + (None, None))[:2]
    if not address or not port:
        return "http://127.0.0.1:PORT/"
    return f"http://[{address}]:{port}/" if ":" in address else f"http://{address}:{port}/"


def redact_token(target: str) -> str:
    """A request target (path?query) with the value of every token-like parameter replaced by REDACTED.

    Token-like: the name, percent-decoded, case-folded and with everything but letters dropped, is
    `token` (`TOKEN`, `token+`, `token%00`): a mistyped login URL still carries the token. Parameters are
    split at `;` as well as `&`, as some parsers do."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = re.split(r"([&;])", query)  # separators kept at odd positions
    for i in range(0, len(parts), 2):
        name = parts[i].partition("=")[0]
        if _is_token_name(name):
            encoded_equals = "=" in unquote_plus(name, errors="replace")  # token%3DSECRET: the value is in the name
            parts[i] = f"{'token' if encoded_equals else name}=REDACTED"
    return f"{path}?{''.join(parts)}"


def without_token(query: str) -> str:
    """A query string (percent-encoded) without its token-like parameters (see `redact_token`): where the
    login URL /?q=red&token=T sends the browser back to, the search it was opened with."""
    parts, kept = re.split(r"([&;])", query), []  # separators at odd positions, kept as they were
    for i in range(0, len(parts), 2):
        if parts[i] and not _is_token_name(parts[i].partition("=")[0]):
            kept += [parts[i - 1], parts[i]] if kept else [parts[i]]
    return "".join(kept)


def _is_token_name(name: str) -> bool:
    """True for a query parameter name that reads as `token` once decoded, case-folded and stripped of non-letters."""
    decoded = unquote_plus(name, errors="replace").casefold().partition("=")[0]  # an encoded '=' ends the name too
    return "".join(c for c in decoded if c.isalpha()) == "token"


class RedactTokenFilter(logging.Filter):
    """For uvicorn's access log: the login URL /?token=T is logged as /?token=REDACTED (see `redact_token`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "?" in a for a in record.args):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a for a in record.args)
        return True


def _too_large(size: int | None, limit: int, headers: Headers) -> str:
    """`size`: the declared body size, or None when a chunked body went past the limit while arriving."""
    got = f"is {size / 1e6:.1f} MB, over" if size is not None else "goes over"
    if headers.get("content-type", "").lower().startswith("multipart/"):
        fix = "send a smaller image (resize or re-export it)"
    else:
        fix = (f"images go as multipart/form-data; a JSON body is at most {MAX_JSON_BYTES // 1024} KB "
               f"(a query of at most {MAX_QUERY_BYTES} bytes and at most {MAX_RERANK_IDS} ids)")
    return f"request body {got} the {limit // (1024 * 1024)} MB limit; {fix}"


def _counting(receive: Receive, limit: int, headers: Headers) -> Receive:
    """`receive` that raises 413 once more than `limit` body bytes have arrived (chunked uploads)."""
    total = 0

    async def wrapped() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise ApiError(413, _too_large(None, limit, headers))
        return message

    return wrapped


def _with_security_headers(send: Send, *, api: bool, head: bool) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.setdefault("x-content-type-options", "nosniff")
            headers.setdefault("x-frame-options", "DENY")
            headers.setdefault("referrer-policy", "no-referrer")
            headers.setdefault("content-security-policy", CONTENT_SECURITY_POLICY)
            headers.setdefault("cross-origin-resource-policy", "same-origin")
            if api:
                headers.setdefault("cache-control", "no-store")
        elif message["type"] == "http.response.body" and head and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return wrapped


async def _send_json(send: Send, status: int, message: str, extra: dict) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _host_name(host_header: str) -> str:
    """The name part of a Host header, lower-case, without port or IPv6 brackets."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _netloc(origin: str) -> str:
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return ""


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "Guard",
    "MIN_TOKEN_CHARS",
    "RedactTokenFilter",
    "TOKEN_COOKIE",
    "allowed_host_names",
    "bearer_token",
    "check_bind",
    "check_token",
    "cookie_value",
    "is_loopback",
    "redact_token",
    "without_token",
    "token_cookie",
    "token_matches",
]
