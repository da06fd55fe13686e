"""`tunesmith report RUN_DIR`: one run as one self-contained report.html, for sharing.

The file is the board's own run page: its stylesheet and scripts inlined, and the answers the page would
ask the server for written into it (window.TUNESMITH_REPORT, keyed by the same API paths), so it opens
from disk with no server and no network and shows the same charts, config, final metrics and rollout
heatmaps. Long runs keep every chart point up to the board's thinning; rollouts and pairs keep at most
REPORT_STEPS logged steps, spread over the run, so the file stays small enough to mail.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from tunesmith.board.app import metric_payload, run_details, static_text
from tunesmith.board.runs import NotARun, RunFolders
from tunesmith.board.samples import sample_payload
from tunesmith.errors import TunesmithError

REPORT_FILE = "report.html"
REPORT_STEPS = 40
SCRIPTS = ("charts.js", "tokens.js", "board.js")


def report_data(run_dir: Path) -> dict:
    """What the run page reads, keyed by the API path it would fetch."""
    folders = RunFolders(run_dir.resolve().parent)
    name = run_dir.resolve().name
    try:
        folder = folders.resolve(name)
    except NotARun:
        raise TunesmithError(f"{run_dir} is not a run folder (no train_config.yaml or trainer_log.jsonl in it); "
                             "point `tunesmith report` at a run's output_dir.") from None
    query = "?name=" + quote(name, safe="!'()*")  # as the page's encodeURIComponent writes it
    log = folders.records(folder)
    api = {"/api/run" + query: run_details(folders, name),
           "/api/metrics" + query: metric_payload(log)}
    for kind in ("rollouts", "pairs"):
        index = api[f"/api/{kind}{query}"] = sample_payload(folders, folder, kind, max_steps=REPORT_STEPS)
        for step in index["steps"]:
            api[f"/api/{kind}{query}&step={step}"] = sample_payload(folders, folder, kind, step=step)
    return {"name": name, "api": api}


def render_report(data: dict) -> str:
    """The page with its styles, scripts and data inline."""
    # no "<", ">" or "&" may reach the HTML parser from inside the script ("</script>", "<!--<script")
    safe = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    scripts = "\n".join(f"<script>\n{static_text(name)}\n</script>" for name in SCRIPTS)
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>tunesmith report: {_escape(data['name'])}</title>\n<style>\n{static_text('board.css')}\n</style>\n"
            f"</head>\n<body>\n<header class=\"top\"><span class=\"brand\">tunesmith report</span>"
            f"<span>{_escape(data['name'])}</span></header>\n<main id=\"main\"></main>\n"
            f"<script>window.TUNESMITH_REPORT = {safe};</script>\n{scripts}\n</body>\n</html>\n")


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the report (RUN_DIR/report.html unless `output` says otherwise); its path."""
    output = output or run_dir / REPORT_FILE
    output.write_text(render_report(report_data(run_dir)), encoding="utf-8")
    return output


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
