"""The denoising trace explorer: one self-contained HTML page (no network), served at /explore or written to a file.

    dengine explore TRACE.json [MORE.json ...] -o page.html

A trace file holds a Trace (`msgspec.json.encode(output.trace)`), a RequestOutput or a server response with
one, or a list of any of these. See docs/explorer.md.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from dengine.cli_args import DefaultsHelpFormatter
from dengine.scheduler.policies import POLICIES
from dengine.trace import Trace

TEMPLATE = "explorer.html"


def traces_in(data: Any) -> list[Trace]:
    """The traces in decoded JSON: a trace, an object with a "trace", or a list of these; ValueError if none."""
    if isinstance(data, list):
        return [trace for item in data for trace in traces_in(item)]
    if isinstance(data, dict) and isinstance(data.get("trace"), dict):
        data = data["trace"]
    if not (isinstance(data, dict) and "steps" in data):
        raise ValueError("expected a trace, a response or output with a trace, or a list of them")
    try:
        return [msgspec.convert(data, Trace)]
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"not a valid trace: {exc}") from None


def render_page(traces: list[Trace] = ()) -> str:
    """The explorer page with traces embedded."""
    page = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")

    def embedded(value: Any) -> str:
        # inside <script>, "</" would end the element early
        return msgspec.json.encode(value).decode().replace("</", "<\\/")

    return (page.replace("__DENGINE_TRACES__", embedded(list(traces)))
                .replace("__DENGINE_POLICIES__", embedded(sorted(POLICIES))))


def add_explore_route(app) -> None:
    """Serve the explorer at GET /explore; its Run buttons call this server's completions endpoints."""
    from fastapi.responses import HTMLResponse

    page = render_page()

    @app.get("/explore")
    async def explore() -> HTMLResponse:
        return HTMLResponse(page)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dengine explore", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path, help="JSON files holding traces")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the HTML page to write")
    args = parser.parse_args(argv)
    traces = []
    for path in args.traces:
        try:
            traces += traces_in(msgspec.json.decode(path.read_bytes()))
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            parser.error(f"{path}: {exc}")
    args.output.write_text(render_page(traces), encoding="utf-8")
    print(f"dengine explore: {len(traces)} trace{'' if len(traces) == 1 else 's'} -> {args.output}")
