"""Measurements: wrk for load (a C load generator, so that the client is never the bottleneck), a
streaming probe for event timing, and /proc for CPU time and memory of a system's processes."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .systems import Running

PROMPT = "Write a short essay about the sea."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def request_body(model: str = "bench", stream: bool = False) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:  # the static upstream always ends a stream with its usage chunk, as if asked for it
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float


_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
"""


def wrk(system: Running, connections: int, seconds: float, stream: bool = False) -> LoadResult:
    headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in system.headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA.format(body=json.dumps(request_body(stream=stream)), headers=headers))
    pids = system.pids()
    cpu_before = cpu_seconds(pids)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            script.name,
            system.url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(pids) - cpu_before
    os.unlink(script.name)
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if requests == 0:  # every connection waited the whole run (wrk counts a timeout only when an answer comes)
        errors = max(errors, connections)
    return LoadResult(
        requests=requests,
        seconds=seconds,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        p99_ms=_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        errors=errors,
        cpu_us_per_request=cpu / max(requests, 1) * 1e6,
    )


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


@dataclass
class StreamTiming:
    first_event_ms: float
    first_content_ms: float
    gap_ms: float
    events: int
    added_first_event_ms: float  # median of paired differences against the upstream alone
    added_first_content_ms: float


def stream_timing(system: Running, reference: Running, count: int, whole: int = 5) -> StreamTiming:
    """Streams of the slow model, alternating between `system` and the upstream alone (`reference`), so that
    drift in the machine's speed falls on both: medians of each, and of the paired differences. Timing
    samples hang up after the first content; `whole` streams are read to the end for gaps and event counts."""
    body = request_body("bench-slow", stream=True)
    samples: dict[str, list] = {"system": [], "reference": []}
    with httpx.Client(timeout=30) as client:
        for i in range(count + 1):  # the first pair warms the connections up and is not counted
            for name, target in (("system", system), ("reference", reference)):
                headers = {"Content-Type": "application/json", **target.headers}
                sample = _one_stream(client, target.url, body, headers, until_content=True)
                if i:
                    samples[name].append(sample)
        headers = {"Content-Type": "application/json", **system.headers}
        full = [_one_stream(client, system.url, body, headers) for _ in range(whole)]
    mine, base = samples["system"], samples["reference"]
    return StreamTiming(
        first_event_ms=statistics.median(s[0] for s in mine) * 1000,
        first_content_ms=statistics.median(s[1] for s in mine) * 1000,
        gap_ms=statistics.median(g for s in full for g in s[2]) * 1000,
        events=statistics.median(s[3] for s in full),
        added_first_event_ms=statistics.median(a[0] - b[0] for a, b in zip(mine, base, strict=True)) * 1000,
        added_first_content_ms=statistics.median(a[1] - b[1] for a, b in zip(mine, base, strict=True)) * 1000,
    )


def _one_stream(client: httpx.Client, url: str, body: str, headers: dict, until_content: bool = False):
    start = time.perf_counter()
    first = content = None
    stamps = []
    buffer = b""
    with client.stream("POST", url + "/v1/chat/completions", content=body, headers=headers) as response:
        for chunk in response.iter_raw():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                stamps.append(now)
                first = first or now
                compact = event.replace(b": ", b":")
                if content is None and b'"content":"' in compact and b'"content":""' not in compact:
                    content = now
            if until_content and content is not None:
                break
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return first - start, (content or now) - start, gaps, len(stamps)


def memory_per_stream(system: Running, streams: int) -> float:
    """Bytes of resident memory the system's processes hold per open stream (bench-hold streams): the growth
    from `streams` open to twice as many, divided by `streams`. A first hold warms the allocator's pools; the
    difference between two levels of one hold cancels what a single before-and-after would also count
    (garbage from earlier load collected meanwhile, memory the allocator keeps)."""
    _hold_streams(system, [streams])
    low, high = _hold_streams(system, [streams, streams])
    return (high - low) / streams


def _hold_streams(system: Running, waves: list[int]) -> list[int]:
    """Open the streams of each wave (adding to those already open) and read the resident memory after each;
    then close them all."""
    body = request_body("bench-hold", stream=True)
    headers = {"Content-Type": "application/json", **system.headers}
    release = threading.Event()

    def hold(opened: threading.Barrier) -> None:
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", system.url + "/v1/chat/completions", content=body, headers=headers) as r,
        ):
            next(r.iter_raw())
            opened.wait()
            release.wait(60)

    threads, readings = [], []
    try:
        for count in waves:
            opened = threading.Barrier(count + 1, timeout=60)
            wave = [threading.Thread(target=hold, args=(opened,), daemon=True) for _ in range(count)]
            for t in wave:
                t.start()
            threads += wave
            opened.wait()
            time.sleep(0.5)
            readings.append(rss_bytes(system.pids()))
    finally:
        release.set()
        for t in threads:
            t.join(10)
    return readings


def soak(system: Running, seconds: float, connections: int, sample_every: float, progress=None) -> list[tuple]:
    """Steady load for `seconds`; returns (elapsed s, RSS bytes) samples."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in system.headers.items())
        script.write(_LUA.format(body=json.dumps(request_body()), headers=headers))
    load = subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "-s",
            script.name,
            system.url + "/v1/chat/completions",
        ],
        stdout=subprocess.DEVNULL,
    )
    samples, start = [], time.time()
    while load.poll() is None:
        samples.append((round(time.time() - start, 1), rss_bytes(system.pids())))
        if progress:
            progress(time.time() - start)
        time.sleep(sample_every)
    os.unlink(script.name)
    return samples
