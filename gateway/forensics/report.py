"""`canarygate report`: every test on a probe's transcript, with the evidence behind it, as JSON.

The watermark is tested as `canarygate detect` tests it (exact Poisson-binomial tail, Holm over key
epochs), and again under many random wrong keys: if the test is sound, their p-values are uniform
whatever the suspect is, so a suspect that "matches" every key shows a flaw, not a finding. Canaries
are attributed as `canaries attribute` does, and where the probe scored exposure, each identity's
canaries are tested by their ranks. For every canary found, the log entries that served it are proved
included under a signed checkpoint, so a reader holding only the log's public key can check that entries
naming those canary ids were served to that identity, and when. That a canary id is the phrase found in
the suspect's answers takes the canary key to show (an arbiter can be given it); the proofs do not open the
answers. Identities found at chance are counted, never named: the report goes to third parties. The claims
are worded from the numbers (see `claims`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

from .. import canary, watermark
from ..canary.detect import Attribution
from ..canary.phrases import SPACE
from ..evidence.keys import Keys
from ..evidence.reader import LogReader, VerifyError, commitments
from ..stats import binomial_sf, holm, hypergeometric_sf
from ..watermark.scoring import fixed_scheme_p, poisson_binomial_pmf, vote_counts, votes
from .claims import SUGGESTIVE, claims
from .evidence import canary_owners, prior_commitments
from .exposure import ALPHA as EXPOSURE_ALPHA
from .probe import SETTINGS, TRANSCRIPT, read_rows, read_settings
from .reading import reading_test


def build(probe: Path, keys: Keys, readers: list[LogReader], names: list[str], count: int, wrong: int = 200,
          proofs_per_canary: int = 3) -> dict:  # fmt: skip
    rows = read_rows(probe / TRANSCRIPT)
    if not rows:
        raise VerifyError(f"{probe}: no transcript; run canarygate probe --out {probe} first")
    items = [(str(r["text"]), str(r.get("prompt") or "")) for r in rows]
    suspect = read_settings(probe / SETTINGS) if (probe / SETTINGS).exists() else {}
    doc = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "suspect": {**suspect, "texts": len(items), "words": sum(len(t.split()) for t, _ in items)},
        "watermark": _watermark(items, keys, readers, wrong, hashlib.sha256((probe / TRANSCRIPT).read_bytes())),
        "canaries": _canaries(items, keys, readers, names, count, proofs_per_canary, suspect.get("started")),
        "exposure": _exposure(read_rows(probe / "exposure.jsonl"), readers, suspect.get("started")),
        "reading": _reading(read_rows(probe / "reading.jsonl"), keys, wrong),
        "public_keys": sorted({v.vkey() for r in readers for v in r.verifiers(None)}),
    }
    doc["claims"] = claims(doc)
    return doc


def _watermark(items, keys: Keys, readers: list[LogReader], wrong: int, seed) -> dict:
    sets = watermark.default_sets()
    epochs = watermark.epoch_keys(keys)
    findings = watermark.detect(items, epochs, sets)
    best = min(findings, key=lambda finding: finding.p_value)
    counts = vote_counts(items, sets)
    cast = votes(counts)
    rng = random.Random(seed.digest())
    wrong_p = [fixed_scheme_p(counts, watermark.LexicalKey(rng.randbytes(32), sets))[0] for _ in range(wrong)]
    return {
        "test": "fixed keyed preference: one vote per word set (its most used member); hits are the votes for "
        "the key's member; exact Poisson-binomial tail; Holm-adjusted over key epochs",
        "assumptions": [
            "Under the null hypothesis the suspect's text was written without this key: each set's preferred member "
            "is then uniform over the set and independent of the text, because the key was drawn at random.",
            "The key was fixed before the suspect's text existed (the commitment below shows when).",
            "Each set votes once, so a habit that recurs in many answers counts once.",
        ],
        "epochs": [f.as_json() for f in findings],
        "best": best.as_json(),
        "null": {"pmf": [float(x) for x in poisson_binomial_pmf([1 / len(sets.sets[s].members) for s, _ in cast])]},
        "by_amount": _by_amount(items, epochs, sets),
        "wrong_keys": {"count": wrong, "p_values": wrong_p, "share_at": _shares(wrong_p)},
        "commitments": _with_proofs(prior_commitments(_commitments(readers), epochs, sets.version), readers),
    }


def _reading(rows: list[dict], keys: Keys, wrong: int) -> dict | None:
    """The reading-mode test (gateway/forensics/reading.py) per key epoch, Holm-adjusted, and under wrong keys."""
    if not rows:
        return None
    sets = watermark.default_sets()
    epochs = watermark.epoch_keys(keys)
    raw = [reading_test(rows, key) for key in epochs]
    adjusted = holm([r[0] for r in raw])
    rng = random.Random(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).digest())
    wrong_p = [reading_test(rows, watermark.LexicalKey(rng.randbytes(32), sets))[0] for _ in range(wrong)]
    results = [{"epoch": key.epoch, "key": key.fingerprint, "p_value": adj, "raw_p_value": p, "n": n, "hits": hits}
               for key, adj, (p, n, hits) in zip(epochs, adjusted, raw, strict=True)]  # fmt: skip
    return {
        "test": "reading mode: per word set, the member the suspect scores highest over a few passages votes; "
        "exact Poisson-binomial tail; Holm-adjusted over key epochs",
        "passages": len(rows),
        "epochs": results,
        "best": min(results, key=lambda r: r["p_value"]),
        "wrong_keys": {"count": wrong, "p_values": wrong_p, "share_at": _shares(wrong_p)},
    }


def _shares(p_values: list[float]) -> dict[str, float]:
    return {str(a): sum(p <= a for p in p_values) / max(1, len(p_values)) for a in (0.05, 0.01)}


def _by_amount(items, epochs, sets) -> list[dict]:
    """The p-value the report would give on the first k answers, for k growing to all of them: how much text
    the finding needs. Each point is the whole test on those answers (every epoch, Holm-adjusted, the best),
    so that the curve never crosses a line the finding itself does not (the best key's raw p-value did)."""
    out, total = [], len(items)
    for k in sorted({max(1, round(total * share)) for share in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)}):
        best = min(watermark.detect(items[:k], epochs, sets), key=lambda finding: finding.p_value)
        out.append({"texts": k, "words": sum(len(t.split()) for t, _ in items[:k]), "p_value": best.p_value,
                    "votes": best.n})  # fmt: skip
    return out


def _with_proofs(commitments: dict[str, dict | None], readers: list[LogReader]) -> dict[str, dict | None]:
    """Each commitment found with its entry's inclusion proof: a claim that rests on when a key was committed to
    cites that entry, which a reader of the report alone must be able to check."""
    logs = {reader.origin(): reader for reader in readers}
    return {name: None if c is None else {**c, "proof": _proof(logs[c["log"]], c["index"]) if c["log"] in logs
                                          else None} for name, c in commitments.items()}  # fmt: skip


def _commitments(readers: list[LogReader]) -> list[dict]:
    try:
        return commitments(readers)
    except VerifyError:
        return []


def _canaries(items, keys: Keys, readers, names, count: int, proofs_per_canary: int, started: str | None) -> dict:
    key = canary.canary_key(keys.watermark)
    owners = canary_owners(key, names, sorted(keys.masters), count)
    results, found = canary.attribute([t for t, _ in items], owners, [p for _, p in items])
    wanted = {c: r.identity for r in results for c in r.canaries if r.p_value < SUGGESTIVE}
    served = _served_entries(readers, set(wanted), proofs_per_canary)
    return {
        "test": "exact binomial tail of the identity's canaries among the distinct canary-space phrases found; "
        "Holm-adjusted over every identity and key epoch tested",
        "assumptions": [
            "Under the null hypothesis the suspect's text owes nothing to the identity's answers: each phrase it "
            "writes is then unrelated to the identity's canaries, which the canary key chose uniformly at random.",
        ],
        "identities_tested": len(owners),
        "phrases_found": found,
        "attributions": [
            _proved(r, [e for c in r.canaries for e in served.get(c, [])], started, owners, found)
            for r in results
            if r.p_value < SUGGESTIVE
        ],
        # identities whose canaries the answers hold no more than chance explains: counted, not named (the report
        # goes to third parties, and these accounts are not implicated)
        "chance_matches": sum(1 for r in results if r.p_value >= SUGGESTIVE and r.canaries),
    }


def _proved(found: Attribution, served: list[dict], started: str | None, owners: dict, phrases: int) -> dict:
    """The attribution, with the log entries that served its canaries, and the test again on those alone that
    the log shows served before the probe began. Only these tie the identity's answers to the suspect: a
    canary never served to it points to a leak of the canary key, and one served once the probe had begun
    could not have been learned from it. The test on them is exact and conservative (fewer hits, tested as
    among all of its canaries), Bonferroni-adjusted over the identity-epochs tested (`owners`)."""
    shown = sorted({entry["canary"] for entry in served if _before(entry.get("time"), started)})
    mine = len(owners[found.identity, found.epoch])
    raw = hypergeometric_sf(len(shown), SPACE, mine, phrases) if shown else 1.0
    return {**found.as_json(), "served": served, "served_before_probe": shown,
            "served_p_value": min(1.0, raw * len(owners))}  # fmt: skip


def _before(time: str | None, started: str | None) -> bool:
    """Logged before the probe began, to the second (the probe's start has no fraction): the same second is late."""
    return time is not None and started is not None and time[:19] < started[:19]


def _threshold(rows: list[dict]) -> float:
    """The largest p-value a rank can have and be in the top EXPOSURE_ALPHA among the fewest candidates scored."""
    candidates = min(r["candidates"] for r in rows)
    return math.floor(EXPOSURE_ALPHA * (candidates + 1)) / (candidates + 1)


def _shown(named: dict, rows: list[dict], readers: list[LogReader], started: str | None, tested: int) -> None:
    """Add to a named identity's exposure what the log shows of it: each scored canary's entry with its inclusion
    proof, and the test on those that name the identity and the canary and were logged before the probe began
    (Bonferroni over the identities tested): only these tie its answers to the suspect."""
    logs, q = {reader.origin(): reader for reader in readers}, _threshold(rows)
    entries, shown = [], []
    for row in rows:
        entry = _entry(logs.get(row["log"]), row["entry"])
        if entry is None:
            continue
        entries.append(entry)
        canaries = {c.get("id") for c in entry["public"].get("canaries") or ()}
        if (
            entry["public"].get("identity") == named["identity"]
            and row["canary"] in canaries
            and _before(entry["public"].get("time"), started)
        ):
            shown.append(row)
    exposed = sum(r["p_value"] <= q for r in shown)
    raw = binomial_sf(exposed, len(shown), q) if shown and q > 0 else 1.0
    named.update(served=[{k: e[k] for k in ("log", "entry", "time", "proof")} for e in entries],
                 shown=len(shown), shown_exposed=exposed, served_p_value=min(1.0, raw * tested))  # fmt: skip


def _entry(reader: LogReader | None, index: int) -> dict | None:
    """An entry's public part, where it was logged and its inclusion proof (None before a checkpoint covers it)."""
    if reader is None:
        return None
    try:
        public = reader.get(index).public
    except VerifyError:
        return None
    return {"public": public, "log": reader.origin(), "entry": index, "time": public.get("time"),
            "proof": _proof(reader, index)}  # fmt: skip


def _proof(reader: LogReader, index: int) -> dict | None:
    """The entry's inclusion proof under the latest checkpoint; None before a checkpoint covers it."""
    try:
        return reader.prove(index)
    except VerifyError:
        return None


def _served_entries(readers: list[LogReader], ids: set[str], most: int) -> dict[str, list[dict]]:
    """For each canary id, the `most` earliest log entries that served it, across every log, each with its
    inclusion proof. The earliest: the first log's later servings had filled the quota, and a serving before
    the probe began, in another worker's log, went unseen."""
    found: dict[str, list[tuple[str, LogReader, int, dict]]] = {}
    for reader in readers if ids else ():
        for item in reader.entries(strict=False):
            public = item.public
            for record in public.get("canaries") or ():
                if record.get("id") in ids:
                    found.setdefault(record["id"], []).append((public.get("time") or "", reader, item.index, public))
    out: dict[str, list[dict]] = {}
    for canary_id, servings in found.items():
        for _, reader, index, public in sorted(servings, key=lambda s: s[0])[:most]:
            out.setdefault(canary_id, []).append({"log": reader.origin(), "entry": index, "time": public.get("time"),
                                                  "identity": public.get("identity"), "canary": canary_id,
                                                  "proof": _proof(reader, index)})  # fmt: skip
    return out


def _exposure(rows: list[dict], readers: list[LogReader], started: str | None) -> dict:
    """Per identity, how many of its scored canaries rank in the top EXPOSURE_ALPHA of their candidates, and the
    exact binomial tail of that count (ranks of distinct canaries are independent under the null, each
    drawn against its own candidates); Holm over identities. For an identity named, the test again on the
    canaries the log shows served to it before the probe began, each with its inclusion proof (`_shown`)."""
    by_identity: dict[str, list[dict]] = {}
    for row in rows:
        by_identity.setdefault(row["identity"], []).append(row)
    tested = []
    for identity, mine in sorted(by_identity.items()):
        q = _threshold(mine)
        exposed = sum(r["p_value"] <= q for r in mine)
        tested.append({"identity": identity, "scored": len(mine), "exposed": exposed, "raw_p_value":
                       binomial_sf(exposed, len(mine), q) if q > 0 else 1.0,
                       "median_exposure": sorted(r["exposure"] for r in mine)[len(mine) // 2]})  # fmt: skip
    for row, adjusted in zip(tested, holm([t["raw_p_value"] for t in tested]), strict=True):
        row["p_value"] = adjusted
    named = [t for t in tested if t["p_value"] < SUGGESTIVE]  # the others are not implicated: counted, not named
    for row in named:
        _shown(row, by_identity[row["identity"]], readers, started, len(tested))
    return {
        "test": f"rank of each canary among its candidates (p = rank / (N + 1), exact); per identity, the count "
        f"ranked in the top {EXPOSURE_ALPHA:g}, exact binomial tail, Holm over identities",
        "alpha": EXPOSURE_ALPHA,
        "identities_tested": len(tested),
        "rows": [row for row in rows if row["identity"] in {t["identity"] for t in named}],
        "identities": named,
    }
