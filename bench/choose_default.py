"""The rule that picks the default robust setting, without looking at the OOD test splits:
the setting with the best mean (over seeds) worst-domain accuracy on the in-distribution *validation* split.

    python bench/choose_default.py runs/sweep_dro_reward 1000
"""

import collections
import glob
import json
import os
import statistics
import sys

if __name__ == "__main__":
    folder, steps = sys.argv[1], int(sys.argv[2])
    scores = collections.defaultdict(list)
    for run in sorted(glob.glob(os.path.join(folder, f"*_n{steps}"))):
        if not os.path.exists(os.path.join(run, "args.json")):  # unfinished
            continue
        setting = os.path.basename(run).rsplit("_s", 1)[0]
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        last = max(r["step"] for r in rows)
        scores[setting] += [
            r["worst_domain_accuracy"] for r in rows if r["step"] == last and r["split"] == "validation"
        ]
    for setting, s in sorted(scores.items(), key=lambda kv: -statistics.mean(kv[1])):
        print(f"{setting:>10}: validation worst-domain accuracy {100 * statistics.mean(s):.1f} over {len(s)} seeds")
    print("chosen:", max(scores, key=lambda k: statistics.mean(scores[k])))
