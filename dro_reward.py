"""Distributionally robust Bradley-Terry reward model (Mandal, Sasnauskas, Radanovic 2025).

Objective. A reward model r_theta scores a prompt x and response y. Each prompt i of a minibatch of B
prompts has the Bradley-Terry loss l_i = mean over its pairs of -log sigmoid(r(x_i, y_w) - r(x_i, y_l)).
Instead of the plain mean over pairs, sum_i p0_i l_i with p0_i = n_i / N (prompt i has n_i of the N pairs), we
minimise the loss under the worst prompt distribution near p0:

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || p0) <= rho}

By Danskin's theorem the gradient is sum_i q*_i grad l_i, with q* the maximiser computed from the
detached losses (`robust.robust_prompt_weights`, robust.py; D = total variation, chi-square, KL or CVaR).
rho = 0 is plain (ERM) reward modelling. Under torchrun the worst case is over the global batch. With
--center-rewards-coefficient c each pair's loss gains c * (r(x, y_w) + r(x, y_l))^2 (TRL's reward centring, per
pair so that the worst case sees it; at rho = 0 it is TRL's c * mean((r_w + r_l)^2)).

    python dro_reward.py                                     # embedded benchmark, robust default
    python dro_reward.py --dro.kind erm                      # the ERM baseline
    python dro_reward.py --dataset llm-blender/Unified-Feedback --eval-datasets allenai/reward-bench \
        --model-name-or-path Qwen/Qwen2.5-0.5B-Instruct
"""

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, get_scheduler

import common
import ingest
import lifecycle
import robust


@dataclass
class Args(lifecycle.RunArgs):  # RunArgs: output folder, tracking, memory savers, checkpoints (lifecycle.py)
    # Experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""

    # Data
    dataset: str = "synthetic"
    """training data: "synthetic" (embedded), a `datasets` hub name, or a local file or folder (json, jsonl,
    parquet, csv) or `save_to_disk` folder"""
    dataset_split: str = "train"
    """the split of --dataset to train on"""
    eval_datasets: tuple[str, ...] = ()
    """evaluation data, zero or more like --dataset (default: the embedded validation, ID and shifted splits)"""
    max_train_rows: Optional[int] = None
    """use at most this many training rows"""
    max_eval_rows: Optional[int] = None
    """use at most this many rows of each evaluation split"""
    max_length: int = 64
    """maximum tokens of prompt + response; longer rows are an error (or skipped with --skip-bad-rows)"""

    # Model
    model_name_or_path: Optional[str] = None
    """a Hugging Face model (loaded with AutoModelForSequenceClassification, num_labels=1); default: a tiny Llama"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer, if not the model's own"""
    keep_dropout: bool = False
    """keep the model's dropout in training (default: off, as TRL's disable_dropout=True: train() computes eval())"""

    # Algorithm
    dro: robust.DROArgs = field(default_factory=robust.DROArgs)
    """the ambiguity set over the prompts of a batch"""
    center_rewards_coefficient: float = 0.0
    """add c * (r_w + r_l)^2 to each pair's loss, pulling rewards towards mean zero (TRL's; it suggests 0.01)"""

    # Optimisation
    total_steps: int = 1000
    """number of optimizer steps"""
    batch_size: int = 64
    """pairs per optimizer step, over all processes and accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step and process"""
    learning_rate: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "cosine"
    """a transformers scheduler name (linear, cosine, constant, ...)"""
    warmup_steps: int = 20
    """learning-rate warm-up steps"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # Evaluation and logging
    eval_every: int = 100
    """evaluate every this many steps (0: only at the end)"""
    eval_batch_size: int = 256
    """pairs per evaluation forward"""
    log_every: int = 10
    """log training metrics every this many steps"""

    # Filled in at run time
    micro_batch_size: int = 0
    """pairs per forward and process (computed at run time)"""

    def __post_init__(self):
        super().__post_init__()
        lifecycle.check_args(
            self,
            positive=(
                "total_steps batch_size gradient_accumulation_steps learning_rate eval_batch_size "
                "log_every max_length max_train_rows max_eval_rows max_grad_norm"
            ),
            non_negative="weight_decay warmup_steps eval_every center_rewards_coefficient",
        )
        if self.lora_dropout and not self.keep_dropout:
            raise ValueError("--lora-dropout needs --keep-dropout: dropout is off by default (as in TRL)")


def pair_losses(model, data, idx, pad_id, center_rewards_coefficient=0.0):
    """The Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin) of rows `idx` (chosen and rejected in one
    forward; the row's margin column as in TRL's RewardTrainer, 0 without one), plus c * (r(x, y_w) + r(x, y_l))^2
    with c = `center_rewards_coefficient`, and the two rewards."""
    seqs = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    chosen_rewards, rejected_rewards = common.sequence_rewards(model, seqs, pad_id).split(len(idx))
    margin = torch.tensor([data["margin"][i] for i in idx], device=chosen_rewards.device)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_rewards_coefficient:  # TRL's reward centring, per pair: the robust weights see it
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@torch.no_grad()
def evaluate(model, data, pad_id, batch_size, where="evaluation"):
    """Per-domain accuracy r(chosen) > r(rejected) (a tie counts 1/2)."""
    model.eval()
    correct, rewards = [], []
    for i in range(0, len(data["chosen"]), batch_size):
        _, chosen_rewards, rejected_rewards = pair_losses(
            model, data, range(i, min(i + batch_size, len(data["chosen"]))), pad_id
        )
        correct += (
            (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        ).tolist()
        rewards += chosen_rewards.tolist() + rejected_rewards.tolist()
    model.train()
    lifecycle.check_outputs(rewards, "reward", where)
    return common.domain_report(correct, data["domain"])


if __name__ == "__main__":
    args, run = lifecycle.start(Args)  # flags, torchrun, the output folder's previous run, seeding
    args.micro_batch_size = run.per_process(args.batch_size, args.gradient_accumulation_steps)

    # Data: preference pairs as token ids; global batches of row indices, epoch after epoch
    tokenizer = lifecycle.load_tokenizer(args)
    pad_id = tokenizer.pad_token_id
    _, train = common.load_pairs(
        args.dataset,
        args.dataset_split,
        tokenizer,
        args.max_length,
        args.skip_bad_rows,
        args.max_train_rows,
        args.truncation_mode,
    )
    groups = robust.GroupWeights.start(args.dro, train["domain"])  # group DRO's domain weights (None otherwise)
    batches = common.batch_indices(len(train["chosen"]), args.batch_size, args.seed)
    eval_sets = {
        name: common.load_pairs(
            source, split, tokenizer, args.max_length, args.skip_bad_rows, args.max_eval_rows, args.truncation_mode
        )
        for name, (source, split) in ingest.eval_sources(args.dataset, args.eval_datasets).items()
    }

    # Model: any sequence classifier with one output, or a tiny Llama built from a config
    if args.model_name_or_path:
        model = lifecycle.load_model(
            AutoModelForSequenceClassification, args.model_name_or_path, args, tokenizer, num_labels=1
        )
    else:
        model = AutoModelForSequenceClassification.from_config(common.tiny_config(tokenizer, num_labels=1))
    model.config.pad_token_id = pad_id
    if not args.keep_dropout:  # as TRL (disable_dropout=True): train() computes what eval() does
        lifecycle.disable_dropout(model)
    run.open_folder(model)  # the last step of start-up, once everything is checked: the folder becomes this run's
    model = lifecycle.prepare_model(model.to(run.device), args, "SEQ_CLS")  # gradient checkpointing, LoRA
    parallel_model = run.distribute(model)  # DDP, FSDP2 with --fsdp, or the model itself in one process
    run.print(
        f"{args.run_id}: {len(train['chosen'])} training pairs, {lifecycle.parameter_counts(model)}, {run.world} "
        f"process(es) x {args.gradient_accumulation_steps} micro-batch(es) of {args.micro_batch_size}"
    )
    # fused: one kernel, no per-parameter temporaries (2x the largest tensor otherwise); TRL's default
    params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.total_steps
    )
    modules = {"model": model}
    groups = run.resume(modules, optimizer, scheduler, batches).get("groups", groups)  # a resumed run's state

    def evaluate_all(step):
        with lifecycle.autocast(args, run.device):
            results = {
                split: evaluate(model, data, pad_id, args.eval_batch_size, f"step {step}, {split}")
                for split, (_, data) in eval_sets.items()
            }
        for split, report in results.items():
            run.log_eval(step, split, report)
        return results

    # Training loop
    center = args.center_rewards_coefficient  # reward centring in each pair's loss (0: off)
    for step in run.steps(args.total_steps, "training"):
        batch = common.shard(next(batches), run.rank, run.world)  # this process's share of the global batch
        micro_batches = [batch[i : i + args.micro_batch_size] for i in range(0, len(batch), args.micro_batch_size)]

        # ROBUST: 1. The worst-case weights q* of the global batch, from detached per-pair losses. With one
        #    micro-batch they come from the training forward itself; with accumulation from a no-grad forward
        #    over all micro-batches first, so that every backward uses the weights of the whole batch.
        with lifecycle.autocast(args, run.device):
            if len(micro_batches) == 1:
                losses, chosen_rewards, rejected_rewards = pair_losses(parallel_model, train, batch, pad_id, center)
                detached = losses.detach()
            else:
                with torch.no_grad():
                    detached = torch.cat([pair_losses(model, train, idx, pad_id, center)[0] for idx in micro_batches])
        prompt_ids = torch.tensor([train["prompt_id"][i] for i in batch], device=run.device)
        domains = [train["domain"][i] for i in batch]
        weights, dro_stats = robust.robust_prompt_weights(detached, prompt_ids, args.dro, groups, domains)

        # ROBUST: 2. Backward of sum_i q*_i l_i (times the world size: DDP averages gradients over processes)
        for j, idx in enumerate(micro_batches):
            if len(micro_batches) > 1:
                with lifecycle.autocast(args, run.device):
                    losses, chosen_rewards, rejected_rewards = pair_losses(parallel_model, train, idx, pad_id, center)
            loss = (weights[j * args.micro_batch_size : (j + 1) * args.micro_batch_size] * losses).sum() * run.world
            run.stop_on_nonfinite_loss(loss, step)
            with lifecycle.no_sync(parallel_model, skip=j < len(micro_batches) - 1):
                loss.backward()
        grad_norm = lifecycle.clip_gradients(model, args.max_grad_norm)
        if run.update_is_finite(step, grad_norm):  # else skipped (--skip-nonfinite-steps) or the run stops
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if step % args.log_every == 0:
            run.log(
                {
                    **dro_stats,
                    "rewards/chosen": chosen_rewards.mean().item(),
                    "rewards/rejected": rejected_rewards.mean().item(),
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                    "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                    "charts/grad_norm": grad_norm.item(),
                    "charts/learning_rate": scheduler.get_last_lr()[0],
                    "charts/skipped_steps": run.skipped_steps,
                    "charts/pairs_per_second": (step - run.start_step) * args.batch_size / (time.time() - run.started),
                },
                step,
            )
        if run.evaluation_due(step):
            evaluate_all(step)
        run.checkpoint(step, modules, optimizer, scheduler, {"groups": groups})  # when due, or on SIGTERM (then exit)

    # Final evaluation (rank 0; with --fsdp every process takes part) and save (rank 0 writes)
    results = evaluate_all(args.total_steps) if run.evaluating else None
    if run.rank == 0 and results:
        print(f"\nper-domain accuracy (%) after {args.total_steps} steps, {time.time() - run.started:.0f} s:")
        common.print_table(results)
    run.finish(model, tokenizer)
