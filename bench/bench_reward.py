"""Cost of robustness in dro_reward.py, measured side by side in one run.

    python bench/bench_reward.py

1. Step time of the tiny reward model at batch 64 for every kind against ERM. A step is the body of
   dro_reward.py's training loop with one micro-batch: `dro_reward.pair_losses` (chosen and rejected in one
   forward), `common.robust_prompt_weights` over the batch's prompt ids, backward of sum_i q_i l_i, gradient
   clipping, the finiteness check, AdamW and the scheduler, at the script's defaults. Kinds are interleaved step
   by step in a rotating order, so machine noise hits all alike; we report the ratio of medians (target <= 1.02)
   and the time of the weights alone.
2. `common.robust_weights` on 1e6 losses for every kind (target < 0.1 s).
"""

import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, get_scheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_reward  # noqa: E402

SETTINGS = [("erm", 0.0), ("tv", 0.2), ("chi2", 0.5), ("kl", 0.5), ("cvar", 1.0)]
BATCH, BATCHES, REPS, WARMUP = 64, 20, 60, 10

if __name__ == "__main__":
    args = dro_reward.Args()  # the script's defaults: learning rate, scheduler, clipping, max length
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    pad_id = tok.pad_token_id
    _, data = common.load_pairs("synthetic", "train", tok, args.max_length, max_rows=BATCH * BATCHES)
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    model.config.pad_token_id = pad_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type, opt, num_warmup_steps=args.warmup_steps, num_training_steps=REPS * len(SETTINGS)
    )
    times = {s: [] for s in SETTINGS}
    for rep in range(REPS):
        b = rep % BATCHES
        idx = list(range(BATCH * b, BATCH * (b + 1)))
        for kind, rho in SETTINGS[rep % 5 :] + SETTINGS[: rep % 5]:  # rotate the order: no kind always runs first
            dro = common.DROArgs(kind, rho)
            t = time.perf_counter()
            losses, chosen_rewards, rejected_rewards = dro_reward.pair_losses(model, data, idx, pad_id)
            prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx])
            weights, _ = common.robust_prompt_weights(losses.detach(), prompt_ids, dro)
            loss = (weights * losses).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()}")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if torch.isfinite(grad_norm):
                opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            if rep >= WARMUP:
                times[(kind, rho)].append(time.perf_counter() - t)
    erm = statistics.median(times[("erm", 0.0)])
    print(
        f"step time at batch {BATCH} (tiny reward model, {torch.get_num_threads()} threads), "
        f"median of {len(times[('erm', 0.0)])}:"
    )
    print("| kind | rho | step ms | robust / ERM | robust_prompt_weights alone, ms |\n|---|---|---|---|---|")
    losses = torch.rand(BATCH)
    prompt_ids = torch.tensor(data["prompt_id"][:BATCH])  # the first batch's prompts, some repeated
    for (kind, rho), ts in times.items():
        t = time.perf_counter()
        for _ in range(200):
            common.robust_prompt_weights(losses, prompt_ids, common.DROArgs(kind, rho))
        weights_ms = (time.perf_counter() - t) / 200 * 1000
        step_s = statistics.median(ts)
        print(f"| {kind} | {rho} | {1000 * step_s:.1f} | {step_s / erm:.3f} | {weights_ms:.2f} |")

    losses = torch.rand(10**6) * 5
    print("\nrobust_weights on 1e6 losses (best of 5):\n| kind | rho | seconds |\n|---|---|---|")
    for kind, rho in SETTINGS:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            common.robust_weights(losses, kind, rho)
            runs.append(time.perf_counter() - t)
        print(f"| {kind} | {rho} | {min(runs):.4f} |")
