"""Cost of robustness in dro_reward.py, measured side by side in one run.

    python bench/bench_reward.py

1. Step time of the tiny reward model at batch 64 for every kind against ERM. A step is the body of
   dro_reward.py's training loop with one micro-batch: `dro_reward.pair_losses` (chosen and rejected in one
   forward), `robust.robust_prompt_weights` over the batch's prompt ids, backward of sum_i q_i l_i, gradient
   clipping, the finiteness check, AdamW and the scheduler, at the script's defaults. Kinds are interleaved step
   by step in a rotating order, so machine noise hits all alike; we report the ratio of medians (target <= 1.02)
   and the time of the weights alone.
2. `robust.robust_weights` on 1e6 losses for every kind (target < 0.1 s).
3. dro_reward.py against TRL's RewardTrainer (target: ours >= 1.3x), side by side like bench/bench_dpo.py: the
   same tiny reward model (same initial weights), the same embedded synthetic pairs
   (`ingest.load_preferences("synthetic", "train", ...)`), batch 64, fp32, AdamW at the same learning rate and
   weight decay, a constant schedule, clipping at 1, on the CPU; ours is the loop body of 1. at rho = 0. Each
   measurement runs in a fresh subprocess, ours and TRL's alternating, 3 rounds; after one warm-up step the clock
   runs to the end of the last step, data loading and collation included (for TRL from a callback at the end of
   its first step). Reported: training pairs per second (median over rounds).

    python bench/bench_reward.py --only-trl      # section 3 alone
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification, get_scheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_reward  # noqa: E402
import ingest  # noqa: E402
import robust  # noqa: E402

SETTINGS = [("erm", 0.0), ("tv", 0.2), ("chi2", 0.5), ("kl", 0.5), ("cvar", 1.0)]
BATCH, BATCHES, REPS, WARMUP = 64, 20, 60, 10
TRL_STEPS, TRL_ROUNDS = 30, 3


def tiny_reward_model(tok):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    model.config.pad_token_id = tok.pad_token_id
    return model


def train_step(model, data, idx, pad_id, dro, opt, scheduler, max_grad_norm):
    """The body of dro_reward.py's training loop with one micro-batch on one process."""
    losses, _, _ = dro_reward.pair_losses(model, data, idx, pad_id)
    prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx])
    weights, _ = robust.robust_prompt_weights(losses.detach(), prompt_ids, dro)
    loss = (weights * losses).sum()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if torch.isfinite(grad_norm):
        opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)


def vs_trl_ours(steps):
    """Pairs per second of dro_reward.py's loop body (ERM) after one warm-up step."""
    args = dro_reward.Args()
    tok = common.tiny_tokenizer()
    rows = ingest.load_preferences("synthetic", "train", tok, max_rows=(steps + 1) * BATCH)
    data = common.tokenize_preferences(rows, tok, args.max_length, "synthetic")
    model = tiny_reward_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = get_scheduler("constant", opt)
    dro, pad_id, n = robust.DROArgs("erm", 0.0), tok.pad_token_id, len(data["chosen"])
    for step in range(-1, steps):
        if step == 0:
            t = time.perf_counter()
        idx = [((step + 1) * BATCH + i) % n for i in range(BATCH)]
        train_step(model, data, idx, pad_id, dro, opt, scheduler, args.max_grad_norm)
    return steps * BATCH / (time.perf_counter() - t)


def vs_trl_trl(steps):
    """Pairs per second of TRL's RewardTrainer on the same rows, from the end of its first step to its last."""
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    args = dro_reward.Args()
    tok = common.tiny_tokenizer()
    rows = ingest.load_preferences("synthetic", "train", tok, max_rows=(steps + 1) * BATCH)
    rows = rows.select_columns(["prompt", "chosen", "rejected"])
    model = tiny_reward_model(tok)
    clock = {}

    class Timing(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps + 1,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_length=args.max_length,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = RewardTrainer(
            model=model, args=config, train_dataset=rows, processing_class=tok, callbacks=[Timing()]
        )
        trainer.train()
    return steps * BATCH / (clock[steps + 1] - clock[1])


def vs_trl():
    rates = {"ours": [], "trl": []}
    for r in range(TRL_ROUNDS):
        for which in ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--vs-trl-child", which],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rates[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, trl = statistics.median(rates["ours"]), statistics.median(rates["trl"])
    print(
        f"\nreward model training, tiny Llama, batch {BATCH}, fp32, CPU, {torch.get_num_threads()} threads, "
        f"{TRL_STEPS} steps after 1 warm-up, {TRL_ROUNDS} rounds:"
    )
    print("| trainer | pairs/s (median) | all rounds |\n|---|---|---|")
    print(f"| dro_reward.py (rho = 0) | {ours:.0f} | {', '.join(f'{x:.0f}' for x in rates['ours'])} |")
    print(f"| TRL RewardTrainer | {trl:.0f} | {', '.join(f'{x:.0f}' for x in rates['trl'])} |")
    print(f"speed ratio ours / TRL: {ours / trl:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--vs-trl-child"]:
        print(json.dumps(vs_trl_ours(TRL_STEPS) if sys.argv[2] == "ours" else vs_trl_trl(TRL_STEPS)))
        sys.exit()
    if sys.argv[1:2] == ["--only-trl"]:
        vs_trl()
        sys.exit()
    args = dro_reward.Args()  # the script's defaults: learning rate, scheduler, clipping, max length
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    pad_id = tok.pad_token_id
    _, data = common.load_pairs("synthetic", "train", tok, args.max_length, max_rows=BATCH * BATCHES)
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    model.config.pad_token_id = pad_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = get_scheduler(
        args.lr_scheduler_type, opt, num_warmup_steps=args.warmup_steps, num_training_steps=REPS * len(SETTINGS)
    )
    times = {s: [] for s in SETTINGS}
    for rep in range(REPS):
        b = rep % BATCHES
        idx = list(range(BATCH * b, BATCH * (b + 1)))
        for kind, rho in SETTINGS[rep % 5 :] + SETTINGS[: rep % 5]:  # rotate the order: no kind always runs first
            dro = robust.DROArgs(kind, rho)
            t = time.perf_counter()
            train_step(model, data, idx, pad_id, dro, opt, scheduler, args.max_grad_norm)
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
            robust.robust_prompt_weights(losses, prompt_ids, robust.DROArgs(kind, rho))
        weights_ms = (time.perf_counter() - t) / 200 * 1000
        step_s = statistics.median(ts)
        print(f"| {kind} | {rho} | {1000 * step_s:.1f} | {step_s / erm:.3f} | {weights_ms:.2f} |")

    losses = torch.rand(10**6) * 5
    print("\nrobust_weights on 1e6 losses (best of 5):\n| kind | rho | seconds |\n|---|---|---|")
    for kind, rho in SETTINGS:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            robust.robust_weights(losses, kind, rho)
            runs.append(time.perf_counter() - t)
        print(f"| {kind} | {rho} | {min(runs):.4f} |")

    vs_trl()
