"""Distributionally robust DPO (Mandal, Sasnauskas, Radanovic 2025).

Objective. DPO trains a policy pi_theta against a frozen reference pi_ref. Each prompt i of a minibatch of B
prompts has the DPO loss (mean over its pairs)

    l_i(theta) = -log sigmoid(beta * [log pi/ref(y_w | x_i) - log pi/ref(y_l | x_i)]),

with log pi/ref(y|x) = log pi_theta(y|x) - log pi_ref(y|x) summed over the response tokens. Robust DPO
minimises the loss under the worst prompt distribution near the uniform one:

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || uniform) <= rho}.

Its gradient is sum_i q*_i grad l_i with q* computed from the detached losses (`common.robust_weights`;
D = total variation, chi-square, KL or CVaR); rho = 0 is plain DPO. Under torchrun the worst case is over
the global batch. Everything else is the DPO you know.

    python dro_dpo.py                                  # embedded benchmark, robust default
    python dro_dpo.py --dro.kind tv --dro.rho 0.2
    python dro_dpo.py --dro.kind erm                   # plain DPO
"""

import copy
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
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

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
    """a Hugging Face causal LM; default: a tiny Llama built from a config"""
    sft_steps: Optional[int] = None
    """supervised warm start on both responses of the training pairs before DPO (the reference is the
    warm-started model); default: 500 for the tiny model, 0 for --model-name-or-path"""
    sft_learning_rate: float = 3e-3
    """learning rate of the warm start"""
    dro: common.DROArgs = field(default_factory=common.DROArgs)
    """the ambiguity set over the prompts of a batch"""
    beta: float = 0.1
    """DPO temperature: strength of the implicit KL regularisation to the reference"""
    precompute_ref_logps: bool = False
    """compute the reference log-probs of all training pairs once before training (saves a forward per step)"""
    total_steps: int = 600
    """number of DPO optimizer steps"""
    batch_size: int = 64
    """pairs per optimizer step, over all processes and accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step and process"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    lr_scheduler_type: str = "cosine"
    """a transformers scheduler name (linear, cosine, constant, ...)"""
    warmup_steps: int = 20
    """learning-rate warm-up steps"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 200
    """evaluate every this many steps (0: only at the start and the end)"""
    eval_batch_size: int = 256
    """sequences per evaluation forward"""
    eval_generations: int = 400
    """prompts per split whose sampled responses are scored with the gold reward (embedded task only)"""
    max_new_tokens: int = 10
    """maximum new tokens of evaluation generations"""
    temperature: float = 1.0
    """sampling temperature of evaluation generations (0: greedy)"""
    log_every: int = 10
    """log training metrics every this many steps"""
    save_model: bool = True
    """save the trained policy and tokenizer to <output-dir>/model"""


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-example DPO losses -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) from summed log-probs."""
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * logits)


def token_logps(model, seqs, prompt_lens, pad_id: int, side: str = "right"):
    """Per-token log-probabilities of `seqs` (lists of ids) under a causal LM, and the mask of completion
    tokens (after the prompt, not padding). Masks and positions come from the lengths, so the result is the
    same with any amount of padding on either side, and a pad id equal to EOS is harmless."""
    ids = common.pad(seqs, pad_id, side).to(next(model.parameters()).device)
    lengths = torch.tensor([len(s) for s in seqs], device=ids.device)
    pos = torch.arange(ids.shape[1], device=ids.device)
    start = ids.shape[1] - lengths if side == "left" else torch.zeros_like(lengths)
    attention = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids).logits[:, :-1].float()
    labels = ids[:, 1:, None]
    logps = torch.gather(logits, 2, labels).squeeze(-1) - torch.logsumexp(logits, -1)
    completion = attention[:, 1:] & (pos[1:] >= (start + torch.as_tensor(prompt_lens, device=ids.device))[:, None])
    return logps * completion, completion


def pair_logps(model, data, idx, pad_id):
    """Summed completion log-probs of the chosen and rejected responses of rows `idx`, in one forward."""
    seqs = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    logps, _ = token_logps(model, seqs, [data["prompt_len"][i] for i in idx] * 2, pad_id)
    return logps.sum(-1).split(len(idx))


@torch.no_grad()
def implicit_reward_accuracy(policy, reference, data, pad_id, beta, batch_size):
    """Per-domain accuracy of the implicit reward: beta * log pi/ref margin of chosen over rejected > 0 (ties: 1/2)."""
    policy.eval()
    correct = []
    for i in range(0, len(data["chosen"]), batch_size):
        idx = range(i, min(i + batch_size, len(data["chosen"])))
        (pc, pr), (rc, rr) = pair_logps(policy, data, idx, pad_id), pair_logps(reference, data, idx, pad_id)
        margin = (pc - rc) - (pr - rr)
        correct += ((margin > 0).float() + 0.5 * (margin == 0).float()).tolist()  # a tie is a coin flip
    policy.train()
    return common.domain_report(correct, data["domain"])


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy: exp(d) - 1 - d with
    d = ref_logp - logp (Schulman's k3). Unbiased, and never negative, unlike the plain difference."""
    d = ref_logp - logp
    return torch.expm1(d) - d


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 256):
    """Sampled (temperature > 0) or greedy responses to prompt strings. Returns the prompt ids and the response
    ids cut after the first EOS, and whether each response ended (produced an EOS) within max_new_tokens."""
    prompt_ids, responses, ended = [], [], []
    for i in range(0, len(prompts), batch_size):
        batch = [common.encode_prompt(tokenizer, p) for p in prompts[i: i + batch_size]]  # as in training
        ids = common.pad(batch, tokenizer.pad_token_id, side="left").to(next(model.parameters()).device)
        out = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:].tolist()
        for p, r in zip(batch, out):
            cut = r.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in r else len(r)
            prompt_ids.append(p)
            responses.append(r[:cut])
            ended.append(cut < len(r) or r[-1:] == [tokenizer.eos_token_id])
    return prompt_ids, responses, ended


@torch.no_grad()
def evaluate_generations(policy, reference, tokenizer, prompts, domains, max_new_tokens: int,
                         temperature: float = 1.0, batch_size: int = 256) -> dict:
    """Sample a response per prompt; per-domain mean gold reward (embedded task) and the mean KL to the
    reference on those samples (k3 estimate summed over the response tokens)."""
    policy.eval()
    prompt_ids, responses, _ = generate(policy, tokenizer, prompts, max_new_tokens, temperature, batch_size)
    seqs = [p + r for p, r in zip(prompt_ids, responses)]
    lens = [len(p) for p in prompt_ids]
    kl = []
    for i in range(0, len(seqs), batch_size):
        logp, mask = token_logps(policy, seqs[i: i + batch_size], lens[i: i + batch_size], tokenizer.pad_token_id)
        ref_logp, _ = token_logps(reference, seqs[i: i + batch_size], lens[i: i + batch_size], tokenizer.pad_token_id)
        kl += (kl_k3(logp, ref_logp) * mask).sum(-1).tolist()
    policy.train()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    gold = [common.synthetic_gold_reward(p, t) for p, t in zip(prompts, texts)]
    return {**common.domain_report(gold, domains, "gold_reward"), "kl": sum(kl) / len(kl)}


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
    sft_steps = args.sft_steps if args.sft_steps is not None else (0 if args.model_name_or_path else 500)
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

    # Seeding: the same initialisation and batch order on every rank (each takes its own shard)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

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
        return rows, common.tokenize_preferences(rows, tokenizer, args.max_length, source, args.skip_bad_rows)

    train = load(args.dataset, args.dataset_split, args.max_train_rows)[1]
    if args.eval_datasets:
        eval_sets = {name.split("/")[-1]: load(name, "test", args.max_eval_rows) for name in args.eval_datasets}
    elif args.dataset == "synthetic":
        eval_sets = {s: load("synthetic", s, args.max_eval_rows) for s in common.SYNTHETIC_SPLITS if s != "train"}
    else:
        eval_sets = {}
    n_train = len(train["chosen"])

    # Policy: any causal LM, or a tiny Llama built from a config
    if args.model_name_or_path:
        policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    else:
        policy = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer))
    policy.config.pad_token_id = pad_id
    policy.to(device)
    model = DDP(policy) if distributed else policy  # one wrapper for the warm start and DPO
    if rank == 0:
        print(f"{run_name}: {n_train} training pairs, {sum(p.numel() for p in policy.parameters()):,} parameters, "
              f"{world} process(es) x {args.gradient_accumulation_steps} micro-batch(es) of {micro_batch_size}")

    def batches(seed):
        """Yields this rank's micro-batches (row indices) of successive global batches, epoch after epoch."""
        epoch = 0
        while True:
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for start in range(0, n_train - args.batch_size + 1, args.batch_size):
                mine = order[start: start + args.batch_size][rank::world]
                yield [mine[j: j + micro_batch_size] for j in range(0, len(mine), micro_batch_size)]
            epoch += 1

    # Supervised warm start: imitate both responses of each pair, like a base model that could have sampled them
    if sft_steps:
        sft_optimizer = torch.optim.AdamW(policy.parameters(), lr=args.sft_learning_rate)
        sft_batches = batches(args.seed + 10_000)
        for step in tqdm(range(sft_steps), disable=rank != 0, desc="warm start"):
            for idx in next(sft_batches):
                seqs = [train[k][i] for k in ("chosen", "rejected") for i in idx]
                logps, mask = token_logps(model, seqs, [train["prompt_len"][i] for i in idx] * 2, pad_id)
                (-(logps.sum() / mask.sum()) / args.gradient_accumulation_steps).backward()
            sft_optimizer.step()
            sft_optimizer.zero_grad(set_to_none=True)
        del sft_optimizer

    # The frozen reference: the policy DPO starts from
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if args.precompute_ref_logps:
        with torch.no_grad():
            ref_logps = torch.cat([torch.stack(pair_logps(reference, train, range(i, min(i + 256, n_train)), pad_id), 1)
                                   for i in range(0, n_train, 256)])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.total_steps)

    def evaluate_all(step):
        results = {}
        for split, (rows, data) in eval_sets.items():
            report = implicit_reward_accuracy(policy, reference, data, pad_id, args.beta, args.eval_batch_size)
            if args.eval_generations and common.is_synthetic_prompt(rows[0]["prompt"]):
                sample = rows.select(range(min(args.eval_generations, len(rows))))
                report.update(evaluate_generations(policy, reference, tokenizer, sample["prompt"], sample["domain"],
                                                          args.max_new_tokens, args.temperature, args.eval_batch_size))
            common.log_eval(writer, metrics_path, step, split, report)
            results[split] = report
        return results

    if rank == 0:
        start_results = evaluate_all(0)

    # DPO training loop
    dpo_batches, start = batches(args.seed), time.time()
    for step in tqdm(range(1, args.total_steps + 1), disable=rank != 0, desc="dpo"):
        micros = next(dpo_batches)
        mine = [i for idx in micros for i in idx]

        def losses_of(idx, module):
            if args.precompute_ref_logps:
                rc, rr = ref_logps[idx].to(device).unbind(1)
            else:  # the reference first: its temporaries are freed before the policy's graph is built
                with torch.no_grad():
                    rc, rr = pair_logps(reference, train, idx, pad_id)
            pc, pr = pair_logps(module, train, idx, pad_id)
            return dpo_loss(pc, pr, rc, rr, args.beta), args.beta * (pc - rc).detach(), args.beta * (pr - rr).detach()

        # 1. The worst-case weights of the global batch, from detached per-pair losses (with accumulation,
        #    from a no-grad forward over all micro-batches first, so every backward uses the whole batch's q*)
        if len(micros) == 1:
            losses, chosen_rewards, rejected_rewards = losses_of(micros[0], model)
            detached = losses.detach()
        else:
            with torch.no_grad():
                detached = torch.cat([losses_of(idx, policy)[0] for idx in micros])
        groups = torch.tensor([train["group"][i] for i in mine], device=device)
        weights, dro_stats = common.robust_pair_weights(detached, groups, args.dro)

        # 2. Backward of sum_i q_i l_i (times the world size: DDP averages gradients over processes)
        for j, idx in enumerate(micros):
            if len(micros) > 1:
                losses, chosen_rewards, rejected_rewards = losses_of(idx, model)
            loss = (weights[j * micro_batch_size: (j + 1) * micro_batch_size] * losses).sum() * world
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()}; stopping before anything is saved")
            if distributed and j < len(micros) - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if rank == 0 and step % args.log_every == 0:
            scalars = {"losses/robust_loss": dro_stats["dro/robust_loss"], "losses/erm_loss": dro_stats["dro/erm_loss"],
                       "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                       "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                       "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
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
        print(f"\nimplicit-reward accuracy (%) after {args.total_steps} DPO steps, {time.time() - start:.0f} s:")
        common.print_table(results)
        if "gold_reward" in next(iter(results.values())):
            for name, res in (("the reference (step 0)", start_results), (f"the policy (step {args.total_steps})", results)):
                print(f"\ngold reward of sampled responses, {name}:")
                common.print_table(res, name="gold_reward")
                print("KL to the reference: " + ", ".join(f"{s} {r['kl']:.3f}" for s, r in res.items()))
        if args.save_model:
            common.save_atomically(policy, tokenizer, os.path.join(output_dir, "model"))
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, default=str, indent=1)
        writer.close()
    if distributed:
        dist.destroy_process_group()
