"""The `canarygate` command from an empty folder, as a newcomer runs it: real processes, real ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway import config

CANARYGATE = str(Path(sys.executable).parent / "canarygate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CANARYGATE, *args], cwd=folder, capture_output=True, text=True, timeout=30)


class Running:
    def __init__(self, folder: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [CANARYGATE, *args, "--port", str(self.port)],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def __enter__(self) -> Running:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"gateway did not start: {self.proc.stdout.read()}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.output = self.proc.communicate(timeout=20)[0]
        # uvicorn finishes its graceful shutdown, then re-raises the signal so the exit status reports it.
        assert self.proc.returncode in (0, -signal.SIGTERM), self.output
        assert "Application shutdown complete" in self.output


def test_init_identities_serve_and_one_sdk_call(tmp_path, fake_upstream):
    fake_upstream.reset()
    result = cli(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "canarygate.toml").exists() and (tmp_path / ".canarygate").is_dir()

    added = cli(tmp_path, "identities", "add", "alice")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("cg_")
    registry = tmp_path / ".canarygate" / "identities.json"
    assert key not in registry.read_text()
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    assert cli(tmp_path, "identities", "add", "alice").returncode == 2  # one line, non-zero

    env = {"CANARYGATE_UPSTREAM_API_KEY": "sk-upstream-cli"}
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url, env=env) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == fake_upstream.behaviour.text
    assert fake_upstream.requests[-1].headers["authorization"] == "Bearer sk-upstream-cli"
    assert "sk-upstream-cli" not in gw.output
    listed = json.loads(cli(tmp_path, "identities", "list", "--json").stdout)
    assert [(i["name"], i["revoked"]) for i in listed] == [("alice", False)]
    table = cli(tmp_path, "identities", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "TIER", "TENANT", "KEY", "ID", "STATUS"]
    assert table[1].split()[0] == "alice" and table[1].split()[-1] == "active" and len(table) == 2


def test_demo_and_one_curl(tmp_path):
    with Running(tmp_path, "demo") as gw:
        time.sleep(0.2)
        banner = gw.proc.stdout.readline() + gw.proc.stdout.readline() + gw.proc.stdout.readline()
        while "curl" not in banner:
            banner += gw.proc.stdout.readline()
        key = banner.split("Bearer ")[1].split("'")[0]
        curl = subprocess.run(
            [
                "curl",
                "-s",
                gw.url + "/v1/chat/completions",
                "-H",
                f"Authorization: Bearer {key}",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{"model": "canarygate-demo", "messages": [{"role": "user", "content": "Hello"}]}',
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        answer = json.loads(curl.stdout)
        assert "canarygate demo model" in answer["choices"][0]["message"]["content"]
    # the demo's state is its own: a gateway set up here afterwards never knows the demo's key
    assert (tmp_path / ".canarygate-demo" / "identities.json").exists() and not (tmp_path / ".canarygate").exists()
    assert cli(tmp_path, "init").returncode == 0 and "demo" not in cli(tmp_path, "identities", "list").stdout


def test_the_demo_starts_beside_a_state_folder_given_as_the_current_one(tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "canarygate.toml").write_text('[state]\ndir = "."\n')
    with Running(tmp_path / "here", "demo"):
        pass
    assert (tmp_path / "here-demo" / "identities.json").exists()


def test_revocation_reaches_every_worker(tmp_path, fake_upstream):
    cli(tmp_path, "init")
    key = cli(tmp_path, "identities", "add", "dave").stdout.strip().splitlines()[-1]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url, "--workers", "2") as gw, httpx.Client() as http:
        url = gw.url + "/v1/chat/completions"
        assert all(http.post(url, json=body, headers=headers).status_code == 200 for _ in range(10))
        assert cli(tmp_path, "identities", "revoke", "dave").returncode == 0
        again = cli(tmp_path, "identities", "revoke", "dave")
        assert again.returncode == 2 and "'dave' is revoked" in again.stderr
        time.sleep(0.6)  # workers re-check the registry every 0.25 s
        statuses = {httpx.post(url, json=body, headers=headers).status_code for _ in range(20)}  # new connections
        metrics = http.get(gw.url + "/metrics").text
    assert statuses == {401}
    assert 'canarygate_requests_total{route="/v1/chat/completions",status="200",tier="normal"} 10.0' in metrics
    logs = tmp_path / ".canarygate" / "evidence"  # the two workers' slots: the parent's check claims none
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == ["0", "1"]


def test_a_worker_count_for_a_bigger_machine_stops_serve_here_but_no_other_command(tmp_path):
    cli(tmp_path, "init")
    most = config.max_workers()
    toml = (tmp_path / "canarygate.toml").read_text().replace("workers = 1", f"workers = {most + 1}", 1)
    (tmp_path / "canarygate.toml").write_text(toml)
    assert cli(tmp_path, "identities", "list").returncode == 0
    refused = cli(tmp_path, "serve", "--upstream", "demo")
    assert refused.returncode == 2 and f"workers must be at most {most} on this machine" in refused.stderr


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[server]\nport = "eighty"\n', "[server] port must be an int"),
        ("[server]\nworkers = 0\n", "workers must be from 1 to"),
        ("[server]\nworkers = 100000\n", "workers must be from 1 to"),  # a typo once started hundreds
        ('[upstream]\nurl = "http://[::1"\n', "[upstream] url must be an http(s) URL"),  # a traceback before
        ('[limits]\nstorage = "redis://127.0.0.1:6379/13x"\n', "[limits] storage must be"),  # was database 0
        ('[limits]\nstorage = "redis://:hunter2@[::1/0"\n', "[limits] storage must be"),
        ('[upstream]\nurl = "ftp://x"\n', "[upstream] url must be an http(s) URL"),
        ("[sever]\n", "unknown section [sever]"),
        ("[upstream]\ntimeout = 3\n", "unknown key(s): timeout"),
        ("[server\n", "not valid TOML"),
        # accepted before, then a crash or a hang at run time
        ("[limits]\nlease_seconds = inf\n", "[limits] lease_seconds must be a finite number, got inf"),
        ("[limits.tiers.normal]\nscale = nan\n", "scale must be a finite number, got nan"),
        ("[limits.tiers.suspect]\ntarpit_ms = inf\n", "tarpit_ms must be a finite number"),
        ('[limits.identity]\nrequests = "0/minute"\n', "a rate allows at least 1 per period"),
        ("[server]\nmax_response_bytes = -1\n", "max_response_bytes must be at least 1024"),
        ("[canaries.density]\nwtach = 0.5\n", "[canaries.density] names no tier wtach"),
        ('[upstream]\nurl = "http://127.0.0.1:99999"\n', "[upstream] url must be an http(s) URL"),
        ('[limits]\nstorage = "redis://127.0.0.1:notaport/0"\n', "[limits] storage must be"),
        ('[limits]\nstorage = "redis+cluster://h1:7000,h2:x"\n', "[limits] storage must be"),
        ('[state]\ndir = ""\n', "[state] dir must name a folder"),
        (b"\xff\xfe[server]\n", "not valid TOML: not UTF-8"),
    ],
)
def test_bad_config_names_file_and_key_and_exits_non_zero(tmp_path, toml, expected):
    (tmp_path / "canarygate.toml").write_bytes(toml if isinstance(toml, bytes) else toml.encode())
    result = cli(tmp_path, "serve", "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("canarygate: canarygate.toml: ") and expected in line, line
    assert len(line.splitlines()) == 1


def test_with_several_workers_an_app_that_cannot_be_built_stops_with_one_line(tmp_path):
    """Each worker builds the app: one that fails was started again forever, each time with a traceback."""
    (tmp_path / "canarygate.toml").write_text('[sampling_bias]\nenabled = true\ntokenizer = "/nonexistent.json"\n')
    result = cli(tmp_path, "serve", "--upstream", "demo", "--workers", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("canarygate: canarygate.toml: [sampling_bias] tokenizer")


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[upstream]\napi_key_env = "sk-proj-LIVESECRET123"\n', "must name an environment variable"),
        ('[server]\nadmin_token_env = "LIVESECRET 123"\n', "must name an environment variable"),
        ('[evidence]\nwitnesses = [{url = "https://u:LIVESECRET@w.example"}]\n', "got keys ['url']"),
    ],
)
def test_a_secret_put_where_a_name_goes_is_not_echoed(tmp_path, toml, expected):
    (tmp_path / "canarygate.toml").write_text(toml)
    result = cli(tmp_path, "serve", "--upstream", "http://127.0.0.1:9")
    assert result.returncode == 2 and expected in result.stderr and "LIVESECRET" not in result.stderr


def test_an_upstream_key_that_cannot_go_in_a_header_is_refused_at_start(tmp_path):
    result = subprocess.run(
        [CANARYGATE, "serve", "--upstream", "http://127.0.0.1:9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CANARYGATE_UPSTREAM_API_KEY": "sk-LIVESECRET\nX-Injected: 1"},
    )
    assert result.returncode == 2 and "control character" in result.stderr and "LIVESECRET" not in result.stderr


def test_the_state_folder_is_found_beside_the_config_file_from_anywhere(tmp_path):
    for folder in ("etc", "a", "b"):
        (tmp_path / folder).mkdir()
    config_file = str(tmp_path / "etc" / "canarygate.toml")
    assert cli(tmp_path / "a", "--config", config_file, "init").returncode == 0
    assert cli(tmp_path / "a", "--config", config_file, "identities", "add", "alice").returncode == 0
    assert "alice" in cli(tmp_path / "b", "--config", config_file, "identities", "list").stdout
    assert (tmp_path / "etc" / ".canarygate" / "identities.json").exists()


def test_a_tier_set_that_cannot_reach_the_shared_storage_changes_nothing(tmp_path):
    (tmp_path / "canarygate.toml").write_text('[limits]\nstorage = "redis://:LIVESECRET@127.0.0.1:1/0"\n')
    assert cli(tmp_path, "identities", "add", "bob").returncode == 0
    for command in (("tier", "set", "bob", "blocked"), ("risk", "pin", "bob", "blocked", "--note", "n")):
        result = cli(tmp_path, *command)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "did not answer" in result.stderr and "LIVESECRET" not in result.stderr
    assert "blocked" not in cli(tmp_path, "identities", "list").stdout


def test_an_identity_is_added_only_to_a_known_tier(tmp_path):
    assert cli(tmp_path, "init").returncode == 0
    assert cli(tmp_path, "identities", "add", "new", "--tier", "watch").returncode == 0
    shown = cli(tmp_path, "risk", "show", "new")  # before the gateway served: no log, so no decision
    assert shown.returncode == 0 and "new: registry tier watch" in shown.stdout and "no risk decisions" in shown.stdout
    refused = cli(tmp_path, "identities", "add", "typo", "--tier", "Suspect")
    assert refused.returncode == 2 and "unknown tier 'Suspect'" in refused.stderr
    assert "typo" not in cli(tmp_path, "identities", "list").stdout


def test_missing_config_file_says_what_to_do(tmp_path):
    result = cli(tmp_path, "--config", "nope.toml", "identities", "list")
    assert result.returncode == 2 and "canarygate init" in result.stderr


def test_stop_signal_lets_an_inflight_stream_finish(tmp_path, fake_upstream):
    fake_upstream.reset()
    fake_upstream.behaviour.event_delay = 0.05  # about a second for the whole answer
    cli(tmp_path, "init")
    key = cli(tmp_path, "identities", "add", "gina").stdout.strip().splitlines()[-1]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with Running(tmp_path, "serve", "--upstream", fake_upstream.url) as gw:
        client = httpx.Client(base_url=gw.url, timeout=10)
        with client.stream("POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
            pieces = r.iter_raw()
            received = next(pieces)
            gw.proc.send_signal(signal.SIGTERM)  # the server stops accepting, the stream runs on
            received += b"".join(pieces)
    assert received.endswith(b"data: [DONE]\n\n")
    # the upstream's body is read to its end beside the request, and at shutdown too: once the gateway has
    # stopped, the upstream has ended its answer as it would, not seen its connection cut
    assert fake_upstream.completed_streams == 1


def test_a_tier_set_keeps_a_pin_and_a_revoked_accounts_risk_history_can_be_shown(tmp_path):
    assert cli(tmp_path, "identities", "add", "carol").returncode == 0
    assert cli(tmp_path, "risk", "pin", "carol", "normal", "--note", "our partner").returncode == 0
    moved = cli(tmp_path, "tier", "set", "carol", "watch")
    assert "still pinned (our partner)" in moved.stdout
    shown = json.loads(cli(tmp_path, "risk", "show", "carol", "--json").stdout)
    assert (shown["tier"], shown["pin"]) == ("watch", "our partner")
    assert cli(tmp_path, "identities", "revoke", "carol").returncode == 0
    revoked = cli(tmp_path, "risk", "show", "carol")
    assert revoked.returncode == 0 and "carol: registry tier watch, pinned: our partner, revoked" in revoked.stdout
    assert cli(tmp_path, "risk", "show", "nobody").returncode == 2
