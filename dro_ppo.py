"""Distributionally robust reward-based RLHF with PPO (Mandal, Sasnauskas, Radanovic 2025).

Objective. A policy pi generates a response y to a prompt x; a reward model (or, on the embedded task,
the known gold reward) scores it with r(x, y), and a KL penalty keeps pi near the reference pi_ref.
Instead of the average over the training prompts we maximise the value under the worst prompt
distribution near the batch's (uniform: every prompt has K rollouts):

    max_pi  min_{q in Q_rho}  sum_i q_i * E_{y ~ pi(.|x_i)} [ r(x_i, y) - beta * KL(pi(.|x_i) || pi_ref(.|x_i)) ]

How the minibatch algorithm realises it. Each PPO iteration samples a rollout batch of B prompts, K
responses each. For prompt i, R_i is the mean over its K rollouts of the KL-regularised return
(the score minus beta times the per-token KL estimates summed over the response). The worst-case
weights q = robust.robust_weights(-R_i) put more weight on the prompts on which the policy currently
does worst; they are computed once per rollout batch (detached) and held fixed through its PPO epochs.
By default (--weights-from loo) rollout j of prompt i is weighted by the worst case computed with R_i replaced
by the mean of the prompt's *other* rollouts: the realised returns of the very rollouts the weights multiply
(--weights-from returns) upweight the unlucky ones, and the critic's V(x_i) (--weights-from values) cannot
see what the prompt does not show. docs/results.md has what each measured and how the default was chosen.
Which losses are weighted: only the policy surrogate. Each rollout's clipped PPO surrogate is summed over its
response tokens and divided by the constant --max-new-tokens (a per-rollout token mean would favour short
responses), and the loss is sum_i q_i * (mean surrogate of prompt i's rollouts): each rollout gets q_i / K. With
--baseline critic a value loss is added, a plain mean over all response tokens (it fits V^pi, which does not depend
on q). rho = 0 (or --dro.kind erm) gives uniform weights: exactly plain PPO (plain RLOO with the default baseline).
Minibatches draw rollouts of the batch at random; their weights are scaled by N/M (rollouts per batch / per
minibatch), so the expected minibatch loss is the full-batch robust loss. The advantages (whitened) are by default
each rollout's KL-regularised return minus the mean return of its prompt's other K - 1 samples (RLOO's
leave-one-out baseline: K samples per prompt stand in for a value model), or with --baseline critic GAE on a learned
critic (PPO's): on the embedded task the critic's baseline kept PPO from improving even the gold reward
(docs/results.md). Under torchrun each process generates for its share of the rollout prompts; the worst case (the
returns are all-gathered) and the advantage whitening are over the global rollout batch.

The tiny default model is first warm-started by 1000 steps of supervised fine-tuning on the
chosen responses of the training split (--sft-steps; off for a pretrained --model-name-or-path); that
warm-started model is the reference policy, and the step-0 evaluation measures it.

    python dro_ppo.py                                    # embedded task, gold reward, chi2 rho = 2, loo, RLOO
    python dro_ppo.py --dro.kind erm                     # the plain PPO baseline
    python dro_ppo.py --reward-model-path runs/<reward run>/model   # a reward model from dro_reward.py
"""

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    """prompts (and warm-start responses): "synthetic" (embedded), a `datasets` hub name, or a local file or folder
    (json, jsonl, parquet, csv) or `save_to_disk` folder"""
    dataset_split: str = "train"
    """the split of --dataset to train on"""
    eval_datasets: tuple[str, ...] = ()
    """evaluation prompts, zero or more like --dataset (default: the embedded validation, ID and shifted splits)"""
    max_train_rows: Optional[int] = None
    """use at most this many training prompts"""
    max_eval_rows: Optional[int] = 400
    """use at most this many prompts of each evaluation split"""
    max_prompt_length: int = 64
    """maximum prompt length in tokens; a longer prompt is an error (or skipped with --skip-bad-rows)"""

    # Model
    model_name_or_path: Optional[str] = None
    """a Hugging Face causal LM for the policy (and reference); default: a tiny Llama"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer, if not the model's own"""
    reward_model_path: Optional[str] = None
    """a sequence-classification reward model (e.g. <run>/model of dro_reward.py) with the policy's tokenizer;
    default: the gold reward, which exists for the embedded task's prompts"""
    sft_steps: Optional[int] = None
    """supervised warm start on the chosen responses of --dataset (the reference is the warm-started model);
    default: 1000 for the tiny model, 0 for --model-name-or-path"""
    sft_learning_rate: float = 3e-3
    """peak learning rate of the warm start (cosine decay to 0)"""
    sft_batch_size: int = 64
    """sequences per warm-start step, over all processes (apart from --batch-size: the rollout shape leaves the
    reference as it is)"""

    # Algorithm
    dro: robust.DROArgs = field(default_factory=lambda: robust.DROArgs(kind="chi2", rho=2.0))
    """the ambiguity set over the prompts of a rollout batch (chi2 2 and loo: chosen on validation, docs/results.md)"""
    weights_from: Literal["returns", "values", "loo"] = "loo"
    """a prompt's value for the worst case: its other rollouts' returns (loo), its own (returns), the critic's V(x)"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty (k3 estimate) to the reference (the start value with --target-kl)"""
    target_kl: Optional[float] = None
    """adapt beta after each iteration towards this KL to the reference per response (Ziegler et al. 2019); None: off"""
    kl_horizon: int = 10_000
    """rollouts over which the adaptive controller closes a gap of its clipped proportional error (Ziegler's horizon)"""
    score_baseline: Literal["chosen", "none"] = "chosen"
    """a reward model's score of a rollout minus its score of the prompt's chosen response (chosen), or raw (none):
    Bradley-Terry fixes r(x, y) only up to a constant per prompt, which would decide the worst case"""
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
    baseline: Literal["rloo", "critic"] = "rloo"
    """advantage baseline: each rollout's return minus the mean return of its prompt's other samples (rloo: no value
    model, needs --samples-per-prompt >= 2), or a learned value model with GAE (critic: PPO's; docs/results.md)"""

    # Optimisation
    total_steps: int = 60
    """number of PPO iterations (a rollout batch, then its PPO epochs)"""
    batch_size: int = 32
    """prompts per rollout batch, over all processes"""
    samples_per_prompt: int = 4
    """sampled responses per prompt (their mean return is the prompt's return; 4 samples x 32 prompts: chosen on
    validation over 2 x 64 and 8 x 16 at the same 128 rollouts, docs/results.md)"""
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
    top_p: float = 1.0
    """nucleus sampling of rollouts and evaluations (1.0: off); log-probs stay those of the full logits at
    --temperature, as in TRL's GRPOTrainer, so the ratio and KL ignore the truncation"""
    top_k: int = 0
    """sample rollouts and evaluations from the k most likely tokens only (0: off); log-probs as with --top-p"""

    # Evaluation
    eval_every: int = 20
    """evaluate every this many PPO iterations (0: only at the start and the end)"""
    eval_batch_size: int = 200
    """prompts per evaluation generate"""
    eval_greedy: bool = False
    """evaluate greedy generations (default: sampled at --temperature, as the objective E_{y ~ pi}[r] is defined)"""

    # Filled in at run time
    local_batch_size: int = 0
    """rollouts per process and iteration: batch_size / world_size x samples_per_prompt (computed at run time)"""
    minibatch_size: int = 0
    """rollouts per PPO minibatch and process (computed at run time)"""

    def __post_init__(self):
        super().__post_init__()
        lifecycle.check_args(
            self,
            positive=(
                "total_steps batch_size samples_per_prompt num_ppo_epochs num_minibatches learning_rate "
                "value_learning_rate max_grad_norm max_new_tokens temperature eval_batch_size max_prompt_length "
                "max_train_rows max_eval_rows sft_learning_rate sft_batch_size cliprange cliprange_value gamma "
                "target_kl kl_horizon"
            ),
            non_negative="kl_coef missing_eos_penalty lam vf_coef eval_every sft_steps top_k",
        )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.baseline == "rloo" and (self.samples_per_prompt < 2 or self.weights_from == "values"):
            raise ValueError(
                "--baseline rloo compares each rollout with its prompt's other samples: it needs --samples-per-prompt "
                f">= 2 (got {self.samples_per_prompt}) and has no critic for --weights-from values"
            )
        if self.lora_dropout:
            raise ValueError("--lora-dropout must be 0: PPO's ratio compares the policy with itself, dropout is off")


def load_prompts(
    source, split, tokenizer, max_prompt_length, skip_bad_rows=False, max_rows=None, truncation_mode="error"
):
    """Tokenized prompts of a preference source (`common.encode_prompt`), whether each is chat-template text, and its
    chosen responses as whole sequences with their prompt lengths (for the warm start). A longer prompt than
    max_prompt_length is an error naming the row, skipped with --skip-bad-rows, or cut by --truncation-mode."""
    data, skipped = {"text": [], "ids": [], "chat": [], "chosen": [], "chosen_prompt_len": [], "domain": []}, 0
    for row in ingest.load_preferences(source, split, tokenizer, skip_bad_rows, max_rows):
        where, chat = row["where"], row["chat"]
        ids = common.encode_prompt(tokenizer, row["prompt"], chat, where)
        if len(ids) > max_prompt_length:
            if truncation_mode == "error" and not skip_bad_rows:
                raise common.DataError(
                    f"{where}: the prompt is {len(ids)} tokens, more than --max-prompt-length "
                    f"{max_prompt_length} (raise it, pass --truncation-mode keep_start|keep_end or --skip-bad-rows)"
                )
            if truncation_mode == "error":
                skipped += 1
                continue
            ids = ids[:max_prompt_length] if truncation_mode == "keep_start" else ids[-max_prompt_length:]
        chosen, prompt_len = common.encode_pair(tokenizer, row["prompt"], row["chosen"], chat, where=where)
        data["text"].append(row["prompt"])
        data["ids"].append(ids)
        data["chat"].append(chat)
        data["chosen"].append(chosen)
        data["chosen_prompt_len"].append(prompt_len)
        data["domain"].append(row["domain"])
    if skipped:
        print(f"{source}: skipped {skipped} prompt(s) longer than {max_prompt_length} tokens (--skip-bad-rows)")
    if not data["ids"]:
        raise common.DataError(f"{source}: no prompts fit in --max-prompt-length {max_prompt_length}")
    return data


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


def rloo_advantages(returns: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """--baseline rloo (REINFORCE leave-one-out, Ahmadian et al. 2024): each rollout's return minus the mean return
    of its prompt's other K - 1 samples. Rollouts come in runs of K per prompt; one advantage per rollout."""
    k = samples_per_prompt
    per_prompt = returns.view(-1, k)
    return (per_prompt - (per_prompt.sum(1, keepdim=True) - per_prompt) / (k - 1)).flatten()


def cross_fitted_weights(losses, prompt_ids, dro, samples_per_prompt):
    """--weights-from loo: rollout j of every prompt gets the prompt's weight in the worst case computed from the
    prompts' *other* rollouts (its own loss replaced by the mean of the other K - 1), so no rollout's weight depends
    on its own return. Rollouts come in runs of K per prompt. Returns (weights summing to 1 over all ranks, the
    diagnostics averaged over the K worst cases). rho = 0 gives exactly the plain 1/N."""
    k = samples_per_prompt
    per_prompt, weights, stats = losses.view(-1, k), torch.empty_like(losses).view(-1, k), {}
    for j in range(k):
        held_out = per_prompt.clone()
        held_out[:, j] = torch.cat([per_prompt[:, :j], per_prompt[:, j + 1 :]], 1).mean(1)
        w, fold = robust.robust_prompt_weights(held_out.flatten(), prompt_ids, dro)
        weights[:, j] = w.view(-1, k)[:, j]
        for name, value in fold.items():
            stats[name] = stats.get(name, 0.0) + value / k
    return weights.flatten(), stats


def adapted_kl_coef(kl_coef: float, kl: float, target: float, rollouts: int, horizon: int) -> float:
    """Ziegler et al. (2019)'s adaptive KL controller: beta <- beta * (1 + e * rollouts / horizon), with the
    proportional error e = clip(KL / target - 1, -0.2, 0.2) of the batch's mean KL per response."""
    return kl_coef * (1 + min(max(kl / target - 1, -0.2), 0.2) * rollouts / horizon)


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


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    values,
    old_values,
    returns,
    mask,
    weights=None,
    cliprange=0.2,
    cliprange_value=0.2,
    max_tokens=None,
):
    """Clipped PPO losses from per-token tensors [N, T] of N rollouts.

    policy loss = sum_j weights_j * (clipped surrogate of rollout j summed over its response tokens) / max_tokens
    (default T): the sequence-level policy gradient, divided by a constant. Averaging each rollout over its own
    length instead would weight short responses up and bias the objective towards them. weights=None is the plain
    mean (1/N each): plain PPO. The value loss is a plain token mean (0 without values: --baseline rloo).
    """
    if weights is None:
        weights = torch.full((logprobs.shape[0],), 1.0 / logprobs.shape[0], device=logprobs.device)
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (weights * (surrogate * mask).sum(1)).sum() / (max_tokens or mask.shape[1])
    stats = {
        "losses/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask).item(),
        "losses/approxkl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item(),
    }
    if values is None:
        return pg_loss, torch.zeros_like(pg_loss), stats
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    stats["losses/value_clipfrac"] = masked_mean(((values - old_values).abs() > cliprange_value).float(), mask).item()
    return pg_loss, vf_loss, stats


class Critic(nn.Module):
    """Value model: the policy's transformer with a scalar head, one value per token. A copy of the transformer, or
    with shared=True (LoRA, built before the adapters are added) a second module tree over the very same weight
    tensors: the frozen base is held once, and the critic trains only its own adapter and head."""

    def __init__(self, policy, shared=False):
        super().__init__()
        same = {id(p): p for p in policy.base_model.parameters()} if shared else {}  # deepcopy's memo: kept as they are
        self.backbone = copy.deepcopy(policy.base_model, same)
        self.head = nn.Linear(policy.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, mask):
        hidden = self.backbone(
            input_ids=ids, attention_mask=mask, position_ids=common.positions(mask)
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def rollout_scores(tokenizer, reward_model, prompts, domains, chat, responses, response_mask, ended=None):
    """The score of each rollout: the gold reward of the decoded response (embedded datasets) or the reward model's
    score of prompt + response encoded as its training rows were (`common.encode_pair`: the decoded response, closed
    as a row's response is where the rollout ended: `ended` from `common.generate`, or else where its last token is
    one of `common.end_token_ids(tokenizer)`), read by its own pooling (`common.sequence_rewards`)."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)  # cut at the end token already
    if reward_model is None:
        return torch.tensor(list(map(common.synthetic_gold_reward, prompts, texts, domains)), device=responses.device)
    if ended is None:
        n, end = response_mask.sum(1).tolist(), common.end_token_ids(tokenizer)
        ended = [k > 0 and r[k - 1] in end for r, k in zip(responses.tolist(), n)]
    seqs = [
        common.encode_pair(tokenizer, p, t, c, close=None if e else "")[0]
        for p, t, c, e in zip(prompts, texts, chat, ended)
    ]
    return common.sequence_rewards(reward_model, seqs, tokenizer.pad_token_id).to(responses.device)


@torch.no_grad()
def score_baselines(reward_model, data, pad_id, kind, batch_size=256):
    """Each prompt's score baseline: the reward model's score of its chosen response (--score-baseline chosen), or 0."""
    if kind == "none":
        return torch.zeros(len(data["ids"]))
    seqs = data["chosen"]
    return torch.cat(
        [
            common.sequence_rewards(reward_model, seqs[i : i + batch_size], pad_id).cpu()
            for i in range(0, len(seqs), batch_size)
        ]
    )


@torch.no_grad()
def evaluate(
    policy, reference, reward_model, tokenizer, data, generation_config, batch_size, temperature, where="evaluation"
):
    """Per-domain gold reward (embedded-task prompts) and reward-model score of generations; KL to the reference."""
    gold, kls, rm = [], [], []
    has_gold = all(map(common.has_gold_reward, data["text"], data["domain"]))
    for i in range(0, len(data["ids"]), batch_size):
        prompts, prompt_ids = data["text"][i : i + batch_size], data["ids"][i : i + batch_size]
        domains = data["domain"][i : i + batch_size]
        ids, mask, responses, response_mask, ended = common.generate(
            policy, prompt_ids, tokenizer.pad_token_id, generation_config.eos_token_id, generation_config
        )
        start = ids.shape[1] - responses.shape[1]
        # exact KL of the next-token distributions, summed over the response: the sequence KL in expectation
        kl = common.token_kl(policy, reference, ids, mask, start, temperature)
        kls += (kl * response_mask).sum(1).tolist()
        rollouts = (prompts, domains, data["chat"][i : i + batch_size], responses, response_mask, ended.tolist())
        if has_gold:
            gold += rollout_scores(tokenizer, None, *rollouts).tolist()
        if reward_model is not None:
            rm += (
                rollout_scores(tokenizer, reward_model, *rollouts).cpu() - data["baseline"][i : i + batch_size]
            ).tolist()
    lifecycle.check_outputs(kls, "KL to the reference", where, must_vary=False)
    lifecycle.check_outputs(rm, "reward-model score", where)
    report = {"kl": sum(kls) / len(kls)}
    if gold:
        report.update(common.domain_report(gold, data["domain"], "gold_reward"))
    if rm:
        report.update(common.domain_report(rm, data["domain"], "reward_model_score"))
        if gold:
            report["reward_gap"] = sum(r - g for r, g in zip(rm, gold)) / len(rm)
    return report


if __name__ == "__main__":
    args, run = lifecycle.start(Args)  # flags, torchrun, the output folder's previous run, seeding
    if args.reward_model_path is not None:
        lifecycle.check_model_path(args.reward_model_path, "--reward-model-path")
    args.local_batch_size = run.per_process(args.batch_size) * args.samples_per_prompt  # rollouts per process
    if args.local_batch_size % args.num_minibatches:
        raise common.ArgumentError(
            f"{args.local_batch_size} rollouts per process must split into --num-minibatches {args.num_minibatches}"
        )
    args.minibatch_size = args.local_batch_size // args.num_minibatches
    if args.weights_from == "loo" and args.samples_per_prompt < 2 and args.dro.kind != "group":
        raise common.ArgumentError(
            "--weights-from loo holds out one rollout of each prompt: it needs --samples-per-prompt >= 2 (got "
            f"{args.samples_per_prompt}); or pass --weights-from returns"
        )
    if args.sft_steps is None:
        args.sft_steps = 0 if args.model_name_or_path else 1000

    # Data: prompts (their chosen responses only for the warm start); global batches of prompts, epoch after epoch
    tokenizer = lifecycle.load_tokenizer(args)
    pad_id = tokenizer.pad_token_id
    train = load_prompts(
        args.dataset,
        args.dataset_split,
        tokenizer,
        args.max_prompt_length,
        args.skip_bad_rows,
        args.max_train_rows,
        args.truncation_mode,
    )
    if args.reward_model_path is None:  # (a --reward-model-path is checked at start-up, before the data is read)
        gold = map(common.has_gold_reward, train["text"], train["domain"])
        no_gold = next((i for i, has in enumerate(gold) if not has), None)
        if no_gold is not None:
            raise common.DataError(
                f"{args.dataset}: prompt {no_gold} is not one of the embedded datasets', so it has no gold "
                f"reward: pass --reward-model-path"
            )
    groups = robust.GroupWeights.start(args.dro, train["domain"])  # group DRO's domain weights (None otherwise)
    batches = common.batch_indices(len(train["ids"]), args.batch_size, args.seed, "prompts")
    if args.sft_steps and len(train["chosen"]) < args.sft_batch_size:
        raise common.DataError(
            f"the training data has {len(train['chosen'])} warm-start sequences, fewer than one --sft-batch-size of "
            f"{args.sft_batch_size}; lower it or add data"
        )
    eval_sets = {
        name: load_prompts(
            source,
            split,
            tokenizer,
            args.max_prompt_length,
            args.skip_bad_rows,
            args.max_eval_rows,
            args.truncation_mode,
        )
        for name, (source, split) in ingest.eval_sources(args.dataset, args.eval_datasets).items()
    }

    # Models: policy (warm-started, then frozen as the reference), value model, reward model
    if args.model_name_or_path:
        policy = lifecycle.load_model(AutoModelForCausalLM, args.model_name_or_path, args, tokenizer)
    else:
        policy = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer))
    policy.config.pad_token_id = pad_id
    policy.to(run.device)
    reward_model = None
    if args.reward_model_path:
        reward_model = lifecycle.load_model(
            AutoModelForSequenceClassification,
            args.reward_model_path,
            args,
            tokenizer,
            "--reward-model-path",
            frozen=True,
            num_labels=1,
        )
        reward_model.config.pad_token_id = pad_id
        reward_model.to(run.device).eval().requires_grad_(False)
    run.open_folder(policy)  # the last step of start-up, once everything is checked: the folder becomes this run's
    began = time.time()
    if args.sft_steps and not run.resuming:  # the tiny model cannot generate anything meaningful from a random init
        common.warm_start(
            run.replicate(policy),
            train["chosen"],
            train["chosen_prompt_len"],
            pad_id,
            args.sft_steps,
            args.sft_batch_size,
            args.sft_learning_rate,
            args.seed + 10_000,
            run.rank,
            run.world,
            run.tracker,
        )
    critic = None  # --baseline rloo; with LoRA the critic's frozen weights are the policy's (held once)
    if args.baseline == "critic":
        critic = Critic(policy, shared=args.lora_r > 0).to(run.device)
    policy = lifecycle.prepare_model(policy, args, "CAUSAL_LM")  # gradient checkpointing, LoRA
    if critic is not None:
        critic.backbone = lifecycle.prepare_model(critic.backbone, args, "FEATURE_EXTRACTION")  # its own adapter
    trained_models = [policy] + ([critic] if critic is not None else [])
    for model in trained_models:  # no dropout anywhere: the PPO ratio must compare the same function
        lifecycle.disable_dropout(model)
        model.eval()  # train() only for the PPO epochs, where it switches gradient checkpointing on
    reference = lifecycle.reference_policy(policy, args)  # a frozen copy; with LoRA the policy with its adapter off
    parallel_policy = run.distribute(policy)  # DDP, FSDP2, or itself
    parallel_critic = run.distribute(critic) if critic is not None else None
    reference = run.distribute(reference, frozen=True)  # sharded with --fsdp
    if reward_model is not None:
        reward_model = run.distribute(reward_model, frozen=True)
        with lifecycle.autocast(args, run.device):  # each prompt's score baseline, subtracted from its rollouts' scores
            for data in [train, *eval_sets.values()]:
                data["baseline"] = score_baselines(reward_model, data, pad_id, args.score_baseline)
    param_groups = [{"params": policy.parameters(), "lr": args.learning_rate}]
    if critic is not None:
        trained = [p for p in critic.parameters() if p.requires_grad]  # (with LoRA its frozen ones are the policy's)
        param_groups.append({"params": trained, "lr": args.value_learning_rate})
    optimizer = torch.optim.AdamW(param_groups, fused=True)  # (one kernel, no temporaries: TRL's default)
    # rollouts stop at any end token (`common.end_token_ids`): EOS, the model's generation_config's (e.g.
    # <|eot_id|>), the template's turn end
    sampling = dict(top_p=args.top_p, top_k=args.top_k, model=policy)
    generation_config = common.sampling_config(tokenizer, args.max_new_tokens, args.temperature, **sampling)
    eval_config = common.sampling_config(
        tokenizer, args.max_new_tokens, args.temperature, greedy=args.eval_greedy, **sampling
    )
    run.print(
        f"{args.run_id}: {len(train['ids'])} training prompts, policy: {lifecycle.parameter_counts(*trained_models)} "
        f"with the critic's (--baseline {args.baseline}), reward: {args.reward_model_path or 'gold'}, "
        f"warm start: {args.sft_steps} steps "
        f"({time.time() - began:.0f} s), {run.world} process(es) x {args.batch_size // run.world} prompts x "
        f"{args.samples_per_prompt} samples per rollout batch"
    )

    def evaluate_all(step):  # each evaluation samples the same random stream (common random numbers)
        with lifecycle.evaluation_rng(args.seed, run), lifecycle.autocast(args, run.device):
            results = {
                split: evaluate(
                    policy,
                    reference,
                    reward_model,
                    tokenizer,
                    data,
                    eval_config,
                    args.eval_batch_size,
                    args.temperature,
                    f"step {step}, {split}",
                )
                for split, data in eval_sets.items()
            }
        for split, report in results.items():
            run.log_eval(step, split, report)
        return results

    if run.evaluating and not run.resuming:
        start_results = evaluate_all(0)
    torch.manual_seed(args.seed + run.rank)  # the prompt order is the same on all ranks, the sampling differs per rank
    modules = {"policy": policy, "critic": critic} if critic is not None else {"policy": policy}
    if not args.lora_r:  # with LoRA the reference is a view of the policy
        modules["reference"] = reference
    resumed = run.resume(modules, optimizer, None, batches)  # a resumed run's state ({} for a new run)
    if resumed:
        groups, start_results = resumed["groups"], resumed["start_results"]
    generation_seconds, update_seconds = resumed.get("generation_seconds", 0.0), resumed.get("update_seconds", 0.0)
    kl_coef = resumed.get("kl_coef", args.kl_coef)  # beta, adapted after each iteration with --target-kl

    # Training loop
    for step in run.steps(args.total_steps, "ppo"):
        batch = common.shard(next(batches), run.rank, run.world)  # this process's share of the global batch
        rollout_prompts = [i for i in batch for _ in range(args.samples_per_prompt)]
        prompt_ids = (run.rank * len(batch) + torch.arange(len(batch), device=run.device)).repeat_interleave(
            args.samples_per_prompt
        )

        # 1. Rollouts, scores, per-token rewards (KL penalty + score at the last response token), GAE
        t0 = time.time()
        with torch.no_grad(), lifecycle.autocast(args, run.device):
            queries = [train["ids"][i] for i in rollout_prompts]
            ids, mask, responses, response_mask, ended = common.generate(
                policy, queries, pad_id, generation_config.eos_token_id, generation_config
            )
            context_len = ids.shape[1] - responses.shape[1]
            logprobs, entropy = common.token_logprobs(policy, ids, mask, context_len, args.temperature, entropy=True)
            ref_logprobs = common.token_logprobs(reference, ids, mask, context_len, args.temperature)
            entropy = masked_mean(entropy, response_mask)
            values = critic(ids, mask)[:, context_len - 1 : -1] if critic is not None else None
            scores = rollout_scores(
                tokenizer,
                reward_model,
                [train["text"][i] for i in rollout_prompts],
                [train["domain"][i] for i in rollout_prompts],
                [train["chat"][i] for i in rollout_prompts],
                responses,
                response_mask,
                ended.tolist(),
            )
            if reward_model is not None:  # relative to the prompt's chosen response (--score-baseline)
                scores = scores - train["baseline"][rollout_prompts].to(scores.device)
            scores = scores - args.missing_eos_penalty * (~ended).float()
            kl = common.kl_k3(logprobs, ref_logprobs) * response_mask
            rewards = -kl_coef * kl
            rewards[torch.arange(len(rewards)), response_mask.sum(1) - 1] += scores
            if args.baseline == "critic":  # GAE on the critic's values
                advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)
            else:  # RLOO: the return minus the mean of the prompt's other samples, at every response token
                advantages = rloo_advantages(rewards.sum(1), args.samples_per_prompt)[:, None] * response_mask
            advantages = masked_whiten(advantages, response_mask)

            # ROBUST: 2. The worst-case prompt weights, from the negated KL-regularised returns grouped by prompt:
            #    by default cross-fitted (each rollout's weight from its prompt's other rollouts), or the rollouts'
            #    own returns, or the critic's V(x). Fixed for all PPO epochs on this batch; rho = 0: plain PPO.
            prompt_values = values[:, 0] if args.weights_from == "values" else rewards.sum(1)
            if args.weights_from == "loo" and groups is None:  # (group DRO: a domain's mean over many prompts)
                weights, dro_stats = cross_fitted_weights(-prompt_values, prompt_ids, args.dro, args.samples_per_prompt)
            else:
                domains = [train["domain"][i] for i in rollout_prompts]
                weights, dro_stats = robust.robust_prompt_weights(-prompt_values, prompt_ids, args.dro, groups, domains)
        generation_seconds += time.time() - t0

        # 3. PPO epochs over minibatches. ROBUST: each minibatch's weights are scaled by N / M so that uniform
        #    weights give the minibatch mean and the expected minibatch loss is the full-batch robust loss (and by
        #    the world size: the weights of all ranks sum to 1 and DDP averages gradients over ranks)
        t0 = time.time()
        for model in trained_models:
            model.train()
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(args.local_batch_size, device=run.device).split(args.minibatch_size):
                with lifecycle.autocast(args, run.device):
                    new_logprobs = common.token_logprobs(
                        parallel_policy, ids[mb], mask[mb], context_len, args.temperature
                    )
                    new_values = old_values = mb_returns = None  # --baseline rloo: no value loss
                    if critic is not None:
                        new_values = parallel_critic(ids[mb], mask[mb])[:, context_len - 1 : -1]
                        old_values, mb_returns = values[mb], returns[mb]
                pg_loss, vf_loss, ppo_stats = ppo_loss(
                    new_logprobs,
                    logprobs[mb],
                    advantages[mb],
                    new_values,
                    old_values,
                    mb_returns,
                    response_mask[mb],
                    weights[mb] * run.world * args.local_batch_size / len(mb),
                    args.cliprange,
                    args.cliprange_value,
                    args.max_new_tokens,
                )
                loss = pg_loss + args.vf_coef * vf_loss
                run.stop_on_nonfinite_loss(loss, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = lifecycle.clip_gradients(policy, args.max_grad_norm)
                value_grad_norm = grad_norm if critic is None else lifecycle.clip_gradients(critic, args.max_grad_norm)
                if run.update_is_finite(step, grad_norm, value_grad_norm):  # else skipped, or the run stops
                    optimizer.step()
        for model in trained_models:
            model.eval()
        update_seconds += time.time() - t0

        # Logging: objective/ (the RLHF objective), losses/ (last minibatch), charts/ (progress), dro/
        run.log(
            {
                **dro_stats,
                **ppo_stats,
                "objective/score": scores.mean().item(),
                "objective/kl": kl.sum(1).mean().item(),
                "objective/entropy": entropy.item(),
                "objective/rlhf_reward": rewards.sum(1).mean().item(),
                "objective/kl_coef": kl_coef,
                "losses/policy_loss": pg_loss.item(),
                "losses/value_loss": vf_loss.item(),
                "charts/grad_norm": grad_norm.item(),
                "charts/skipped_steps": run.skipped_steps,
                "charts/response_length": response_mask.sum(1).float().mean().item(),
                "charts/eos_fraction": ended.float().mean().item(),
                "charts/episodes": step * args.local_batch_size * run.world,
                "charts/generation_seconds": generation_seconds,
                "charts/update_seconds": update_seconds,
                # mean whitened advantage of the rollouts under q (about 0 for ERM); < 0: q picks unlucky rollouts
                "dro/weighted_advantage": run.world
                * (weights * masked_mean(advantages, response_mask, dim=1)).sum().item(),
            },
            step,
        )
        if args.target_kl is not None:  # from the rollout batch's mean KL per response, over all processes
            mean_kl = kl.sum(1).mean() / run.world
            if run.world > 1:
                dist.all_reduce(mean_kl)  # (a sum: gloo has no average)
            kl_coef = adapted_kl_coef(
                kl_coef, mean_kl.item(), args.target_kl, args.batch_size * args.samples_per_prompt, args.kl_horizon
            )
        if run.evaluation_due(step):
            evaluate_all(step)
        extra = {
            "groups": groups,
            "start_results": start_results if run.rank == 0 else None,
            "generation_seconds": generation_seconds,
            "update_seconds": update_seconds,
            "kl_coef": kl_coef,
        }
        run.checkpoint(step, modules, optimizer, None, extra)  # when due, or on SIGTERM (then exit)

    # Final evaluation (rank 0; with --fsdp every process takes part) and save (rank 0 writes)
    results = evaluate_all(args.total_steps) if run.evaluating else None
    if run.rank == 0:
        print(
            f"\n{args.total_steps} PPO iterations, {time.time() - began:.0f} s in all "
            f"(rollouts {generation_seconds:.0f} s, updates {update_seconds:.0f} s)"
        )
        for name in ("gold_reward", "reward_model_score"):
            for label, res in (
                (f"step 0 (the {'warm-started' if args.sft_steps else 'initial'} policy)", start_results),
                (f"after {args.total_steps} PPO iterations", results),
            ):
                res = {split: report for split, report in res.items() if name in report}
                if res:
                    print(f"\n{name}, {label}:")
                    common.print_table(res, name=name)
        if results:
            print("KL to the reference: " + ", ".join(f"{s} {r['kl']:.3f}" for s, r in results.items()))
    run.finish(policy, tokenizer, base_changed=bool(args.sft_steps))
