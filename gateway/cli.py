"""The `canarygate` command: init, identities, serve, demo.

A failure prints one line that says what to do and exits non-zero. A new API key is printed alone on the
last line of `identities add`, so that scripts can take it with `tail -n 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from redis.exceptions import RedisError

from . import bias, canary, config, evidence, ratelimit, watermark
from .evidence import keys
from .evidence.bundle import bundle_commitments, committed_epochs, disclosed_keys
from .evidence.bundle import export as export_bundle
from .evidence.reader import LogReader, VerifyError, commitments
from .evidence.store import Segment, segment_paths
from .evidence.tenants import Erased, TenantKeys
from .evidence.verifier import VerificationError
from .exchange import Identity
from .files import durable_dirs
from .forensics.cli import add_commands as _forensics_commands
from .forensics.evidence import canary_owners, prior_commitments
from .identity import DEFAULT_TIER, IdentityError, Registry
from .watermark.detect import adjusted
from .witness.cli import add_commands as _witness_commands

DEMO_IDENTITY = "demo"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        code = args.run(args) or 0
        sys.stdout.flush()  # here, where a reader gone is caught, not as Python exits
        return code
    except BrokenPipeError:  # `canarygate log show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 0
    except (config.ConfigError, IdentityError, keys.KeysError, VerifyError, VerificationError, Erased, OSError) as e:
        print(f"canarygate: {e}", file=sys.stderr)
        return 2
    except (RedisError, TimeoutError) as e:  # redis-py leaves passwords out of its messages
        print(
            f"canarygate: the shared storage ([limits] storage) did not answer: {e or type(e).__name__}",
            file=sys.stderr,
        )
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

    _tier_commands(commands)
    detect = commands.add_parser("detect", help="test a file of texts for the watermark (exact p-values)")
    detect.add_argument("file", help='JSON lines {"text": ..., "prompt": ...} (prompt optional)')
    detect.add_argument("--keys", help="the keys folder (default: the state folder's)")
    detect.add_argument("--json", action="store_true", help="print the result as JSON")
    detect.add_argument("--per-text", action="store_true", help="also test each line alone")
    detect.add_argument("--bundle", help="test with the watermark keys disclosed in this evidence bundle")
    detect.set_defaults(log_slot=None)
    detect.set_defaults(run=_detect)
    _risk_commands(commands)
    _canary_commands(commands)
    _keys_commands(commands)
    _log_commands(commands)
    _witness_commands(commands)
    _forensics_commands(commands, _settings, lambda args: _readers(args, all_by_default=True))

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


def _tier_commands(commands) -> None:
    tier = commands.add_parser("tier", help="move an identity between risk tiers (normal, watch, suspect, ...)")
    sub = tier.add_subparsers(title="tier commands")
    setting = sub.add_parser("set", help="set an identity's tier; every worker and replica applies it at once")
    setting.add_argument("name")
    setting.add_argument("tier")
    setting.set_defaults(run=_tier_set)
    showing = sub.add_parser("show", help="an identity's tier, and the shared override if one is set")
    showing.add_argument("name")
    showing.set_defaults(run=_tier_show)


def _canary_commands(commands) -> None:
    canaries = commands.add_parser("canaries", help="whose canaries a suspect's text carries")
    sub = canaries.add_subparsers(title="canary commands")
    attribute = sub.add_parser("attribute", help="test a file of texts against every identity's canaries")
    attribute.add_argument("file", help='JSON lines {"text": ...}')
    attribute.add_argument("--keys", help="the keys folder (default: the state folder's)")
    attribute.add_argument("--json", action="store_true")
    attribute.set_defaults(run=_canaries_attribute)


def _canaries_attribute(args) -> int:
    settings = _settings(args)
    loaded = keys.Keys.load(Path(args.keys) if args.keys else evidence.keys_dir(settings))
    key = canary.canary_key(loaded.watermark)
    names = sorted({record.name for record in Registry(settings.state_dir).all()})
    owners = canary_owners(key, names, sorted(loaded.masters), settings.canaries.count)
    rows = _detection_items(Path(args.file))
    texts = [row.text for row in rows]
    results, found = canary.attribute(texts, owners, [row.prompt for row in rows])
    doc = {"texts": len(texts), "identities_tested": len(owners), "phrases_found": found,
           "attributions": [r.as_json() for r in results]}  # fmt: skip
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(
        f"{len(texts)} texts; {found} canary-space phrases found; {len(owners)} identity-epochs tested, Holm-corrected"
    )
    for r in results:
        print(f"  {r.identity} (epoch {r.epoch}): {len(r.canaries)} of its canaries, p = {r.p_value:.3g}")
    if not results:
        print("  no identity's canaries found")
    return 0


def _risk_commands(commands) -> None:
    risk = commands.add_parser("risk", help="the risk engine's decisions about an identity; pin a tier")
    sub = risk.add_subparsers(title="risk commands")
    show = sub.add_parser("show", help="tier, pin, and every tier change with the signals behind it")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_risk_show, log_slot=None)
    pin = sub.add_parser("pin", help="fix an identity's tier; the risk engine leaves it alone")
    pin.add_argument("name")
    pin.add_argument("tier")
    pin.add_argument("--note", required=True, help="why (kept in the registry)")
    pin.set_defaults(run=_risk_pin)
    unpin = sub.add_parser("unpin", help="let the risk engine move the identity again")
    unpin.add_argument("name")
    unpin.set_defaults(run=_risk_unpin)


def _keys_commands(commands) -> None:
    keys = commands.add_parser("keys", help="the gateway's own keys: log signing, encryption, watermark")
    sub = keys.add_subparsers(title="key commands")
    sub.add_parser("init", help="create missing keys (files 0600); never overwrites").set_defaults(run=_keys_init)
    sub.add_parser(
        "public", help="print the log's verifier keys, retired ones included; the current one alone on the last line"
    ).set_defaults(run=_keys_public)
    sub.add_parser(
        "rotate", help="new encryption epoch and signing key; old ones stay for reading and verifying"
    ).set_defaults(run=_keys_rotate)


def _log_commands(commands) -> None:
    log = commands.add_parser("log", help="the evidence log: verify, prove, open, show, export")
    sub = log.add_subparsers(title="log commands")
    verify = sub.add_parser(
        "verify", help="check every entry, root, signature and checkpoint; non-zero on the first fault"
    )
    verify.add_argument("--vkey", action="append", help="verifier key(s) to check against (default: the key files)")
    verify.add_argument(
        "--gossip", action="append", default=[], help="a file holding a checkpoint seen elsewhere (a witness's)"
    )
    verify.set_defaults(run=_log_verify)
    prove = sub.add_parser("prove", help="inclusion proof of entry N under the latest checkpoint (JSON)")
    prove.add_argument("index", type=int)
    prove.set_defaults(run=_log_prove)
    opening = sub.add_parser("open", help="reveal one field (value and salt) of entry N")
    opening.add_argument("index", type=int)
    opening.add_argument("field", choices=["prompt", "response", "client"])
    opening.set_defaults(run=_log_open)
    for name, text in (("show", "list entries"), ("search", "list the entries that match")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--identity")
        command.add_argument("--since", help="ISO time, e.g. 2026-11-27T09:00")
        command.add_argument("--until")
        command.add_argument("--canary", help="a canary id served in the exchange (its begin entry is shown too)")
        command.add_argument("--reveal", action="store_true", help="decrypt prompts and responses (needs the keys)")
        command.add_argument("--json", action="store_true")
        command.set_defaults(run=_log_show)
    export = sub.add_parser("export", help="write a self-contained evidence bundle to a folder")
    export.add_argument("out")
    export.add_argument("--identity")
    export.add_argument(
        "--reveal",
        action="append",
        choices=["prompt", "response", "client"],
        default=[],
        help="include the openings of these fields",
    )
    export.add_argument(
        "--disclose-epoch",
        type=int,
        action="append",
        default=[],
        help="open the commitment to this epoch's watermark key (for a judge or expert)",
    )
    export.set_defaults(run=_log_export)
    shred = sub.add_parser("shred", help="erase a tenant's prompts and answers for good (deletes its keys)")
    shred.add_argument("--tenant", required=True, help='the tenant\'s name ("" for requests of no tenant)')
    shred.set_defaults(run=_log_shred)
    expire = sub.add_parser("expire", help="erase what is older than [evidence] retention_days now")
    expire.set_defaults(run=_log_expire)
    for command in (verify, prove, opening, export, *sub.choices.values()):
        if not any(a.dest == "log_slot" for a in command._actions):
            command.add_argument(
                "--log",
                dest="log_slot",
                type=int,
                default=None,
                help="which worker's log (default: every log for verify, else 0)",
            )


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
    durable_dirs(settings.state_dir)
    print(f"state folder: {settings.state_dir}")
    created = keys.init_keys(evidence.keys_dir(settings), evidence.origin_of(settings))
    print(f"keys: created {', '.join(created)}" if created else "keys: already there")
    print("next: canarygate identities add NAME, then canarygate serve --upstream URL")
    return 0


def _identities_add(args) -> int:
    settings = _settings_with_tier(args)  # an unknown tier would be served as normal
    registry = Registry(settings.state_dir)
    holders = registry.named(args.name)
    if holders and all(record.revoked is not None for record in holders):  # a name revoked, registered anew,
        # is a new caller: a tier the risk engine gave its last holder goes (first, as in `tier set`, so that
        # storage that cannot be reached leaves the registry as it was)
        _clear_shared_tier(settings, Identity(args.name, args.tier, args.tenant))
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
        line = "{:<32} {:<10} {:<16} {:<16}  {}"
        print(line.format("NAME", "TIER", "TENANT", "KEY ID", "STATUS"))
        for row in rows:
            status = "revoked" if row["revoked"] else "active"
            print(line.format(row["name"], row["tier"], row["tenant"] or "-", row["key_id"], status))
    return 0


def _identities_revoke(args) -> int:
    settings = _settings(args)
    registry = Registry(settings.state_dir)
    identity = registry.get(args.name).identity()
    registry.revoke(args.name)  # first: a leaked key must be revocable while the shared storage is down
    print(f"revoked {args.name}")
    try:  # so that no later holder of the name inherits a tier the engine gave this one
        _clear_shared_tier(settings, identity)
    except (RedisError, TimeoutError) as e:
        print(f"canarygate: its tier on the shared storage was left ({e or type(e).__name__}); registering the "
              "name again clears it", file=sys.stderr)  # fmt: skip
    return 0


def _clear_shared_tier(settings: config.Settings, identity: Identity) -> None:
    """Drop the tier override that replicas read for the identity from shared storage (memory has none here)."""
    if settings.limits.storage != "memory":
        asyncio.run(ratelimit.set_shared_tier(settings, identity, None))


def _settings_with_tier(args) -> config.Settings:
    """The settings, once `args.tier` is known to be one of their tiers."""
    settings = _settings(args)
    if args.tier not in settings.limits.tiers:
        known = ", ".join(settings.limits.tiers)
        raise config.ConfigError(f"unknown tier {args.tier!r}; the tiers in {settings.source} are {known}")
    return settings


def _tier_set(args) -> int:
    settings = _settings_with_tier(args)
    registry = Registry(settings.state_dir)
    record = registry.get(args.name)
    if settings.limits.storage != "memory":  # replicas on other hosts read the tier from the shared storage;
        # first, so that storage that cannot be reached leaves the registry as it was
        asyncio.run(ratelimit.set_shared_tier(settings, record.identity(), args.tier))
    record = registry.move(args.name, args.tier)
    print(f"{args.name} is now in tier {args.tier}" + (f", still pinned ({record.pin})" if record.pin else ""))
    return 0


def _risk_pin(args) -> int:
    settings = _settings_with_tier(args)
    registry = Registry(settings.state_dir)
    if settings.limits.storage != "memory":  # first, as in `tier set`
        asyncio.run(ratelimit.set_shared_tier(settings, registry.get(args.name).identity(), None))
    registry.set_tier(args.name, args.tier, pin=args.note)
    print(f"{args.name} is pinned to tier {args.tier}; the risk engine will not move it ({args.note})")
    return 0


def _risk_unpin(args) -> int:
    record = Registry(_settings(args).state_dir).unpin(args.name)
    print(f"{args.name} is no longer pinned (tier {record.tier}); the risk engine may move it again")
    return 0


def _risk_show(args) -> int:
    """An identity's tier and pin, and every risk decision about it in the evidence log, with its reasons."""
    settings = _settings(args)
    record = _latest_record(Registry(settings.state_dir), args.name)  # a revoked account's history too
    try:
        readers = _readers(args, all_by_default=True)
    except VerifyError:  # a gateway that has not served yet has no log: no decision either
        readers = []
    decisions = [
        {"log": reader.origin(), "index": item.index, "time": item.public["time"], **item.public["decision"]}
        for reader in readers
        for item in reader.entries(strict=False)
        if item.public.get("kind") == "risk" and item.public.get("identity") == args.name
    ]
    decisions.sort(key=lambda d: d["time"])  # each worker's log holds its own: one history, in time order
    revoked = record.revoked is not None
    doc = {"identity": args.name, "tier": record.tier, "pin": record.pin, "revoked": revoked, "decisions": decisions}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{args.name}: registry tier {record.tier}" + (f", pinned: {record.pin}" if record.pin else "")
          + (", revoked" if revoked else ""))  # fmt: skip
    for d in decisions:
        shadow = "" if d["applied"] else f" (not applied{': ' + d['error'] if d.get('error') else ''})"
        reasons = ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["strengths"].items(), key=lambda kv: -kv[1]))
        reasons = reasons or "no signals"  # a step down, once they decayed
        print(f"  {d['time']} {d['from']} -> {d['to']}{shadow}: score {d['score']:.2f} from {reasons}")
    if not decisions:
        print("  no risk decisions recorded")
    return 0


def _latest_record(registry: Registry, name: str):
    """The record registered under `name` now, or else its latest revoked one (IdentityError if never)."""
    return (registry.named(name) or [registry.get(name)])[-1]


def _tier_show(args) -> int:
    settings = _settings(args)
    record = Registry(settings.state_dir).get(args.name)
    print(f"{args.name}: tier {record.tier} (registry)")
    if settings.limits.storage != "memory":
        override = asyncio.run(ratelimit.shared_tier(settings, record.identity()))
        print(f"shared override: {override or 'none'}")
    return 0


def _detect(args) -> int:
    settings = _settings(args)
    directory = Path(args.keys) if args.keys else evidence.keys_dir(settings)
    rows = _detection_items(Path(args.file))
    items = [(row.text, row.prompt) for row in rows]
    sets = watermark.default_sets()
    if args.bundle:  # an expert's run: the keys disclosed in an evidence bundle, its commitments as the record
        found = bundle_commitments(Path(args.bundle))
        epochs = [watermark.LexicalKey(key, sets, epoch) for epoch, key in disclosed_keys(found)]
        if not epochs:
            raise config.ConfigError(f"{args.bundle}: no disclosed watermark key (export with --disclose-epoch N)")
        # the family is every epoch committed to: disclosing only the one that fits must not shrink it
        untested = len(committed_epochs(found) - {key.epoch for key in epochs})
        greens = None
    else:
        loaded = keys.Keys.load(directory)
        epochs, untested = watermark.epoch_keys(loaded), 0
        found = _logged_commitments(args)
        greens = _green_lists(settings, loaded, found)

    def findings_for(chosen: list[tuple[str, str]]):
        """Every scheme's test, Holm-adjusted across schemes and key epochs."""
        lexical = watermark.detect(chosen, epochs, sets, untested)
        return adjusted(lexical + bias.detect(chosen, greens.lists, greens.vocabulary)) if greens else lexical

    findings = findings_for(items)
    doc = {"texts": len(items), "word_sets": sets.version, "schemes": _by_scheme(findings)}
    doc["commitments"] = prior_commitments(found, epochs, sets.version, greens.lists if greens else ())
    if args.per_text:
        doc["per_text"] = _per_text(rows, [findings_for([item]) for item in items], untested)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"{len(items)} texts; word sets {sets.version[:16]}; one test per key epoch, Holm-corrected")
    for name, result in doc["schemes"].items():
        print(
            f"  {name}: p = {result['p_value']:.3g} from {result['n']} votes ({result['hits']} for the key, "
            f"{result['sites']} sites)"
        )
    for subject, found in doc["commitments"].items():
        if found is None:
            print(f"  {subject}: NO PRIOR COMMITMENT in the evidence log; nothing shows it was fixed in advance")
        else:
            print(f"  {subject}: committed at {found['time']} ({found['log']} entry {found['index']}"
                  f"{_CHECKPOINTED[found['checkpointed']]})")  # fmt: skip
    if args.per_text:
        print("  per text, Holm-corrected over every line, scheme and key epoch:")
    for per_text in doc.get("per_text", []):
        best = min(per_text["schemes"].values(), key=lambda r: r["p_value"])
        print(f"  line {per_text['line']}: p = {best['p_value']:.3g} from {best['n']} votes")
    return 0


# what a commitment's entry is known to be under: a signed checkpoint of the log read; none yet; or a bundle's
# word, which `detect --bundle` does not check (a forged bundle's commitments read the same)
_CHECKPOINTED = {True: "", False: ", not yet under a signed checkpoint",
                 "unverified": ", as the bundle says: run the bundle's verify.py to check it"}  # fmt: skip


def _per_text(rows: list[_Row], findings: list[list], untested: int) -> list[dict]:
    """Each line's findings, Holm-adjusted together over every line's (a file of many texts is many tests:
    some line of unmarked text would otherwise come out below any alpha); `raw_p_value` keeps the line's own."""
    flat = iter(adjusted([f for line in findings for f in line], untested * len(rows)))
    return [
        {"line": row.line, "schemes": _by_scheme([next(flat) for _ in line])}
        for row, line in zip(rows, findings, strict=True)
    ]


def _logged_commitments(args) -> list[dict]:
    try:
        return commitments(_readers(args, all_by_default=True))
    except VerifyError:
        return []


class GreenLists(NamedTuple):
    vocabulary: bias.Vocabulary
    lists: list[bias.GreenList]


def _green_lists(settings: config.Settings, loaded: keys.Keys, found: list[dict]) -> GreenLists | None:
    """The green lists the gateway committed to in the log (each epoch's, with its size), where the sampling-
    bias mark has a tokenizer; None where it has none or never served under one (then nothing is tested, so
    the other scheme's p-values are not diluted)."""
    chosen = settings.sampling_bias
    committed = {
        c["epoch"]: c for c in found if c.get("subject") == "sampling-bias-key" and c["epoch"] in loaded.masters
    }
    if not chosen.tokenizer or not committed:
        return None
    try:
        vocabulary = bias.Vocabulary.load(Path(chosen.tokenizer))
    except bias.VocabularyError as e:
        raise config.ConfigError(f"[sampling_bias] tokenizer: {e}") from None
    if vocabulary.digest not in {c.get("digest") for c in found if c.get("subject") == "tokenizer"}:
        raise config.ConfigError(f"{chosen.tokenizer} is not the tokenizer file the gateway committed to")
    lists = [
        bias.green_list(loaded.watermark, e, vocabulary, c["size"], chosen.bias) for e, c in sorted(committed.items())
    ]
    return GreenLists(vocabulary, lists)


class _Row(NamedTuple):
    line: int  # in the file, from 1 (blank lines count)
    text: str
    prompt: str


def _detection_items(path: Path) -> list[_Row]:
    """The file's JSON lines. Lines end at LF alone: JSON allows U+2028 and its kin raw inside a string (a probe's
    transcript holds them), which str.splitlines would cut the line at."""
    try:
        lines = path.read_bytes().decode("utf-8-sig").split("\n")  # a byte order mark, as Windows tools write
    except UnicodeDecodeError as e:
        raise config.ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # a number of over 4,300 digits is refused as well
            raise config.ConfigError(f"{path}:{number}: not valid JSON ({str(e)[:120]})") from None
        try:
            text, prompt = row["text"], row.get("prompt")
            prompt = "" if prompt is None else prompt  # a falsy 0 or [] is no prompt: refused below, not dropped
            if not isinstance(text, str) or not isinstance(prompt, str):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise config.ConfigError(
                f'{path}:{number}: expected a JSON object with "text" (and "prompt") as strings'
            ) from None
        rows.append(_Row(number, text, prompt))
    if not rows:
        raise config.ConfigError(f'{path}: no texts to test (expected JSON lines with "text")')
    return rows


def _by_scheme(findings) -> dict:
    """One entry per scheme; with several key epochs, one per epoch (named scheme@epoch)."""
    several = len(findings) > 1
    return {f"{f.scheme}@{f.epoch}" if several else f.scheme: f.as_json() for f in findings}


def _keys_init(args) -> int:
    settings = _settings(args)
    created = keys.init_keys(evidence.keys_dir(settings), evidence.origin_of(settings))
    print(f"created {', '.join(created)} in {evidence.keys_dir(settings)}" if created else "all keys already exist")
    return 0


def _keys_public(args) -> int:
    retired, current = _verifier_keys(_settings(args))
    print("\n".join([*retired, *current]))
    return 0


def _verifier_keys(settings) -> tuple[list[str], list[str]]:
    """(retired, current) verifier keys of every log slot, named for the slot's log (slot 0 last). After `keys
    rotate` the old checkpoints stay under the retired keys, so a verifier pinned to the current key alone
    would refuse the log's own history."""
    loaded = keys.Keys.load(evidence.keys_dir(settings))
    origin = evidence.origin_of(settings)
    slots = evidence.slots(evidence.logs_dir(settings)) or [0]
    named = [loaded.verifiers(evidence.slot_origin(origin, slot)) for slot in sorted(slots, reverse=True)]
    return [key.vkey() for of_slot in named for key in of_slot[1:]], [of_slot[0].vkey() for of_slot in named]


def _keys_rotate(args) -> int:
    settings = _settings(args)
    epoch = keys.rotate(evidence.keys_dir(settings))
    print(f"encryption epoch {epoch} and a new signing key; restart the gateway to use them. New key:")
    print("\n".join(_verifier_keys(settings)[1]))  # named for the log, as `keys public` names it
    return 0


def _readers(args, all_by_default: bool) -> list[LogReader]:
    settings = _settings(args)
    directory = evidence.keys_dir(settings)
    try:  # no key folder: a third party's check, with --vkey
        loaded = keys.Keys.load(directory) if directory.exists() else None
    except keys.KeysError as e:  # a damaged key is named, not taken for no keys
        if not getattr(args, "vkey", None):
            raise
        print(f"canarygate: {e}; checking with --vkey alone (sealed values are not opened)", file=sys.stderr)
        loaded = None
    root = evidence.logs_dir(settings)
    if args.log_slot is not None:
        slots = [args.log_slot]
    elif all_by_default:
        slots = evidence.slots(root)
    else:
        slots = [0]
    readers = [LogReader(root / str(slot), loaded) for slot in slots if (root / str(slot)).is_dir()]
    if not readers:
        raise VerifyError(f"no evidence log under {root}; the gateway writes one as it serves")
    return readers


def _log_verify(args) -> int:
    readers = _readers(args, all_by_default=True)
    gossip: dict[str, list[tuple[str, str]]] = {}  # a log's origin (a note's first line) -> (file, note)
    for path in args.gossip:
        text = Path(path).read_text("utf-8", "replace")
        gossip.setdefault(text.split("\n", 1)[0], []).append((path, text))
    for origin in set(gossip) - {reader.origin() for reader in readers}:
        raise VerifyError(f"{gossip[origin][0][0]}: a checkpoint of {origin!r}, none of these logs")
    for reader in readers:
        report = reader.verify(args.vkey, gossip.get(reader.origin(), []))
        opened = f", {report.opened} sealed entries opened and matched" if reader.keys else ""
        if report.erased:
            opened += f", {report.erased} erased (tenant keys shredded or past retention)"
        print(
            f"{report.origin}: {report.entries} entries, {report.checkpoints} checkpoints, "
            f"{report.covered} under the latest{opened}: OK"
        )
        for warning in report.warnings:
            print(f"  note: {warning}")
    return 0


def _log_prove(args) -> int:
    print(json.dumps(_readers(args, False)[0].prove(args.index), indent=1))
    return 0


def _log_open(args) -> int:
    print(json.dumps(_readers(args, False)[0].open_field(args.index, args.field), indent=1, ensure_ascii=False))
    return 0


def _log_show(args) -> int:
    for reader in _readers(args, all_by_default=True):
        # a canary is in the end entry; its exchange's begin entry (the prompt it answered) is shown with it
        entries = reader.entries(strict=False) if args.canary else ()
        exchanges = {item.public.get("id") for item in entries if _matches(item.public, args)}
        for item in reader.entries(strict=False):
            public = item.public
            if not (_matches(public, args) or (args.canary and public.get("id") in exchanges - {None})):
                continue
            row = {"log": reader.origin(), "index": item.index, **public}
            if args.reveal and public.get("kind") != "commitment":  # a commitment opens to a key: export discloses it
                try:
                    opened = reader.open_all(item)
                except Erased as e:
                    opened = {"erased": {"value": base64.b64encode(str(e).encode())}}
                row["revealed"] = {
                    k: base64.b64decode(v["value"]).decode("utf-8", "replace") for k, v in opened.items()
                }
            if args.json:
                print(json.dumps(row, ensure_ascii=False))
            else:
                status = public.get("status", public.get("decision", ""))  # commitments have no id, no status
                if public["kind"] == "risk":  # nor a risk decision: its move says what it was
                    status = f"{public['decision']['from']} -> {public['decision']['to']}"
                print(  # the log (one per worker) first: each numbers its entries from 0
                    f"log {reader.dir.name} {item.index:>8} {public.get('time', '-')} {public['kind']:<5} "
                    f"{public.get('id', '-')} {public.get('identity') or '-':<16} {status}"
                )
                for key, value in row.get("revealed", {}).items():
                    print(f"{'':>9}{key}: {value[:200]}")
    return 0


def _matches(public: dict, args) -> bool:
    if args.identity and public.get("identity") != args.identity:
        return False
    if args.since and public.get("time", "") < args.since:
        return False
    if args.until and public.get("time", "") > args.until:
        return False
    return not args.canary or any(c.get("id") == args.canary for c in public.get("canaries") or [])


def _log_export(args) -> int:
    settings = _settings(args)
    readers = _readers(args, all_by_default=True)
    count, warnings = export_bundle(readers, Path(args.out), args.identity, args.reveal, settings, args.disclose_epoch)
    print(f"wrote {count} entries with their proofs to {args.out}; check it with: python {args.out}/verify.py")
    for warning in warnings:
        print(f"  note: {warning}")
    return 0


def _log_shred(args) -> int:
    settings = _settings(args)
    count = TenantKeys(evidence.keys_dir(settings)).shred(args.tenant)
    print(f"deleted {count} keys of tenant {args.tenant!r}: its recorded prompts and answers can no longer be read")
    print("the log's entries, commitments and proofs are unchanged and still verify")
    root = evidence.logs_dir(settings)
    older = [p for slot in evidence.slots(root) for p in segment_paths(root / str(slot)) if Segment(p).version == 1]
    if older:
        print(
            f"note: {len(older)} segment(s) written before per-tenant keys existed are sealed under the log's "
            "own key; this tenant's bodies in them are not erased by deleting its keys"
        )
    return 0


def _log_expire(args) -> int:
    settings = _settings(args)
    if not settings.evidence.retention_days:
        print("[evidence] retention_days is 0: everything is kept")
        return 0
    count = TenantKeys(evidence.keys_dir(settings)).expire(settings.evidence.retention_days)
    print(f"deleted {count} tenant-day keys older than {settings.evidence.retention_days} days")
    return 0


def _serve(args) -> int:
    settings = _settings(args).with_overrides(
        upstream=args.upstream, host=args.host, port=args.port, workers=args.workers
    )
    key = settings.upstream.api_key()
    if not settings.upstream.is_demo and not key:
        print(
            f"canarygate: warning: ${settings.upstream.api_key_env} is not set; requests go upstream without a key",
            file=sys.stderr,
        )
    if key and not (key.isascii() and key.isprintable() and " " not in key):  # it goes into a header as it is
        raise config.ConfigError(f"${settings.upstream.api_key_env} holds a space or a control character")
    overrides = {"upstream": args.upstream, "host": args.host, "port": args.port, "workers": args.workers}
    return _run(settings, args, {k: v for k, v in overrides.items() if v is not None})


def _demo(args) -> int:
    state_dir = _settings(args).state_dir.resolve()  # the demo's folder is beside it ("." has no name to extend):
    demo_dir = str(state_dir.parent / (state_dir.name + "-demo"))  # its key must never work on the gateway set up here
    overrides = {"upstream": "demo", "host": args.host, "port": args.port, "workers": args.workers}
    overrides = {k: v for k, v in overrides.items() if v is not None} | {"state_dir": demo_dir}
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

    from .app import SETTINGS_ENV, check_app
    from .logs import uvicorn_log_config

    if settings.server.workers > config.max_workers():
        raise config.ConfigError(
            f"{settings.source}: [server] workers must be at most {config.max_workers()} on this machine (four per "
            f"CPU), got {settings.server.workers}"
        )
    durable_dirs(settings.state_dir)
    keys.init_keys(evidence.keys_dir(settings), evidence.origin_of(settings))  # once, before any worker starts
    if settings.server.workers > 1:  # a worker that cannot build the app is started again, forever: build it once
        check_app(settings)  # here, where a ConfigError is one line and exit status 2
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
