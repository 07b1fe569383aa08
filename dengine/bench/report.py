"""What every benchmark records about its run, and how it writes OUT.md, OUT.json and OUT.png."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def run_record(program: str, argv: list[str] | None, **fields: Any) -> dict[str, Any]:
    """The command that reproduces the run, the commit, the machine and the date, then the results."""
    command = f"{program} " + shlex.join(argv if argv is not None else sys.argv[1:])  # pastes into a shell
    return {"command": command, "commit": git_commit(), "machine": machine(), "date": date.today().isoformat(),
            **fields}


def write_report(out: Path | None, record: dict[str, Any], markdown: str,
                 plot: Callable[[Path], None] | None = None) -> None:
    """OUT.md (the command line, then the tables), OUT.json (the record) and, given plot, OUT.png."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"`{record['command']}` (commit {record['commit']}, {record['machine']}, {record['date']})\n\n"
    out.with_suffix(".md").write_text(header + markdown + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if plot is not None:
        plot(out.with_suffix(".png"))


@contextmanager
def figure(path: Path, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (headless) saved as a PNG at path when the block ends: `with figure(p) as (fig, ax)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
