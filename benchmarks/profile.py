"""Where the gateway's CPU goes: py-spy samples of a running gateway under wrk load, summed by part.

py-spy (a sampling profiler that reads the process from outside, so the gateway runs unchanged) samples
the thread holding the GIL (`--gil`): time spent waiting on the disk or the network is not counted. Each
sample goes to the part of the innermost frame that belongs to one (so JSON encoding called by the
evidence log counts as the evidence log, and aiohttp called by the pipeline as forwarding).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import measure
from .systems import Running

# (part, what a frame's file path starts with), tried in order on each frame from the innermost out
PARTS = (
    ("transform: watermark", "gateway/watermark/"),
    ("transform: canaries", "gateway/canary/"),
    ("transform: sampling bias", "gateway/bias/"),
    ("transform: rewriting answers and events", "gateway/rewrite.py"),
    ("JSON (jsonio)", "gateway/jsonio.py"),
    ("protocols: shapes, SSE", "gateway/protocols/"),
    ("record: evidence log", "gateway/evidence/"),
    ("risk engine (background)", "gateway/risk/"),
    ("admit: limits", "gateway/ratelimit/"),
    ("identify", "gateway/identity.py"),
    ("metrics", "gateway/metrics.py"),
    ("metrics", "prometheus_client/"),
    ("forward: upstream client (aiohttp)", "aiohttp/"),
    ("forward: upstream client (aiohttp)", "gateway/upstream.py"),
    ("HTTP server (uvicorn, httptools)", "uvicorn/"),
    ("pipeline core", "gateway/"),
)
OTHER = "event loop, interpreter and other"
_LINE = re.compile(r":\d+\)$")  # "name (file.py:12)" -> "name (file.py)"


def py_spy() -> str | None:
    """The py-spy binary beside this Python (the dev install has it), or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _part(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = frame.rpartition(" (")[2]
        for part, prefix in PARTS:
            if path.startswith(prefix):
                return part
    return OTHER


def summarise(raw: str, top: int = 15) -> dict:
    """Shares of samples by part, and the functions with the most samples of their own."""
    parts, functions, total = collections.Counter(), collections.Counter(), 0
    carried = ""  # a frame name py-spy wrote across lines: its sample's count ends a later line
    for line in raw.splitlines():
        line = carried + line
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            carried = line + "\n"
            continue
        carried = ""
        if not stack:
            continue
        frames = stack.split(";")
        total += int(count)
        parts[_part(frames)] += int(count)
        functions[_LINE.sub(")", frames[-1])] += int(count)
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "parts": [{"part": part, "percent": share(n)} for part, n in parts.most_common()],
        "functions": [{"function": name, "percent": share(n)} for name, n in functions.most_common(top)],
    }


def profile(system: Running, seconds: float, stream: bool, connections: int = 32, rate: int = 250) -> dict:
    """Load the system with wrk for `seconds` while py-spy samples its process."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        argv = [binary, "record", "--pid", str(system.process.pid), "--gil", "--format", "raw", "--rate", str(rate)]
        argv += ["--duration", str(max(1, round(seconds))), "--output", out.name, "--nonblocking"]
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load = measure.wrk(system, connections, seconds, stream=stream)
        _, errors = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors[-500:]}")
        summary = summarise(Path(out.name).read_text())
    mode = "streams" if stream else "whole answers"
    summary.update(
        mode=mode, connections=connections, rps=load.rps, seconds=seconds, cpu_us_per_request=load.cpu_us_per_request
    )
    return summary


def markdown(profiles: list[dict]) -> list[str]:
    lines = [
        "## Profile of the gateway (everything on)",
        "",
        __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
        "",
    ]
    for p in profiles:
        lines += [
            f"### {p['mode']}, {p['connections']} connections: {p['samples']} samples over {p['seconds']:g} s at "
            f"{p['rps']:.0f} req/s, {p['cpu_us_per_request']:.0f} µs of CPU per request",
            "",
            "| part | share of samples |",
            "| --- | --- |",
            *(f"| {r['part']} | {r['percent']}% |" for r in p["parts"]),
            "",
            "| function (own samples) | share |",
            "| --- | --- |",
            *(f"| {r['function']} | {r['percent']}% |" for r in p["functions"]),
            "",
        ]
    return lines
