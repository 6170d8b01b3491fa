"""DPO, the reward model and PPO at a real vocabulary (Qwen2.5's 151,936 tokens): ours against TRL, side by side.

    OMP_NUM_THREADS=2 python bench/bench_vocab.py                       # CPU, all sections, 3 rounds (~10 min)
    python bench/bench_vocab.py --device cuda --size 0.5b --lengths 512 1024 --pairs 8 --bf16    # a GPU

The model: Qwen2.5's config with its real vocabulary (151,936 entries, tied embeddings) shrunk to fit the CPU
(--size cpu: 2 layers, hidden 64, intermediate 128, 4 heads / 2 KV heads: 9.8M parameters, 9.7M of them the
embedding), or Qwen2.5-0.5B's shape (--size 0.5b: 24 layers, hidden 896; 494M parameters), random weights. Token
ids drawn uniformly from the vocabulary (ids 0-2 reserved), a 64-token prompt and responses up to --lengths in
all. On the CPU the logits ([tokens, 151,936] floats) dominate everything else, as they do at 0.5B on a GPU.

(a) DPO, --pairs pairs per step, AdamW lr 1e-4, clipping 1, beta 0.1. Ours: dro_dpo.pair_losses (the reference
forward first, under no_grad; `common.token_logprobs` runs the output layer a chunk of positions at a time and
keeps only logit - logsumexp, never the [N, T, V] logits), robust weights, backward, clip, AdamW. TRL:
DPOTrainer's default with a frozen copy as ref_model (it runs offline only with one) on the same pre-tokenized pairs.
TRL 1.16's DPOTrainer has no `use_logits_to_keep` option and disables `padding_free` ("temporarily unavailable after
a refactor"), so its default is the only row.
(b) Reward model (sequence classification, num_labels=1): ours dro_reward.pair_losses against RewardTrainer on
the same pairs (full sequences as chosen_ids / rejected_ids). A reward model computes no vocabulary logits: only
its embedding table is vocabulary-sized, so this section checks that nothing else got worse. TRL's configs turn
gradient checkpointing on by default and the scripts do not, so both sides are also measured the other way (ours
with --gradient-checkpointing, RewardTrainer with gradient_checkpointing=False): setting for setting, the same bytes.
(c) PPO at the script's defaults (2 samples per prompt, 8 new tokens, 4 epochs x 2 minibatches, the gold reward)
on --ppo-prompts prompts: ours with --baseline rloo (no critic) and with the critic, against TRL's GRPOTrainer in
the same shape (bench_scale.py's GRPO runner). The byte-level tokenizer decodes the ids above 255 modulo 256, so
sampling runs over the full vocabulary.

Each measurement runs in a fresh subprocess; ours and TRL alternate; --rounds rounds, medians. Time: the timed steps
after one warm-up step; memory: one more step, measured apart, as in bench_scale.py (`Memory`: torch.profiler's
memory timeline on the CPU, max_memory_allocated on a GPU; "total" = everything held at the peak, "step" = its
growth over the step).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
import bench_scale as scale  # noqa: E402  (Memory, Clock, timed_trainer, trl_timing_callback, ppo_trl)

VOCAB, PROMPT, BETA, LR, MAX_GRAD_NORM = 151_936, 64, 0.1, 1e-4, 1.0


def qwen_config(size, num_labels=None):
    """Qwen2.5-0.5B's config (from its config.json), or shrunk for the CPU; the real vocabulary either way."""
    from transformers import Qwen2Config

    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    if size == "cpu":
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = Qwen2Config(
        vocab_size=VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **shape,
    )
    if num_labels:
        config.num_labels = num_labels
    return config


def wide_tokenizer():
    """The byte-level tokenizer, decoding ids beyond its 259 as bytes modulo 256 (for generations of the 152k
    model: the gold reward and TRL decode them)."""
    import common

    tok = common.tiny_tokenizer()
    tok.__class__ = type("WideByT5", (type(tok),), {"_convert_id_to_token": lambda s, i: chr((i - s.offset) % 256)})
    return tok


def new_model(kind, size, device, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if kind == "causal":
        model = AutoModelForCausalLM.from_config(qwen_config(size))
    else:
        model = AutoModelForSequenceClassification.from_config(qwen_config(size, num_labels=1))
    return model.to(device)


def pairs(n, length, seed=0):
    """n preference pairs of random token ids: a PROMPT-token prompt, a chosen response filling `length` and a
    rejected one 16 tokens shorter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, VOCAB, (k,), generator=gen).tolist()  # noqa: E731
    rows = [(ids(PROMPT), ids(length - PROMPT), ids(length - PROMPT - 16)) for _ in range(n)]
    return {
        "prompt": [p for p, _, _ in rows],
        "chosen": [p + c for p, c, _ in rows],
        "rejected": [p + r for p, _, r in rows],
        "prompt_len": [PROMPT] * n,
        "prompt_id": list(range(n)),
        "margin": [0.0] * n,
    }


def our_loop(step_loss, params, steps, batch, n, device, autocast):
    """The scripts' step: losses, robust weights (ERM), backward, clip, AdamW; timed and measured as bench_scale."""
    import torch

    import robust

    memory, clock = scale.Memory(device), scale.Clock(device)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    dro = robust.DROArgs("erm", 0.0)
    for step in range(-1, steps + 1):  # step -1 warms up, step `steps` measures the memory
        if step == 0:
            clock.timing, start = True, clock.now()
        if step == steps:
            seconds, clock.timing = clock.now() - start, False
            memory.start()
        idx = [((step + 1) * batch + i) % n for i in range(batch)]
        with autocast():
            losses = step_loss(idx)
        weights, _ = robust.robust_prompt_weights(losses.detach(), torch.arange(batch, device=device), dro)
        (weights * losses).sum().backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"seconds": seconds, **memory.stop()}


def autocast_for(bf16, device):
    import contextlib

    import torch

    return (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else contextlib.nullcontext


def dpo_ours(a, length, device):
    import copy

    from dro_dpo import pair_losses

    data = pairs((a.steps + 2) * a.pairs, length)
    model = new_model("causal", a.size, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    params = list(model.parameters())
    loss = lambda idx: pair_losses(model, reference, data, idx, 0, BETA)[0]  # noqa: E731
    return our_loop(loss, params, a.steps, a.pairs, len(data["chosen"]), device, autocast_for(a.bf16, device))


def reward_ours(a, length, device, checkpointing=False):
    import lifecycle
    from dro_reward import pair_losses

    data = pairs((a.steps + 2) * a.pairs, length)
    model = new_model("seq", a.size, device)
    if checkpointing:  # as dro_reward.py --gradient-checkpointing
        model = lifecycle.prepare_model(model, scale.script_args("gc"), "SEQ_CLS")
    model.train()
    params = list(model.parameters())
    loss = lambda idx: pair_losses(model, data, idx, 0)[0]  # noqa: E731
    return our_loop(loss, params, a.steps, a.pairs, len(data["chosen"]), device, autocast_for(a.bf16, device))


def trl_run(kind, a, length, device, checkpointing=True):
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    data = pairs((a.steps + 2) * a.pairs, length)
    memory, clock = scale.Memory(device), scale.Clock(device)
    options = scale.trl_args(
        device,
        per_device_train_batch_size=a.pairs,
        max_steps=a.steps + 2,
        learning_rate=LR,
        max_length=None,
        bf16=a.bf16,
        gradient_checkpointing=checkpointing,  # True is the default of both TRL configs
    )
    callbacks = [scale.trl_timing_callback(clock, memory, 1, a.steps + 1, a.steps + 2)]
    with tempfile.TemporaryDirectory() as out:
        if kind == "dpo":
            rows = Dataset.from_dict(
                {
                    "prompt_ids": data["prompt"],
                    "chosen_ids": [c[PROMPT:] for c in data["chosen"]],
                    "rejected_ids": [r[PROMPT:] for r in data["rejected"]],
                }
            )
            trainer_class = type("PreTokenized", (DPOTrainer,), {"_prepare_dataset": lambda self, ds, *_: ds})
            model = new_model("causal", a.size, device)
            ref = copy.deepcopy(model).eval().requires_grad_(False)
            config = DPOConfig(output_dir=out, beta=BETA, **options)
            kwargs = dict(ref_model=ref)
        else:
            rows = Dataset.from_dict({"chosen_ids": data["chosen"], "rejected_ids": data["rejected"]})
            trainer_class, model = RewardTrainer, new_model("seq", a.size, device)
            config, kwargs = RewardConfig(output_dir=out, **options), {}
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=rows,
            processing_class=wide_tokenizer(),
            callbacks=callbacks,
            **kwargs,
        )
        trainer.train()
    return {"seconds": clock.seconds, **clock.memory}


def ppo_ours(a, baseline, device):
    """One iteration of dro_ppo.py's loop (as bench_scale.ppo_ours) with --baseline critic or rloo."""
    import dataclasses

    import torch

    import common
    import dro_ppo
    import lifecycle

    args = dataclasses.replace(dro_ppo.Args(), batch_size=a.ppo_prompts, baseline=baseline, bf16=a.bf16)
    n, mb_size = args.batch_size * args.samples_per_prompt, args.batch_size * args.samples_per_prompt // 2
    tok = wide_tokenizer()
    pad_id = tok.pad_token_id
    train = dro_ppo.load_prompts("synthetic", "train", tok, 64, max_rows=(a.steps + 2) * a.ppo_prompts)
    memory, clock = scale.Memory(device), scale.Clock(device)
    policy = new_model("causal", a.size, device)
    critic = dro_ppo.Critic(policy).to(device) if baseline == "critic" else None
    reference = lifecycle.reference_policy(policy, args)
    models = [m for m in (policy, critic) if m is not None]
    optimizer = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=args.learning_rate, fused=True)
    end_ids = common.end_token_ids(tok, policy)
    config = common.sampling_config(tok, args.max_new_tokens, args.temperature, model=policy)
    for step in range(-1, a.steps + 1):
        if step == 0:
            clock.timing, start = True, clock.now()
        if step == a.steps:
            seconds, clock.timing = clock.now() - start, False
            memory.start()
        torch.manual_seed(step + 1)
        mine = list(range((step + 1) * a.ppo_prompts, (step + 2) * a.ppo_prompts))
        rollout = [i for i in mine for _ in range(args.samples_per_prompt)]
        with torch.no_grad(), lifecycle.autocast(args, device):
            ids, mask, responses, response_mask, ended = common.generate(
                policy, [train["ids"][i] for i in rollout], pad_id, end_ids, config
            )
            c = ids.shape[1] - responses.shape[1]
            logprobs = common.token_logprobs(policy, ids, mask, c, args.temperature)
            ref_logprobs = common.token_logprobs(reference, ids, mask, c, args.temperature)
            values = critic(ids, mask)[:, c - 1 : -1] if critic is not None else None
            scores = dro_ppo.rollout_scores(
                tok,
                None,
                [train["text"][i] for i in rollout],
                [train["domain"][i] for i in rollout],
                [train["chat"][i] for i in rollout],
                responses,
                response_mask,
            )
            scores = scores - args.missing_eos_penalty * (~ended).float()
            rewards = -args.kl_coef * common.kl_k3(logprobs, ref_logprobs) * response_mask
            rewards[torch.arange(len(rewards)), response_mask.sum(1) - 1] += scores
            if critic is not None:
                advantages, returns = dro_ppo.gae(rewards, values, response_mask, args.gamma, args.lam)
            else:
                advantages = dro_ppo.rloo_advantages(rewards.sum(1), args.samples_per_prompt)[:, None] * response_mask
            advantages = dro_ppo.masked_whiten(advantages, response_mask)
        for m in models:
            m.train()
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(n, device=device).split(mb_size):
                with lifecycle.autocast(args, device):
                    new_logprobs = common.token_logprobs(policy, ids[mb], mask[mb], c, args.temperature)
                    new = (None, None, None)
                    if critic is not None:
                        new = (critic(ids[mb], mask[mb])[:, c - 1 : -1], values[mb], returns[mb])
                pg, vf, _ = dro_ppo.ppo_loss(
                    new_logprobs, logprobs[mb], advantages[mb], *new, response_mask[mb], max_tokens=8
                )
                optimizer.zero_grad(set_to_none=True)
                (pg + args.vf_coef * vf).backward()
                for m in models:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), args.max_grad_norm)
                optimizer.step()
        for m in models:
            m.eval()
    return {"seconds": seconds, "rollouts": a.steps * n, **memory.stop()}


def ppo_trl(a, device):
    """bench_scale's GRPOTrainer runner on the 152k model and the wide tokenizer."""
    import common

    tok = wide_tokenizer()
    scale.new_model = lambda _, dev: new_model("causal", a.size, dev)
    common.tiny_tokenizer = lambda: tok
    return scale.ppo_trl("bf16" if a.bf16 else "fp32", a.steps, a.ppo_prompts, device)


# ----------------------------------------------------------------------------------------------
# Driver: fresh subprocesses, ours and TRL alternating; one markdown table
# ----------------------------------------------------------------------------------------------


def child(a):
    import torch

    device = torch.device(a.device)
    section, side, length = a.child
    length = int(length)
    if section == "ppo":
        result = ppo_trl(a, device) if side == "trl" else ppo_ours(a, side, device)
    elif side == "ours":
        result = (dpo_ours if section == "dpo" else reward_ours)(a, length, device)
    elif side == "ours-gc":
        result = reward_ours(a, length, device, checkpointing=True)
    else:
        result = trl_run(section, a, length, device, checkpointing=side == "trl")
    result.pop("split", None)
    print(json.dumps(result))


def run_child(a, section, side, length):
    flags = [
        "--steps",
        str(a.steps),
        "--pairs",
        str(a.pairs),
        "--ppo-prompts",
        str(a.ppo_prompts),
        "--size",
        a.size,
        "--device",
        a.device,
    ] + (["--bf16"] if a.bf16 else [])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", section, side, str(length), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


PLAN = {"dpo": ["ours", "trl"], "reward": ["ours", "ours-gc", "trl", "trl-no-gc"], "ppo": ["rloo", "critic", "trl"]}
NAMES = {
    ("dpo", "ours"): "dro_dpo.py",
    ("dpo", "trl"): "TRL DPOTrainer (default: gradient checkpointing)",
    ("reward", "ours"): "dro_reward.py",
    ("reward", "ours-gc"): "dro_reward.py --gradient-checkpointing",
    ("reward", "trl"): "TRL RewardTrainer (default: gradient checkpointing)",
    ("reward", "trl-no-gc"): "TRL RewardTrainer, gradient_checkpointing=False",
    ("ppo", "rloo"): "dro_ppo.py --baseline rloo",
    ("ppo", "critic"): "dro_ppo.py (critic)",
    ("ppo", "trl"): "TRL GRPOTrainer",
}


def table(results, a):
    """One markdown table: per section and length, each trainer's throughput and peak, and ours / TRL."""
    lines = [
        "| section | tokens per sequence | trainer | throughput (median) | peak MB total | peak MB step "
        "| throughput ours / TRL | peak total ours / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (section, length), sides in results.items():
        med = {}
        for side, rs in sides.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                med[side] = None
                lines.append(f"| {section} | {length} | {NAMES[section, side]} | failed: {rs[0]['error'][:120]} |||||")
                continue
            sec = statistics.median(r["seconds"] for r in ok)
            n = ok[0]["rollouts"] if section == "ppo" else a.steps * a.pairs
            med[side] = (n / sec, *(statistics.median(r[k] for r in ok) for k in ("mem_total_mb", "mem_step_mb")))
        trl = med.get("trl")
        for side, m in med.items():
            if m is None:
                continue
            unit = "rollouts/s" if section == "ppo" else "pairs/s"
            ratio = f"{m[0] / trl[0]:.2f}x | {m[1] / trl[1]:.2f}x" if trl and not side.startswith("trl") else " | "
            length_text = "prompt + 8" if section == "ppo" else str(length)
            lines.append(
                f"| {section} | {length_text} | {NAMES[section, side]} | {m[0]:.2f} {unit} | {m[1]:.0f} | {m[2]:.0f} "
                f"| {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", choices=["dpo", "reward", "ppo"], default=["dpo", "reward", "ppo"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps (PPO: iterations) after one warm-up")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="tokens per sequence (DPO, reward)")
    p.add_argument("--ppo-prompts", type=int, default=8, help="prompts per PPO rollout batch (x 2 samples)")
    p.add_argument("--size", choices=["cpu", "0.5b"], default="cpu", help="the Qwen2.5 shape (see the docstring)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (ours) / bf16=True (TRL)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        sys.exit()
    import torch

    head = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}, Qwen2.5 shape {a.size}, vocab "
        f"{VOCAB:,}, {'bf16' if a.bf16 else 'fp32'}, {a.pairs} pairs per step, {a.steps} timed steps after 1 warm-up, "
        f"median of {a.rounds} rounds"
    )
    print(head)
    results = {}
    for r in range(a.rounds):
        for section in a.sections:
            sides = PLAN[section]
            for length in [0] if section == "ppo" else a.lengths:
                for side in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                    t = time.time()
                    res = run_child(a, section, side, length)
                    results.setdefault((section, length), {}).setdefault(side, []).append(res)
                    print(
                        f"  [{section} {length} {side} round {r + 1}: {time.time() - t:.0f} s] {res}", file=sys.stderr
                    )
    text = f"{head}\n\n{table(results, a)}\n"
    print("\n" + text)
    if a.out:
        open(a.out, "w").write(text)
