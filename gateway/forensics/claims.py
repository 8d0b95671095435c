"""The report's words: each claim as strong as its statistics, and what else would explain the same numbers.

A watermark finding says the suspect learned from text marked with this gateway's key; it cannot say
how that text reached it. Three other explanations fit a watermark finding just as well: the answers
were published (by a customer, on the web) and a third party trained on them; the suspect was trained
on another model that had been trained on ours (distillation at second hand); or someone who studied
many marked answers wrote the key's preferences into the suspect's data to frame it (a forgery from
public samples; the word sets are public, the preferences can be estimated). Canaries are what tell
these apart: each is drawn with a secret key for one account and served only to it (another account may
draw the same phrase by chance; the test allows for that), so a suspect that
writes (or rates highly) an account's canaries learned from that account's answers, whoever passed
them on; and no one can forge a canary without the key or those answers.
"""

from __future__ import annotations

STRONG = 1e-6  # below this (adjusted) p-value a finding is worded as conclusive
SUGGESTIVE = 0.01  # below this, as suggestive; at or above, as nothing (and no identity is named)

ALTERNATIVES = {
    "published": "The answers were published (by the account holder or anyone they shared them with) and a third "
    "party trained on them. The watermark cannot tell this from direct extraction; canaries name the accounts "
    "whose answers reached the training data, which narrows who could have published them.",
    "second hand": "The suspect was trained on the outputs of another model that was itself trained on our "
    "answers. The marks fade at each step but can survive; only canaries point at the accounts the data "
    "first came from, and not at the suspect's own operator.",
    "forgery": "Someone who collected many marked answers estimated the key's preferences (the word sets are "
    "public) and wrote them into the suspect's training data. The watermark test cannot exclude this. A canary "
    "cannot be forged this way: it is drawn with a secret key per account, so finding one requires having "
    "that account's answers.",
}


def claims(doc: dict) -> list[dict]:
    """Statements for the report, each with the evidence it rests on and the alternatives that remain."""
    probed = doc.get("suspect", {}).get("started")
    commitments = doc["watermark"]["commitments"]
    found = [_watermark(doc["watermark"], commitments, probed), *_canaries(doc["canaries"]),
             *_exposure(doc["exposure"])]  # fmt: skip
    return found + ([_reading(doc["reading"], commitments, probed)] if doc.get("reading") else [])


def _key_fixed(commitments: dict, epoch: int, probed: str | None) -> tuple[bool, str]:
    """(whether the evidence log shows the epoch's key fixed before the probe began, the sentence saying so or
    why not). Either mode's p-value holds only for such a key: one chosen after seeing the suspect's text could
    be any that fits it. `probed`: when the probe began (UTC, ISO 8601 as the probe writes it)."""
    committed = commitments.get(f"watermark-key@{epoch}")
    if committed is None:
        return False, (" No prior commitment to this key is in the evidence log, so nothing here shows the key was "
                       "fixed before the suspect's text existed.")  # fmt: skip
    when = f" The key was committed to in the evidence log at {committed['time']} ({committed['log']} entry " \
           f"{committed['index']})."  # fmt: skip
    if probed is None:
        return False, when + " When the probe began is not on record, so nothing shows the commitment came first."
    # to the second (the probe's start has no fraction): a commitment in the same second counts as late
    if committed["time"][:19] >= probed[:19]:
        return False, when + (f" That is after the probe began ({probed}): the commitment does not show that the "
                              "key was fixed before the suspect's text existed.")  # fmt: skip
    return True, when


def _watermark(mark: dict, commitments: dict, probed: str | None) -> dict:
    best = mark["best"]
    p, hits, n = best["p_value"], best["hits"], best["n"]
    fixed, when = _key_fixed(commitments, best["epoch"], probed)
    if p < STRONG:
        text = (f"The suspect's answers follow this gateway's watermark key in {hits} of {n} word sets (p = {p:.3g}, "
                "exact). Text written without the key does this with probability at most p"
                + (": the suspect learned from text marked by this gateway." if fixed
                   else ", if the key was fixed before the text was written."))  # fmt: skip
        level = "strong" if fixed else "suggestive"
    elif p < SUGGESTIVE:
        text = (f"The suspect's answers lean towards this gateway's watermark key ({hits} of {n} word sets, "
                f"p = {p:.3g}): suggestive, not conclusive; a longer probe would settle it.")  # fmt: skip
        level = "suggestive"
    else:
        text = (f"The watermark test finds nothing (p = {p:.3g} from {n} word sets). This does not show the suspect "
                "never saw our answers: a small share of them in its training data leaves a trace too faint for "
                "this much probe text.")  # fmt: skip
        level = "none"
    return {"about": "watermark", "level": level, "text": text + when,
            "alternatives": ["published", "second hand", "forgery"] if level != "none" else []}  # fmt: skip


def _reading(reading: dict, commitments: dict, probed: str | None) -> dict:
    best = reading["best"]
    p, hits, n = best["p_value"], best["hits"], best["n"]
    fixed, when = _key_fixed(commitments, best["epoch"], probed)
    level = "none" if p >= SUGGESTIVE else "strong" if p < STRONG and fixed else "suggestive"
    text = (f"Read from its own log-probabilities at {reading['passages']} passages, the suspect prefers this "
            f"gateway's watermark member in {hits} of {n} word sets (p = {p:.3g}, exact).")  # fmt: skip
    if level == "strong":
        text += " It learned the key's preferences, which only text marked by this gateway teaches."
    return {"about": "reading mode", "level": level, "text": text + (when if level != "none" else ""),
            "alternatives": ["published", "second hand", "forgery"] if level != "none" else []}  # fmt: skip


def _canaries(found: dict) -> list[dict]:
    out = []
    for a in found["attributions"]:
        text = (f"{len(a['canaries'])} canaries of identity {a['identity']} (key epoch {a['epoch']}) appear in the "
                f"suspect's answers, among {found['phrases_found']} canary-space phrases found "
                f"(p = {a['p_value']:.3g}, Holm-adjusted over {found['identities_tested']} identity-epochs). "
                )  # fmt: skip
        level, more, alternatives = _served_canaries(a)
        out.append({"about": "canaries", "identity": a["identity"], "level": level, "text": text + more,
                    "alternatives": alternatives})  # fmt: skip
    if not found["attributions"]:
        chance = found["chance_matches"]
        also = (f" {chance} identities have a canary-space phrase in common with the answers, no more than chance "
                "explains (adjusted p >= 0.01); they are not named." if chance else "")  # fmt: skip
        out.append({"about": "canaries", "level": "none", "alternatives": [],
                    "text": f"No identity's canaries appear in the suspect's answers beyond chance "
                            f"({found['identities_tested']} identity-epochs tested).{also}"})  # fmt: skip
    return out


def _served_canaries(a: dict) -> tuple[str, str, list[str]]:
    """(level, the sentences, the alternatives) of an attribution, from what the log shows: only canaries served
    to the identity before the probe began tie its answers to the suspect, and the claim is graded on those
    alone. One never served points to the canary key leaking; one served later, to nothing."""
    shown, served, p = a["served_before_probe"], a["served"], a["served_p_value"]
    unserved = len(a["canaries"]) - len({entry["canary"] for entry in served})
    leaked = (f" {unserved} of them were never served to it, which points to the canary key or the log's contents "
              "leaking, not to this account." if unserved else "")  # fmt: skip
    if shown:
        level = "strong" if p < STRONG else "suggestive"
        text = (f"The log shows {len(shown)} of them served to this identity before the probe began (p = {p:.3g} on "
                f"those alone, Bonferroni-adjusted); {_served(served)}.{leaked}")  # fmt: skip
        return level, text, ["published", "second hand"] + (["canary key leaked"] if unserved else [])
    if served:
        return "suggestive", (f"The log shows them served to this identity only once the probe had begun, or when "
                              f"it began is not on record; {_served(served)}. That does not show that this "
                              f"account's answers reached the suspect.{leaked}"), ["canary key leaked"]  # fmt: skip
    # the suspect knows phrases this account was never given: the canary key, not the account, leaked
    return "suggestive", ("The log has no record of serving them: they were drawn for this identity but never sent "
                          "to it, which points to the canary key or the log's contents leaking, not to this account."
                          ), ["canary key leaked"]  # fmt: skip


def _served(entries: list[dict]) -> str:
    proved = sum(1 for entry in entries if entry.get("proof"))
    if proved == len(entries):
        return f"{len(entries)} log entries below show when, each with an inclusion proof"
    return (f"{len(entries)} log entries below show when, {proved} of them with an inclusion proof (the others are "
            "not yet under a signed checkpoint)")  # fmt: skip


def _exposure(exposure: dict) -> list[dict]:
    """Graded, like canaries, on the canaries the log shows served to the identity before the probe began."""
    out = []
    for row in exposure["identities"]:
        if row["p_value"] >= SUGGESTIVE:
            continue
        p = row["served_p_value"]
        text = (f"The suspect rates {row['exposed']} of {row['scored']} canaries of identity {row['identity']} above "
                f"nearly all phrases of the same kind (p = {row['p_value']:.3g}; median exposure "
                f"{row['median_exposure']:.1f} bits). Of the {row['shown']} the log shows served to this identity "
                f"before the probe began, {row['shown_exposed']} are so rated (p = {p:.3g} on those alone, "
                f"Bonferroni-adjusted)")  # fmt: skip
        if p < SUGGESTIVE:
            text += f": its training data held answers served to this identity; {_served(row['served'])}."
        else:
            text += ": that does not show that this identity's answers reached the suspect."
        alternatives = ["published", "second hand"] if p < SUGGESTIVE else ["canary key leaked"]
        out.append({"about": "exposure", "identity": row["identity"], "text": text,
                    "level": "strong" if p < STRONG else "suggestive", "alternatives": alternatives})  # fmt: skip
    return out
