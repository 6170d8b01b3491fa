"""Where the worst-case weights go: train an ERM reward model briefly, then, over many training batches,
report which prompts receive each kind's largest weights (their domain, and whether the shortcut marker
agrees with the label) and the weight's size.

    python bench/tv_weights.py

Losses and weights are dro_reward.py's: `dro_reward.pair_losses`, then `robust.robust_prompt_weights` over the
batch's prompt ids (the worst case is over prompts; a prompt's pairs share its weight). The ERM training steps
are the script's with --dro.kind erm (uniform over the batch's prompts, gradient clipping) at its learning rate.
"""

import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import AutoModelForSequenceClassification  # noqa: E402

import common  # noqa: E402
import dro_reward  # noqa: E402
import robust  # noqa: E402

BATCH, ERM_STEPS, BATCHES = 64, 400, 100

if __name__ == "__main__":
    args = dro_reward.Args()
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    pad_id = tok.pad_token_id
    rows, data = common.load_pairs("synthetic", "train", tok, args.max_length)
    agrees = [c.endswith(common.SHORTCUT) for c in rows["chosen"]]
    groups_of = [
        d + (" (shortcut disagrees)" if not a and d in ("chat", "safety") else "")
        for d, a in zip(data["domain"], agrees)
    ]
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    model.config.pad_token_id = pad_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    erm = robust.DROArgs("erm", 0.0)
    for _ in range(ERM_STEPS):  # ERM, as at 40% of the default budget
        idx = torch.randint(0, len(data["chosen"]), (BATCH,)).tolist()
        losses, _, _ = dro_reward.pair_losses(model, data, idx, pad_id)
        prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx])
        weights, _ = robust.robust_prompt_weights(losses.detach(), prompt_ids, erm)
        (weights * losses).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    settings = [("tv", 0.1), ("tv", 0.3), ("chi2", 0.5), ("cvar", 1.0)]
    mass = {s: collections.Counter() for s in settings}
    with torch.no_grad():
        for _ in range(BATCHES):
            idx = torch.randint(0, len(data["chosen"]), (BATCH,)).tolist()
            losses, _, _ = dro_reward.pair_losses(model, data, idx, pad_id)
            prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx])
            for kind, rho in settings:
                q, stats = robust.robust_prompt_weights(losses, prompt_ids, robust.DROArgs(kind, rho))
                for i, w in zip(idx, q.tolist()):
                    mass[(kind, rho)][groups_of[i]] += w / BATCHES
                mass[(kind, rho)]["max weight x B"] += stats["dro/max_weight_x_B"] / BATCHES  # B: prompts in the batch
    groups = sorted({g for m in mass.values() for g in m if g != "max weight x B"})
    print(f"share of the worst-case weight by prompt group, after {ERM_STEPS} ERM steps (uniform = share of the data):")
    print("| group | uniform | " + " | ".join(f"{k} {r}" for k, r in settings) + " |")
    print("|---" * (len(settings) + 2) + "|")
    share = collections.Counter(groups_of)
    for g in groups:
        print(f"| {g} | {share[g] / len(groups_of):.3f} | " + " | ".join(f"{mass[s][g]:.3f}" for s in settings) + " |")
    print("| mean max weight x B | 1 | " + " | ".join(f"{mass[s]['max weight x B']:.1f}" for s in settings) + " |")
