"""Settings: the TOML file, its defaults, and the one place that validates them.

A bad value is reported as `ConfigError` naming the file, the key and the fix; the CLI turns it into one
line and a non-zero exit. Nothing here reads secrets' values into logs: the upstream key is named by the
environment variable that holds it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import limits

from .protocols.openai import CONSTRAINED_FIELDS

DEFAULT_CONFIG_FILE = "canarygate.toml"

# The commented file that `canarygate init` writes; parsing it gives exactly the defaults below.
DEFAULT_TOML = """\
# canarygate configuration. Every key is optional; the values shown are the defaults.

[server]
host = "127.0.0.1"
port = 8080
workers = 1                      # worker processes (uvicorn)
max_body_bytes = 4194304         # request bodies above this (after decompression) get 413
max_response_bytes = 33554432    # an upstream answer above this is cut off (502, or an error event in a stream)
shutdown_timeout = 30.0          # seconds in-flight streams may run on after a stop signal
trusted_proxies = []             # CIDRs whose X-Forwarded-For is believed, e.g. ["10.0.0.0/8"]
admin_token_env = "CANARYGATE_ADMIN_TOKEN"  # the variable holding the /admin/ token; unset: no admin endpoint

[upstream]
url = "https://api.openai.com"   # the model API's origin, without /v1; "demo" serves the built-in demo model
api_key_env = "CANARYGATE_UPSTREAM_API_KEY"  # the environment variable holding the upstream key
connect_timeout = 5.0
read_timeout = 300.0             # longest silence between two bytes of an answer
max_connections = 1000
passthrough = []                 # extra path prefixes forwarded as-is to authenticated callers
# request fields of constrained decoding that make an answer structured output, which no mark touches (vLLM:
# guided_*, structured_outputs; llama.cpp: json_schema, grammar; SGLang: regex, ebnf, json_schema). List only
# those your upstream honours: one it ignores lets a client switch the marks off. [] for OpenAI itself.
constrained_decoding = ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                        "json_schema", "grammar", "regex", "ebnf"]

[state]
dir = ".canarygate"              # identities, keys, the evidence log, worker metrics; relative: to this file

[evidence]
origin = ""                      # the log's name in its checkpoints; "" means canarygate.local/<hostname>
durability = "batch"             # "batch": fsync every batch_interval_ms; "fsync": wait for disk (see docs)
batch_interval_ms = 2.0
checkpoint_every = 1000          # sign a checkpoint every this many entries...
checkpoint_interval = 10.0       # ...or this many seconds, and at shutdown
segment_bytes = 67108864         # segment files roll over at this size
unauthenticated_records = "10/minute"  # requests without a valid key recorded in full per address; the
                                 # rest are counted into one summary entry a minute
client_addresses = "hashed"      # "hashed": client addresses are kept as keyed hashes; "plain": as they are
retention_days = 0               # erase prompts and answers older than this (their keys are deleted; the
                                 # tree, commitments and proofs stay); 0 keeps them for ever
witnesses = []                   # C2SP witnesses that cosign each checkpoint, e.g.
                                 # [{url = "https://witness.example/w1", vkey = "witness.example/w1+..."}]

[watermark]
enabled = true                   # mark every answer's prose with the keyed lexical watermark
logprobs = "strip"               # a marked answer's log-probabilities would reveal the unmarked text:
                                 # "strip" removes the ask from the request, "refuse" answers 400

[canaries]
enabled = true                   # end some answers of watched identities with a canary phrase of their own
count = 8                        # canaries per identity and key epoch
identities = []                  # names that get a canary in every answer, whatever their tier
tenants = []                     # tenants whose identities get one in every answer

[canaries.density]               # the share of answers that carry one, per tier
watch = 0.25
suspect = 1.0

[sampling_bias]
enabled = false                  # ask the upstream to favour a keyed list of its tokens (logit_bias), where
                                 # its API takes it; needs the upstream's tokenizer file
tokenizer = ""                   # a tokenizers JSON file (or any JSON object of token -> id), read offline
size = 300                       # tokens favoured (OpenAI allows 300 logit_bias entries)
bias = 4.0                       # added to each one's logit (above 0, at most 10)
skip_models = ["o1*", "o3*", "o4*", "gpt-5*"]  # reasoning models refuse logit_bias; others that do are
                                 # found on their first refusal and skipped from then on
client_bias = "refuse"           # a client's own logit_bias where the mark applies: "refuse" (400), or
                                 # "yield" (its entries win and ours fill the rest; but then an answer with
                                 # and one without the mark, at temperature 0, show which tokens are favoured)

[risk]
mode = "enforce"                 # "enforce": the risk engine moves identities between normal, watch and
                                 # suspect; "shadow": it scores and records its decisions without applying
                                 # them; "off": no scoring

[limits]
storage = "memory"               # "memory" (per process), or a Redis shared by replicas: redis://host:6379/0,
                                 # redis+cluster://host:port,host:port, redis+sentinel://host:port/service
timeout_ms = 50                  # longest wait for the storage on the request path
on_storage_error = "open"        # "open": local limits (divided by replicas) until it is back; "closed": 503
replicas = 1                     # gateway replicas sharing the storage
lease_seconds = 60               # a concurrency slot lapses this long after its holder's last heartbeat
default_max_tokens = 4096        # asked of the upstream (and reserved) when a request sets no output limit
unauthenticated = "60/minute"    # requests without a valid key or for no route, per client address (IPv6: /64)

[limits.identity]                # per identity, at tier scale 1; rates are "N/second|minute|hour|day; ..."
requests = "600/minute; 20000/day"
tokens = "400000/minute; 20000000/day"   # prompt plus completion
concurrency = 32

[limits.tenant]                  # across all identities of one tenant; "" and 0 mean no such limit
requests = ""
tokens = ""
concurrency = 0

# Tiers scale every limit; the risk engine, `canarygate tier set` and the admin endpoint move identities
# between them. tarpit_ms delays forwarding; max_tokens caps the output a request may ask for (0: no cap);
# enforce = false evaluates the limits without refusing; headers = false sends no rate-limit headers.
[limits.tiers.normal]
scale = 1.0

[limits.tiers.watch]
scale = 0.5
tarpit_ms = 250

[limits.tiers.suspect]
scale = 0.1
tarpit_ms = 2000
max_tokens = 1024

[limits.tiers.blocked]
scale = 0.0

[limits.tiers.unlimited]         # internal and benchmark traffic: limits are evaluated, never enforced
scale = 1.0
enforce = false
headers = false
"""

_TOP_LEVEL_SECTIONS = (
    "server",
    "upstream",
    "state",
    "evidence",
    "watermark",
    "canaries",
    "sampling_bias",
    "risk",
    "limits",
)
REQUIRED_TIERS = ("normal", "watch", "suspect", "blocked", "unlimited")


class ConfigError(Exception):
    """A configuration problem a user can act on: says where and what to do."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 32 * 1024 * 1024
    shutdown_timeout: float = 30.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    admin_token_env: str = "CANARYGATE_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = "https://api.openai.com"
    api_key_env: str = "CANARYGATE_UPSTREAM_API_KEY"
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    max_connections: int = 1000
    passthrough: tuple[str, ...] = ()
    constrained_decoding: tuple[str, ...] = CONSTRAINED_FIELDS

    @property
    def is_demo(self) -> bool:
        return self.url == "demo"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None


@dataclass(frozen=True, slots=True)
class WitnessSettings:
    url: str
    vkey: str  # a C2SP cosignature verifier key (algorithm 0x04)


@dataclass(frozen=True, slots=True)
class EvidenceSettings:
    origin: str = ""
    durability: str = "batch"
    batch_interval_ms: float = 2.0
    checkpoint_every: int = 1000
    checkpoint_interval: float = 10.0
    segment_bytes: int = 64 * 1024 * 1024
    unauthenticated_records: str = "10/minute"
    client_addresses: str = "hashed"
    retention_days: int = 0
    witnesses: tuple[WitnessSettings, ...] = ()

    @staticmethod
    def default_origin() -> str:
        """What an empty `origin` becomes at a log's first start (then kept in the state folder)."""
        return f"canarygate.local/{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class WatermarkSettings:
    enabled: bool = True
    logprobs: str = "strip"


@dataclass(frozen=True, slots=True)
class CanarySettings:
    enabled: bool = True
    count: int = 8
    identities: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    density: tuple[tuple[str, float], ...] = (("watch", 0.25), ("suspect", 1.0))


@dataclass(frozen=True, slots=True)
class SamplingBiasSettings:
    enabled: bool = False
    tokenizer: str = ""
    size: int = 300
    bias: float = 4.0
    skip_models: tuple[str, ...] = ("o1*", "o3*", "o4*", "gpt-5*")
    client_bias: str = "refuse"


@dataclass(frozen=True, slots=True)
class RiskSettings:
    mode: str = "enforce"


@dataclass(frozen=True, slots=True)
class Rate:
    """N units per period, as written in the config ("600/minute")."""

    amount: int
    period_ms: int
    text: str


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    requests: tuple[Rate, ...] = ()
    tokens: tuple[Rate, ...] = ()
    concurrency: int = 0  # 0: none

    @property
    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.concurrency)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    scale: float = 1.0
    tarpit_ms: float = 0.0
    max_tokens: int = 0
    enforce: bool = True
    headers: bool = True


@dataclass(frozen=True, slots=True)
class LimitSettings:
    storage: str = "memory"
    timeout_ms: float = 50.0
    on_storage_error: str = "open"
    replicas: int = 1
    lease_seconds: float = 60.0
    default_max_tokens: int = 4096
    unauthenticated: tuple[Rate, ...] = ()
    identity: ScopeLimits = ScopeLimits()
    tenant: ScopeLimits = ScopeLimits()
    tiers: dict[str, Tier] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)
    risk: RiskSettings = field(default_factory=RiskSettings)
    canaries: CanarySettings = field(default_factory=CanarySettings)
    watermark: WatermarkSettings = field(default_factory=WatermarkSettings)
    sampling_bias: SamplingBiasSettings = field(default_factory=SamplingBiasSettings)
    limits: LimitSettings = field(default_factory=lambda: _DEFAULT_LIMITS)
    state_dir: Path = Path(".canarygate")
    source: str = "<defaults>"

    def with_overrides(self, **overrides: object) -> Settings:
        """Apply CLI flags (host, port, workers, upstream; the demo's state_dir) on top of the file, validated
        the same way."""
        server = self.server
        for name in ("host", "port", "workers"):
            if overrides.get(name) is not None:
                server = replace(server, **{name: overrides[name]})
        upstream = self.upstream
        if overrides.get("upstream") is not None:
            upstream = replace(upstream, url=_check_upstream("command line", str(overrides["upstream"]), "--upstream"))
        if overrides.get("host") is not None and not _is_host(server.host):
            raise ConfigError(f"command line: --host must be an IP address or a host name, got {server.host!r}")
        _check_server(server, "command line")
        state_dir = Path(overrides["state_dir"]) if overrides.get("state_dir") is not None else self.state_dir
        return replace(self, server=server, upstream=upstream, state_dir=state_dir)


_DEFAULT_UPSTREAM = UpstreamSettings()


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from `path` (or ./canarygate.toml when present), else the embedded defaults."""
    if path is None:
        path = DEFAULT_CONFIG_FILE
        if not os.path.exists(path):
            return Settings()
    elif not os.path.exists(path):
        raise ConfigError(f"{path}: no such file; run `canarygate init` to create one or pass --config FILE")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    settings = parse(raw, str(path))
    # beside the file that names it, wherever the command runs: a server started from another folder must
    # find the same identities and keys
    return replace(settings, state_dir=Path(path).parent / settings.state_dir)


def parse(raw: dict, source: str) -> Settings:
    """Validate a parsed TOML document; every error names `source` and the key."""
    for name in raw:
        if name not in _TOP_LEVEL_SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {', '.join(_TOP_LEVEL_SECTIONS)}")
    reader = _SectionReader(source)
    server_raw = reader.section(raw, "server")
    server = ServerSettings(
        host=reader.take(server_raw, "server", "host", str, "127.0.0.1"),
        port=reader.take(server_raw, "server", "port", int, 8080),
        workers=reader.take(server_raw, "server", "workers", int, 1),
        max_body_bytes=reader.take(server_raw, "server", "max_body_bytes", int, 4 * 1024 * 1024),
        max_response_bytes=reader.take(server_raw, "server", "max_response_bytes", int, 32 * 1024 * 1024),
        shutdown_timeout=reader.take(server_raw, "server", "shutdown_timeout", float, 30.0),
        trusted_proxies=_networks(source, reader.take(server_raw, "server", "trusted_proxies", list, [])),
        admin_token_env=reader.take(server_raw, "server", "admin_token_env", str, "CANARYGATE_ADMIN_TOKEN"),
    )
    reader.reject_unknown(server_raw, "server")
    _check_server(server, source)

    up_raw = reader.section(raw, "upstream")
    upstream = UpstreamSettings(
        url=_check_upstream(
            source, reader.take(up_raw, "upstream", "url", str, _DEFAULT_UPSTREAM.url), "[upstream] url"
        ),
        api_key_env=reader.take(up_raw, "upstream", "api_key_env", str, _DEFAULT_UPSTREAM.api_key_env),
        connect_timeout=reader.take(up_raw, "upstream", "connect_timeout", float, 5.0),
        read_timeout=reader.take(up_raw, "upstream", "read_timeout", float, 300.0),
        max_connections=reader.take(up_raw, "upstream", "max_connections", int, 1000),
        passthrough=tuple(_prefixes(source, reader.take(up_raw, "upstream", "passthrough", list, []))),
        constrained_decoding=_constrained_fields(
            source, reader.take(up_raw, "upstream", "constrained_decoding", list, list(CONSTRAINED_FIELDS))
        ),
    )
    reader.reject_unknown(up_raw, "upstream")
    _check_variable_name(source, "[upstream] api_key_env", upstream.api_key_env)
    _check_variable_name(source, "[server] admin_token_env", server.admin_token_env)
    for key in ("connect_timeout", "read_timeout"):
        if getattr(upstream, key) <= 0:
            raise ConfigError(f"{source}: [upstream] {key} must be a positive number of seconds")
    if upstream.max_connections < 1:
        raise ConfigError(f"{source}: [upstream] max_connections must be at least 1")

    state_raw = reader.section(raw, "state")
    state_dir = reader.take(state_raw, "state", "dir", str, ".canarygate")
    reader.reject_unknown(state_raw, "state")
    if not state_dir:
        raise ConfigError(f"{source}: [state] dir must name a folder")
    state_dir = Path(state_dir).expanduser()
    settings = Settings(
        server=server,
        upstream=upstream,
        evidence=_evidence(reader, raw),
        watermark=_watermark(reader, raw),
        risk=_risk(reader, raw),
        canaries=_canaries(reader, raw),
        sampling_bias=_sampling_bias(reader, raw),
        limits=_limits(reader, raw, _DEFAULT_LIMITS),
        state_dir=state_dir,
        source=source,
    )
    unknown = sorted({tier for tier, _ in settings.canaries.density} - set(settings.limits.tiers))
    if unknown:  # a misspelt tier would quietly never carry canaries
        raise ConfigError(f"{source}: [canaries.density] names no tier {', '.join(unknown)}; the tiers are "
                          f"{', '.join(settings.limits.tiers)}")  # fmt: skip
    return settings


def _evidence(reader: _SectionReader, raw: dict) -> EvidenceSettings:
    table = reader.section(raw, "evidence")
    d = EvidenceSettings()
    settings = EvidenceSettings(
        origin=reader.take(table, "evidence", "origin", str, d.origin),
        durability=reader.take(table, "evidence", "durability", str, d.durability),
        batch_interval_ms=reader.take(table, "evidence", "batch_interval_ms", float, d.batch_interval_ms),
        checkpoint_every=reader.take(table, "evidence", "checkpoint_every", int, d.checkpoint_every),
        checkpoint_interval=reader.take(table, "evidence", "checkpoint_interval", float, d.checkpoint_interval),
        segment_bytes=reader.take(table, "evidence", "segment_bytes", int, d.segment_bytes),
        unauthenticated_records=reader.take(
            table, "evidence", "unauthenticated_records", str, d.unauthenticated_records
        ),
        client_addresses=reader.take(table, "evidence", "client_addresses", str, d.client_addresses),
        retention_days=reader.take(table, "evidence", "retention_days", int, d.retention_days),
        witnesses=_witnesses(reader.source, reader.take(table, "evidence", "witnesses", list, [])),
    )
    reader.reject_unknown(table, "evidence")
    source = reader.source
    if settings.durability not in ("batch", "fsync"):
        raise ConfigError(f'{source}: [evidence] durability must be "batch" or "fsync", got {settings.durability!r}')
    if any(c.isspace() or c == "+" for c in settings.origin):
        raise ConfigError(f"{source}: [evidence] origin must not contain spaces or '+'")
    if settings.batch_interval_ms <= 0 or settings.checkpoint_every < 1 or settings.checkpoint_interval <= 0:
        raise ConfigError(
            f"{source}: [evidence] batch_interval_ms, checkpoint_every and checkpoint_interval must be positive"
        )
    if settings.segment_bytes < 4096:
        raise ConfigError(f"{source}: [evidence] segment_bytes must be at least 4096")
    if settings.client_addresses not in ("hashed", "plain"):
        raise ConfigError(f'{source}: [evidence] client_addresses must be "hashed" or "plain"')
    if settings.retention_days < 0:
        raise ConfigError(f"{source}: [evidence] retention_days must be 0 (keep) or a number of days")
    try:
        rates(settings.unauthenticated_records)
    except ValueError as e:
        raise ConfigError(f"{source}: [evidence] unauthenticated_records: {e}") from None
    return settings


def _witnesses(source: str, items: list) -> tuple[WitnessSettings, ...]:
    from .evidence.verifier import ALG_COSIGNATURE_V1, NoteError, NoteKey  # the evidence package imports config

    witnesses = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"url", "vkey"}:
            got = f"keys {sorted(item)}" if isinstance(item, dict) else type(item).__name__  # a URL may hold a token
            raise ConfigError(f"{source}: [evidence] witnesses: each is {{url = ..., vkey = ...}}, got {got}")
        try:
            key = NoteKey.parse(str(item["vkey"]))
        except NoteError as e:
            raise ConfigError(f"{source}: [evidence] witnesses: {e}") from None
        if key.algorithm != ALG_COSIGNATURE_V1:
            raise ConfigError(f"{source}: [evidence] witnesses: {key.name} is not a cosignature (0x04) key")
        if any(NoteKey.parse(w.vkey).name == key.name for w in witnesses):  # cosignatures are told apart by name
            raise ConfigError(f"{source}: [evidence] witnesses: two witnesses are named {key.name}")
        witnesses.append(WitnessSettings(_check_url(source, str(item["url"]), "[evidence] witnesses url"), key.vkey()))
    return tuple(witnesses)


def _canaries(reader: _SectionReader, raw: dict) -> CanarySettings:
    table = reader.section(raw, "canaries")
    d = CanarySettings()
    density = table.pop("density", dict(d.density))
    settings = CanarySettings(
        enabled=reader.take(table, "canaries", "enabled", bool, d.enabled),
        count=reader.take(table, "canaries", "count", int, d.count),
        identities=tuple(str(n) for n in reader.take(table, "canaries", "identities", list, [])),
        tenants=tuple(str(n) for n in reader.take(table, "canaries", "tenants", list, [])),
        density=tuple(density.items()) if isinstance(density, dict) else (),
    )
    reader.reject_unknown(table, "canaries")
    source = reader.source
    if not isinstance(density, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in density.values()
    ):
        raise ConfigError(f"{source}: [canaries.density] maps tiers to shares between 0 and 1, e.g. watch = 0.25")
    if not 1 <= settings.count <= 64:
        raise ConfigError(f"{source}: [canaries] count must be between 1 and 64")
    return settings


def _constrained_fields(source: str, fields: list) -> tuple[str, ...]:
    unknown = [field for field in fields if field not in CONSTRAINED_FIELDS]
    if unknown:
        raise ConfigError(
            f"{source}: [upstream] constrained_decoding names {unknown!r}; known: {', '.join(CONSTRAINED_FIELDS)}"
        )
    return tuple(fields)


def _sampling_bias(reader: _SectionReader, raw: dict) -> SamplingBiasSettings:
    table = reader.section(raw, "sampling_bias")
    d = SamplingBiasSettings()
    settings = SamplingBiasSettings(
        enabled=reader.take(table, "sampling_bias", "enabled", bool, d.enabled),
        tokenizer=reader.take(table, "sampling_bias", "tokenizer", str, d.tokenizer),
        size=reader.take(table, "sampling_bias", "size", int, d.size),
        bias=reader.take(table, "sampling_bias", "bias", float, d.bias),
        skip_models=tuple(
            str(m) for m in reader.take(table, "sampling_bias", "skip_models", list, list(d.skip_models))
        ),
        client_bias=reader.take(table, "sampling_bias", "client_bias", str, d.client_bias),
    )
    reader.reject_unknown(table, "sampling_bias")
    if settings.client_bias not in ("refuse", "yield"):
        raise ConfigError(f'{reader.source}: [sampling_bias] client_bias must be "refuse" or "yield"')
    if not 1 <= settings.size <= 300:
        raise ConfigError(f"{reader.source}: [sampling_bias] size must be between 1 and 300")
    if not 0 < settings.bias <= 10:  # at or below 0 it marks nothing; far above, it forces words where they jar
        raise ConfigError(f"{reader.source}: [sampling_bias] bias must be above 0 and at most 10")
    if settings.enabled and not settings.tokenizer:
        raise ConfigError(f"{reader.source}: [sampling_bias] enabled needs tokenizer, the upstream's tokenizer file")
    return settings


def _risk(reader: _SectionReader, raw: dict) -> RiskSettings:
    table = reader.section(raw, "risk")
    settings = RiskSettings(mode=reader.take(table, "risk", "mode", str, RiskSettings().mode))
    reader.reject_unknown(table, "risk")
    if settings.mode not in ("enforce", "shadow", "off"):
        raise ConfigError(f'{reader.source}: [risk] mode must be "enforce", "shadow" or "off"')
    return settings


def _watermark(reader: _SectionReader, raw: dict) -> WatermarkSettings:
    table = reader.section(raw, "watermark")
    settings = WatermarkSettings(
        enabled=reader.take(table, "watermark", "enabled", bool, True),
        logprobs=reader.take(table, "watermark", "logprobs", str, "strip"),
    )
    reader.reject_unknown(table, "watermark")
    if settings.logprobs not in ("strip", "refuse"):
        raise ConfigError(f'{reader.source}: [watermark] logprobs must be "strip" or "refuse"')
    return settings


def rates(text: str) -> tuple[Rate, ...]:
    """Parse "600/minute; 20000/day" with the `limits` library's grammar; ValueError names what is wrong."""
    if not text.strip():
        return ()
    try:
        items = limits.parse_many(text)
    except ValueError:
        raise ValueError(f'{text!r} is not a list of rates such as "600/minute; 20000/day"') from None
    if any(item.amount < 1 for item in items):  # a rate of nothing: to refuse everyone, a tier has scale = 0
        raise ValueError(f"{text!r}: a rate allows at least 1 per period (a tier with scale = 0 refuses all)")
    return tuple(Rate(item.amount, int(item.get_expiry() * 1000), str(item)) for item in items)


def _limits(reader: _SectionReader, raw: dict, defaults: LimitSettings | None) -> LimitSettings:
    table = reader.section(raw, "limits")
    d = defaults or LimitSettings()
    source = reader.source

    def take_rates(tbl: dict, section: str, key: str, default: tuple[Rate, ...]) -> tuple[Rate, ...]:
        text = reader.take(tbl, section, key, str, None)
        if text is None:
            return default
        try:
            return rates(text)
        except ValueError as e:
            raise ConfigError(f"{source}: [{section}] {key}: {e}") from None

    def scope(name: str, default: ScopeLimits) -> ScopeLimits:
        section = f"limits.{name}"
        tbl = reader.section(table, name)
        table.pop(name, None)
        limits_ = ScopeLimits(
            requests=take_rates(tbl, section, "requests", default.requests),
            tokens=take_rates(tbl, section, "tokens", default.tokens),
            concurrency=reader.take(tbl, section, "concurrency", int, default.concurrency),
        )
        reader.reject_unknown(tbl, section)
        if limits_.concurrency < 0:
            raise ConfigError(f"{source}: [{section}] concurrency must not be negative")
        return limits_

    settings = LimitSettings(
        storage=reader.take(table, "limits", "storage", str, d.storage),
        timeout_ms=reader.take(table, "limits", "timeout_ms", float, d.timeout_ms),
        on_storage_error=reader.take(table, "limits", "on_storage_error", str, d.on_storage_error),
        replicas=reader.take(table, "limits", "replicas", int, d.replicas),
        lease_seconds=reader.take(table, "limits", "lease_seconds", float, d.lease_seconds),
        default_max_tokens=reader.take(table, "limits", "default_max_tokens", int, d.default_max_tokens),
        unauthenticated=take_rates(table, "limits", "unauthenticated", d.unauthenticated),
        identity=scope("identity", d.identity),
        tenant=scope("tenant", d.tenant),
        tiers=_tiers(reader, table, d.tiers),
    )
    reader.reject_unknown(table, "limits")
    if settings.storage != "memory" and not _is_redis_url(settings.storage):
        raise ConfigError(f'{source}: [limits] storage must be "memory" or a Redis URL '
                          f"({', '.join(s + '://' for s in _REDIS_SCHEMES)})")  # fmt: skip
    if settings.on_storage_error not in ("open", "closed"):
        raise ConfigError(f'{source}: [limits] on_storage_error must be "open" or "closed"')
    if settings.timeout_ms <= 0 or settings.lease_seconds <= 0:
        raise ConfigError(f"{source}: [limits] timeout_ms and lease_seconds must be positive")
    if settings.replicas < 1 or settings.default_max_tokens < 1:
        raise ConfigError(f"{source}: [limits] replicas and default_max_tokens must be at least 1")
    return settings


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def _is_redis_url(url: str) -> bool:
    """A Redis URL redis_client.connect reads, every port in it a number from 1 to 65535, and a plain one's
    database a number (redis-py reads "/13x" as database 0)."""
    parts = _split(url)
    if parts is None or parts.scheme not in _REDIS_SCHEMES:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?|/\d+", parts.path):
        return False
    for host in parts.netloc.rpartition("@")[2].split(","):  # cluster and sentinel URLs list several
        _, colon, port = host.rpartition(":")
        if colon and "]" not in port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            return False
    return True


def _tiers(reader: _SectionReader, table: dict, defaults: dict[str, Tier]) -> dict[str, Tier]:
    raw_tiers = reader.section(table, "tiers")
    table.pop("tiers", None)
    tiers = dict(defaults)
    for name in list(raw_tiers):
        section = f"limits.tiers.{name}"
        tbl = reader.section(raw_tiers, name)
        base = tiers.get(name, Tier(name))
        tier = Tier(
            name=name,
            scale=reader.take(tbl, section, "scale", float, base.scale),
            tarpit_ms=reader.take(tbl, section, "tarpit_ms", float, base.tarpit_ms),
            max_tokens=reader.take(tbl, section, "max_tokens", int, base.max_tokens),
            enforce=reader.take(tbl, section, "enforce", bool, base.enforce),
            headers=reader.take(tbl, section, "headers", bool, base.headers),
        )
        reader.reject_unknown(tbl, section)
        if not name or any(c.isspace() or c == ";" for c in name):
            raise ConfigError(f"{reader.source}: [limits.tiers] tier names must not contain spaces or ';'")
        if tier.scale < 0 or tier.tarpit_ms < 0 or tier.max_tokens < 0:
            raise ConfigError(f"{reader.source}: [{section}] scale, tarpit_ms and max_tokens must not be negative")
        tiers[name] = tier
    missing = [name for name in REQUIRED_TIERS if name not in tiers]
    if missing:
        raise ConfigError(f"{reader.source}: [limits.tiers] must define {', '.join(missing)}")
    return tiers


class _SectionReader:
    def __init__(self, source: str) -> None:
        self.source = source

    def section(self, raw: dict, name: str) -> dict:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: [{name}] must be a table")
        return dict(value)

    def take(self, table: dict, section: str, key: str, kind: type, default):
        if key not in table:
            return default
        value = table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(
                f"{self.source}: [{section}] {key} must be {'an' if kind.__name__[0] in 'aeiou' else 'a'} "
                f"{kind.__name__}, got {type(value).__name__} {value!r}"
            )
        if kind is float and not math.isfinite(value):  # TOML allows nan and inf; no setting means them
            raise ConfigError(f"{self.source}: [{section}] {key} must be a finite number, got {value!r}")
        return value

    def reject_unknown(self, table: dict, section: str) -> None:
        if table:
            names = ", ".join(sorted(table))
            raise ConfigError(f"{self.source}: [{section}] unknown key(s): {names}; see `canarygate init` for all keys")


MAX_WORKERS = 1024  # a sanity bound wherever the file is read; `serve` holds the count to this machine's CPUs


def max_workers() -> int:
    """Four processes per CPU, which `serve` allows: more only contend for the same cores, and each holds its
    own memory (a typo of a few zeros started hundreds and stalled the machine)."""
    return 4 * (os.cpu_count() or 1)


def _check_server(server: ServerSettings, source: str) -> None:
    if not 0 < server.port < 65536:
        raise ConfigError(f"{source}: [server] port must be between 1 and 65535, got {server.port}")
    if not 1 <= server.workers <= MAX_WORKERS:
        raise ConfigError(f"{source}: [server] workers must be from 1 to {MAX_WORKERS}, got {server.workers}")
    if server.max_body_bytes < 1024 or server.max_response_bytes < 1024:
        raise ConfigError(f"{source}: [server] max_body_bytes and max_response_bytes must be at least 1024")
    if server.shutdown_timeout < 0:
        raise ConfigError(f"{source}: [server] shutdown_timeout must not be negative")
    if not _is_host(server.host):
        raise ConfigError(f"{source}: [server] host must be an IP address or a host name, got {server.host!r}")


def _is_host(host: str) -> bool:
    """An address to listen on: an IP address, or a host name (letters, digits, hyphens, underscores, dots)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and _HOST_NAME.fullmatch(host) is not None


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # "_": a Compose service's name resolves
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _check_variable_name(source: str, where: str, name: str) -> None:
    """An environment variable's name; never echoed, as it may be the secret itself pasted by mistake."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(f"{source}: {where} must name an environment variable (letters, digits, _), not hold a key")


def _split(url: str):
    """urlsplit's parts, or None for what it cannot read ("http://[::1": an unclosed address)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _check_url(source: str, url: str, where: str) -> str:
    if url == "demo":
        return url
    parts = _split(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not _has_valid_port(parts):
        raise ConfigError(f'{source}: {where} must be an http(s) URL such as https://api.openai.com, or "demo"')
    if parts.query or parts.fragment:
        raise ConfigError(f"{source}: {where} must not carry a query or fragment")
    return url.rstrip("/")


def _check_upstream(source: str, url: str, where: str) -> str:
    """An upstream's URL is its origin (and any prefix before the API's own paths): the gateway forwards the
    client's path, /v1/chat/completions, as it is. An SDK's base URL ends in /v1, and would send /v1/v1/..."""
    url = _check_url(source, url, where)
    if url.endswith("/v1"):
        raise ConfigError(
            f"{source}: {where} ends in /v1, which the client's paths already begin with; give it without: {url[:-3]}"
        )
    return url


def _has_valid_port(parts) -> bool:
    try:
        return parts.port != 0
    except ValueError:  # not a number, or out of range
        return False


def _networks(source: str, values: list) -> tuple:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            raise ConfigError(f"{source}: [server] trusted_proxies: {value!r} is not an address or CIDR") from None
    return tuple(networks)


def _prefixes(source: str, values: list) -> list[str]:
    for value in values:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(
                f"{source}: [upstream] passthrough entries must be paths starting with '/', got {value!r}"
            )
    return values


_DEFAULT_LIMITS = _limits(_SectionReader("<defaults>"), tomllib.loads(DEFAULT_TOML), None)
