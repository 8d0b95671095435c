"""The `canarygate` command: init, identities, serve, demo.

A failure prints one line that says what to do and exits non-zero. A new API key is printed alone on the
last line of `identities add`, so that scripts can take it with `tail -n 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from . import config
from .identity import DEFAULT_TIER, IdentityError, Registry

DEMO_IDENTITY = "demo"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (config.ConfigError, IdentityError) as e:
        print(f"canarygate: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canarygate", description="A gateway that guards a model API.")
    parser.add_argument("--config", help=f"settings file (default: ./{config.DEFAULT_CONFIG_FILE} if present)")
    commands = parser.add_subparsers(title="commands")

    init = commands.add_parser("init", help="write canarygate.toml with commented defaults and the state folder")
    init.add_argument("--force", action="store_true", help="overwrite an existing canarygate.toml")
    init.set_defaults(run=_init)

    identities = commands.add_parser("identities", help="register, list and revoke callers").add_subparsers(
        title="identity commands"
    )
    add = identities.add_parser("add", help="register a caller; prints its API key on the last line")
    add.add_argument("name")
    add.add_argument("--tier", default=DEFAULT_TIER)
    add.add_argument("--tenant")
    add.set_defaults(run=_identities_add)
    listing = identities.add_parser("list", help="list callers (never their keys)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_identities_list)
    revoke = identities.add_parser("revoke", help="revoke a caller's key; every worker refuses it within a second")
    revoke.add_argument("name")
    revoke.set_defaults(run=_identities_revoke)

    for name, text in (("serve", "run the gateway"), ("demo", "run the gateway in front of the built-in demo model")):
        command = commands.add_parser(name, help=text)
        if name == "serve":
            command.add_argument("--upstream", help="the model API's base URL, e.g. https://api.openai.com")
        command.add_argument("--host")
        command.add_argument("--port", type=int)
        command.add_argument("--workers", type=int)
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        command.set_defaults(run=_serve if name == "serve" else _demo)
    return parser


def _settings(args) -> config.Settings:
    return config.load(args.config)


def _init(args) -> int:
    path = Path(args.config or config.DEFAULT_CONFIG_FILE)
    if path.exists() and not args.force:
        print(f"{path} exists; leaving it as it is (use --force to overwrite)")
    else:
        path.write_text(config.DEFAULT_TOML)
        print(f"wrote {path}")
    settings = config.load(path)
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    print(f"state folder: {settings.state_dir}")
    print("next: canarygate identities add NAME, then canarygate serve --upstream URL")
    return 0


def _identities_add(args) -> int:
    registry = Registry(_settings(args).state_dir)
    key = registry.add(args.name, tier=args.tier, tenant=args.tenant)
    print(f"registered {args.name} (tier {args.tier}); its key is shown once, below:")
    print(key)
    return 0


def _identities_list(args) -> int:
    records = Registry(_settings(args).state_dir).all()
    rows = [
        {"name": r.name, "tier": r.tier, "tenant": r.tenant, "key_id": r.key_id, "revoked": r.revoked is not None}
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no identities; add one with `canarygate identities add NAME`")
    else:
        for row in rows:
            status = "revoked" if row["revoked"] else "active"
            print(f"{row['name']:<32} {row['tier']:<10} {row['tenant'] or '-':<16} {row['key_id']}  {status}")
    return 0


def _identities_revoke(args) -> int:
    Registry(_settings(args).state_dir).revoke(args.name)
    print(f"revoked {args.name}")
    return 0


def _serve(args) -> int:
    settings = _settings(args).with_overrides(
        upstream=args.upstream, host=args.host, port=args.port, workers=args.workers
    )
    if not settings.upstream.is_demo and not settings.upstream.api_key():
        print(
            f"canarygate: warning: ${settings.upstream.api_key_env} is not set; requests go upstream without a key",
            file=sys.stderr,
        )
    overrides = {"upstream": args.upstream, "host": args.host, "port": args.port, "workers": args.workers}
    return _run(settings, args, {k: v for k, v in overrides.items() if v is not None})


def _demo(args) -> int:
    overrides = {"upstream": "demo", "host": args.host, "port": args.port, "workers": args.workers}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = _settings(args).with_overrides(**overrides)
    registry = Registry(settings.state_dir)
    if any(r.name == DEMO_IDENTITY and r.revoked is None for r in registry.all()):
        registry.revoke(DEMO_IDENTITY)
    key = registry.add(DEMO_IDENTITY)
    url = f"http://{settings.server.host}:{settings.server.port}"
    print(
        f"canarygate demo: the gateway at {url} in front of the built-in demo model.\n"
        f"Try it:\n\n  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n"
        "    -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "canarygate-demo", "messages": [{"role": "user", "content": "Hello"}]}\'\n',
        flush=True,
    )
    return _run(settings, args, overrides)


def _run(settings: config.Settings, args, overrides: dict) -> int:
    import uvicorn

    from .app import SETTINGS_ENV
    from .logs import uvicorn_log_config

    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[SETTINGS_ENV] = json.dumps({"config": args.config, "overrides": overrides, "log_level": args.log_level})
    if settings.server.workers > 1:
        metrics_dir = settings.state_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    uvicorn.run(
        "gateway.app:app_from_env",
        factory=True,
        host=settings.server.host,
        port=settings.server.port,
        workers=settings.server.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # the gateway decides whom to believe ([server] trusted_proxies)
        log_level=args.log_level,
        log_config=uvicorn_log_config(args.log_level),
        timeout_graceful_shutdown=settings.server.shutdown_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
