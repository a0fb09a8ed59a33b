"""Table 5: is training on in-distribution data sparser, with "in distribution" measured?

Each recipe's training targets get a per-token NLL under the policy it starts from (the pair's
mean of chosen and rejected for DPO; the completion for SFT/RFT). Within one algorithm, every pair
of recipes whose target NLLs differ by more than the pre-registered margin is compared at matched
learning rates: the lower-NLL recipe wins a learning rate when its mean sparsity is higher by more
than the noise margin, loses when lower by more, ties otherwise. The tally carries a bootstrap
interval over seeds. The controls that vary only the targets' likelihood are named pairs:
``dpo_id`` vs ``dpo_randrej`` (only the rejected answer differs) and ``dpo_fmt_sft`` vs
``dpo_fmt`` (the same pairs, with and without an SFT that makes them likely: the paper's manipulation).
"""

from __future__ import annotations

from itertools import combinations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import TOL, Finding, by_lr, not_measured, recipe, seeds_of

TITLE = "Table 5: in- vs out-of-distribution data (distribution measured as per-token NLL under the policy)"
PAPER = ("SFT-then-DPO (in distribution) 81.4% vs DPO on another model's data 6.8-7.7% sparse; RFT 91.2% "
         "(Table 5)")
CONTROL_PAIRS = (("dpo_id", "dpo_randrej", "only the rejected answer's likelihood differs"),
                 ("dpo_fmt_sft", "dpo_fmt", "the same reversed-digit pairs, with vs without a preceding SFT on them"),
                 ("rft", "sft_id", "the policy's own correct answers vs the generator's"),
                 ("dpo_id", "dpo_ood", "policy pairs vs constructed one-digit edits on another task"))


def target_nll(entry: dict) -> float | None:
    """The NLL that places a dataset: mean of chosen and rejected for pairs, else the completion's."""
    nll = entry.get("data_nll") or {}
    if "chosen" in nll and "rejected" in nll:
        return (nll["chosen"] + nll["rejected"]) / 2
    return nll.get("completion")


def _trainer(results: dict, name: str) -> str:
    algo = recipe(results, name)["algorithm"]
    return "sft" if algo == "rft" else algo  # RFT is SFT on the policy's own samples


def finding(results: dict, prereg) -> Finding:
    margin, nll_margin, boot = prereg["noise_margin"], prereg["nll_margin"], prereg["bootstrap"]
    share = prereg["table5"]["min_share_won"]
    rule = (f"Within each algorithm, every pair of recipes whose target NLLs differ by more than {nll_margin} nats/token "
            f"is compared at matched learning rates (a win when the lower-NLL recipe is sparser by more than "
            f"{100 * margin:.0f} points). Reproduces when the lower-NLL side wins at least {100 * share:.0f}% of "
            "comparisons and loses none; partly when wins outnumber losses; otherwise does not reproduce.")
    control = "; ".join(f"{a} vs {b}: {why}" for a, b, why in CONTROL_PAIRS)
    entries = {n: e for n, e in results["recipes"].items() if target_nll(e) is not None}
    if len(entries) < 2:
        return not_measured("table5", TITLE, PAPER, "No two recipes recorded the NLL of their training targets "
                            "(results from before the measurement, or one recipe).", rule, control)
    nll = {n: target_nll(e) for n, e in entries.items()}
    sparsity = {n: by_lr(results, n, lambda p: p["sparsity"][TOL]) for n in entries}
    comparisons, rows = [], []
    for a, b in combinations(sorted(entries), 2):
        if _trainer(results, a) != _trainer(results, b):
            continue
        if abs(nll[a] - nll[b]) <= nll_margin:
            continue
        low, high = (a, b) if nll[a] < nll[b] else (b, a)
        lrs = sorted(set(sparsity[low]) & set(sparsity[high]))
        pairs = [(sparsity[low][lr], sparsity[high][lr]) for lr in lrs]
        tally = stats.count_wins(pairs, margin, resamples=boot["resamples"], level=boot["level"], seed=boot["seed"])
        rows.append({"in": low, "out": high, "nll_in": nll[low], "nll_out": nll[high], **tally,
                     "by_lr": {lr: [stats.mean(x), stats.mean(y)] for lr, (x, y) in zip(lrs, pairs)}})
        comparisons.extend(pairs)
    if not comparisons:
        return not_measured("table5", TITLE, PAPER, "No two recipes of one algorithm differ in target NLL by more than "
                            f"{nll_margin} nats/token at a common learning rate.", rule, control,)
    total = stats.count_wins(comparisons, margin, resamples=boot["resamples"], level=boot["level"], seed=boot["seed"])
    if total["wins"] >= share * total["n"] - 1e-9 and total["losses"] == 0:
        verdict = "reproduces"
    elif total["wins"] > total["losses"]:
        verdict = "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    named = {f"{a} vs {b}": r for a, b, _ in CONTROL_PAIRS for r in rows if {r["in"], r["out"]} == {a, b}}
    parts = [f"lower-NLL data sparser at {total['wins']}/{total['n']} matched comparisons (interval "
             f"{total['wins_interval'][0]:.0f}-{total['wins_interval'][1]:.0f}), less sparse at {total['losses']}, "
             f"within {100 * margin:.0f} points at {total['ties']}"]
    parts += [f"{k} (NLL {r['nll_in']:.2f} vs {r['nll_out']:.2f}): {r['wins']}/{r['n']} won, {r['losses']} lost"
              for k, r in named.items()]
    parts.append("target NLL (nats/token): " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(nll.items(), key=lambda t: t[1])))
    return Finding("table5", TITLE, PAPER, verdict, "; ".join(parts) + ".",
                   {"nll": nll, "pairs": rows, "total": total, "controls": named,
                    "curves": {n: [{"lr": lr, "sparsity": stats.mean(v)} for lr, v in sparsity[n].items()] for n in entries}},
                   "table5.png", seeds_of(results, entries), rule, control)
