"""The console's pages and actions: each reads or acts through `Data` (off the event
loop, in a worker thread) and renders a template, or JSON for a script that asks for
it (`Accept: application/json`). Actions answer with a redirect to the page they came
from (POST, redirect, GET), which shows what they did."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from returner.console.auth import checked_form, csrf_token, local_target, sign_in
from returner.console.data import Data, Query, Replayed
from returner.errors import RedisUnavailable

MAX_ID_CHARS = 1024  # longer than any id the service keeps whole
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
THUMB_CACHE = "private, max-age=86400"
NONE = "\N{EN DASH}"  # shown for a figure that is not known


def data(request: Request) -> Data:
    found: Data = request.app.state.data
    return found


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def as_json(value: Any, status_code: int = 200) -> Response:
    plain = dataclasses.is_dataclass(value) and not isinstance(value, type)
    body = dataclasses.asdict(value) if plain else value
    text = json.dumps(body, default=str, ensure_ascii=False)
    return Response(text, status_code, media_type="application/json")


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    access = request.app.state.access
    context.update(
        csrf=csrf_token(request),
        signed_in=access.required and request.session.get("auth") is True,
        queue=data(request).queue,
        notice=request.session.pop("notice", None),
    )
    response: Response = request.app.state.templates.TemplateResponse(
        request, name, context, status_code=status_code
    )
    return response


# ---------------------------------------------------------------- filters


def count(value: int | None) -> str:
    return NONE if value is None else f"{value:,}"


def age(seconds: float | None) -> str:
    """A duration as a person reads it at a glance: 4 s, 3 min, 2 h 5 min, 3 d 4 h."""
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def since(stream_id: str) -> str:
    """How long ago a stream entry was added, from its ID."""
    millis = stream_id.partition("-")[0]
    if not millis.isdigit():
        return NONE
    return age(max(0.0, time.time() - int(millis) / 1000))


def name(path: str) -> str:
    """A JPEG's file name, with its day directory under OUTPUT_LAYOUT=daily."""
    parts = PurePath(path).parts
    daily = len(parts) > 1 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[-2])
    return "/".join(parts[-2:]) if daily else parts[-1] if parts else path


def when(timestamp: str | None) -> str:
    """A record's ISO timestamp as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    if not timestamp:
        return NONE
    try:
        moment = datetime.fromisoformat(timestamp).astimezone(UTC)
    except ValueError:
        return timestamp
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- pages


async def overview(request: Request) -> Response:
    seen = await run_in_threadpool(data(request).overview)
    if wants_json(request):
        return as_json(seen)
    return render(request, "overview.html", {"ov": seen, "page": "overview"})


async def overview_live(request: Request) -> Response:
    seen = await run_in_threadpool(data(request).overview)
    return render(request, "_live.html", {"ov": seen})


def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and len(value) > MAX_ID_CHARS:
        raise HTTPException(400, f"{name}: longer than {MAX_ID_CHARS} characters")
    return value


def query_of(request: Request) -> Query:
    """The search in the URL. Raises HTTPException 400."""
    before = request.query_params.get("before")
    if before is not None and not (before.isdigit() and 0 < int(before) < 2**63):
        raise HTTPException(400, "before: not a record id")
    return Query(
        request_id=_param(request, "request_id"),
        image_id=_param(request, "image_id"),
        failed=request.query_params.get("failed") in ("1", "on", "true"),
        before=int(before) if before else None,
    )


def results_url(query: Query, before: int | None = None) -> str:
    params = {"request_id": query.request_id, "image_id": query.image_id, "before": before}
    shown = {k: v for k, v in params.items() if v is not None}
    if query.failed:
        shown["failed"] = "1"
    return "/results" + (f"?{urlencode(shown)}" if shown else "")


async def results(request: Request) -> Response:
    query = query_of(request)
    page = await run_in_threadpool(data(request).results, query)
    if wants_json(request):
        return as_json(page)
    links = {
        "newest": results_url(query) if query.before else None,
        "older": results_url(query, page.older) if page.older else None,
    }
    context = {"q": query, "found": page, "links": links, "page": "results"}
    return render(request, "results.html", context)


async def thumbnail(request: Request) -> Response:
    record_id: int = request.path_params["record_id"]
    small = await run_in_threadpool(data(request).thumbnail, record_id)
    if small is None:
        return PlainTextResponse("no image\n", 404, headers={"cache-control": "no-store"})
    return Response(small, media_type="image/jpeg", headers={"cache-control": THUMB_CACHE})


async def dead_letters(request: Request) -> Response:
    before = request.query_params.get("before")
    if before is not None and not _STREAM_ID.fullmatch(before):
        raise HTTPException(400, "before: not a stream ID")
    page = await run_in_threadpool(data(request).dead_letters, before)
    if wants_json(request):
        return as_json(page)
    older = f"/dead-letters?{urlencode({'before': page.older})}" if page.older else None
    context = {"found": page, "older": older, "newest": before is not None, "page": "dead"}
    return render(request, "dead_letters.html", context)


# ---------------------------------------------------------------- actions


def replayed_notice(done: Replayed, stream: str) -> dict[str, str]:
    if not done.moved and done.gone:
        return {"kind": "error", "text": "Nothing replayed: already gone (replayed elsewhere)."}
    plural = "" if done.moved == 1 else "s"
    text = f"Moved {done.moved} dead letter{plural} back into {stream}; the workers retry them."
    if done.gone:
        text += f" {done.gone} were already gone."
    return {"kind": "ok", "text": text}


async def _replayed(request: Request, action: Any, *args: Any) -> Response:
    try:
        done: Replayed = await run_in_threadpool(action, *args)
    except RedisUnavailable as exc:
        if wants_json(request):
            return as_json({"error": str(exc)}, 503)
        request.session["notice"] = {"kind": "error", "text": f"Replay failed: {exc}"}
        return RedirectResponse("/dead-letters", status_code=303)
    if wants_json(request):
        return as_json(done)
    request.session["notice"] = replayed_notice(done, data(request).stream.keys.stream)
    return RedirectResponse("/dead-letters", status_code=303)


async def replay(request: Request) -> Response:
    form = await checked_form(request, request.app.state.access)
    dead_id = form.get("id")
    if not isinstance(dead_id, str) or not _STREAM_ID.fullmatch(dead_id):
        raise HTTPException(400, "id: not a dead letter's stream ID")
    return await _replayed(request, data(request).replay, dead_id)


async def replay_all(request: Request) -> Response:
    form = await checked_form(request, request.app.state.access)
    request_id = form.get("request_id") or None
    if request_id is not None and not isinstance(request_id, str):
        raise HTTPException(400, "request_id: not text")
    return await _replayed(request, data(request).replay_all, request_id)


# ---------------------------------------------------------------- access


async def signin_form(request: Request) -> Response:
    if not request.app.state.access.required:
        return RedirectResponse("/", status_code=303)
    target = local_target(request.query_params.get("next"))
    return render(request, "signin.html", {"next": target, "wrong": False, "page": "signin"})


async def signin(request: Request) -> Response:
    ok, form = await sign_in(request, request.app.state.access)
    target = local_target(form.get("next"))
    if ok:
        return RedirectResponse(target, status_code=303)
    context = {"next": target, "wrong": True, "page": "signin"}
    return render(request, "signin.html", context, status_code=401)


async def signout(request: Request) -> Response:
    await checked_form(request, request.app.state.access)
    request.session.clear()
    return RedirectResponse("/signin", status_code=303)


async def healthz(_request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if wants_json(request) or "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse(f"{exc.detail}\n", exc.status_code, headers=exc.headers)
    context = {"status": exc.status_code, "detail": exc.detail, "page": "error"}
    return render(request, "error.html", context, status_code=exc.status_code)


EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: http_error}
