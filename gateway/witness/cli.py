"""`canarygate witness init | key | serve | check`: run a witness, or compare what witnesses saw of a log."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from ..evidence.note import NoteKey
from ..evidence.verifier import NoteError, forks, open_checkpoint


def add_commands(commands) -> None:
    witness = commands.add_parser("witness", help="run a C2SP witness, or check witnesses for a forked log")
    sub = witness.add_subparsers(title="witness commands")
    init = sub.add_parser("init", help="create the witness key in --dir; prints its verifier key on the last line")
    init.add_argument("--dir", required=True)
    init.add_argument("--name", required=True, help="the witness's name, e.g. witness.example.com/w1")
    init.set_defaults(run=_init)
    key = sub.add_parser("key", help="print the witness's verifier key")
    key.add_argument("--dir", required=True)
    key.set_defaults(run=_key)
    serve = sub.add_parser("serve", help="serve add-checkpoint for the logs given by --log (their verifier keys)")
    serve.add_argument("--dir", required=True)
    serve.add_argument("--log", action="append", default=[], help="a log's verifier key (repeat for several)")
    serve.add_argument("--logs", help="a file of log verifier keys, one per line")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7380)
    serve.set_defaults(run=_serve)
    check = sub.add_parser(
        "check", help="fetch a log's latest checkpoint from each witness; 1 on a fork, 2 if they could not be compared"
    )
    check.add_argument("--log", required=True, help="the log's verifier key")
    check.add_argument("--save", help="a folder to keep each witness's checkpoint in (for --gossip)")
    check.add_argument("urls", nargs="+", help="witness URLs")
    check.set_defaults(run=_check)


def _init(args) -> int:
    from .state import init_witness

    print(init_witness(Path(args.dir), args.name).verifier.vkey())
    return 0


def _key(args) -> int:
    from .state import load_cosigner

    print(load_cosigner(Path(args.dir)).verifier.vkey())
    return 0


def _serve(args) -> int:
    import uvicorn

    from .app import witness_app
    from .state import load_cosigner

    load_cosigner(Path(args.dir))  # a missing key is one line here, not a traceback from the server's startup
    vkeys = list(args.log)
    if args.logs:
        vkeys += [
            line.strip() for line in Path(args.logs).read_text().splitlines() if line.strip()[:1] not in ("", "#")
        ]
    if not vkeys:
        print("canarygate: give the logs to witness with --log VKEY or --logs FILE", file=sys.stderr)
        return 2
    logs = [NoteKey.parse(v) for v in vkeys]
    uvicorn.run(witness_app(Path(args.dir), logs), host=args.host, port=args.port)
    return 0


def _check(args) -> int:
    key = NoteKey.parse(args.log)
    notes, sizes = [], set()
    for url in args.urls:
        try:
            response = httpx.get(url.rstrip("/") + "/checkpoint", params={"origin": key.name}, timeout=10)
        except httpx.HTTPError as e:  # one witness down: the others may still show a fork
            print(f"{url}: unreachable ({type(e).__name__}: {e})")
            continue
        if response.status_code != 200:
            print(f"{url}: no checkpoint of {key.name} ({response.status_code})")
            continue
        try:
            checkpoint = open_checkpoint(response.text, [key])
        except NoteError as e:
            print(f"{url}: {e}")
            continue
        notes.append(response.text)
        sizes.add(checkpoint.size)
        print(f"{url}: size {checkpoint.size}")
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"witness-{len(notes)}.checkpoint").write_text(response.text)
    found = forks(notes, [key])
    for first, second in found:
        print(f"FORK: {key.name} signed two different trees of one size:\n{first}\n{second}")
    if found:
        return 1
    if not notes:  # nothing was checked: no all-clear
        print(f"no witness showed a checkpoint of {key.name} signed by this key: nothing was checked")
        return 2
    if len(sizes) > 1:  # a split view grows on both sides: the witnesses rarely hold one size
        print(
            "not compared: checkpoints of different sizes agree only by a consistency proof from the log; "
            "check them (--save) with `canarygate log verify --gossip FILE` or a bundle's `verify.py --gossip FILE`"
        )
        return 2
    return 0
