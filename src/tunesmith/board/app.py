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
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel

from tunesmith.board.chat import Chats
from tunesmith.board.launch import Launcher, form_schema
from tunesmith.board.logs import LogFile, chart_groups, read_json
from tunesmith.board.runs import NotARun, RunFolders, checkpoints, read_config, tail
from tunesmith.board.samples import sample_payload
from tunesmith.errors import TunesmithError
from tunesmith.training.run_files import CONFIG_FILE, CONSOLE_FILE, RESULTS_FILE

TOKEN_COOKIE = "tunesmith_board_token"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain"}
DEFAULT_MAX_POINTS = 2000
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def create_app(root: Path, auth_token: str | None = None) -> FastAPI:
    """The board over the runs under `root`."""
    app = FastAPI(title="tunesmith board", docs_url=None, redoc_url=None, openapi_url=None)
    folders = RunFolders(root)
    if auth_token:
        _require_token(app, auth_token)
    _refuse_other_sites(app, check_host=not auth_token)
    _page_routes(app)
    launcher = Launcher(folders)
    _run_routes(app, folders, launcher)
    _action_routes(app, launcher, Chats(folders))
    return app


def _require_token(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def check(request: Request, call_next):
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):  # the link printed at start: remember it
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        sent = header[len("Bearer "):] if header.startswith("Bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            return PlainTextResponse("tunesmith board: this board needs its auth token (open the link it printed).",
                                     status_code=401)
        return await call_next(request)


def _refuse_other_sites(app: FastAPI, check_host: bool) -> None:
    """What a web page of another site could make the user's browser send: a POST of a form or of text
    (no CORS preflight; every real POST here is JSON, so others get 415), and, on a board without a
    token, requests under another host name that resolves to this machine (DNS rebinding: 421)."""
    @app.middleware("http")
    async def check(request: Request, call_next):
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
        if check_host and host not in LOCAL_HOSTS:
            return PlainTextResponse(f"tunesmith board answers to localhost only, not {host!r}.", status_code=421)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return PlainTextResponse("tunesmith board: POST bodies are JSON.", status_code=415)
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


def _run_routes(app: FastAPI, folders: RunFolders, launcher: Launcher) -> None:
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
            except (NotARun, OSError):  # removed while listing, or refused
                continue
        return {"root": str(folders.root), "runs": listed}

    @app.get("/api/run")
    def run(name: str) -> dict:
        early = launcher.early_failure(name)  # launched here, ended before writing its folder
        if early is not None:
            return early
        folder_of(name)
        return run_details(folders, name)

    @app.get("/api/rollouts")
    def rollouts(name: str, step: int | None = None) -> dict:
        return sample_payload(folders, folder_of(name), "rollouts", step=step)

    @app.get("/api/pairs")
    def pairs(name: str, step: int | None = None) -> dict:
        return sample_payload(folders, folder_of(name), "pairs", step=step)

    @app.get("/api/metrics")
    def metrics(name: str, since: int = -1, max_points: int = DEFAULT_MAX_POINTS) -> JSONResponse:
        if launcher.early_failure(name) is not None:
            return JSONResponse({"version": 0, "charts": {}, "series": {}})
        log = folders.records(folder_of(name))
        if since == log.version:
            return JSONResponse({"version": log.version, "unchanged": True})
        return JSONResponse(metric_payload(log, max_points))


class LaunchRequest(BaseModel):
    config: str
    """The run's YAML text."""


class ChatRequest(BaseModel):
    name: str
    messages: list[dict]


def _action_routes(app: FastAPI, launcher: Launcher, chats: Chats) -> None:
    """What changes anything: start and stop runs, chat with finished ones. Errors are the CLI's messages
    (400), a name that is no run is 404."""
    @app.exception_handler(TunesmithError)
    async def user_error(request: Request, error: TunesmithError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(NotARun)
    async def no_run(request: Request, error: NotARun) -> JSONResponse:
        return JSONResponse({"error": "no such run"}, status_code=404)

    @app.get("/api/schema")
    def schema() -> dict:
        return form_schema()

    @app.get("/api/examples")
    def examples() -> dict:
        return {"examples": launcher.examples()}

    @app.post("/api/check")
    def check(request: LaunchRequest) -> dict:
        raw, _ = launcher.check(request.config)
        return {"ok": True, "output_dir": raw["output_dir"]}

    @app.post("/api/launch")
    def launch(request: LaunchRequest) -> dict:
        return {"run": launcher.start(request.config)}

    @app.post("/api/stop")
    def stop(name: str) -> dict:
        launcher.stop(name)
        return {"stopping": name}

    @app.get("/api/launched")
    def launched() -> dict:
        return {"running": [name for name in launcher.children if launcher.running(name)]}

    @app.post("/api/chat")
    def chat(request: ChatRequest) -> StreamingResponse:
        return StreamingResponse(chats.stream(request.name, request.messages), media_type="text/plain; charset=utf-8")


def run_details(folders: RunFolders, name: str) -> dict:
    """The run page's facts: its summary, config (text and values), checkpoints, final metrics, console tail."""
    folder = folders.resolve(name)
    return {**folders.summary(name), "config": _text(folder / CONFIG_FILE), "config_values": read_config(folder),
            "checkpoints": checkpoints(folder), "results": read_json(folder / RESULTS_FILE),
            "console": tail(folder / CONSOLE_FILE)}


def metric_payload(log: LogFile, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Every metric's series (thinned for drawing, with its full count) and the charts they form."""
    with log.lock:
        return {"version": log.version, "charts": chart_groups(list(log.series)),
                "series": {name: {"count": len(column), "points": column.points(max(max_points, 8))}
                           for name, column in log.series.items()}}


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
