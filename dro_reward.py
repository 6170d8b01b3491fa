"""Distributionally robust Bradley-Terry reward model (Mandal, Sasnauskas, Radanovic 2025).

Objective. A reward model r_theta scores a prompt x and response y. Each prompt i of a minibatch of B
prompts has the Bradley-Terry loss l_i = mean over its pairs of -log sigmoid(r(x_i, y_w) - r(x_i, y_l)).
Instead of the mean of the l_i we minimise the loss under the worst prompt distribution near uniform:

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || uniform) <= rho}

By Danskin's theorem the gradient is sum_i q*_i grad l_i, with q* the maximiser computed from the
detached losses (`common.robust_weights`; D = total variation, chi-square, KL or CVaR). rho = 0 is
plain (ERM) reward modelling. Under torchrun the worst case is over the global batch.

    python dro_reward.py                                     # embedded benchmark, robust default
    python dro_reward.py --dro.kind erm                      # the ERM baseline
    python dro_reward.py --dataset llm-blender/Unified-Feedback --eval-datasets allenai/reward-bench \
        --model-name-or-path Qwen/Qwen2.5-0.5B-Instruct
"""

import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, get_scheduler

import common


@dataclass
class Args:
    # Experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    track: bool = False
    """if toggled, mirror the logs to Weights and Biases"""
    wandb_project_name: str = "dro-rlhf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    output_dir: Optional[str] = None
    """where metrics.jsonl, TensorBoard logs and the model go (default: runs/<run_name>)"""

    # Data
    dataset: str = "synthetic"
    """training data: "synthetic" (embedded), a `datasets` hub name, or a local json/jsonl/parquet file"""
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
    skip_bad_rows: bool = False
    """skip and count malformed or too long rows instead of stopping with an error"""

    # Model
    model_name_or_path: Optional[str] = None
    """a Hugging Face model (loaded with AutoModelForSequenceClassification, num_labels=1); default: a tiny Llama"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer, if not the model's own"""
    attn_implementation: Optional[str] = None
    """attention kernel for from_pretrained (sdpa, flash_attention_2, eager, ...); default: transformers' choice"""
    trust_remote_code: bool = False
    """allow models and tokenizers whose code lives in their hub repository"""
    bf16: bool = False
    """bf16 autocast for the forward passes; master weights, optimizer state, log-probs, losses and weights stay fp32
    (with LoRA the frozen weights are stored in bf16)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass instead of storing them (less memory, slower)"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA the adapter and the score head train"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapter's update is scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the LoRA branch"""
    lora_target_modules: tuple[str, ...] = ()
    """names of the modules that get an adapter (default: every linear layer except the output layer)"""
    merge_lora: bool = False
    """save the weights with the adapter merged in (they load with the Auto classes) instead of the adapter alone"""
    fsdp: bool = False
    """under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP"""

    # Algorithm
    dro: common.DROArgs = field(default_factory=common.DROArgs)
    """the ambiguity set over the prompts of a batch"""

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

    # Evaluation, logging and saving
    eval_every: int = 100
    """evaluate every this many steps (0: only at the end)"""
    eval_batch_size: int = 256
    """pairs per evaluation forward"""
    log_every: int = 10
    """log training metrics every this many steps"""
    save_model: bool = True
    """save the trained model and tokenizer to <output-dir>/model"""

    # Checkpoints
    save_every: int = 0
    """save a checkpoint every this many steps (0: only when stopped by SIGTERM or SIGINT)"""
    keep_checkpoints: int = 2
    """keep the latest this many checkpoints"""
    resume: bool = False
    """continue the run in --output-dir from its latest complete checkpoint"""
    resume_from: Optional[str] = None
    """continue from this checkpoint folder (<output-dir>/checkpoints/step-<N>)"""
    overwrite: bool = False
    """replace a previous run in --output-dir (by default a folder that holds one is refused)"""
    skip_nonfinite_steps: bool = False
    """skip (and count) an optimizer step whose gradient is not finite instead of stopping the run"""

    # Filled in at run time
    run_id: str = ""
    """the run's name (computed at run time; a resumed run keeps the one it continues)"""
    world_size: int = 1
    """number of processes (computed at run time from torchrun)"""
    micro_batch_size: int = 0
    """pairs per forward and process (computed at run time)"""

    def __post_init__(self):
        common.check_args(
            self,
            positive=(
                "keep_checkpoints total_steps batch_size gradient_accumulation_steps learning_rate eval_batch_size "
                "log_every max_length max_train_rows max_eval_rows max_grad_norm lora_alpha"
            ),
            non_negative="save_every weight_decay warmup_steps eval_every lora_r",
            fraction="lora_dropout",
        )


def pair_losses(model, data, idx, pad_id):
    """The Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)) of rows `idx` (chosen and rejected in one
    forward), and the two rewards."""
    seqs = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    chosen_rewards, rejected_rewards = common.sequence_rewards(model, seqs, pad_id).split(len(idx))
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


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
    common.check_outputs(rewards, "reward", where)
    return common.domain_report(correct, data["domain"])


if __name__ == "__main__":
    common.exit_cleanly_on_user_errors()
    args = tyro.cli(Args)
    distributed, rank, world, device = common.init_distributed()
    evaluating = rank == 0 or args.fsdp  # with --fsdp every process takes part in each forward
    args.world_size = world
    if args.batch_size % (world * args.gradient_accumulation_steps):
        raise common.ArgumentError(
            f"--batch-size {args.batch_size} must be divisible by processes x accumulation "
            f"steps = {world * args.gradient_accumulation_steps}"
        )
    args.micro_batch_size = args.batch_size // (world * args.gradient_accumulation_steps)
    dataset_name, robust = args.dataset.split("/")[-1], f"{args.dro.kind}{args.dro.rho}"
    args.run_id = f"{dataset_name}__{args.exp_name}__{robust}__{args.seed}__{int(time.time())}"
    if (args.resume or args.resume_from) and not args.output_dir:
        raise common.ArgumentError("--resume and --resume-from need the --output-dir of the run to continue")
    output_dir = args.output_dir or f"runs/{args.run_id}"
    checkpoint = common.find_checkpoint(args, output_dir)  # None for a new run

    # Seeding: the same model initialisation and batch order on every rank (each takes its own shard)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    # Data
    tokenizer = common.load_tokenizer(args)
    pad_id = tokenizer.pad_token_id
    _, train = common.load_pairs(
        args.dataset, args.dataset_split, tokenizer, args.max_length, args.skip_bad_rows, args.max_train_rows
    )
    groups = common.GroupWeights.start(args.dro, train["domain"])  # group DRO's domain weights (None otherwise)
    # global batches, epoch after epoch
    batches = common.batch_indices(len(train["chosen"]), args.batch_size, args.seed)
    eval_sets = {
        name: common.load_pairs(source, split, tokenizer, args.max_length, args.skip_bad_rows, args.max_eval_rows)
        for name, (source, split) in common.eval_sources(args.dataset, args.eval_datasets).items()
    }

    # Tracking (rank 0 only), once the inputs are checked
    tracker = common.Tracker(args, output_dir, checkpoint) if rank == 0 else None

    # Model: any sequence classifier with one output, or a tiny Llama built from a config
    if args.model_name_or_path:
        model = common.load_model(
            AutoModelForSequenceClassification, args.model_name_or_path, args, tokenizer, num_labels=1
        )
    else:
        model = AutoModelForSequenceClassification.from_config(common.tiny_config(tokenizer, num_labels=1))
    model.config.pad_token_id = pad_id
    model = common.prepare_model(model.to(device), args, "SEQ_CLS")  # gradient checkpointing, LoRA
    ddp_model = common.distribute(model, args, distributed)  # DDP, or FSDP2 with --fsdp
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.total_steps
    )
    # Resuming: the checkpoint's weights, optimizer, scheduler and RNG states; the data order is replayed to its step
    modules, start_step, skipped_steps = {"model": model}, 0, 0
    if checkpoint:
        state = common.load_checkpoint(checkpoint, modules, optimizer, scheduler, args, rank, world)
        start_step, skipped_steps, groups = state["step"], state["extra"]["skipped_steps"], state["extra"]["groups"]
        for _ in range(start_step):
            next(batches)
    if rank == 0:
        print(
            f"{args.run_id}: {len(train['chosen'])} training pairs, {sum(p.numel() for p in model.parameters()):,} "
            f"parameters ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained), "
            f"{world} process(es) x {args.gradient_accumulation_steps} micro-batch(es) of {args.micro_batch_size}"
        )

    def evaluate_all(step):
        with common.autocast(args, device):
            results = {
                split: evaluate(model, data, pad_id, args.eval_batch_size, f"step {step}, {split}")
                for split, (_, data) in eval_sets.items()
            }
        for split, report in results.items():
            if rank == 0:
                tracker.eval(step, split, report)
        return results

    # Training loop
    stop, start = common.StopSignal(), time.time()
    for step in tqdm(
        range(start_step + 1, args.total_steps + 1),
        initial=start_step,
        total=args.total_steps,
        disable=rank != 0,
        desc="training",
    ):
        mine = common.shard(next(batches), rank, world)
        micro_batches = [mine[i : i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]

        # ROBUST: 1. The worst-case weights q* of the global batch, from detached per-pair losses. With one
        #    micro-batch they come from the training forward itself; with accumulation from a no-grad forward
        #    over all micro-batches first, so that every backward uses the weights of the whole batch.
        with common.autocast(args, device):
            if len(micro_batches) == 1:
                losses, chosen_rewards, rejected_rewards = pair_losses(ddp_model, train, micro_batches[0], pad_id)
                detached = losses.detach()
            else:
                with torch.no_grad():
                    detached = torch.cat([pair_losses(model, train, idx, pad_id)[0] for idx in micro_batches])
        prompt_ids = torch.tensor([train["prompt_id"][i] for i in mine], device=device)
        domains = [train["domain"][i] for i in mine]
        weights, dro_stats = common.robust_prompt_weights(detached, prompt_ids, args.dro, groups, domains)

        # ROBUST: 2. Backward of sum_i q*_i l_i (times the world size: DDP averages gradients over processes)
        for j, idx in enumerate(micro_batches):
            if len(micro_batches) > 1:
                with common.autocast(args, device):
                    losses, chosen_rewards, rejected_rewards = pair_losses(ddp_model, train, idx, pad_id)
            loss = (weights[j * args.micro_batch_size : (j + 1) * args.micro_batch_size] * losses).sum() * world
            if not torch.isfinite(loss) and not args.skip_nonfinite_steps:
                raise FloatingPointError(
                    f"step {step}: the loss is {loss.item()}; stopping before anything is saved "
                    f"(--skip-nonfinite-steps skips such steps)"
                )
            with common.no_sync(ddp_model, skip=j < len(micro_batches) - 1):
                loss.backward()
        grad_norm = common.clip_gradients(model, args.max_grad_norm)
        if torch.isfinite(grad_norm):  # the same on every rank: DDP averaged the gradients
            optimizer.step()
        elif args.skip_nonfinite_steps:
            skipped_steps += 1
        else:
            raise FloatingPointError(
                f"step {step}: the gradient norm is {grad_norm.item()}; stopping before anything "
                f"is saved (--skip-nonfinite-steps skips such steps)"
            )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if rank == 0 and step % args.log_every == 0:
            tracker.scalars(
                {
                    **dro_stats,
                    "rewards/chosen": chosen_rewards.mean().item(),
                    "rewards/rejected": rejected_rewards.mean().item(),
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                    "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                    "charts/grad_norm": grad_norm.item(),
                    "charts/learning_rate": scheduler.get_last_lr()[0],
                    "charts/skipped_steps": skipped_steps,
                    "charts/pairs_per_second": (step - start_step) * args.batch_size / (time.time() - start),
                },
                step,
            )
        if evaluating and args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            evaluate_all(step)
        if stop.requested() or (args.save_every and step % args.save_every == 0 and step < args.total_steps):
            extra = {"skipped_steps": skipped_steps, "groups": groups}
            common.save_checkpoint(output_dir, step, modules, optimizer, scheduler, extra, args, rank, world)
            if stop.signum:
                stop.exit(output_dir, step)

    # Final evaluation (rank 0; with --fsdp every process takes part) and save (rank 0 writes)
    results = evaluate_all(args.total_steps) if evaluating else None
    if rank == 0 and results:
        print(f"\nper-domain accuracy (%) after {args.total_steps} steps, {time.time() - start:.0f} s:")
        common.print_table(results)
    common.save_run(output_dir, args, model, tokenizer, args.total_steps)
    if rank == 0:
        tracker.close()
    if distributed:  # every process leaves together: one exiting while another still writes can abort in gloo
        dist.barrier()
        dist.destroy_process_group()
