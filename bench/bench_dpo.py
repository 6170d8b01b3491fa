"""dro_dpo.py against TRL's DPOTrainer, measured side by side in one run.

    pip install -r requirements-bench.txt && python bench/bench_dpo.py

Same tiny Llama (same initial weights), same 1,280 synthetic pairs, batch 64, fp32, the reference model in
memory, AdamW at the same constant learning rate, gradients clipped at norm 1 (both trainers' default), on the
CPU; ours is the body of dro_dpo.py's training loop (`dro_dpo.pair_losses`, `robust.robust_prompt_weights`).
Each measurement runs in a fresh subprocess, ours and TRL's alternating (3 rounds), so machine noise hits both
alike. Reported: training pairs per second (median over rounds; TRL's own train_runtime, data already
tokenized) and the growth of the peak resident memory during training, counted from after one warm-up step for
both (CPU memory: a coarse measure). Then the robust/ERM step-time ratio of dro_dpo.py for each kind, kinds in
alternation, 3 rounds.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STEPS, BATCH, BETA, LR, MAX_GRAD_NORM = 40, 64, 0.1, 1e-4, 1.0  # dro_dpo.py's defaults


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def setup():
    import torch
    from transformers import AutoModelForCausalLM

    import common
    import ingest

    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    rows = ingest.load_preferences("synthetic", "train", tok, max_rows=STEPS * BATCH // 2)
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    ref = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    ref.load_state_dict(policy.state_dict())
    for model in (policy, ref):
        model.config.pad_token_id = tok.pad_token_id  # as dro_dpo.py sets it
    return tok, rows, policy, ref.eval().requires_grad_(False)


def ours(kind="erm", rho=0.0):
    """The body of dro_dpo.py's training loop with one micro-batch on one process: `dro_dpo.pair_losses` (the
    reference's no-grad forward first, then the policy's), `robust.robust_prompt_weights` over the batch's prompt
    ids, backward of sum_i q_i l_i, clipping at --max-grad-norm, the finiteness check, AdamW and the scheduler
    (constant here, as TRL's)."""
    import torch
    from transformers import get_scheduler

    import common
    import robust
    from dro_dpo import pair_losses

    tok, rows, policy, ref = setup()
    data = common.tokenize_preferences(rows, tok, 64, "synthetic")
    pad_id = tok.pad_token_id
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, fused=True)
    scheduler = get_scheduler("constant", opt)
    n, dro = len(data["chosen"]), robust.DROArgs(kind, rho)
    base, t = None, None
    for step in range(-1, STEPS):  # step -1 warms up; memory and time count from step 0
        if step == 0:
            base, t = rss_mb(), time.perf_counter()
        idx = [(step * BATCH + i) % n for i in range(BATCH)]
        losses, _, _ = pair_losses(policy, ref, data, idx, pad_id, BETA)
        prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx])
        weights, _ = robust.robust_prompt_weights(losses.detach(), prompt_ids, dro)
        loss = (weights * losses).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        if torch.isfinite(grad_norm):
            opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
    return STEPS * BATCH / (time.perf_counter() - t), base


def trl():
    from trl import DPOConfig, DPOTrainer

    tok, rows, policy, ref = setup()
    rows = rows.remove_columns(["domain", "chat", "margin", "row", "where"])
    rows = rows.select([i % len(rows) for i in range(STEPS * BATCH)])
    with tempfile.TemporaryDirectory() as out:

        def trainer(steps):
            config = DPOConfig(
                output_dir=out,
                per_device_train_batch_size=BATCH,
                max_steps=steps,
                learning_rate=LR,
                beta=BETA,
                max_grad_norm=MAX_GRAD_NORM,
                lr_scheduler_type="constant",
                warmup_steps=0,
                max_length=64,
                logging_steps=10_000,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                dataloader_num_workers=0,
                seed=0,
            )
            return DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=rows, processing_class=tok)

        trainer(1).train()  # warm-up step, as for ours
        timed = trainer(STEPS)
        base = rss_mb()
        metrics = timed.train().metrics
    return STEPS * BATCH / metrics["train_runtime"], base


def child(which):
    rate, base = ours() if which == "ours" else trl()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pairs_per_s": rate, "peak_growth_mb": peak - base}))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
        sys.exit()
    results = {"ours": [], "trl": []}
    for _ in range(3):
        for which in results:
            out = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    print(
        f"DPO training, tiny Llama, batch {BATCH}, fp32, CPU, {torch.get_num_threads()} threads, {STEPS} steps, "
        f"3 rounds:"
    )
    print("| trainer | pairs/s (median) | peak memory growth MB (median) |\n|---|---|---|")
    med = {
        k: (statistics.median(r["pairs_per_s"] for r in v), statistics.median(r["peak_growth_mb"] for r in v))
        for k, v in results.items()
    }
    for k, (rate, mem) in med.items():
        print(f"| {'dro_dpo.py (rho = 0)' if k == 'ours' else 'TRL DPOTrainer'} | {rate:.0f} | {mem:.0f} |")
    print(
        f"speed ratio ours / TRL: {med['ours'][0] / med['trl'][0]:.2f}x; "
        f"memory ratio: {med['ours'][1] / max(med['trl'][1], 1e-9):.2f}"
    )

    # robust / ERM step time of dro_dpo.py, interleaved
    times = {}
    for _ in range(3):
        for kind, rho in [("erm", 0.0), ("tv", 0.2), ("chi2", 0.5), ("kl", 0.5), ("cvar", 1.0)]:
            times.setdefault((kind, rho), []).append(ours(kind, rho)[0])
    erm = statistics.median(times[("erm", 0.0)])
    print("\n| kind | rho | pairs/s | step time robust / ERM |\n|---|---|---|---|")
    for (kind, rho), rates in times.items():
        print(f"| {kind} | {rho} | {statistics.median(rates):.0f} | {erm / statistics.median(rates):.3f} |")
