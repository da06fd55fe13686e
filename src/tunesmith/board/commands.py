"""`tunesmith board` and `tunesmith report`: their arguments and what each runs."""

from __future__ import annotations

import ipaddress
import secrets
import sys
from pathlib import Path

from tunesmith.errors import TunesmithError

LOOPBACK_NAMES = {"localhost"}


def add_board_commands(commands) -> None:
    """board (watch, compare, inspect and launch runs in the browser) and report (one run as one HTML file)."""
    board = commands.add_parser("board", help="watch, compare, inspect and launch runs in the browser")
    board.add_argument("--root", default="saves", help="folder whose runs it shows and under which it launches "
                       "new ones (default: saves)")
    board.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                       "only; any other address needs --auth-token)")
    board.add_argument("--port", type=int, default=7860)
    board.add_argument("--auth-token", default=None, help="a secret every request must carry; `random` makes one "
                       "(printed in the link)")
    board.set_defaults(handler=_board)
    report = commands.add_parser("report", help="write RUN_DIR/report.html: charts, config, final metrics and "
                                 "rollouts in one file that opens without a server")
    report.add_argument("run_dir")
    report.add_argument("--output", default=None, help="where to write it (default RUN_DIR/report.html)")
    report.set_defaults(handler=_report)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def board_token(host: str, auth_token: str | None) -> str | None:
    """The token to require: none on loopback unless asked; elsewhere one is required (refused without)."""
    if auth_token == "random":
        return secrets.token_urlsafe(24)
    if auth_token is not None and not auth_token.strip():
        raise TunesmithError("--auth-token is empty: give a secret (or `random`), or leave the option out.")
    if auth_token is None and not is_loopback(host):
        raise TunesmithError(
            f"--host {host} would let other machines read your runs, launch training and chat with "
            "your models. Pass --auth-token SECRET (or --auth-token random) to require a token, or keep the default "
            "--host 127.0.0.1.")
    return auth_token


def _board(args) -> None:
    import uvicorn

    from tunesmith.board.app import create_app

    root = Path(args.root)
    token = board_token(args.host, args.auth_token)
    root.mkdir(parents=True, exist_ok=True)
    link = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"[tunesmith] board over {root.resolve()}: open {link}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(root, auth_token=token), host=args.host, port=args.port, log_level="warning")


def _report(args) -> None:
    from tunesmith.board.report import write_report

    written = write_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"[tunesmith] report written to {written}")
