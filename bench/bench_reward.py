"""Cost of robustness in dro_reward.py, measured side by side in one run.

    python bench/bench_reward.py

1. Step time (forward + robust weights + backward + AdamW) of the tiny reward model at batch 64 for every
   kind against ERM. Kinds are interleaved step by step in a rotating order, so machine noise hits all
   alike; we report the ratio of medians (target <= 1.02) and the time of the weights alone.
2. `common.robust_weights` on 1e6 losses for every kind (target < 0.1 s).
"""

import statistics
import sys
import time
import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from dro_reward import bt_scores  # noqa: E402

SETTINGS = [("erm", 0.0), ("tv", 0.2), ("chi2", 0.5), ("kl", 0.5), ("cvar", 1.0)]

if __name__ == "__main__":
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    rows = common.load_preferences("synthetic", "train", tok, max_rows=64 * 20)
    data = common.tokenize_preferences(rows, tok, 64, "synthetic")
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = {s: [] for s in SETTINGS}
    for rep in range(60):
        b = rep % 20
        idx = list(range(64 * b, 64 * (b + 1)))
        for kind, rho in SETTINGS[rep % 5:] + SETTINGS[: rep % 5]:  # rotate the order: no kind always runs first
            t = time.perf_counter()
            r_c, r_r = bt_scores(model, [data["chosen"][i] for i in idx], [data["rejected"][i] for i in idx], tok.pad_token_id)
            losses = -F.logsigmoid(r_c - r_r)
            w, _ = common.robust_pair_weights(losses.detach(), torch.tensor([data["group"][i] for i in idx]), common.DROArgs(kind, rho))
            (w * losses).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep >= 10:  # warm-up
                times[(kind, rho)].append(time.perf_counter() - t)
    erm = statistics.median(times[("erm", 0.0)])
    print(f"step time at batch 64 (tiny reward model, {torch.get_num_threads()} threads), median of {len(times[('erm', 0.0)])}:")
    print("| kind | rho | step ms | robust / ERM | robust_pair_weights alone, ms |\n|---|---|---|---|---|")
    losses, groups = torch.rand(64), torch.arange(64)
    for (kind, rho), ts in times.items():
        t = time.perf_counter()
        for _ in range(200):
            common.robust_pair_weights(losses, groups, common.DROArgs(kind, rho))
        weights_ms = (time.perf_counter() - t) / 200 * 1000
        print(f"| {kind} | {rho} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / erm:.3f} | {weights_ms:.2f} |")

    losses = torch.rand(10**6) * 5
    print("\nrobust_weights on 1e6 losses (best of 5):\n| kind | rho | seconds |\n|---|---|---|")
    for kind, rho in SETTINGS:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            common.robust_weights(losses, kind, rho)
            runs.append(time.perf_counter() - t)
        print(f"| {kind} | {rho} | {min(runs):.4f} |")
