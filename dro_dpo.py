"""Distributionally robust DPO (Mandal, Sasnauskas, Radanovic 2025).

Objective. DPO trains a policy pi_theta against a frozen reference pi_ref. Each prompt i of a minibatch of B
prompts has the DPO loss (mean over its pairs)

    l_i(theta) = -log sigmoid(beta * [log pi/ref(y_w | x_i) - log pi/ref(y_l | x_i)]),

with log pi/ref(y|x) = log pi_theta(y|x) - log pi_ref(y|x) summed over the response tokens. Robust DPO
minimises the loss under the worst prompt distribution near the batch's own, p0_i = n_i / N (n_i of its N pairs):

    L(theta) = max_{q in Q_rho} sum_i q_i * l_i(theta),   Q_rho = {q in simplex_B : D(q || p0) <= rho}.

Its gradient is sum_i q*_i grad l_i with q* computed from the detached losses (`robust.robust_prompt_weights`
in robust.py; D = total variation, chi-square, KL or CVaR); rho = 0 is plain DPO. Under torchrun the worst case
is over the global batch. Everything else is the DPO you know. `--loss-type ipo` or `hinge` replaces the
per-pair loss by TRL's IPO or hinge (SLiC) loss: the robust weights wrap any per-prompt loss the same way.

    python dro_dpo.py                                  # embedded benchmark, robust default
    python dro_dpo.py --dro.kind tv --dro.rho 0.2
    python dro_dpo.py --dro.kind erm                   # plain DPO
"""

import os
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, get_scheduler

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
    """a Hugging Face causal LM; default: a tiny Llama built from a config"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer, if not the model's own"""
    keep_dropout: bool = False
    """keep the model's dropout in training (default: off, as TRL's disable_dropout=True: a step's loss is then
    that of the model evaluated, ln 2 at the first step)"""
    ref_model: Optional[str] = None
    """the frozen reference pi_ref, if not the starting policy (e.g. the SFT model a trained policy came from)"""
    sft_steps: Optional[int] = None
    """supervised warm start on both responses of the training pairs before DPO (the reference is the
    warm-started model); default: 1000 for the tiny model, 0 for --model-name-or-path"""
    sft_learning_rate: float = 3e-3
    """peak learning rate of the warm start (cosine decay to 0)"""

    # Algorithm
    dro: robust.DROArgs = field(default_factory=robust.DROArgs)
    """the ambiguity set over the prompts of a batch"""
    beta: float = 0.1
    """DPO temperature: strength of the implicit KL regularisation to the reference (IPO: its tau)"""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """the per-pair loss, as TRL's DPOTrainer defines it: sigmoid (DPO), ipo (on per-token mean log-ratios), hinge"""
    label_smoothing: float = 0.0
    """sigmoid only: the probability eps that a label is flipped (conservative DPO), in [0, 0.5)"""
    precompute_ref_logps: bool = False
    """compute the reference log-probs of all training pairs once before training (saves a forward per step)"""

    # Optimisation
    total_steps: int = 600
    """number of DPO optimizer steps"""
    batch_size: int = 64
    """pairs per optimizer step, over all processes and accumulation steps"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step and process"""
    learning_rate: float = 1e-4
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
    eval_every: int = 200
    """evaluate every this many steps (0: only at the start and the end)"""
    eval_batch_size: int = 256
    """pairs per evaluation forward"""
    eval_generations: int = 400
    """prompts per split whose sampled responses are scored with the gold reward (embedded task only)"""
    max_new_tokens: int = 10
    """maximum new tokens of evaluation generations"""
    temperature: float = 1.0
    """sampling temperature of evaluation generations (their KL to the reference is taken at it too)"""
    top_p: float = 1.0
    """nucleus sampling of evaluation generations (1.0: off); their KL is still taken on the full logits"""
    top_k: int = 0
    """sample evaluation generations from the k most likely tokens only (0: off)"""
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
                "total_steps batch_size gradient_accumulation_steps learning_rate eval_batch_size log_every "
                "max_length max_train_rows max_eval_rows max_grad_norm beta sft_learning_rate max_new_tokens "
                "temperature"
            ),
            non_negative="weight_decay warmup_steps eval_every sft_steps eval_generations top_k",
        )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"--label-smoothing applies to --loss-type sigmoid, not {self.loss_type}")
        if self.lora_dropout and not self.keep_dropout:
            raise ValueError("--lora-dropout needs --keep-dropout: dropout is off by default (as in TRL)")


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
):
    """Per-example losses from summed completion log-probs, as TRL 1.16's DPOTrainer computes them (tested against
    its source). logits = log pi/ref(y_w) - log pi/ref(y_l); sigmoid: -log sigmoid(beta * logits); hinge:
    relu(1 - beta * logits); ipo: (logits - 1 / (2 beta))^2 with each log-ratio divided by its response's number of
    tokens (`*_lengths`). Label smoothing eps (conservative DPO): -(1 - eps) log sigmoid(beta * logits) - eps log
    sigmoid(-beta * logits), the sigmoid loss of earlier TRL versions (1.16's sigmoid ignores label_smoothing)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
        if label_smoothing:  # conservative DPO: the label is wrong with probability eps
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * logits)
        return losses
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":  # per-token means, as TRL (and the IPO authors' results) do
        logits = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def pair_logps(model, data, idx, pad_id):
    """Summed completion log-probs of the chosen and rejected responses of rows `idx`, in one forward."""
    seqs = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    logps, _ = common.completion_logprobs(model, seqs, [data["prompt_len"][i] for i in idx] * 2, pad_id)
    return logps.sum(-1).split(len(idx))


def pair_losses(model, reference, data, idx, pad_id, beta, ref_logps=None, loss_type="sigmoid", label_smoothing=0.0):
    """The DPO loss of rows `idx` and the implicit rewards beta * log pi/ref of the chosen and rejected responses.
    The reference goes first: its temporaries are freed before the policy's graph is built."""
    if ref_logps is not None:
        ref_chosen, ref_rejected = ref_logps[idx].unbind(1)
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logps(reference, data, idx, pad_id)
    chosen, rejected = pair_logps(model, data, idx, pad_id)
    lengths = [[len(data[key][i]) - data["prompt_len"][i] for i in idx] for key in ("chosen", "rejected")]
    lengths = torch.tensor(lengths, dtype=chosen.dtype, device=chosen.device)  # response tokens (IPO's means)
    losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, *lengths)
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


@torch.no_grad()
def evaluate(model, reference, data, pad_id, beta, batch_size, where="evaluation"):
    """Per-domain accuracy of the implicit reward: beta * log pi/ref margin of chosen over rejected > 0 (ties: 1/2)."""
    model.eval()
    correct, margins = [], []
    for i in range(0, len(data["chosen"]), batch_size):
        idx = range(i, min(i + batch_size, len(data["chosen"])))
        (chosen, rejected), (ref_chosen, ref_rejected) = (
            pair_logps(model, data, idx, pad_id),
            pair_logps(reference, data, idx, pad_id),
        )
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        correct += ((margin > 0).float() + 0.5 * (margin == 0).float()).tolist()
        margins += (chosen - rejected).tolist()
    model.train()
    lifecycle.check_outputs(margins, "log-prob margin log pi(y_w|x) - log pi(y_l|x)", where)
    return common.domain_report(correct, data["domain"])


@torch.no_grad()
def evaluate_generations(model, reference, tokenizer, rows, generation_config, batch_size) -> dict:
    """Sample a response to each prompt of `rows`; per-domain mean gold reward (embedded task) and the mean KL to the
    reference on those samples (k3 estimate summed over the response tokens, both at the sampling temperature)."""
    prompts, domains = rows["prompt"], rows["domain"]
    model.eval()
    gold, kl = [], []
    for i in range(0, len(prompts), batch_size):
        prompt_ids = [common.encode_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]  # plain text, as trained
        ids, mask, responses, response_mask, _ = common.generate(
            model, prompt_ids, tokenizer.pad_token_id, generation_config.eos_token_id, generation_config
        )
        start = ids.shape[1] - responses.shape[1]
        logps = common.token_logprobs(model, ids, mask, start, generation_config.temperature)
        ref_logps = common.token_logprobs(reference, ids, mask, start, generation_config.temperature)
        kl += (common.kl_k3(logps, ref_logps) * response_mask).sum(-1).tolist()
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        gold += list(map(common.synthetic_gold_reward, prompts[i : i + batch_size], texts, domains[i : i + batch_size]))
    model.train()
    return {**common.domain_report(gold, domains, "gold_reward"), "kl": sum(kl) / len(kl)}


if __name__ == "__main__":
    args, run = lifecycle.start(Args)  # flags, torchrun, the output folder's previous run, seeding
    args.micro_batch_size = run.per_process(args.batch_size, args.gradient_accumulation_steps)
    if args.sft_steps is None:
        args.sft_steps = 0 if args.model_name_or_path else 1000

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
    if any(train["margin"]):
        print(
            f"{args.dataset}: the 'margin' column is not used by DPO (nor by TRL's DPOTrainer); dro_reward.py uses it"
        )
    groups = robust.GroupWeights.start(args.dro, train["domain"])  # group DRO's domain weights (None otherwise)
    batches = common.batch_indices(len(train["chosen"]), args.batch_size, args.seed)
    eval_sets = {
        name: common.load_pairs(
            source, split, tokenizer, args.max_length, args.skip_bad_rows, args.max_eval_rows, args.truncation_mode
        )
        for name, (source, split) in ingest.eval_sources(args.dataset, args.eval_datasets).items()
    }

    # Model: any causal LM, or a tiny Llama built from a config; warm-started, it becomes the frozen reference
    if args.model_name_or_path:
        model = lifecycle.load_model(AutoModelForCausalLM, args.model_name_or_path, args, tokenizer)
    else:
        model = AutoModelForCausalLM.from_config(common.tiny_config(tokenizer))
    model.config.pad_token_id = pad_id
    model.to(run.device)
    if not args.keep_dropout:  # as TRL (disable_dropout=True): train() computes what eval() does
        lifecycle.disable_dropout(model)
    reference = None
    if args.ref_model:
        reference = lifecycle.load_model(
            AutoModelForCausalLM, args.ref_model, args, tokenizer, "--ref-model", frozen=True
        ).eval()
        reference.to(run.device).requires_grad_(False)
    run.open_folder(model)  # the last step of start-up, once everything is checked: the folder becomes this run's
    if args.sft_steps and not run.resuming:  # imitate both responses of each pair, as a base model might sample
        common.warm_start(
            run.replicate(model),
            train["chosen"] + train["rejected"],
            train["prompt_len"] * 2,
            pad_id,
            args.sft_steps,
            2 * args.batch_size,
            args.sft_learning_rate,
            args.seed + 10_000,
            run.rank,
            run.world,
        )
    model = lifecycle.prepare_model(model, args, "CAUSAL_LM")  # gradient checkpointing, LoRA
    if reference is None:  # a frozen copy of the starting policy; with LoRA the policy itself with its adapter off
        reference = lifecycle.reference_policy(model, args)
    reference = run.distribute(reference, frozen=True)  # sharded with --fsdp
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
    modules = {"model": model} if args.lora_r else {"model": model, "reference": reference}  # LoRA: a view
    resumed = run.resume(modules, optimizer, scheduler, batches)  # a resumed run's state ({} for a new run)
    groups, start_results = resumed.get("groups", groups), resumed.get("start_results")
    ref_logps = None
    if args.precompute_ref_logps:
        with torch.no_grad():
            ref_logps = torch.cat(
                [
                    torch.stack(pair_logps(reference, train, range(i, min(i + 256, len(train["chosen"]))), pad_id), 1)
                    for i in range(0, len(train["chosen"]), 256)
                ]
            )
    loss_options = dict(loss_type=args.loss_type, label_smoothing=args.label_smoothing)  # the per-pair loss
    generation_config = common.sampling_config(
        tokenizer, args.max_new_tokens, args.temperature, top_p=args.top_p, top_k=args.top_k, model=model
    )  # stops at any of common.end_token_ids: EOS, the model's generation_config's, the template's turn end

    def evaluate_all(step):  # each evaluation samples the same random stream (common random numbers)
        results = {}
        for split, (rows, data) in eval_sets.items():
            with lifecycle.evaluation_rng(args.seed, run), lifecycle.autocast(args, run.device):
                results[split] = evaluate(
                    model, reference, data, pad_id, args.beta, args.eval_batch_size, f"step {step}, {split}"
                )
                if args.eval_generations and all(map(common.has_gold_reward, rows["prompt"], rows["domain"])):
                    sample = rows.select(range(min(args.eval_generations, len(rows))))
                    generated = evaluate_generations(
                        model, reference, tokenizer, sample, generation_config, args.eval_batch_size
                    )
                    results[split].update(generated)
            run.log_eval(step, split, results[split])
        return results

    if run.evaluating and not run.resuming:
        start_results = evaluate_all(0)

    # Training loop
    for step in run.steps(args.total_steps, "dpo"):
        batch = common.shard(next(batches), run.rank, run.world)  # this process's share of the global batch
        micro_batches = [batch[i : i + args.micro_batch_size] for i in range(0, len(batch), args.micro_batch_size)]

        # ROBUST: 1. The worst-case weights q* of the global batch, from detached per-pair losses. With one
        #    micro-batch they come from the training forward itself; with accumulation from a no-grad forward
        #    over all micro-batches first, so that every backward uses the weights of the whole batch.
        with lifecycle.autocast(args, run.device):
            if len(micro_batches) == 1:
                losses, chosen_rewards, rejected_rewards = pair_losses(
                    parallel_model, reference, train, batch, pad_id, args.beta, ref_logps, **loss_options
                )
                detached = losses.detach()
            else:
                with torch.no_grad():
                    detached = torch.cat(
                        [
                            pair_losses(model, reference, train, idx, pad_id, args.beta, ref_logps, **loss_options)[0]
                            for idx in micro_batches
                        ]
                    )
        prompt_ids = torch.tensor([train["prompt_id"][i] for i in batch], device=run.device)
        domains = [train["domain"][i] for i in batch]
        weights, dro_stats = robust.robust_prompt_weights(detached, prompt_ids, args.dro, groups, domains)

        # ROBUST: 2. Backward of sum_i q*_i l_i (times the world size: DDP averages gradients over processes)
        for j, idx in enumerate(micro_batches):
            if len(micro_batches) > 1:
                with lifecycle.autocast(args, run.device):
                    losses, chosen_rewards, rejected_rewards = pair_losses(
                        parallel_model, reference, train, idx, pad_id, args.beta, ref_logps, **loss_options
                    )
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
        extra = {"groups": groups, "start_results": start_results if run.rank == 0 else None}
        run.checkpoint(step, modules, optimizer, scheduler, extra)  # when due, or on SIGTERM (then exit)

    # Final evaluation (rank 0; with --fsdp every process takes part) and save (rank 0 writes)
    results = evaluate_all(args.total_steps) if run.evaluating else None
    if run.rank == 0:
        if results:
            print(
                f"\nimplicit-reward accuracy (%) after {args.total_steps} DPO steps, {time.time() - run.started:.0f} s:"
            )
            common.print_table(results)
        for name, res in (
            ("the reference (step 0)", start_results),
            (f"the policy (step {args.total_steps})", results),
        ):
            res = {split: report for split, report in res.items() if "gold_reward" in report}
            if res:
                print(f"\ngold reward of sampled responses, {name}:")
                common.print_table(res, name="gold_reward")
                print("KL to the reference: " + ", ".join(f"{s} {r['kl']:.3f}" for s, r in res.items()))
    run.finish(model, tokenizer, base_changed=bool(args.sft_steps))
