"""The max-min policy of robust PPO on --dataset synthetic-groups in closed form, against the measured runs.

    python bench/groups_theory.py                                   # the theory table (beta 0.05, p_ref 0.15)
    python bench/groups_theory.py --fixed-points --runs runs/sweep_dro_ppo_groups_{returns,loo,values}  # the runs

The policy cannot tell the groups apart, so it refuses every prompt with the same probability p; the majority group
(85% of the training prompts) wants the word (gold reward c (1 - p), c: how often the policy copies it right), the
minority group wants the refusal (gold reward p). With the KL penalty beta to the reference (refusal probability
p_ref), the objective of a prompt distribution with minority mass q is maximised by the policy

    p(q) = sigmoid(logit(p_ref) + (q - (1 - q) c) / beta)

(the KL-regularised optimum of two response classes). The worst case over the ball Q_rho around the training
distribution puts the largest mass q_max(rho) it can on the minority group while the policy serves it worse, so
the max-min policy is p* = min(p(q_max), c / (1 + c)): it refuses more than the reference as soon as
q_max > c / (1 + c), and it equalises the two groups (worst-group gold c / (1 + c)) once p(q_max) reaches that
point. q_max for the minority share m = 0.15:

    chi2 (1/2) E_P[(dQ/dP - 1)^2] <= rho:  m + sqrt(2 rho m (1 - m))
    kl   KL(Q || P) <= rho:                 the q with KL((q, 1 - q) || (m, 1 - m)) = rho
    tv   (1/2) sum |Q - P| <= rho:           m + rho
    cvar dQ/dP <= 1 + rho:                  (1 + rho) m

ERM (q = m) drives p to sigmoid(logit(p_ref) - (1 - m (1 + c)) / beta), about 0.

That is the population worst case, over the prompts' *expected* rewards. The scripts compute it on a minibatch of
B prompts from K sampled rewards each, which attenuates it: `--fixed-points` simulates the expected update
direction of the refusal logit (the REINFORCE gradient of the weighted rewards plus the KL term) under each
estimator's weights, and prints where it changes sign: the refusal probability each estimator can settle at.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dro_ppo  # noqa: E402
import robust  # noqa: E402

MINORITY = 0.15  # the minority group's share of the training prompts (common._GROUPS_TRAIN)


def q_max(kind: str, rho: float, m: float = MINORITY) -> float:
    if kind == "group":  # group DRO: any mixture of the groups (its weights are not held near the training one)
        return 1.0
    if kind == "erm" or rho == 0:
        return m
    if kind == "chi2":
        return min(1.0, m + math.sqrt(2 * rho * m * (1 - m)))
    if kind == "tv":
        return min(1.0, m + rho)
    if kind == "cvar":
        return min(1.0, (1 + rho) * m)
    if kind == "kl":  # KL((q, 1-q) || (m, 1-m)) increases in q on [m, 1]: bisection
        kl = lambda q: q * math.log(q / m) + (1 - q) * math.log((1 - q) / (1 - m)) if q < 1 else math.log(1 / m)
        if kl(1.0) <= rho:
            return 1.0
        lo, hi = m, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kl(mid) < rho else (lo, mid)
        return lo
    raise ValueError(kind)


def max_min_policy(q: float, p_ref: float, beta: float, c: float) -> float:
    """The refusal probability of the max-min policy when the worst case gives the minority mass q."""
    z = math.log(p_ref / (1 - p_ref)) + (q - (1 - q) * c) / beta
    return min(1 / (1 + math.exp(-z)) if z > -700 else 0.0, c / (1 + c))


def threshold(kind: str, target: float) -> float:
    """The smallest radius whose q_max reaches `target` (bisection on rho)."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if q_max(kind, mid) < target else (lo, mid)
    return hi


def update_direction(p, kind, rho, estimator, k, prompts, p_ref, beta, c, batches=150, seed=0):
    """Expected gradient of the weighted objective with respect to the refusal logit at refusal probability p, when
    every rollout's reward is its group's (1 or 0 for a refusal, c or 0 for the word) and the weights come from
    `estimator` ("returns", "loo", or "erm") over `prompts` prompts x `k` samples; plus the KL term."""
    gen, dro = torch.Generator().manual_seed(seed), robust.DROArgs(kind=kind, rho=rho)
    ids, total = torch.arange(prompts).repeat_interleave(k), 0.0
    for _ in range(batches):
        minority = (torch.rand(prompts, generator=gen) < MINORITY).repeat_interleave(k)
        refuse = torch.rand(prompts * k, generator=gen) < p
        reward = torch.where(minority, refuse.float(), (~refuse).float() * c)
        if estimator == "loo":
            w, _ = dro_ppo.cross_fitted_weights(-reward, ids, dro, k)
        elif estimator == "returns":
            w, _ = robust.robust_prompt_weights(-reward, ids, dro)
        else:
            w = torch.full((prompts * k,), 1.0 / (prompts * k))
        score = torch.where(refuse, torch.tensor(1 - p), torch.tensor(-p))  # d log pi(y) / d logit
        total += (w * (reward - reward.mean()) * score).sum().item()
    logit = lambda x: math.log(x / (1 - x))
    return total / batches - beta * (logit(p) - logit(p_ref)) * p * (1 - p)


def fixed_point(kind, rho, estimator, k, prompts, p_ref, beta, c):
    """The refusal probability where the expected update changes sign from up to down (0 if it only goes down).
    Group DRO's weights are over the known groups, with no sampling noise to attenuate them: its p*."""
    if kind == "group":
        return max_min_policy(1.0, p_ref, beta, c)
    grid = [0.005 * 1.25**i for i in range(21)]  # 0.005 .. 0.43
    signs = [update_direction(p, kind, rho, estimator, k, prompts, p_ref, beta, c) > 0 for p in grid]
    return next((p for p, up, nxt in zip(grid, signs, signs[1:]) if up and not nxt), 0.0 if not signs[0] else grid[-1])


def measured(folder: str, split: str):
    """{setting: [(p_ref, c, p, worst-group gold) per seed]} from the runs' step-0 and final evaluations."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_s*_n*", "metrics.jsonl"))):
        name = os.path.basename(os.path.dirname(path))
        match = re.fullmatch(r"(erm|tv|chi2|kl|cvar|group)-?([0-9.]+)_s(\d+)_n\d+", name)  # chi2-0.5 or chi20.5
        if not match or not os.path.exists(os.path.join(os.path.dirname(path), "args.json")):
            continue
        rows = [json.loads(line) for line in open(path) if json.loads(line)["split"] == split]
        first, last = min(rows, key=lambda r: r["step"]), max(rows, key=lambda r: r["step"])
        p_ref, p = first["domain_gold_reward"]["wants_refusal"], last["domain_gold_reward"]["wants_refusal"]
        c = first["domain_gold_reward"]["wants_word"] / max(1e-9, 1 - p_ref)
        out.setdefault(f"{match[1]}:{match[2]}", []).append((p_ref, c, p, last["worst_domain_gold_reward"]))
    return out


def fmt(values, pct=100.0):
    return f"{pct * statistics.mean(values):.1f}" + (
        f" ± {pct * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--beta", type=float, default=0.05, help="--kl-coef of the runs")
    p.add_argument("--p-ref", type=float, default=0.15, help="the reference's refusal probability")
    p.add_argument("--c", type=float, default=1.0, help="how often the policy copies the word right")
    p.add_argument("--settings", nargs="+", default=["erm:0", "chi2:0.25", "chi2:0.5", "chi2:1", "kl:0.5", "tv:0.5"])
    p.add_argument("--runs", nargs="*", default=[], help="sweep folders (one per estimator) to compare with")
    p.add_argument("--fixed-points", action="store_true", help="simulate where each estimator settles")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="K of the runs")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch of the runs")
    p.add_argument("--split", default="test_uniform")
    a = p.parse_args()
    equal = a.c / (1 + a.c)
    print(f"minority share {MINORITY}, beta {a.beta}, p_ref {a.p_ref}, c {a.c}: groups equal at p = {equal:.3f}")
    logit = lambda x: math.log(x / (1 - x))
    q_equalise = (a.c + a.beta * (logit(equal) - logit(a.p_ref))) / (1 + a.c)  # p(q) = c / (1 + c)
    for kind in ("chi2", "kl", "tv", "cvar"):
        start, full = threshold(kind, equal), threshold(kind, q_equalise)
        print(f"{kind}: refuses more than the reference above rho = {start:.3f}, equalises the groups above {full:.3f}")
    print("\n| setting | worst-case minority mass | predicted p* (x 100) | predicted worst-group gold (x 100) |")
    print("|---|---|---|---|")
    for s in a.settings:
        kind, rho = s.split(":")[0], float(s.split(":")[1])
        q = q_max(kind, rho)
        pstar = max_min_policy(q, a.p_ref, a.beta, a.c)
        print(f"| {s} | {q:.3f} | {100 * pstar:.1f} | {100 * min(pstar, a.c * (1 - pstar)):.1f} |")
    for folder in a.runs:
        runs = measured(folder, a.split)
        print(f"\n{folder}, {a.split} (seeds as found): the prediction from each seed's own reference (p_ref, c)")
        # the weights' estimator, from the folder's name: the critic's V(x) cannot see the group, so "values" weights
        # carry no information about it and settle where ERM does
        estimator = "loo" if "loo" in folder else "erm" if "values" in folder else "returns"
        print(
            "| setting | p_ref | p measured | p* predicted | where the estimator settles "
            "| worst-group gold measured | predicted |"
        )
        print("|---|---|---|---|---|---|---|")
        for s in [s for s in a.settings if s in runs] + sorted(set(runs) - set(a.settings)):
            kind, rho = s.split(":")[0], float(s.split(":")[1])
            pred = [max_min_policy(q_max(kind, rho), pr, a.beta, c) for pr, c, _, _ in runs[s]]
            p_ref, c = statistics.mean(r[0] for r in runs[s]), statistics.mean(r[1] for r in runs[s])
            k, prompts = a.samples_per_prompt, a.batch_size
            settles = fixed_point(kind, rho, "erm" if kind == "erm" else estimator, k, prompts, p_ref, a.beta, c)
            cells = [
                fmt([r[0] for r in runs[s]]),
                fmt([r[2] for r in runs[s]]),
                fmt(pred),
                f"{100 * settles:.1f}",
                fmt([r[3] for r in runs[s]]),
                fmt([min(ps, c * (1 - ps)) for ps, (_, c, _, _) in zip(pred, runs[s])]),
            ]
            print(f"| {s} | " + " | ".join(cells) + " |")
    if a.fixed_points:
        k, prompts = a.samples_per_prompt, a.batch_size
        print(f"\nwhere each estimator settles ({prompts} prompts x {k} samples, p_ref {a.p_ref}, c {a.c}):")
        print("| setting | population p* | returns | loo |")
        print("|---|---|---|---|")
        for s in a.settings:
            kind, rho = s.split(":")[0], float(s.split(":")[1])
            pstar = max_min_policy(q_max(kind, rho), a.p_ref, a.beta, a.c)
            cells = [fixed_point(kind, rho, e, k, prompts, a.p_ref, a.beta, a.c) for e in ("returns", "loo")]
            print(f"| {s} | {100 * pstar:.1f} | " + " | ".join(f"{100 * x:.1f}" for x in cells) + " |")
