"""Run a script over kinds, radii and seeds on the embedded benchmark and print the results tables.

    python bench/sweep.py                      # the reward-model table (about 30 min on 2 cores)
    python bench/sweep.py --steps 4000 --settings erm:0 chi2:0.5   # its 4x budget check
    python bench/sweep.py --script dro_dpo.py --steps 600 --settings erm:0 chi2:0.5 chi2:1 --metric gold_reward

Runs go to runs/sweep_<script>[_<tag>]/<kind>-<rho>_s<seed>_n<steps> (e.g. chi2-0.5_s1_n1000, as run ids read);
finished runs (with args.json) are reused, also under the names of earlier sweeps (chi20.5_s1_n1000), an unfinished
one is run again from the start (--overwrite). Two runs at a time, one thread each. Prints, for each
setting, mean +- std over seeds of the per-domain accuracy on the in-distribution validation split (used to choose
the default) and on the shifted test_uniform split.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["erm:0", "tv:0.1", "tv:0.3", "chi2:0.25", "chi2:0.5", "chi2:1", "kl:0.5", "cvar:1"]


def run_folder(folder, kind, rho, seed, steps):
    """runs/<folder>/<kind>-<rho>_s<seed>_n<steps>, or a finished run of an earlier sweep named <kind><rho>_s..."""
    old = os.path.join(ROOT, "runs", folder, f"{kind}{rho}_s{seed}_n{steps}")
    new = os.path.join(ROOT, "runs", folder, f"{kind}-{rho}_s{seed}_n{steps}")
    return old if os.path.exists(os.path.join(old, "args.json")) else new


def run(kind, rho, seed, steps, script, extra, steps_flag="--total-steps", tag="", keep_model=False):
    folder = f"sweep_{os.path.basename(script)[:-3]}" + (f"_{tag}" if tag else "")
    out = run_folder(folder, kind, rho, seed, steps)
    if not os.path.exists(os.path.join(out, "args.json")):
        cmd = [
            sys.executable,
            os.path.join(ROOT, script),
            "--dro.kind",
            kind,
            "--dro.rho",
            rho,
            "--seed",
            str(seed),
            steps_flag,
            str(steps),
            "--output-dir",
            out,
            *([] if keep_model else ["--no-save-model"]),
            "--overwrite",
            *(flag.replace("{seed}", str(seed)) for flag in extra),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last = max(r["step"] for r in rows)
    return {
        **{r["split"]: r for r in rows if r["step"] == last},
        "step 0": {r["split"]: r for r in rows if not r["step"]},
    }


def fmt(values, pct=100.0):
    """mean ± std over seeds, in % for accuracies and gold rewards (gold rewards lie in [0, 1])"""
    if len(values) == 1:
        return f"{pct * values[0]:.1f}"
    return f"{pct * statistics.mean(values):.1f} ± {pct * statistics.stdev(values):.1f}"


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--settings", nargs="+", default=DEFAULT, help="kind:rho pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--script", default="dro_reward.py")
    p.add_argument("--steps-flag", default="--total-steps", help="the script's budget flag")
    p.add_argument("--metric", default="accuracy")
    p.add_argument("--splits", nargs="+", default=["validation", "test_uniform"])
    p.add_argument("--tag", default="", help="suffix of the runs folder: give one per set of --extra flags")
    p.add_argument("--keep-models", action="store_true", help="save each run's model (e.g. reward models for PPO)")
    p.add_argument("--scalar", default="", help="also print the mean over training of this TensorBoard scalar")
    p.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="more flags for the script; {seed} becomes the run's seed"
    )
    a = p.parse_args()
    jobs = [(s.split(":")[0], s.split(":")[1], seed) for s in a.settings for seed in a.seeds]
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda j: run(*j, a.steps, a.script, a.extra, a.steps_flag, a.tag, a.keep_models), jobs)
        )
    m = a.metric
    for split in a.splits:
        domains = sorted(results[0][split][f"domain_{m}"])
        print(f"\n{split} ({a.steps} steps, seeds {a.seeds}): {m}, mean ± std over seeds")
        has_kl = "kl" in results[0][split]
        print("| setting | " + " | ".join(domains) + " | mean | worst |" + (" KL to ref |" if has_kl else ""))
        print("|---" * (len(domains) + 3 + has_kl) + "|")
        rows = [(s, [r[split] for (kind, rho, _), r in zip(jobs, results) if f"{kind}:{rho}" == s]) for s in a.settings]
        if has_kl:  # the reference policy (warm-started; the same for every setting of a seed) at step 0
            first = a.settings[0]
            rows.insert(
                0,
                (
                    "step 0",
                    [r["step 0"][split] for (kind, rho, _), r in zip(jobs, results) if f"{kind}:{rho}" == first],
                ),
            )
        for s, rs in rows:
            cells = [fmt([r[f"domain_{m}"][d] for r in rs]) for d in domains]
            means = [statistics.mean(r[f"domain_{m}"].values()) for r in rs]
            kl = f" {fmt([r['kl'] for r in rs], pct=1.0)} |" if has_kl else ""
            worst = fmt([r[f"worst_domain_{m}"] for r in rs])
            print(f"| {s} | " + " | ".join(cells) + f" | {fmt(means)} | {worst} |" + kl)
    if a.scalar:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        folder = f"sweep_{os.path.basename(a.script)[:-3]}" + (f"_{a.tag}" if a.tag else "")
        print(f"\n{a.scalar}, mean over the {a.steps} steps of each run, mean ± std over seeds")
        for s in a.settings:
            means = []
            for kind, rho, seed in (j for j in jobs if f"{j[0]}:{j[1]}" == s):
                events = EventAccumulator(run_folder(folder, kind, rho, seed, a.steps))
                events.Reload()
                means.append(statistics.mean(e.value for e in events.Scalars(a.scalar)))
            spread = f" ± {statistics.stdev(means):.3f}" if len(means) > 1 else ""
            print(f"| {s} | {statistics.mean(means):.3f}{spread} |")
