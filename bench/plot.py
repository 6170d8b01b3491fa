"""Draw the README's figures from the runs bench/sweep.py writes (runs/sweep_<script>/<kind>-<rho>_s<seed>_n<steps>).

    python bench/plot.py                 # docs/ood_domains.png, docs/worst_vs_steps.png, docs/groups_refusals.png

1. ood_domains.png: per-domain OOD metric at the end of training, ERM against chi2 0.5, group DRO and (PPO) its
   default chi2 2 with --weights-from loo, mean ± std over seeds, one panel per script (reward model: accuracy;
   DPO and PPO: gold reward of sampled responses).
2. worst_vs_steps.png: the worst-domain OOD metric against training steps for ERM and the default robust setting
   (does robust training learn the worst domain faster, or end somewhere else?), mean ± std over seeds.
3. groups_refusals.png: on --dataset synthetic-groups, the minority group's gold reward against PPO iterations for
   plain PPO and each --weights-from estimator above the radius where theory says robust PPO must hedge.
4. overoptimisation.png: the full pipeline, gold reward against KL to the reference along PPO on a learned reward
   model (ERM or robust), plain against robust PPO (compare them at matched KL, not only at matched iterations).

Only the runs present are drawn; a setting needs at least one seed. Needs matplotlib (requirements-bench.txt).
"""

import argparse
import glob
import json
import os
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script: (runs folder, metric, budget in its own steps, y-axis label, the script's default robust setting)
PANELS = {
    "dro_reward.py": ("sweep_dro_reward", "accuracy", 1000, "accuracy (%)", "chi2:0.5"),
    "dro_dpo.py": ("sweep_dro_dpo", "gold_reward", 600, "gold reward (x 100)", "chi2:0.5"),
    "dro_ppo.py": ("sweep_dro_ppo", "gold_reward", 60, "gold reward (x 100)", "chi2:2 loo"),
}
# settings drawn from the runs of another folder (a sweep with --tag): name -> (folder, setting)
TAGGED = {"chi2:2 loo": ("sweep_dro_ppo_loo", "chi2:2")}
LABELS = {"erm:0": "ERM", "chi2:0.5": "chi2 0.5", "group:0": "group DRO", "chi2:2 loo": "chi2 2, loo"}
COLORS = {"erm:0": "tab:gray", "chi2:0.5": "tab:blue", "group:0": "tab:orange", "chi2:2 loo": "tab:green"}


def load_runs(folder: str, steps: int, split: str) -> dict:
    """{"kind:rho": [one {step: metrics line} per seed]} for the runs of `folder` with the given budget."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, f"*_s*_n{steps}", "metrics.jsonl"))):
        match = re.fullmatch(
            r"(erm|tv|chi2|kl|cvar|group)-?([0-9.]+)_s(\d+)_n\d+", os.path.basename(os.path.dirname(path))
        )
        if not match or not os.path.exists(os.path.join(os.path.dirname(path), "args.json")):
            continue  # not a sweep run, or one that did not finish
        lines = [json.loads(line) for line in open(path)]
        curve = {r["step"]: r for r in lines if r.get("split") == split}
        runs.setdefault(f"{match[1]}:{match[2]}", []).append(curve)
    return runs


def load_panel(runs_dir: str, folder: str, steps: int, split: str) -> dict:
    """The runs of a script's sweep folder, plus its TAGGED settings from the other folders."""
    runs = load_runs(os.path.join(runs_dir, folder), steps, split)
    for name, (tagged, setting) in TAGGED.items():
        if tagged.startswith(folder + "_"):
            found = load_runs(os.path.join(runs_dir, tagged), steps, split).get(setting)
            runs.update({name: found} if found else {})
    return runs


def label(setting: str, default: str) -> str:
    return LABELS.get(setting, setting) + (" (default)" if setting == default else "")


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ood_domains(runs_dir: str, split: str, out: str):
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, (script, (folder, metric, steps, ylabel, default)) in zip(axes, PANELS.items()):
        runs = load_panel(runs_dir, folder, steps, split)
        ax.set_title(f"{script}: {split}, {steps} steps")
        if not runs:
            ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
            continue
        settings = [s for s in LABELS if s in runs]
        final = {s: [curve[max(curve)] for curve in runs[s]] for s in settings}
        domains = sorted(final[settings[0]][0][f"domain_{metric}"]) + ["worst"]
        width = 0.8 / len(settings)
        for k, s in enumerate(settings):
            per_seed = [[100 * r[f"domain_{metric}"][d] for d in domains[:-1]] for r in final[s]]
            per_seed = [v + [min(v)] for v in per_seed]  # the worst domain of each seed
            stats = [mean_std([v[j] for v in per_seed]) for j in range(len(domains))]
            xs = [j + (k - (len(settings) - 1) / 2) * width for j in range(len(domains))]
            name = f"{label(s, default)} ({len(per_seed)} seeds)"
            ax.bar(xs, [m for m, _ in stats], width, yerr=[e for _, e in stats], label=name, color=COLORS.get(s))
        ax.set_xticks(range(len(domains)), domains, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    save(fig, out)


def worst_vs_steps(runs_dir: str, split: str, out: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, (script, (folder, metric, steps, ylabel, default)) in zip(axes, PANELS.items()):
        runs = load_panel(runs_dir, folder, steps, split)
        ax.set_title(f"{script}: worst domain on {split}")
        for s in (s for s in ("erm:0", default) if s in runs):
            xs = sorted(set.intersection(*(set(curve) for curve in runs[s])))
            stats = [mean_std([100 * curve[x][f"worst_domain_{metric}"] for curve in runs[s]]) for x in xs]
            name = f"{label(s, default)} ({len(runs[s])} seeds)"
            ax.plot(xs, [m for m, _ in stats], marker="o", label=name, color=COLORS[s])
            ax.fill_between(xs, [m - e for m, e in stats], [m + e for m, e in stats], alpha=0.2, color=COLORS[s])
        ax.set_xlabel("training step" if script != "dro_ppo.py" else "PPO iteration")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
    save(fig, out)


def groups_refusals(runs_dir: str, split: str, out: str, rho: str = "2"):
    """synthetic-groups: the minority group's gold reward (the refusal probability) against PPO iterations, plain
    PPO and each estimator at chi2 `rho`, with the population max-min policy (bench/groups_theory.py)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines = {"plain PPO": ("groups_returns", "erm:0", "tab:gray")}
    for estimator, color in (("returns", "tab:blue"), ("loo", "tab:green"), ("values", "tab:purple")):
        lines[f"chi2 {rho}, --weights-from {estimator}"] = (f"groups_{estimator}", f"chi2:{rho}", color)
    for label, (tag, setting, color) in lines.items():
        runs = load_runs(os.path.join(runs_dir, f"sweep_dro_ppo_{tag}"), 60, split).get(setting)
        if not runs:
            continue
        xs = sorted(set.intersection(*(set(curve) for curve in runs)))
        stats = [mean_std([100 * c[x]["domain_gold_reward"]["wants_refusal"] for c in runs]) for x in xs]
        ax.plot(xs, [m for m, _ in stats], marker="o", color=color, label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(xs, [m - e for m, e in stats], [m + e for m, e in stats], alpha=0.15, color=color)
    if not ax.lines:
        print(f"{out}: no runs, not written")
        return
    ax.axhline(48.0, ls="--", color="k", lw=1, label="max-min policy, population (chi2 rho >= 0.59)")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("minority (refusal) gold reward (x 100)")
    ax.set_title(f"synthetic-groups, {split}: does robust PPO hedge?")
    ax.legend(fontsize=7)
    save(fig, out)


def save(fig, out: str):
    """Write the figure, unless no panel has a run (so a partial set of runs never overwrites a figure with empty
    panels)."""
    if not any(ax.lines or ax.patches for ax in fig.axes):
        print(f"{out}: no runs, not written")
        return
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def domain_mean_or(report: dict, key: str) -> float:
    """The mean over the domains of a per-domain entry (as the tables' "mean"), or the entry itself."""
    return statistics.mean(report[key].values()) if isinstance(report[key], dict) else report[key]


def overoptimisation(runs_dir: str, split: str, out: str):
    """The full pipeline (Gao et al. 2022's view): gold reward of sampled responses against their KL to the reference
    along PPO on a learned reward model, plain and robust PPO, one panel per reward model (ERM, robust) and per
    metric (the mean over the domains, as in the tables, and the worst domain); each point one evaluation, mean over
    seeds (runs of bench/sweep.py --tag pipeline_rm-<kind>)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, (rm, rm_label) in enumerate((("erm", "ERM reward model"), ("chi2", "robust reward model (chi2 0.5)"))):
        runs = load_runs(os.path.join(runs_dir, f"sweep_dro_ppo_pipeline_rm-{rm}"), 60, split)
        for row, (key, what) in enumerate(
            (("domain_gold_reward", "mean"), ("worst_domain_gold_reward", "worst-domain"))
        ):
            ax = axes[row][col]
            for setting, name, color in (("erm:0", "plain PPO", "tab:gray"), ("chi2:2", "robust PPO", "tab:green")):
                if setting not in runs:
                    continue
                xs = sorted(set.intersection(*(set(curve) for curve in runs[setting])))
                kl = [statistics.mean(c[x]["kl"] for c in runs[setting]) for x in xs]
                gold = [statistics.mean(100 * domain_mean_or(c[x], key) for c in runs[setting]) for x in xs]
                ax.plot(kl, gold, marker="o", color=color, label=f"{name} ({len(runs[setting])} seeds)")
                for x, k, g in zip(xs, kl, gold):
                    if x in (xs[0], xs[-1]):
                        ax.annotate(str(x), (k, g), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_title(f"{rm_label}: {what} gold, {split}", fontsize=10)
            ax.set_xlabel("KL to the reference (per response)")
            ax.set_ylabel(f"{what} gold reward (x 100)")
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
    save(fig, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="the folder bench/sweep.py writes to")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="where the PNGs go")
    p.add_argument("--split", default="test_uniform", help="the out-of-distribution split to draw")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ood_domains(a.runs, a.split, os.path.join(a.out, "ood_domains.png"))
    worst_vs_steps(a.runs, a.split, os.path.join(a.out, "worst_vs_steps.png"))
    groups_refusals(a.runs, a.split, os.path.join(a.out, "groups_refusals.png"))
    overoptimisation(a.runs, a.split, os.path.join(a.out, "overoptimisation.png"))
