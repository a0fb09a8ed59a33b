"""Figure 1 read on the grid: RL's and SFT's sparsity at the matched gain, frontier against frontier.

Figure 1's own verdict reads each recipe's learning-rate sweep where it reaches the matched gain.
On the real base the SFT sweep of the quick core never gets there (SFT at its one learning rate
loses accuracy), so that verdict stays "not measured". The grid holds what it lacks: per
algorithm, the Pareto frontier of sparsity against gain over learning rate x steps. This verdict
reads every frontier at the pre-registered matched gain and compares RL's with SFT's, with the
pre-registered noise margin and the paper's lowest RL sparsity. It compares best cases (each
algorithm at its best settings, one seed, no interval), and the report says so.
"""

from __future__ import annotations

from rlsparse.lab import stats
from rlsparse.lab.verdicts.common import Finding, not_measured, pct, pts

TITLE = "Figure 1 on the grid: RL vs SFT sparsity at a matched gain, best settings against best settings"
PAPER = "RL 68.5-96.0% sparse (Table 1: 7 algorithms, 10 models); SFT 6-15% (Figure 1)"


def finding(grid_finding: Finding, prereg) -> Finding:
    """Judge Figure 1 from the grid finding's frontier readings at the matched gain.

    Args:
        grid_finding: ``verdicts.grid.finding`` of the same run.
        prereg: The run's pre-registration (matched gain, noise margin, the paper's lowest RL sparsity).
    """
    data, level, margin = grid_finding.data, prereg["matched_gain"], prereg["noise_margin"]
    low = prereg["figure1"]["rl_sparsity_paper_low"]
    rule = (f"Reproduces when the mean over RL recipes of their frontier's sparsity at the matched gain of "
            f"{pts(level)} exceeds the SFT recipes' mean by more than {100 * margin:.0f} points and RL there is at "
            f"least {pct(low)} sparse (the paper's lowest); partly when RL is sparser by more than the margin but "
            "below that level; does not reproduce when the difference is within the margin or reversed. Only "
            "recipes whose frontier reaches the matched gain count; one seed per grid, so no interval.")
    control = ("Matching on gain along each frontier removes the learning-rate confound of Figure 1's matched-lr "
               "tally; beside it, each frontier read at SFT's KL(start || finetuned) at the matched gain.")
    selection = "best case over each grid (its Pareto frontier), read at the pre-registered matched gain"
    recipes = data.get("recipes", {})
    rl = [n for n, v in recipes.items() if v["rl"]]
    sft = [n for n, v in recipes.items() if v["algorithm"] == "sft"]
    if not rl or not sft:
        return not_measured("figure1_grid", TITLE, PAPER, "Needs the grid of an RL recipe and of an SFT recipe in one "
                            "run folder (e.g. `rlsparse lab run sft_ood,grpo_nokl --grid`).", rule, control)
    key = f"{level:g}"
    at = {n: data["at_gain"][n][key]["value"] for n in rl + sft}
    at_kl = {n: (data["at_kl"].get(n) or {}).get("value") for n in rl + sft}
    reached_rl = [at[n] for n in rl if at[n] is not None]
    reached_sft = [at[n] for n in sft if at[n] is not None]
    each = "; ".join(f"{n} ({recipes[n]['algorithm']}) "
                     + (pct(at[n]) if at[n] is not None else "did not reach it") for n in rl + sft)
    parts = [f"frontier sparsity at the matched gain of {pts(level)}: {each}"]
    diff = stats.mean(reached_rl) - stats.mean(reached_sft) if reached_rl and reached_sft else float("nan")
    if diff == diff:
        parts.append(f"RL minus SFT {100 * diff:+.1f} points (RL {pct(stats.mean(reached_rl))}, "
                     f"SFT {pct(stats.mean(reached_sft))})")
    if data.get("kl_level") is not None:
        parts.append(f"at KL {data['kl_level']:.3g} ({data['kl_level_source']}): "
                     + ", ".join(f"{n} {pct(at_kl[n]) if at_kl[n] is not None else 'out of range'}"
                                 for n in rl + sft))
    unfinished = [f"{n} {len(recipes[n]['points'])}/{recipes[n]['planned']}" for n in rl + sft
                  if not recipes[n]["complete"]]
    if unfinished:
        parts.append("provisional: grids stopped part way (checkpoints measured/planned: " + ", ".join(unfinished)
                     + "), and a missing checkpoint can move a frontier either way")
    if diff != diff:
        verdict = "not measured"
        parts.insert(0, "no RL frontier or no SFT frontier reaches the matched gain")
    elif diff > margin:
        verdict = "reproduces" if stats.at_least(stats.mean(reached_rl), low) else "partly reproduces"
    else:
        verdict = "does not reproduce at this scale"
    return Finding("figure1_grid", TITLE, PAPER, verdict, "; ".join(parts) + ".",
                   {"rl": rl, "sft": sft, "matched_gain": level, "sparsity_at_matched_gain": at,
                    "sparsity_at_matched_kl": at_kl, "kl_level": data.get("kl_level"),
                    "rl_minus_sft": None if diff != diff else diff, "unfinished": unfinished},
                   None, grid_finding.seeds, rule=rule, control=control, selection=selection)
