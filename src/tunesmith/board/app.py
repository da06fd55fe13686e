"""`tunesmith board`'s HTTP side: one page (static/), and a JSON API over the runs under the root.

Read-only except for launch/stop/chat (board/launch.py, board/chat.py). Every run is addressed by its
name relative to the root and resolved by RunFolders.resolve, so nothing outside the root is ever read:
a bad name is a plain 404. With an auth token, every request must carry it (a bearer header, or the
cookie that opening the page once with ?token=... sets).

    app = create_app(Path("saves"), auth_token=None)
    uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import hmac
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from tunesmith.board.logs import chart_groups, chart_series, read_json, thin
from tunesmith.board.runs import NotARun, RunFolders, checkpoints, read_config, tail
from tunesmith.training.run_files import CONFIG_FILE, CONSOLE_FILE, RESULTS_FILE

TOKEN_COOKIE = "tunesmith_board_token"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain"}
DEFAULT_MAX_POINTS = 2000


def create_app(root: Path, auth_token: str | None = None) -> FastAPI:
    """The board over the runs under `root`."""
    app = FastAPI(title="tunesmith board", docs_url=None, redoc_url=None, openapi_url=None)
    folders = RunFolders(root)
    if auth_token:
        _require_token(app, auth_token)
    _page_routes(app)
    _run_routes(app, folders)
    return app


def _require_token(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def check(request: Request, call_next):
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, token):  # the link printed at start: remember it
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        sent = header[len("Bearer "):] if header.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(sent, token):
            return PlainTextResponse("tunesmith board: this board needs its auth token (open the link it printed).",
                                     status_code=401)
        return await call_next(request)


def _page_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return static_text("board.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        suffix = Path(name).suffix
        if "/" in name or suffix not in STATIC_TYPES or not resources.files("tunesmith.board.static").joinpath(name).is_file():
            raise HTTPException(404)
        return Response(static_text(name), media_type=STATIC_TYPES[suffix])


def static_text(name: str) -> str:
    """A file shipped in board/static (the page, its script and style)."""
    return resources.files("tunesmith.board.static").joinpath(name).read_text(encoding="utf-8")


def _run_routes(app: FastAPI, folders: RunFolders) -> None:
    def folder_of(name: str) -> Path:
        try:
            return folders.resolve(name)
        except NotARun:
            raise HTTPException(404, "no such run") from None

    @app.get("/api/runs")
    def runs() -> dict:
        listed = []
        for name in folders.names():
            try:
                listed.append(folders.summary(name))
            except NotARun:  # removed while listing
                continue
        return {"root": str(folders.root), "runs": listed}

    @app.get("/api/run")
    def run(name: str) -> dict:
        folder = folder_of(name)
        return {**folders.summary(name), "config": _text(folder / CONFIG_FILE), "config_values": read_config(folder),
                "checkpoints": checkpoints(folder), "results": read_json(folder / RESULTS_FILE),
                "console": tail(folder / CONSOLE_FILE)}

    @app.get("/api/metrics")
    def metrics(name: str, since: int = -1, max_points: int = DEFAULT_MAX_POINTS) -> JSONResponse:
        log = folders.records(folder_of(name))
        if since == log.version:
            return JSONResponse({"version": log.version, "unchanged": True})
        return JSONResponse(metric_payload(log.records, log.version, max_points))


def metric_payload(records: list[dict], version: int, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Every metric's series (thinned for drawing, with its full count) and the charts they form."""
    series = chart_series(records)
    return {"version": version, "charts": chart_groups(list(series)),
            "series": {name: {"count": len(points), "points": thin(points, max(max_points, 8))}
                       for name, points in series.items()}}


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
