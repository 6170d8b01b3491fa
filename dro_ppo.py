"""Distributionally robust reward-based RLHF with PPO (Mandal, Sasnauskas, Radanovic 2025).

Objective. A policy pi generates a response y to a prompt x; a reward model (or, on the embedded task,
the known gold reward) scores it with r(x, y), and a KL penalty keeps pi near the reference pi_ref.
Instead of the average over the training prompts we maximise the value under the worst prompt
distribution near uniform:

    max_pi  min_{q in Q_rho}  sum_i q_i * E_{y ~ pi(.|x_i)} [ r(x_i, y) - beta * KL(pi(.|x_i) || pi_ref(.|x_i)) ]

How the minibatch algorithm realises it. Each PPO iteration samples a rollout batch of B prompts, K
responses each. For prompt i, R_i is the mean over its K rollouts of the KL-regularised return
(the score minus beta times the per-token KL estimates summed over the response). The worst-case
weights q = common.robust_weights(-R_i) put more weight on the prompts on which the policy currently
does worst; they are computed once per rollout batch (detached) and held fixed through its PPO epochs.
(--weights-from values uses the critic's V(x_i) instead: the realised returns of the same rollouts whose
advantages drive the update upweight the unlucky ones; see the README for what each measured.)
Which losses are weighted: only the policy surrogate. Each rollout's clipped PPO surrogate is averaged
over its response tokens and the loss is sum_i q_i * (mean surrogate of prompt i's rollouts), i.e. each
rollout gets q_i / K. The value loss stays a plain mean over all response tokens (it fits V^pi, which
does not depend on q). rho = 0 (or --dro.kind erm) gives uniform weights: exactly plain PPO. Minibatches
draw rollouts of the batch at random; their weights are scaled by N/M (rollouts per batch / per minibatch),
so the expected minibatch loss is the full-batch robust loss. Under torchrun each process generates for its
share of the rollout prompts; the worst case (the returns are all-gathered) and the advantage whitening are
over the global rollout batch.

The tiny default model is first warm-started by a few hundred steps of supervised fine-tuning on the
chosen responses of the training split (--sft-steps; off for a pretrained --model-name-or-path); that
warm-started model is the reference policy, and the step-0 evaluation measures it.

    python dro_ppo.py                                    # embedded task, gold reward, chi2 rho = 0.5
    python dro_ppo.py --dro.kind erm                     # the plain PPO baseline
    python dro_ppo.py --reward-model-path runs/<reward run>/model   # a reward model from dro_reward.py
"""

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, get_scheduler

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
    """prompts (and warm-start responses): "synthetic" (embedded), a `datasets` hub name, or a local json/jsonl/parquet file"""
    dataset_split: str = "train"
    """the split of --dataset to train on"""
    eval_datasets: tuple[str, ...] = ()
    """evaluation prompts, zero or more like --dataset (default: the embedded validation, ID and shifted splits)"""
    eval_prompts: int = 400
    """evaluate on at most this many prompts of each split"""
    max_prompt_length: int = 64
    """maximum prompt length in tokens; a longer prompt is an error (prompts are never truncated)"""
    skip_bad_rows: bool = False
    """skip rows with a missing/empty field or a too-long prompt (counted) instead of stopping with an error"""
    model_name_or_path: Optional[str] = None
    """a Hugging Face causal LM for the policy (and reference); default: a tiny Llama"""
    reward_model_path: Optional[str] = None
    """a sequence-classification reward model (e.g. <run>/model saved by dro_reward.py), same tokenizer as the policy"""
    reward: Optional[Literal["gold", "model"]] = None
    """the training reward: the gold reward of the embedded task, or the reward model (default: model iff --reward-model-path)"""
    sft_steps: Optional[int] = None
    """supervised warm-start steps on the chosen responses of --dataset (default: 500 for the tiny model, 0 for a pretrained one)"""
    sft_batch_size: int = 64
    """sequences per warm-start step"""
    sft_learning_rate: float = 3e-3
    """AdamW peak learning rate of the warm start (cosine decay to 0)"""

    dro: common.DROArgs = field(default_factory=common.DROArgs)
    """the ambiguity set over the prompts of a rollout batch (weights from their negated KL-regularised returns)"""
    weights_from: Literal["returns", "values"] = "returns"
    """a prompt's value for the worst case: the mean realised return of its rollouts, or the critic's V(x) (README)"""
    num_updates: int = 60
    """number of PPO iterations (rollout batch + PPO epochs)"""
    rollout_prompts: int = 64
    """prompts per rollout batch (over all processes under torchrun)"""
    samples_per_prompt: int = 2
    """sampled responses per prompt (their mean return is the prompt's return)"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_minibatches: int = 2
    """minibatches per PPO epoch"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy"""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value model (it starts from a zero head and must catch up fast)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    max_new_tokens: int = 8
    """maximum response length; a response without EOS by then is penalised"""
    temperature: float = 1.0
    """sampling temperature of rollouts (log-probabilities are computed at the same temperature)"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference policy"""
    kl_estimator: Literal["k3", "k2"] = "k3"
    """per-token KL estimator, both never negative: k3 = exp(d) - 1 - d, k2 = d^2 / 2 with d = ref - logp"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that never ends with EOS"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """PPO policy ratio clip"""
    cliprange_value: float = 0.2
    """PPO value clip"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    eval_every: int = 20
    """evaluate every this many PPO iterations (0: only at the start and the end)"""
    eval_batch_size: int = 200
    """prompts per evaluation generate"""
    eval_greedy: bool = False
    """evaluate greedy generations (default: sampled at --temperature, as the objective E_{y ~ pi}[r] is defined)"""
    save_model: bool = True
    """save the trained policy and tokenizer to <output-dir>/model"""


# ----------------------------------------------------------------------------------------------
# Pure helpers (imported by tests)
# ----------------------------------------------------------------------------------------------


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) position of each row, whatever the padding side."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    return (idx * mask.long()).argmax(1)


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token scores [N, T] -> the score at each row's last real token (never a pad token)."""
    return scores[torch.arange(scores.shape[0], device=scores.device), last_index(mask)]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probabilities of tokens sampled from pi; never negative."""
    d = (ref_logprobs - logprobs).double()  # float64: no cancellation in exp(d) - 1 - d near d = 0
    kl = torch.expm1(d) - d if estimator == "k3" else 0.5 * d.square()
    return kl.clamp(min=0.0).to(logprobs.dtype)  # exact maths is >= 0; the clamp removes rounding below 0


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; positions with mask == 0 are after the end."""
    rewards, values = rewards * mask, values * mask
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten x over its masked positions; under torch.distributed over those of all processes."""
    moments = torch.stack([mask.sum(), (x * mask).sum(), (x.square() * mask).sum()]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(moments)
    mean = moments[1] / moments[0]
    var = moments[2] / moments[0] - mean.square()
    return ((x - mean) * torch.rsqrt(var + 1e-8) * mask).to(x.dtype)


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, weights=None,
             cliprange=0.2, cliprange_value=0.2):
    """Clipped PPO losses from per-token tensors [N, T] of N rollouts.

    policy loss = sum_j weights_j * (clipped surrogate of rollout j averaged over its response tokens);
    weights=None is the plain mean (1/N each): plain PPO. The value loss is a plain token mean.
    """
    if weights is None:
        weights = torch.full((logprobs.shape[0],), 1.0 / logprobs.shape[0], device=logprobs.device)
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (weights * masked_mean(surrogate, mask, dim=1)).sum()
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    stats = {"losses/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).item(),
             "losses/approxkl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item(),
             "losses/value_clipfrac": masked_mean(((values - old_values).abs() > cliprange_value).float(), mask).item()}
    return pg_loss, vf_loss, stats


class Critic(nn.Module):
    """Value model: a copy of the policy's transformer with a scalar head, one value per token."""

    def __init__(self, policy):
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)
        self.head = nn.Linear(policy.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, mask):
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def reward_model_scores(reward_model, ids, mask):
    """Scores of a sequence-classification reward model, read at each row's last real token."""
    hidden = reward_model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    return last_token_rewards(reward_model.score(hidden).squeeze(-1).float(), mask)


def positions(mask):
    """Position ids that start at 0 at the first real token (as `generate` does with left padding)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def token_logits(model, ids, mask, context_len, temperature):
    """Logits [N, T_resp, V] that predict the response tokens (positions context_len..), at `temperature`."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    return logits[:, context_len - 1: -1].float() / temperature


def token_logprobs(logits, tokens):
    return torch.gather(F.log_softmax(logits, -1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def cut_at_eos(responses, eos_id, pad_id):
    """Cut generated tokens after the first EOS (kept): (responses padded after it, response mask, has_eos)."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.long().argmax(1), responses.shape[1] - 1)
    mask = (torch.arange(responses.shape[1], device=responses.device)[None] <= first[:, None]).long()
    return responses.masked_fill(mask == 0, pad_id), mask, has_eos


if __name__ == "__main__":
    args = tyro.cli(Args)
    tiny = args.model_name_or_path is None
    sft_steps = args.sft_steps if args.sft_steps is not None else (500 if tiny else 0)
    reward_kind = args.reward or ("model" if args.reward_model_path else "gold")
    if reward_kind == "model" and not args.reward_model_path:
        raise ValueError("--reward model needs --reward-model-path")
    if reward_kind == "gold" and args.dataset != "synthetic":
        raise ValueError("the gold reward exists only for the embedded task; pass --reward-model-path")
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.rollout_prompts % world:
        raise ValueError(f"--rollout-prompts {args.rollout_prompts} must be divisible by the {world} processes")
    local_prompts = args.rollout_prompts // world  # each process generates for its shard of the rollout batch
    batch_size = local_prompts * args.samples_per_prompt
    if batch_size % args.num_minibatches:
        raise ValueError(f"rollouts per process {batch_size} must be divisible by --num-minibatches {args.num_minibatches}")
    minibatch_size = batch_size // args.num_minibatches
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

    # Seeding: the same initialisation, warm start and prompt order on every rank (each takes its own shard)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data: prompts of --dataset (their chosen responses only for the warm start)
    if tiny:
        tokenizer = common.tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def load_prompts(source, split, max_rows=None):
        """Tokenized prompts (never truncated: a longer one is an error, or skipped with --skip-bad-rows)."""
        data, skipped = {"text": [], "ids": [], "chosen": [], "domain": [], "gold": source == "synthetic"}, 0
        for r in common.load_preferences(source, split, tokenizer, args.skip_bad_rows, max_rows):
            ids = common.encode_prompt(tokenizer, r["prompt"])
            if len(ids) > args.max_prompt_length:
                if not args.skip_bad_rows:
                    raise common.DataError(f"{source}, row {r['row']}: the prompt is {len(ids)} tokens, more than "
                                           f"--max-prompt-length {args.max_prompt_length} (raise it or pass --skip-bad-rows)")
                skipped += 1
                continue
            data["text"].append(r["prompt"])
            data["ids"].append(ids)
            data["chosen"].append(tokenizer(r["chosen"], add_special_tokens=False).input_ids)
            data["domain"].append(r["domain"])
        if skipped:
            print(f"{source}: skipped {skipped} prompt(s) longer than {args.max_prompt_length} tokens (--skip-bad-rows)")
        return data

    train = load_prompts(args.dataset, args.dataset_split)
    if args.eval_datasets:
        eval_sets = {name.split("/")[-1]: load_prompts(name, "test", args.eval_prompts) for name in args.eval_datasets}
    elif args.dataset == "synthetic":
        eval_sets = {s: load_prompts("synthetic", s, args.eval_prompts) for s in common.SYNTHETIC_SPLITS if s != "train"}
    else:
        eval_sets = {}

    # Models: policy, frozen reference, value model, reward model
    if tiny:
        policy = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer))
    else:
        policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    policy.to(device).eval()  # no dropout anywhere: the PPO ratio must compare the same function
    reward_model = None
    if args.reward_model_path:
        reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path, num_labels=1).to(device).eval()
        reward_model.requires_grad_(False)
        if not hasattr(reward_model, "score"):
            raise ValueError(f"{args.reward_model_path}: expected a decoder reward model with a `score` head (Llama, Qwen, GPT-2, ...)")
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                                  top_k=0, top_p=1.0, pad_token_id=pad_id, eos_token_id=eos_id)
    greedy_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                     eos_token_id=eos_id)
    start = time.time()

    # Supervised warm start (the tiny model cannot generate anything meaningful from a random init):
    # next-token loss on the chosen responses (+ EOS) of the training prompts. The reference is its result.
    if sft_steps:
        sft_opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_learning_rate)
        sft_scheduler = get_scheduler("cosine", sft_opt, num_warmup_steps=0, num_training_steps=sft_steps)
        for step in tqdm(range(sft_steps), disable=rank != 0, desc="warm start"):
            idx = random.sample(range(len(train["ids"])), args.sft_batch_size)
            seqs = [train["ids"][i] + train["chosen"][i] + [eos_id] for i in idx]
            ids = common.pad(seqs, pad_id).to(device)
            labels = common.pad([[-100] * len(train["ids"][i]) + train["chosen"][i] + [eos_id] for i in idx], -100).to(device)
            mask = common.pad([[1] * len(s) for s in seqs], 0).to(device)  # the loss is on response tokens only
            loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"warm-start step {step}: the loss is {loss.item()}")
            loss.backward()
            sft_opt.step()
            sft_scheduler.step()
            sft_opt.zero_grad(set_to_none=True)
            if rank == 0:
                writer.add_scalar("losses/sft_loss", loss.item(), step)
    critic = Critic(policy).to(device)
    # Under torchrun the DDP wrappers (used for the training forwards) start all ranks from rank 0's weights
    policy_ddp, critic_ddp = (DDP(policy), DDP(critic)) if distributed else (policy, critic)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([{"params": policy.parameters(), "lr": args.learning_rate},
                                   {"params": critic.parameters(), "lr": args.value_learning_rate}])
    if rank == 0:
        print(f"{run_name}: {len(train['ids'])} training prompts, {sum(p.numel() for p in policy.parameters()):,} policy "
              f"parameters, reward: {reward_kind}, warm start: {sft_steps} steps ({time.time() - start:.0f} s), "
              f"{world} process(es) x {local_prompts} prompts x {args.samples_per_prompt} samples per rollout batch")

    def rollout(prompt_ids, config):
        """Generate responses to `prompt_ids`; returns full ids, mask, response tokens, response mask, has_eos."""
        queries = common.pad(prompt_ids, pad_id, side="left").to(device)
        lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        query_mask = (torch.arange(queries.shape[1], device=device)[None] >= queries.shape[1] - lengths[:, None]).long()
        out = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
        responses = F.pad(out[:, queries.shape[1]:], (0, args.max_new_tokens - out.shape[1] + queries.shape[1]), value=pad_id)
        responses, response_mask, has_eos = cut_at_eos(responses, eos_id, pad_id)
        return torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1), responses, response_mask, has_eos

    def score(ids, mask, responses, response_mask, prompts):
        """The training reward of each rollout: gold reward of the decoded text, or the reward model read at the last real token."""
        if reward_kind == "gold":
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)  # cut at EOS already
            return torch.tensor([common.synthetic_gold_reward(p, t) for p, t in zip(prompts, texts)], device=device)
        return reward_model_scores(reward_model, ids, mask)

    @torch.no_grad()
    def evaluate(data):
        """Gold reward (per domain) of greedy or sampled generations, KL to the reference, reward-model score."""
        gold, kls, rm = [], [], []
        for i in range(0, len(data["ids"]), args.eval_batch_size):
            prompts = data["ids"][i: i + args.eval_batch_size]
            ids, mask, responses, rmask, _ = rollout(prompts, greedy_config if args.eval_greedy else gen_config)
            logits = token_logits(policy, ids, mask, ids.shape[1] - responses.shape[1], args.temperature)
            ref_logits = token_logits(ref_policy, ids, mask, ids.shape[1] - responses.shape[1], args.temperature)
            # exact KL of the next-token distributions, summed over the response: the sequence KL in expectation
            kl = (F.softmax(logits, -1) * (F.log_softmax(logits, -1) - F.log_softmax(ref_logits, -1))).sum(-1)
            kls += (kl * rmask).sum(1).tolist()
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            if data["gold"]:
                gold += [common.synthetic_gold_reward(p, t) for p, t in zip(data["text"][i: i + len(prompts)], texts)]
            if reward_model is not None:
                rm += reward_model_scores(reward_model, ids, mask).tolist()
        domains = data["domain"][: len(kls)]
        report = common.domain_report(gold, domains, "gold_reward") if gold else {}
        report["kl"] = sum(kls) / len(kls)
        if rm:
            report.update(common.domain_report(rm, domains, "reward_model_score"))
            if gold:
                report["reward_gap"] = sum(r - g for r, g in zip(rm, gold)) / len(rm)
        return report

    def evaluate_all(step):
        results = {split: evaluate(data) for split, data in eval_sets.items()}
        for split, report in results.items():
            common.log_eval(writer, metrics_path, step, split, report)
        return results

    initial = evaluate_all(0) if rank == 0 else None

    # Training loop. The prompt order is drawn by a generator seeded alike on all ranks; sampling differs per rank.
    order_rng = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(train["ids"]), generator=order_rng).tolist(), 0
    torch.manual_seed(args.seed + rank)
    gen_time = update_time = 0.0
    for update in tqdm(range(1, args.num_updates + 1), disable=rank != 0, desc="ppo"):
        if cursor + args.rollout_prompts > len(order):
            order, cursor = torch.randperm(len(train["ids"]), generator=order_rng).tolist(), 0
        batch = order[cursor: cursor + args.rollout_prompts][rank * local_prompts: (rank + 1) * local_prompts]
        cursor += args.rollout_prompts
        prompt_of = [i for i in batch for _ in range(args.samples_per_prompt)]
        groups = (rank * local_prompts + torch.arange(local_prompts, device=device)).repeat_interleave(args.samples_per_prompt)

        # 1. Rollouts, scores, per-token rewards (KL penalty + score at the last real token), GAE
        t0 = time.time()
        with torch.no_grad():
            ids, mask, responses, rmask, has_eos = rollout([train["ids"][i] for i in prompt_of], gen_config)
            context_len = ids.shape[1] - responses.shape[1]
            logits = token_logits(policy, ids, mask, context_len, args.temperature)
            logprobs = token_logprobs(logits, responses)
            ref_logprobs = token_logprobs(token_logits(ref_policy, ids, mask, context_len, args.temperature), responses)
            entropy = masked_mean(-(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1), rmask)
            del logits
            values = critic(ids, mask)[:, context_len - 1: -1]
            scores = score(ids, mask, responses, rmask, [train["text"][i] for i in prompt_of])
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
            kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * rmask
            rewards = -args.kl_coef * kl
            rewards[torch.arange(len(rewards)), last_index(rmask)] += scores
            advantages, returns = gae(rewards, values, rmask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, rmask)

            # 2. The worst-case prompt weights: from the negated KL-regularised returns, grouped by prompt,
            #    fixed for all PPO epochs on this batch. rho = 0 gives 1/N each: plain PPO. The returns of
            #    these very rollouts pick unlucky samples (negative advantages); the critic's V(x) does not.
            prompt_values = rewards.sum(1) if args.weights_from == "returns" else values[:, 0]
            weights, dro_stats = common.robust_pair_weights(-prompt_values, groups, args.dro)
        gen_time += time.time() - t0

        # 3. PPO epochs over minibatches; each minibatch's weights are scaled by N / M so that a uniform
        #    weighting is the minibatch mean and the expected minibatch loss is the full-batch robust loss
        #    (and by the world size: the weights of all ranks sum to 1 and DDP averages gradients over ranks)
        t0 = time.time()
        for epoch in range(args.num_ppo_epochs):
            for mb in torch.randperm(batch_size, device=device).split(minibatch_size):
                new_logits = token_logits(policy_ddp, ids[mb], mask[mb], context_len, args.temperature)
                new_values = critic_ddp(ids[mb], mask[mb])[:, context_len - 1: -1]
                pg_loss, vf_loss, ppo_stats = ppo_loss(
                    token_logprobs(new_logits, responses[mb]), logprobs[mb], advantages[mb], new_values, values[mb],
                    returns[mb], rmask[mb], weights[mb] * world * batch_size / len(mb), args.cliprange, args.cliprange_value)
                loss = pg_loss + args.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"update {update}: the loss is {loss.item()}; stopping before anything is saved")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                optimizer.step()
        update_time += time.time() - t0

        # Logging: charts/ (progress), losses/ (last minibatch), objective/ (the RLHF objective), dro/
        mean_kl = kl.sum(1).mean().item()
        scalars = {"objective/score": scores.mean().item(), "objective/kl": mean_kl, "objective/entropy": entropy.item(),
                   "objective/rlhf_reward": rewards.sum(1).mean().item(), "objective/robust_rlhf_reward": -dro_stats["dro/robust_loss"],
                   "losses/policy_loss": pg_loss.item(), "losses/value_loss": vf_loss.item(), **ppo_stats,
                   "charts/grad_norm": grad_norm.item(), "charts/response_length": rmask.sum(1).float().mean().item(),
                   "charts/eos_fraction": has_eos.float().mean().item(), "charts/episodes": update * batch_size * world,
                   "charts/generation_seconds": gen_time, "charts/update_seconds": update_time,
                   # mean whitened advantage of the rollouts under q (about 0 for ERM); < 0: q picks unlucky rollouts
                   "dro/weighted_advantage": world * (weights * masked_mean(advantages, rmask, dim=1)).sum().item(),
                   **{k: v for k, v in dro_stats.items() if not math.isnan(v)}}
        if rank == 0:
            for key, value in scalars.items():
                writer.add_scalar(key, value, update)
        if rank == 0 and args.eval_every and update % args.eval_every == 0 and update < args.num_updates:
            evaluate_all(update)

    # Final evaluation and save (rank 0)
    if distributed:
        dist.destroy_process_group()
    if rank == 0:
        results = evaluate_all(args.num_updates)
        name = "gold_reward" if all(d["gold"] for d in eval_sets.values()) else "reward_model_score"
        if eval_sets:
            print(f"\n{name} at step 0 (the {'warm-started' if sft_steps else 'initial'} policy):")
            common.print_table(initial, name=name)
            print(f"\n{name} after {args.num_updates} PPO iterations ({time.time() - start:.0f} s in all; "
                  f"rollouts {gen_time:.0f} s, updates {update_time:.0f} s):")
            common.print_table(results, name=name)
            print(f"{name} (mean over prompts), step 0 -> {args.num_updates}: " + ", ".join(
                f"{s} {initial[s][name]:.3f} -> {r[name]:.3f}" for s, r in results.items()))
            print("KL to the reference: " + ", ".join(f"{s} {r['kl']:.3f}" for s, r in results.items()))
        if args.save_model:
            common.save_atomically(policy, tokenizer, os.path.join(output_dir, "model"))
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, default=str, indent=1)
        writer.close()
