"""Who may use the console, and which requests count as theirs.

- With CONSOLE_TOKEN, every page, image and action needs it: a session signed in with
  it (a signed cookie, HttpOnly, SameSite=Lax, for 12 hours; the signing key is derived
  from the token, so changing the token signs everyone out), or `Authorization: Bearer
  TOKEN` for scripts. Tokens are compared in constant time (as digests, so their
  lengths do not show either).
- Without a token the console serves on loopback only, and answers only requests whose
  Host is a loopback name: a web page cannot reach it through a DNS name rebound to
  127.0.0.1.
- Actions are POSTs, and a POST is taken only with the CSRF token of its session (a
  hidden form field) and without a foreign Origin or a cross-site Sec-Fetch-Site;
  Bearer requests carry no cookie a browser could add on a page's behalf, so they need
  no CSRF token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from urllib.parse import quote, urlsplit

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

SESSION_COOKIE = "returner_console"
SESSION_MAX_AGE_S = 12 * 3600
# Host names a loopback console answers to ("[::1]" keeps its brackets in Host).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WRONG_TOKEN_DELAY_S = 0.5  # slows guessing; other requests go on meanwhile
MAX_FORM_FIELDS = 16


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class Access:
    """The console's token, if it has one."""

    def __init__(self, token: str | None) -> None:
        self._token = _digest(token) if token else None
        # Derived from the token: sessions survive a restart and die with the token.
        self.session_secret = (
            hmac.new(self._token, b"returner console session", "sha256").hexdigest()
            if self._token
            else secrets.token_hex(32)
        )

    @property
    def required(self) -> bool:
        return self._token is not None

    def matches(self, given: str) -> bool:
        """Whether `given` is the token, compared in constant time."""
        return self._token is not None and hmac.compare_digest(_digest(given), self._token)

    def bearer(self, conn: HTTPConnection) -> bool:
        """Whether the request carries the token as `Authorization: Bearer`."""
        scheme, _, given = conn.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.matches(given.strip())

    def allowed(self, conn: HTTPConnection) -> bool:
        if self._token is None:
            return True
        return conn.session.get("auth") is True or self.bearer(conn)


def public(path: str) -> bool:
    """The sign-in form, its style sheet and script, and the health check."""
    return path in ("/signin", "/healthz") or path.startswith("/static/")


class Gate:
    """Turns away every request that is not allowed to see what it asks for: a browser
    asking for a page is sent to the sign-in form, anything else gets 401."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or public(scope["path"]):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if self.access.allowed(conn):
            await self.app(scope, receive, send)
            return
        await refusal(conn)(scope, receive, send)


def refusal(conn: HTTPConnection) -> Response:
    """A browser navigating to a page goes to the sign-in form; anything else (a
    script, a thumbnail, the overview's refresh, a POST) gets 401."""
    mode = conn.headers.get("sec-fetch-mode")
    html = "text/html" in conn.headers.get("accept", "")
    navigating = mode == "navigate" or (mode is None and html)
    if conn.scope["method"] == "GET" and navigating:
        target = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
        return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)
    return PlainTextResponse(
        "sign in first (or send Authorization: Bearer TOKEN)\n",
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def same_origin(request: Request) -> bool:
    """Whether the browser says the request comes from the console's own pages (or
    says nothing, as scripts do). The Origin's host is compared with Host, not the
    scheme: behind a TLS proxy the console itself sees http."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc.lower() == (
        request.headers.get("host", "").lower()
    )


async def checked_form(request: Request, access: Access) -> FormData:
    """The form of a POST that is the user's own. Raises HTTPException 403."""
    if not same_origin(request):
        raise HTTPException(403, "refused: a request from another site")
    form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=8192)
    if access.required and access.bearer(request):
        return form
    expected, given = request.session.get("csrf"), form.get("csrf")
    if not (isinstance(expected, str) and isinstance(given, str)):
        raise HTTPException(403, "refused: no CSRF token (reload the page)")
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise HTTPException(403, "refused: a stale CSRF token (reload the page)")
    return form


def local_target(value: object) -> str:
    """Where to go after signing in: a path of this console, nothing else."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/"


async def sign_in(request: Request, access: Access) -> tuple[bool, FormData]:
    """Check a sign-in form: whether it gave the token (the session is then signed in,
    as a new session with a new CSRF token), and the form. Raises HTTPException 403 for
    a forged form."""
    form = await checked_form(request, access)
    given = form.get("token")
    if not access.required or not isinstance(given, str) or not access.matches(given):
        await asyncio.sleep(WRONG_TOKEN_DELAY_S)
        return False, form
    request.session.clear()
    request.session["auth"] = True
    csrf_token(request)
    return True, form
