"""The console as a Starlette app: routes, the middleware around them (headers, host
check, session, access), and the templates.

Every response carries a strict Content-Security-Policy (scripts and styles from the
console's own static files only, no inline script; no framing), X-Content-Type-Options
and a Server-Timing header with the time the console spent on it. Templates escape
every value (autoescape, never `|safe` on data): an image id is text, whatever it holds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from returner.console import views
from returner.console.auth import LOOPBACK_NAMES, SESSION_COOKIE, SESSION_MAX_AGE_S, Access, Gate
from returner.console.data import Data
from returner.settings import Settings

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
MAX_BODY_BYTES = 64 * 1024  # forms only: a few fields


class SecurityHeaders:
    """Adds HEADERS, Server-Timing, and `Cache-Control: no-store` unless the route set
    its own (pages show live data, and who may see them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    static = scope["path"].startswith("/static/")
                    headers["cache-control"] = "public, max-age=3600" if static else "no-store"
                spent_ms = (time.perf_counter() - started) * 1000
                headers["server-timing"] = f"app;dur={spent_ms:.1f}"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def templates() -> Jinja2Templates:
    """The page templates, escaping everything (whatever a file's extension)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("returner.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        count=views.count, age=views.age, when=views.when, since=views.since, name=views.name
    )
    return Jinja2Templates(env=env)


def create_app(settings: Settings, data: Data | None = None) -> Starlette:
    """The console over the Redis and OUTPUT_DIR of `settings` (or of `data`).

    Raises SettingsError when REDIS_URL is not set.
    """
    token = settings.console_token.get_secret_value() if settings.console_token else None
    access = Access(token)
    source = data or Data(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        source.close()

    middleware = [Middleware(SecurityHeaders)]
    if not access.required:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES)))
    middleware += [
        Middleware(
            SessionMiddleware,
            secret_key=access.session_secret,
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE_S,
            same_site="lax",
        ),
        Middleware(Gate, access=access),
    ]
    app = Starlette(
        routes=routes(),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=views.EXCEPTION_HANDLERS,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.data = source
    app.state.access = access
    app.state.templates = templates()
    app.state.started = datetime.now(UTC)
    return app


def routes() -> list[Any]:
    return [
        Route("/", views.overview, name="overview"),
        Route("/overview/live", views.overview_live, name="overview_live"),
        Route("/results", views.results, name="results"),
        Route("/thumbs/{record_id:int}", views.thumbnail, name="thumbnail"),
        Route("/dead-letters", views.dead_letters, name="dead_letters"),
        Route("/dead-letters/replay", views.replay, methods=["POST"], name="replay"),
        Route("/dead-letters/replay-all", views.replay_all, methods=["POST"], name="replay_all"),
        Route("/signin", views.signin_form, methods=["GET"], name="signin_form"),
        Route("/signin", views.signin, methods=["POST"], name="signin"),
        Route("/signout", views.signout, methods=["POST"], name="signout"),
        Route("/healthz", views.healthz, name="healthz"),
        Mount("/static", StaticFiles(packages=[("returner.console", "static")]), name="static"),
    ]
