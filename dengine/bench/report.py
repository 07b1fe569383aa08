"""What every benchmark records about its run, and how it writes OUT.md, OUT.json and OUT.png."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and the widest vector ISA torch uses on it (AVX2, AVX512...): two
    machines with one name can differ there, and bf16 speed with them."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return f"{device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def measured_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, size: int = 2048,
                        repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in dtype on device, laid out as a linear layer's (x w^T): the machine's
    practical peak (for MFU, and for telling whether the machine stayed quiet during a run). The layout
    matters where bf16 is emulated: on an AVX2-only CPU torch's bf16 x w runs at 0.3 GFLOP/s, x w^T (every
    projection of the model) at about 20."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    F.linear(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


NOISE_MARGIN = 0.2  # matmul speed at the end of a run may differ from the start by this fraction


class QuietCheck:
    """Whether the machine stayed quiet during a benchmark: the load average when it starts (other work
    already running), and the matmul peak measured at its start and at its end (work that came meanwhile)."""

    def __init__(self) -> None:
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        self.cores = os.cpu_count() or 1
        self.start_peak = measured_peak_flops(size=1024, repeats=10)

    def finish(self) -> dict[str, Any]:
        """The measurements and their warnings (also printed to stderr)."""
        end_peak = measured_peak_flops(size=1024, repeats=10)
        change = end_peak / self.start_peak - 1
        warnings = []
        if self.load > self.cores:
            warnings.append(f"the load average was {self.load:.1f} on {self.cores} cores when the run started: "
                            "other work shared the machine, speeds are not comparable")
        if abs(change) > NOISE_MARGIN:
            warnings.append(f"the matmul peak changed by {change:+.0%} between the start and the end of the run "
                            f"({self.start_peak / 1e12:.2f} -> {end_peak / 1e12:.2f} TFLOP/s): the machine was "
                            "not quiet, speeds are not comparable")
        for warning in warnings:
            print(f"WARNING: {warning}", file=sys.stderr, flush=True)
        return {"load_average_at_start": self.load, "cores": self.cores, "peak_tflops_start": self.start_peak / 1e12,
                "peak_tflops_end": end_peak / 1e12, "warnings": warnings}


def run_record(program: str, argv: list[str] | None, check: QuietCheck | None = None, **fields: Any) -> dict[str, Any]:
    """The command that reproduces the run, the commit, the machine and the date (and, given the QuietCheck
    started with the run, whether the machine stayed quiet), then the results."""
    command = f"{program} " + shlex.join(argv if argv is not None else sys.argv[1:])  # pastes into a shell
    record = {"command": command, "commit": git_commit(), "machine": machine(), "date": date.today().isoformat()}
    if check is not None:
        record["quiet"] = check.finish()
    return {**record, **fields}


def plot_title(record: dict[str, Any], what: str) -> str:
    """A plot title: what was measured, then the machine and the date."""
    return f"{what} ({record['machine']}, {record['date']})"


def write_report(out: Path | None, record: dict[str, Any], markdown: str,
                 plot: Callable[[Path], None] | None = None) -> None:
    """OUT.md (the command line, then the tables), OUT.json (the record) and, given plot, OUT.png."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"`{record['command']}` (commit {record['commit']}, {record['machine']}, {record['date']})\n\n"
    header += "".join(f"**Warning:** {w}\n\n" for w in record.get("quiet", {}).get("warnings", []))
    out.with_suffix(".md").write_text(header + markdown + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if plot is not None:
        plot(out.with_suffix(".png"))


@contextmanager
def figure(path: Path, title: str | None = None, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (headless) saved as a PNG at path when the block ends: `with figure(p) as (fig, ax)`;
    title goes above every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        if title:  # wrapped to the figure's width (about 14 characters an inch at 10 points)
            fig.suptitle("\n".join(textwrap.wrap(title, width=int(fig.get_figwidth() * 14))), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")  # legends placed beside the axes are kept whole
    finally:
        plt.close(fig)
