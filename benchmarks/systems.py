"""The systems under test, each a set of processes started on free loopback ports and stopped after.

- upstream: benchmarks/upstream.py, serving the fixed answers (the reference: no proxy at all)
- nginx: proxy_pass with upstream keep-alive, one worker process (the limit for any proxy)
- bare: benchmarks/bare_proxy.py on uvicorn (the least a Python proxy does)
- gateway: `canarygate serve`, everything on, or with one stage off (benchmarks/variants.py)
- litellm: LiteLLM's proxy, one worker, no database, in its own virtual environment (when asked)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    name: str
    url: str
    process: subprocess.Popen
    headers: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    def pids(self) -> list[int]:
        """The process and all its descendants (uvicorn and nginx workers)."""
        found, frontier = [], [self.process.pid]
        while frontier:
            pid = frontier.pop()
            found.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            frontier.extend(int(c) for c in children)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log: Path, path: str = "/", timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(url + path, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start in {timeout} s: {log.read_text()[-2000:]}")


def _spawn(
    name: str, argv: list[str], workdir: Path, env: dict | None = None, **popen
) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        argv,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=popen.pop("cwd", ROOT),
        env={**os.environ, **(env or {})},
        **popen,
    )
    return process, log


def start_upstream(workdir: Path, answers: Path, event_delay: float) -> Running:
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "benchmarks.upstream",
        "--port",
        str(port),
        "--answers",
        str(answers),
        "--event-delay",
        str(event_delay),
    ]
    process, log = _spawn("upstream", argv, workdir)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log)
    return Running("upstream", url, process, log=log)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream model {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def start_nginx(workdir: Path, upstream: Running) -> Running | None:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        return None
    port = free_port()
    conf_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="nginx-"))
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, upstream=upstream.url.removeprefix("http://"), port=port))
    process, log = _spawn("nginx", [binary, "-c", str(conf), "-p", str(conf_dir)], workdir)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log)
    return Running("nginx", url, process, log=log)


def _uvicorn(app: str, port: int, *options: str) -> list[str]:
    """The command line that serves an ASGI app the way `canarygate serve` does (uvloop, httptools)."""
    return [PYTHON, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", *options]  # fmt: skip


def start_bare(workdir: Path, upstream: Running) -> Running:
    port = free_port()
    process, log = _spawn("bare", _uvicorn("benchmarks.bare_proxy:app", port), workdir, {"BARE_UPSTREAM": upstream.url})
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log)
    return Running("bare", url, process, log=log)


def prepare_gateway_state(workdir: Path) -> tuple[Path, str]:
    """A state folder with the benchmark identity in the `unlimited` tier; returns it and the key."""
    from gateway.identity import Registry

    state = workdir / "gateway-state"
    key = Registry(state).add("bench", tier="unlimited")
    return state, key


def start_gateway(
    workdir: Path,
    upstream: Running,
    state: Path,
    key: str,
    off: tuple[str, ...] = (),
    workers: int = 1,
    limits_storage: str = "memory",
    tree: Path = ROOT,
) -> Running:
    """The gateway (benchmarks.variants) with `off` stages switched off, its code taken from the checkout `tree`."""
    port = free_port()
    config = workdir / "canarygate.toml"
    config.write_text(
        f'[state]\ndir = "{state}"\n[upstream]\nurl = "{upstream.url}"\n[limits]\nstorage = "{limits_storage}"\n'
    )
    name = "gateway" + ("" if not off else "-no-" + "-".join(off)) + ("" if workers == 1 else f"-{workers}w")
    name += "" if limits_storage == "memory" else "-redis"
    env = {
        "CANARYGATE_SETTINGS": json.dumps({"config": str(config), "overrides": {}, "log_level": "warning"}),
        "CANARYGATE_BENCH_OFF": ",".join(off),
        "PYTHONPATH": str(tree),  # ahead of the installed package, which is this checkout's
    }
    if workers > 1:
        metrics_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="metrics-"))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    argv = _uvicorn("benchmarks.variants:app", port, "--factory", "--no-proxy-headers", "--workers", str(workers))
    process, log = _spawn(name, argv, workdir, env, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log, "/healthz")
    return Running(name, url, process, {"Authorization": f"Bearer {key}"}, log)


LITELLM_CONFIG = """
model_list:
  - model_name: bench
    litellm_params: {{model: openai/bench, api_base: "{upstream}/v1", api_key: "sk-bench"}}
  - model_name: bench-slow
    litellm_params: {{model: openai/bench-slow, api_base: "{upstream}/v1", api_key: "sk-bench"}}
  - model_name: bench-hold
    litellm_params: {{model: openai/bench-hold, api_base: "{upstream}/v1", api_key: "sk-bench"}}
litellm_settings: {{drop_params: true, turn_off_message_logging: true}}
"""


def litellm_env(venv: Path) -> Path:
    """LiteLLM's proxy in its own virtual environment (created on first use, kept for later runs)."""
    binary = venv / "bin" / "litellm"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


def litellm_version(venv: Path) -> str:
    script = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True).stdout.strip()


def start_litellm(workdir: Path, upstream: Running, venv: Path) -> Running:
    binary = litellm_env(venv)
    port = free_port()
    conf = workdir / "litellm.yaml"
    conf.write_text(LITELLM_CONFIG.format(upstream=upstream.url))
    master = "sk-" + os.urandom(32).hex()  # it refuses to start without a strong one, and checks it per request
    process, log = _spawn(
        "litellm",
        [str(binary), "--config", str(conf), "--port", str(port), "--num_workers", "1"],
        workdir,
        {"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": master},
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, process, log, "/health/liveliness", timeout=180)
    return Running("litellm", url, process, {"Authorization": f"Bearer {master}"}, log)
