"""Where the worst-case weights go: train an ERM reward model briefly, then, over many training batches,
report which prompts receive each kind's largest weights (their domain, and whether the shortcut marker
agrees with the label) and the weight's size.

    python bench/tv_weights.py
"""

import collections
import os
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from dro_reward import bt_scores  # noqa: E402

if __name__ == "__main__":
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    rows = common.load_preferences("synthetic", "train", tok)
    data = common.tokenize_preferences(rows, tok, 64, "synthetic")
    agrees = [c.endswith(common.SHORTCUT) for c in rows["chosen"]]
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(400):  # ERM, as at 40% of the default budget
        idx = torch.randint(0, len(rows), (64,)).tolist()
        r_c, r_r = bt_scores(model, [data["chosen"][i] for i in idx], [data["rejected"][i] for i in idx], tok.pad_token_id)
        (-F.logsigmoid(r_c - r_r)).mean().backward()
        opt.step()
        opt.zero_grad()
    settings = [("tv", 0.1), ("tv", 0.3), ("chi2", 0.5), ("cvar", 1.0)]
    mass = {s: collections.Counter() for s in settings}
    with torch.no_grad():
        for _ in range(100):
            idx = torch.randint(0, len(rows), (64,)).tolist()
            r_c, r_r = bt_scores(model, [data["chosen"][i] for i in idx], [data["rejected"][i] for i in idx], tok.pad_token_id)
            losses = -F.logsigmoid(r_c - r_r)
            for kind, rho in settings:
                q = common.robust_weights(losses, kind, rho)
                for i, w in zip(idx, q.tolist()):
                    group = rows[i]["domain"] + (" (shortcut disagrees)" if not agrees[i] and rows[i]["domain"] in ("chat", "safety") else "")
                    mass[(kind, rho)][group] += w / 100
                mass[(kind, rho)]["max weight x B"] += q.max().item() * 64 / 100
    groups = sorted({g for m in mass.values() for g in m if g != "max weight x B"})
    print("share of the worst-case weight by prompt group, after 400 ERM steps (uniform = share of the data):")
    print("| group | uniform | " + " | ".join(f"{k} {r}" for k, r in settings) + " |")
    print("|---" * (len(settings) + 2) + "|")
    share = collections.Counter()
    for i in range(len(rows)):
        g = rows[i]["domain"] + (" (shortcut disagrees)" if not agrees[i] and rows[i]["domain"] in ("chat", "safety") else "")
        share[g] += 1 / len(rows)
    for g in groups:
        print(f"| {g} | {share[g]:.3f} | " + " | ".join(f"{mass[s][g]:.3f}" for s in settings) + " |")
    print("| mean max weight x B | 1 | " + " | ".join(f"{mass[s]['max weight x B']:.1f}" for s in settings) + " |")
