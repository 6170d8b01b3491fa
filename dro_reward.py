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

import json
import math
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
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

import common


@dataclass
class Args:
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

    model_name_or_path: Optional[str] = None
    """a Hugging Face model (loaded with AutoModelForSequenceClassification, num_labels=1); default: a tiny Llama"""
    dro: common.DROArgs = field(default_factory=common.DROArgs)
    """the ambiguity set over the prompts of a batch"""
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
    eval_every: int = 100
    """evaluate every this many steps (0: only at the end)"""
    eval_batch_size: int = 256
    """pairs per evaluation forward"""
    log_every: int = 10
    """log training metrics every this many steps"""
    save_model: bool = True
    """save the trained model and tokenizer to <output-dir>/model"""


def bt_scores(model, chosen, rejected, pad_id):
    """Rewards of chosen and rejected sequences (lists of token ids) in one forward."""
    ids = common.pad(chosen + rejected, pad_id).to(next(model.parameters()).device)
    rewards = model(input_ids=ids, attention_mask=ids != pad_id).logits.squeeze(-1).float()
    return rewards[: len(chosen)], rewards[len(chosen):]


@torch.no_grad()
def evaluate(model, data, pad_id, batch_size):
    """Per-domain accuracy r(chosen) > r(rejected) (a tie counts 1/2)."""
    model.eval()
    correct = []
    for i in range(0, len(data["chosen"]), batch_size):
        r_c, r_r = bt_scores(model, data["chosen"][i: i + batch_size], data["rejected"][i: i + batch_size], pad_id)
        correct += ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).tolist()
    model.train()
    return common.domain_report(correct, data["domain"])


if __name__ == "__main__":
    args = tyro.cli(Args)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    micro_batches = world * args.gradient_accumulation_steps
    if args.batch_size % micro_batches:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {micro_batches}")
    micro_batch_size = args.batch_size // micro_batches
    run_name = f"{args.dataset.split('/')[-1]}__{args.exp_name}__{args.dro.kind}{args.dro.rho}__{args.seed}__{int(time.time())}"
    output_dir = args.output_dir or f"runs/{run_name}"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")

    # Tracking (rank 0 only)
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=run_name, save_code=True)
        writer = SummaryWriter(output_dir)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        metrics_path = os.path.join(output_dir, "metrics.jsonl")
        open(metrics_path, "w").close()

    # Seeding: the same model initialisation and batch order on every rank (each takes its own shard)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    # Data
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = common.tiny_tokenizer()
    pad_id = tokenizer.pad_token_id

    def load(source, split, max_rows=None):
        rows = common.load_preferences(source, split, tokenizer, args.skip_bad_rows, max_rows)
        return common.tokenize_preferences(rows, tokenizer, args.max_length, source, args.skip_bad_rows)

    train = load(args.dataset, args.dataset_split, args.max_train_rows)
    if args.eval_datasets:
        eval_sets = {name.split("/")[-1]: load(name, "test", args.max_eval_rows) for name in args.eval_datasets}
    elif args.dataset == "synthetic":
        eval_sets = {s: load("synthetic", s, args.max_eval_rows) for s in common.SYNTHETIC_SPLITS if s != "train"}
    else:
        eval_sets = {}
    n_train = len(train["chosen"])

    # Model: any sequence classifier with one output, or a tiny Llama built from a config
    if args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=1)
        model.config.pad_token_id = pad_id
    else:
        model = AutoModelForSequenceClassification.from_config(common.tiny_config(tokenizer, num_labels=1))
    model.to(device)
    ddp_model = DDP(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.total_steps)
    if rank == 0:
        print(f"{run_name}: {n_train} training pairs, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{world} process(es) x {args.gradient_accumulation_steps} micro-batch(es) of {micro_batch_size}")

    def evaluate_all(step):
        results = {split: evaluate(model, data, pad_id, args.eval_batch_size) for split, data in eval_sets.items()}
        for split, report in results.items():
            common.log_eval(writer, metrics_path, step, split, report)
        return results

    # Training loop
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    cursor, start = 0, time.time()
    for step in tqdm(range(1, args.total_steps + 1), disable=rank != 0, desc="training"):
        if cursor + args.batch_size > n_train:  # a new epoch, the same permutation on every rank
            order, cursor = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed + step)), 0
        batch = order[cursor: cursor + args.batch_size].tolist()
        cursor += args.batch_size
        mine = batch[rank * len(batch) // world: (rank + 1) * len(batch) // world]
        micros = [mine[i: i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]

        def pair_losses(idx, module):
            r_c, r_r = bt_scores(module, [train["chosen"][i] for i in idx], [train["rejected"][i] for i in idx], pad_id)
            return -F.logsigmoid(r_c - r_r), r_c, r_r

        # 1. The worst-case weights of the global batch, from detached per-pair losses. With one
        #    micro-batch they come from the training forward itself; with accumulation from a no-grad
        #    forward over all micro-batches first, so that every backward uses the weights of the whole batch.
        if len(micros) == 1:
            losses, r_c, r_r = pair_losses(micros[0], ddp_model)
            detached = losses.detach()
        else:
            with torch.no_grad():
                detached = torch.cat([pair_losses(m, model)[0] for m in micros])
        groups = torch.tensor([train["group"][i] for i in mine], device=device)
        weights, dro_stats = common.robust_pair_weights(detached, groups, args.dro)

        # 2. Backward of sum_i q_i l_i (times the world size: DDP averages gradients over processes)
        for j, idx in enumerate(micros):
            if len(micros) > 1:
                losses, r_c, r_r = pair_losses(idx, ddp_model)
            w = weights[j * micro_batch_size: (j + 1) * micro_batch_size]
            loss = (w * losses).sum() * world
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()}; stopping before anything is saved")
            if distributed and j < len(micros) - 1:
                with ddp_model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if rank == 0 and step % args.log_every == 0:
            scalars = {"losses/robust_loss": dro_stats["dro/robust_loss"], "losses/erm_loss": dro_stats["dro/erm_loss"],
                       "charts/accuracy": (r_c > r_r).float().mean().item(), "charts/margin": (r_c - r_r).mean().item(),
                       "charts/grad_norm": grad_norm.item(), "charts/learning_rate": scheduler.get_last_lr()[0],
                       "charts/pairs_per_second": step * args.batch_size / (time.time() - start),
                       **{k: v for k, v in dro_stats.items() if not math.isnan(v)}}
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
        if rank == 0 and args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
            evaluate_all(step)

    # Final evaluation and save
    if rank == 0:
        results = evaluate_all(args.total_steps)
        print(f"\nper-domain accuracy (%) after {args.total_steps} steps, {time.time() - start:.0f} s:")
        common.print_table(results)
        if args.save_model:
            common.save_atomically(model, tokenizer, os.path.join(output_dir, "model"))
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, default=str, indent=1)
        writer.close()
    if distributed:
        dist.destroy_process_group()
