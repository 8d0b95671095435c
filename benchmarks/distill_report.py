"""Results of the distillation benchmark: benchmarks/results/distill.{json,md} and distill.png."""

from __future__ import annotations

import json
import statistics

from scipy import stats

from gateway.forensics.claims import SUGGESTIVE


def uniform_at(p_values: list[float], alpha: float) -> dict:
    """The share of p-values at or below alpha, and whether it lies within the 99% binomial bound of alpha."""
    n = len(p_values)
    share = sum(p <= alpha for p in p_values) / n
    low, high = float(stats.binom.ppf(0.005, n, alpha)) / n, float(stats.binom.ppf(0.995, n, alpha)) / n
    return {"alpha": alpha, "share": share, "bound": [low, high], "within": bool(low <= share <= high)}


def summarise(name: str, result: dict) -> dict:
    training, mark = result["training"], result["watermark"]
    served = [r["exposure"] for r in result["exposure"]]
    fresh = [r["exposure"] for r in result["fresh_exposure"]]
    return {
        "student": name,
        "marked_share": training["mix"],
        "seed": training["seed"],
        "p_value": mark["p_value"],
        "votes": mark["n"],
        "hits": mark["hits"],
        "uniform_under_wrong_keys": [uniform_at(result["wrong_keys"], a) for a in (0.05, 0.01)],
        "attributed": [
            (a["identity"], a["p_value"], len(a["canaries"]))
            for a in result["attributions"]
            if a["p_value"] < SUGGESTIVE
        ],  # fmt: skip
        "chance_matches": sum(a["p_value"] >= SUGGESTIVE for a in result["attributions"]),
        "served_exposure_median": statistics.median(served) if served else None,
        "fresh_exposure_median": statistics.median(fresh) if fresh else None,
        "served_at_p_0_001": sum(r["p_value"] <= 0.001 for r in result["exposure"]),
        "served_scored": len(served),
        "fresh_at_p_0_001": sum(r["p_value"] <= 0.001 for r in result["fresh_exposure"]),
    }


def write(results: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results["command"] = "python -m benchmarks.distill " + " ".join(args.argv)
    results["summary"] = [summarise(name, r) for name, r in results["students"].items()]
    (args.out / "distill.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "distill.md").write_text(markdown(results))
    plot(results, args.out / "distill.png")
    print(markdown(results))


def markdown(results: dict) -> str:
    corpus = results["corpus"]
    first = next(iter(results["students"].values()))["training"]
    lines = [
        "# Distillation: students trained on answers served through the gateway",
        "",
        f"`{results['command']}`, on this machine's 2 CPU cores (stages are kept in `--work`, so a run that resumed "
        f"took {results['seconds'] / 60:.0f} min for what was left; each student's training time is in the table).",
        "",
        f"{corpus['answers']} real answers (AlpacaEval outputs of {corpus['models']} models) were asked through a "
        f"running gateway by {corpus['accounts']} campaign accounts in the suspect tier (watermark and canaries on), "
        f"among {corpus['accounts'] + corpus['decoys']} registered identities. Each student is a word-level GRU "
        f"language model ({first['parameters']:,} parameters, vocabulary {first['vocabulary']:,}) trained from "
        f"scratch on {first['sequences']} instruction-answer pairs ({first['tokens']:,} tokens) for "
        f"{first['seconds']:.0f} s; the mix is the share of its training answers that passed through the gateway "
        "(the rest are the same answers unmarked). Each was served behind an OpenAI-compatible endpoint and "
        "questioned with `canarygate probe`; the tests are `canarygate detect` and `canarygate canaries attribute` "
        "on the transcript, and each canary's exposure among "
        f"{results['candidates']:,} other phrases of the canary space.",
        "",
        "| student | marked | steps (s) | loss | probe words | watermark p (hits/votes) | reading mode p (hits/votes) "
        "| wrong keys: share at 0.05, 0.01 "
        "| canaries attributed (p) | exposure served / fresh (median bits) | served canaries at p <= 0.001 "
        "| report proofs verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["summary"]:
        r, t = results["students"][s["student"]], results["students"][s["student"]]["training"]
        wrong = ", ".join(
            f"{u['share']:.3f}{'' if u['within'] else ' (outside)'}" for u in s["uniform_under_wrong_keys"]
        )
        who = "; ".join(f"{i} ({p:.2g}, {n} canaries)" for i, p, n in s["attributed"]) or "none"
        who += f" (and {s['chance_matches']} at chance, p >= {SUGGESTIVE})" if s["chance_matches"] else ""
        lines.append(
            f"| {s['student']} | {t['marked_answers']} / {t['answers']} | {t['steps']} ({t['seconds']:.0f}) | "
            f"{t['final_loss']} | {r['probe_words']:,} | {s['p_value']:.3g} ({s['hits']}/{s['votes']}) | "
            f"{_reading(r.get('reading'))} | {wrong} | {who} | "
            f"{_bits(s['served_exposure_median'])} / {_bits(s['fresh_exposure_median'])} | "
            f"{s['served_at_p_0_001']} of {s['served_scored']} (fresh: {s['fresh_at_p_0_001']}) | "
            f"{r['report']['proofs']} {'yes' if r['report']['proofs_verified'] else 'NO'} |"
        )
    lines += ["", "p-value against the amount of probe text (first k answers of each transcript):", ""]
    lines += ["| student | " + " | ".join(f"{a['texts']} texts" for a in first_amounts(results)) + " |"]
    lines += ["|---|" + "---|" * len(first_amounts(results))]
    for name, r in results["students"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{a['p_value']:.2g} ({a['words']:,} words)" for a in r["by_amount"]) + " |"
        )
    lines += ["", "![p-values](distill.png)", "", "The first student's report, rendered by headless Chromium:", "",
              "![report](distill-report.png)", ""]  # fmt: skip
    return "\n".join(lines)


def first_amounts(results: dict) -> list[dict]:
    return next(iter(results["students"].values()))["by_amount"]


def _reading(reading: dict | None) -> str:
    return "-" if reading is None else f"{reading['p_value']:.3g} ({reading['hits']}/{reading['n']})"


def _bits(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["students"].items():
        left.plot([a["words"] for a in r["by_amount"]], [max(a["p_value"], 1e-300) for a in r["by_amount"]],
                  marker="o", label=name)  # fmt: skip
    left.set(xscale="log", yscale="log", xlabel="probe words", ylabel="watermark p-value", title="p against text")
    left.axhline(1e-6, color="grey", linestyle=":")
    left.legend(fontsize=6)
    pooled = sorted(p for r in results["students"].values() for p in r["wrong_keys"])
    right.plot(pooled, [(i + 1) / len(pooled) for i in range(len(pooled))], label="all students, wrong keys")
    right.plot([0, 1], [0, 1], color="grey", linestyle=":", label="uniform")
    right.set(xlabel="p-value", ylabel="share at or below", title="wrong keys: empirical CDF")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
