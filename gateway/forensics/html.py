"""The report as one self-contained HTML page: inline CSS and SVG plots, nothing fetched from anywhere."""

from __future__ import annotations

import html
import io
import json

from .claims import ALTERNATIVES, STRONG

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}
.strong{border-left:6px solid #b00020}.suggestive{border-left:6px solid #e0a000}.none,.weak{border-left:6px solid #999}
.claim{padding:.5em 1em;margin:1em 0;background:#fafafa}pre{white-space:pre-wrap;word-break:break-all;font-size:12px;
background:#f6f6f6;padding:.5em}.plots{display:flex;flex-wrap:wrap;gap:1em}.plots svg{max-width:520px;height:auto}
"""


def render(doc: dict) -> str:
    e = html.escape
    suspect = doc["suspect"]
    parts = [
        f"<!doctype html><html lang=en><meta charset=utf-8><title>canarygate report: {e(str(suspect.get('model')))}"
        f"</title><style>{STYLE}</style><body>",
        f"<h1>Was {e(str(suspect.get('model')))} trained on our answers?</h1>",
        f"<p>Suspect endpoint {e(str(suspect.get('base_url')))}, probed from {e(str(suspect.get('started')))}: "
        f"{suspect['texts']} answers, {suspect['words']:,} words. Report generated {e(doc['generated'])}.</p>",
        "<h2>Findings</h2>",
        *[_claim(c) for c in doc["claims"]],
        _alternatives(doc["claims"]),
        _watermark(doc["watermark"]),
        _canaries(doc["canaries"]),
        _exposure(doc["exposure"]),
        _reading(doc.get("reading")),
        "<h2>Checking this report</h2><p>Every inclusion proof above is also in <code>proofs.json</code>. With the "
        "log's public key alone, <code>python verify.py --proofs proofs.json --log-key KEY</code> checks each one "
        "against its signed checkpoint and prints what each proved entry says (identity, time, canaries); "
        "<code>verify.py</code> needs Python and the <code>cryptography</code> package, nothing from canarygate. "
        "Take the key from a source independent of this report (the operator's published key, or the witnesses "
        "that cosign the log's checkpoints); the key printed below only says which key the report used.</p>",
        "<pre>" + e("\n".join(doc["public_keys"])) + "</pre></body></html>",
    ]
    return "\n".join(parts)


def _ul(texts: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in texts) + "</ul>"


def _table(head: list[str], rows: list[list]) -> str:
    """A table of escaped cells."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _claim(claim: dict) -> str:
    text = f"<b>{claim['about'].title()}:</b> {html.escape(claim['text'])}"
    return f"<div class='claim {claim['level']}'><p>{text}</p></div>"


def _alternatives(claims: list[dict]) -> str:
    """What else would explain the findings, once for all of them, and which finding each bears on."""
    named = sorted({a for c in claims for a in c["alternatives"]}, key=list(ALTERNATIVES).index)
    if not named:
        return ""
    items = []
    for name in named:
        about = sorted({c["about"] for c in claims if name in c["alternatives"]})
        items.append(f"{ALTERNATIVES[name]} (Bears on: {', '.join(about)}.)")
    return "<h2>What else would explain these findings</h2>" + _ul(items)


def _watermark(mark: dict) -> str:
    e = html.escape
    epochs = [[f["epoch"], f["key"], f"{f['p_value']:.3g}", f"{f['raw_p_value']:.3g}", f"{f['hits']} / {f['n']}",
               f["sites"]] for f in mark["epochs"]]  # fmt: skip
    head = ["key epoch", "key fingerprint", "p (Holm)", "p (raw)", "hits / votes", "sites"]
    commitments = [[name, _when(found)] for name, found in mark["commitments"].items()]
    shares = ", ".join(f"{share:.3f} at {alpha}" for alpha, share in mark["wrong_keys"]["share_at"].items())
    return (
        f"<h2>Watermark</h2><p>Test: {e(mark['test'])}.</p>{_ul(mark['assumptions'])}{_table(head, epochs)}"
        f"{_table(['committed to', 'where'], commitments)}<p>Under {mark['wrong_keys']['count']} random wrong keys "
        f"the same test gives p-values that should be uniform; the share at or below alpha: {shares}.</p>"
        f"<div class=plots>{_plots(mark)}</div>"
    )


def _when(found: dict | None) -> str:
    if found is None:
        return "NO PRIOR COMMITMENT in the evidence log"
    late = "" if found["checkpointed"] else " (not yet checkpointed)"
    return f"{found['time']}, {found['log']} entry {found['index']}{late}"


def _canaries(found: dict) -> str:
    e = html.escape
    out = [f"<h2>Canaries</h2><p>Test: {e(found['test'])}.</p>{_ul(found['assumptions'])}",
           f"<p>{found['phrases_found']} distinct canary-space phrases in the suspect's answers; "
           f"{found['identities_tested']} identity-epochs tested.</p>"]  # fmt: skip
    for a in found["attributions"]:
        out.append(f"<h3>{e(a['identity'])} (key epoch {a['epoch']}): p = {a['p_value']:.3g}</h3>")
        out.append(f"<p>Its canaries found: {e(', '.join(a['canaries']))}.</p>")
        for served in a["served"]:
            proof = served["proof"]
            state = "inclusion proof under the signed checkpoint below" if proof else "not yet under a checkpoint"
            summary = (f"{served['log']} entry {served['entry']}: canary {served['canary']} served to "
                       f"{served['identity']} at {served['time']} ({state})")  # fmt: skip
            body = e(json.dumps(proof, indent=1)) if proof else ""
            out.append(f"<details><summary>{e(summary)}</summary><pre>{body}</pre></details>")
    return "\n".join(out)


def _exposure(exposure: dict) -> str:
    if not exposure["identities_tested"]:
        return ("<h2>Exposure</h2><p>Not scored: the probe ran without <code>--exposure</code>, or the endpoint "
                "returns no log-probabilities.</p>")  # fmt: skip
    rows = [[t["identity"], f"{t['exposed']} / {t['scored']}", f"{t['median_exposure']:.1f}", f"{t['p_value']:.3g}"]
            for t in exposure["identities"]]  # fmt: skip
    head = ["identity", f"canaries in the top {exposure['alpha']:.1%}", "median exposure (bits)", "p (Holm)"]
    others = exposure["identities_tested"] - len(rows)
    unnamed = f"<p>{others} other identities scored, none beyond chance: they are not named.</p>" if others else ""
    table = _table(head, rows) if rows else ""
    return f"<h2>Exposure</h2><p>Test: {html.escape(exposure['test'])}.</p>{table}{unnamed}"


def _reading(reading: dict | None) -> str:
    if reading is None:
        return ("<h2>Reading mode</h2><p>Not read: the probe ran without <code>--reading</code>, or the endpoint "
                "returns no log-probabilities.</p>")  # fmt: skip
    rows = [[r["epoch"], r["key"], f"{r['p_value']:.3g}", f"{r['raw_p_value']:.3g}", f"{r['hits']} / {r['n']}"]
            for r in reading["epochs"]]  # fmt: skip
    shares = ", ".join(f"{share:.3f} at {alpha}" for alpha, share in reading["wrong_keys"]["share_at"].items())
    head = ["key epoch", "key fingerprint", "p (Holm)", "p (raw)", "hits / votes"]
    return (f"<h2>Reading mode</h2><p>Test: {html.escape(reading['test'])}; {reading['passages']} passages.</p>"
            f"{_table(head, rows)}<p>Under {reading['wrong_keys']['count']} wrong keys, the share at or below "
            f"alpha: {shares}.</p>")  # fmt: skip


def _plots(mark: dict) -> str:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    svgs = []
    best, pmf = mark["best"], mark["null"]["pmf"]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.bar(range(len(pmf)), pmf, color="#999", label="null: hits by chance")
    ax.axvline(best["hits"], color="#b00020", label=f"observed: {best['hits']} of {best['n']}")
    ax.set(xlabel="votes for the key's member", ylabel="probability", title="Score against its null distribution")
    ax.legend(fontsize=8)
    svgs.append(_svg(fig, plt))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    amounts = mark["by_amount"]
    ax.plot([a["words"] for a in amounts], [max(a["p_value"], 1e-300) for a in amounts], marker="o", color="#b00020")
    ax.axhline(STRONG, color="grey", linestyle=":", label=f"p = {STRONG:g}")
    ax.set(xscale="log", yscale="log", xlabel="words of probe text", ylabel="p-value", title="p-value against text")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    svgs.append(_svg(fig, plt))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.hist(mark["wrong_keys"]["p_values"], bins=20, range=(0, 1), color="#999", label="wrong keys")
    ax.axvline(best["raw_p_value"], color="#b00020", label=f"our key: p = {best['raw_p_value']:.2g}")
    ax.set(xlabel="p-value", ylabel="keys", title=f"The same test under {mark['wrong_keys']['count']} wrong keys")
    ax.legend(fontsize=8)
    svgs.append(_svg(fig, plt))
    return "".join(svgs)


def _svg(fig, plt) -> str:
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]
