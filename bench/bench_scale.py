"""The memory savers (--bf16, --gradient-checkpointing, LoRA) on a 25M-parameter Llama: ours against TRL.

    OMP_NUM_THREADS=2 python bench/bench_scale.py --rounds 2 --steps 6                 # CPU, both sections
    python bench/bench_scale.py --only dpo --device cuda --rounds 3 --steps 20 --batch 64     # a GPU

The model: a Llama built from a config (8 layers, hidden 512, intermediate 1376, 8 heads, tied embeddings, the
byte-level tokenizer `common.tiny_tokenizer()`: 25.4M parameters, printed), random weights, the embedded synthetic
data. Modes: fp32; bf16 (autocast, fp32 master weights); gradient checkpointing (non-reentrant); LoRA r=16,
alpha=32, dropout 0 on every linear layer but the output one, the reference = the model with its adapter off.

(a) DPO, batch --batch pairs, AdamW lr 1e-4, clipping at 1, beta 0.1, max length 64. Ours: the body of dro_dpo.py's
training loop (`dro_dpo.pair_losses` under `lifecycle.autocast`, `robust.robust_prompt_weights`, backward, clip,
AdamW, scheduler) with the model built as dro_dpo.py builds it (`lifecycle.prepare_model`,
`lifecycle.reference_policy`).
TRL: DPOTrainer with the same options (bf16=True / gradient_checkpointing=True / peft_config=LoraConfig and
ref_model=None; for the full-model modes a frozen copy as ref_model, as TRL only runs offline with one).
(b) PPO: ours = one iteration of dro_ppo.py's loop (as in bench/bench_ppo.py, plus the train()/eval() switches
that turn gradient checkpointing on for the PPO epochs) at --ppo-prompts prompts x 2 samples, 8 new tokens,
4 epochs x 2 minibatches, the gold reward, the critic a copy of the policy's transformer (with LoRA its own
adapter over the policy's frozen weights). TRL has no PPOTrainer any more (1.16); its GRPOTrainer runs with a plain
Python reward function (the same gold reward), the same prompts, 2 generations per prompt, 8 new tokens,
num_iterations=4 (epochs) x 2 optimizer steps per generation batch, beta 0.05 (reference forward), no critic: a
different algorithm with the same shape.

Each measurement runs in a fresh subprocess; ours and TRL alternate, --rounds rounds; medians are reported.
Timing starts after one warm-up step (DPO) or iteration (PPO) and runs to the end of the last, including data
loading and collation. Memory: one more step (iteration) after the timed ones, measured apart so that measuring
costs the timing nothing: on the CPU the largest total of live tensors in torch.profiler's memory timeline (the
resident set would count glibc's caching, which varies by hundreds of MB between identical runs), on a GPU
torch.cuda.max_memory_allocated; "total" is everything held at the peak (weights, reference, optimizer state,
gradients, activations), "step" its growth over the step (gradients and activations). The time split comes from
forward hooks on the models (a forward under no_grad
on the reference = "reference forward", with gradients = "policy forward"), timers around backward and clipping +
optimizer (ours), and Trainer callbacks plus a wrapped training_step / compute_loss (TRL); "other" is the rest
(data, collation, loss arithmetic, scheduler, logging). On a GPU every timer synchronises first.
"""

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODES = ("fp32", "bf16", "gc", "lora")
MODE_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast", "gc": "gradient checkpointing", "lora": "LoRA r=16"}
BETA, LR, MAX_GRAD_NORM, MAX_LENGTH = 0.1, 1e-4, 1.0, 64


# ----------------------------------------------------------------------------------------------
# Measuring: memory and time
# ----------------------------------------------------------------------------------------------


class Memory:
    """Peak memory of one more step after the timed ones (`start` ... `stop`). On the CPU: the largest total of live
    tensors in torch.profiler's memory timeline (tensor bytes, free of the allocator's caching: the resident set
    varies with glibc's arenas by hundreds of MB between identical runs); on a GPU: max_memory_allocated. Returns
    the peak of everything held ("total": weights, reference, optimizer state, gradients, activations) and its
    growth over the step ("step": gradients and activations)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        torch = self.torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=True,
                with_stack=True,
            )
            self.profiler.start()

    def stop(self) -> dict:
        if self.cuda:
            peak, base = self.torch.cuda.max_memory_allocated(), self.base
        else:
            self.profiler.stop()
            with tempfile.TemporaryDirectory() as tmp:
                self.profiler.export_memory_timeline(os.path.join(tmp, "memory.json"), device="cpu")
                _, sizes = json.load(open(os.path.join(tmp, "memory.json")))
            totals = [sum(s) for s in sizes]
            peak, base = max(totals), totals[0]
        return {"mem_total_mb": peak / 2**20, "mem_step_mb": (peak - base) / 2**20}


class Clock:
    """Seconds per named part; `timing` is off during the warm-up."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t, self.timing = defaultdict(float), False

    def now(self):
        self.sync()
        return time.perf_counter()

    @contextlib.contextmanager
    def part(self, name):
        t = self.now()
        yield
        if self.timing:
            self.t[name] += self.now() - t

    def hook(self, module, name=None):
        """Time every forward of `module`: as `name`, or by whether gradients are on (policy / reference)."""
        import torch

        starts = []

        def pre(*_):
            starts.append(self.now())

        def post(*_):
            t = starts.pop()
            if self.timing:
                self.t[name or ("policy forward" if torch.is_grad_enabled() else "reference forward")] += self.now() - t

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


class Timed:
    """A callable (the LoRA reference `lifecycle.WithoutAdapter`) whose calls are timed as `name`."""

    def __init__(self, inner, clock, name):
        self.inner, self.clock, self.name = inner, clock, name

    def parameters(self):
        return self.inner.parameters()

    def __call__(self, **kwargs):
        with self.clock.part(self.name):
            return self.inner(**kwargs)


# ----------------------------------------------------------------------------------------------
# The model and the options, as the scripts build them
# ----------------------------------------------------------------------------------------------


def scale_config(tok):
    """common.tiny_config at 8 layers, hidden 512, 8 heads, intermediate 1376: 25.5M parameters."""
    import common

    config = common.tiny_config(tok, layers=8, hidden=512)
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 1376, 8, 8
    config.head_dim = 512 // 8  # (the config derived it from tiny_config's 4 heads)
    return config


def script_args(mode, **extra):
    """The scripts' option fields for a mode (what lifecycle.prepare_model / reference_policy / autocast read)."""
    return types.SimpleNamespace(
        bf16=mode == "bf16",
        gradient_checkpointing=mode == "gc",
        lora_r=16 if mode == "lora" else 0,
        lora_alpha=32.0,
        lora_dropout=0.0,
        lora_target_modules=(),
        **extra,
    )


def trl_args(device, **overrides) -> dict:
    """TRL trainer arguments shared by the side-by-side benchmarks: no logging, saving or workers, seed 0, a constant
    learning rate and our gradient clipping; `overrides` set the rest."""
    return dict(
        use_cpu=device.type == "cpu",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM,
        **overrides,
    )


def trl_options(mode, device):
    """The same options for a TRL config, and its peft_config."""
    from peft import LoraConfig

    options = trl_args(
        device,
        bf16=mode == "bf16",
        gradient_checkpointing=mode == "gc",
        gradient_checkpointing_kwargs={"use_reentrant": False} if mode == "gc" else None,
    )
    peft = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if mode == "lora"
        else None
    )
    return options, peft


def new_model(tok, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(scale_config(tok)).to(device)
    model.config.pad_token_id = tok.pad_token_id
    return model


def trl_timing_callback(clock, memory, first, last, measured):
    """Starts the clock at the end of optimizer step `first` (the warm-up), stops it at `last`'s and then measures
    the memory until the end of step `measured`."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == first:
                clock.timing, clock.start = True, clock.now()
            elif state.global_step == last:
                clock.seconds, clock.timing = clock.now() - clock.start, False
                memory.start()
            elif state.global_step == measured:
                clock.memory = memory.stop()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            clock.opt_start = clock.now()

        def on_optimizer_step(self, args, state, control, **kw):
            if clock.timing:
                clock.t["clip + optimizer"] += clock.now() - clock.opt_start

    return Timing()


def timed_trainer(cls, clock):
    """A subclass of a TRL trainer whose training_step (forward + backward) and clipping are timed; the forward
    hooks split the forward into policy and reference."""

    class T(cls):
        def training_step(self, *a, **kw):
            t = clock.now()
            loss = super().training_step(*a, **kw)
            if clock.timing:
                clock.t["_training_step"] += clock.now() - t
            return loss

        def compute_loss(self, *a, **kw):
            t = clock.now()
            out = super().compute_loss(*a, **kw)
            if clock.timing:
                clock.t["_compute_loss"] += clock.now() - t
            return out

        def _clip_grad_norm(self, *a, **kw):
            t = clock.now()
            out = super()._clip_grad_norm(*a, **kw)
            if clock.timing:
                clock.t["clip + optimizer"] += clock.now() - t
            return out

    return T


# ----------------------------------------------------------------------------------------------
# (a) DPO
# ----------------------------------------------------------------------------------------------


def dpo_rows(tok, steps, batch):
    import ingest

    return ingest.load_preferences("synthetic", "train", tok, max_rows=(steps + 2) * batch)


def dpo_ours(mode, steps, batch, device):
    import torch
    from transformers import get_scheduler

    import common
    import lifecycle
    import robust
    from dro_dpo import pair_losses

    tok = common.tiny_tokenizer()
    rows = dpo_rows(tok, steps, batch)
    data = common.tokenize_preferences(rows, tok, MAX_LENGTH, "synthetic")
    memory, clock = Memory(device), Clock(device)
    args = script_args(mode)
    model = new_model(tok, device)
    n_params = sum(p.numel() for p in model.parameters())
    model = lifecycle.prepare_model(model, args, "CAUSAL_LM")  # as dro_dpo.py: checkpointing, LoRA
    reference = lifecycle.reference_policy(model, args)
    model.train()
    clock.hook(model)  # with LoRA this also times the reference: the same module, under no_grad
    if not args.lora_r:
        clock.hook(reference)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("constant", opt)
    dro, pad_id, n = robust.DROArgs("erm", 0.0), tok.pad_token_id, len(data["chosen"])
    for step in range(-1, steps + 1):  # step -1 warms up, step `steps` measures the memory
        if step == 0:
            clock.timing, start = True, clock.now()
        if step == steps:
            seconds, clock.timing = clock.now() - start, False
            memory.start()
        idx = [((step + 1) * batch + i) % n for i in range(batch)]
        with lifecycle.autocast(args, device):
            losses, _, _ = pair_losses(model, reference, data, idx, pad_id, BETA)
        prompt_ids = torch.tensor([data["prompt_id"][i] for i in idx], device=device)
        weights, _ = robust.robust_prompt_weights(losses.detach(), prompt_ids, dro)
        loss = (weights * losses).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        with clock.part("backward"):
            loss.backward()
        with clock.part("clip + optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            if torch.isfinite(grad_norm):
                opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
    return {"params": n_params, "trained": trained, "seconds": seconds, **memory.stop(), "split": dict(clock.t)}


def dpo_trl(mode, steps, batch, device):
    from trl import DPOConfig, DPOTrainer

    import common

    tok = common.tiny_tokenizer()
    rows = dpo_rows(tok, steps, batch).remove_columns(["domain", "chat", "margin", "row", "where"])
    memory, clock = Memory(device), Clock(device)
    model = new_model(tok, device)
    n_params = sum(p.numel() for p in model.parameters())
    ref = None if mode == "lora" else copy.deepcopy(model).eval().requires_grad_(False)
    options, peft = trl_options(mode, device)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps + 2,  # the first one warms up, the last one measures the memory
            learning_rate=LR,
            beta=BETA,
            max_length=MAX_LENGTH,
            **options,
        )
        trainer = timed_trainer(DPOTrainer, clock)(
            model=model,
            ref_model=ref,
            args=config,
            train_dataset=rows,
            processing_class=tok,
            peft_config=peft,
            callbacks=[trl_timing_callback(clock, memory, 1, steps + 1, steps + 2)],
        )
        clock.hook(trainer.model)
        if trainer.ref_model is not None:
            clock.hook(trainer.ref_model)
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    split = dict(clock.t)
    step_total = split.pop("_training_step")
    split.pop("_compute_loss", None)
    split["backward"] = step_total - split.get("policy forward", 0) - split.get("reference forward", 0)
    return {"params": n_params, "trained": trained, "seconds": clock.seconds, **clock.memory, "split": split}


# ----------------------------------------------------------------------------------------------
# (b) PPO (ours) and GRPO (TRL)
# ----------------------------------------------------------------------------------------------


def ppo_defaults(prompts):
    import dataclasses

    import dro_ppo

    args = dro_ppo.Args()
    args = dataclasses.replace(args, batch_size=prompts)
    args.local_batch_size = args.batch_size * args.samples_per_prompt
    args.minibatch_size = args.local_batch_size // args.num_minibatches
    return args


def ppo_ours(mode, steps, prompts, device):
    import torch
    from transformers import GenerationConfig

    import common
    import dro_ppo
    import lifecycle
    import robust
    from dro_ppo import cross_fitted_weights, gae, masked_mean, masked_whiten, ppo_loss, rollout_scores

    base = ppo_defaults(prompts)
    args = script_args(mode, **{k: v for k, v in vars(base).items() if k not in vars(script_args(mode))})
    tok = common.tiny_tokenizer()
    pad_id = tok.pad_token_id
    train = dro_ppo.load_prompts("synthetic", "train", tok, args.max_prompt_length, max_rows=(steps + 2) * prompts)
    memory, clock = Memory(device), Clock(device)
    policy = new_model(tok, device)
    n_params, end_ids = sum(p.numel() for p in policy.parameters()), common.end_token_ids(tok, policy)
    # as dro_ppo.py builds them (without the warm start)
    critic = dro_ppo.Critic(policy, shared=args.lora_r > 0).to(device)
    policy = lifecycle.prepare_model(policy, args, "CAUSAL_LM")
    critic.backbone = lifecycle.prepare_model(critic.backbone, args, "FEATURE_EXTRACTION")
    for model in (policy, critic):
        lifecycle.disable_dropout(model)
        model.eval()
    reference = Timed(lifecycle.reference_policy(policy, args), clock, "reference forward")
    trained = sum(p.numel() for m in (policy, critic) for p in m.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        [
            {"params": policy.parameters(), "lr": args.learning_rate},
            {"params": [p for p in critic.parameters() if p.requires_grad], "lr": args.value_learning_rate},
        ],
        fused=True,
    )
    generation_config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=pad_id,
        eos_token_id=end_ids,
    )
    world = 1
    for step in range(-1, steps + 1):  # step -1 warms up, step `steps` measures the memory
        if step == 0:
            clock.timing, start = True, clock.now()
        if step == steps:
            seconds, clock.timing = clock.now() - start, False
            memory.start()
        torch.manual_seed(step + 1)
        mine = list(range((step + 1) * prompts, (step + 2) * prompts))
        rollout_prompts = [i for i in mine for _ in range(args.samples_per_prompt)]
        prompt_ids = torch.arange(len(mine), device=device).repeat_interleave(args.samples_per_prompt)
        t0 = clock.now()
        with torch.no_grad(), lifecycle.autocast(args, device):
            with clock.part("generation"):
                ids, mask, responses, response_mask, ended = common.generate(
                    policy, [train["ids"][i] for i in rollout_prompts], pad_id, end_ids, generation_config
                )
            context_len = ids.shape[1] - responses.shape[1]
            logprobs, entropy = common.token_logprobs(policy, ids, mask, context_len, args.temperature, entropy=True)
            ref_logprobs = common.token_logprobs(reference, ids, mask, context_len, args.temperature)
            entropy = masked_mean(entropy, response_mask)  # noqa: F841
            values = critic(ids, mask)[:, context_len - 1 : -1]
            with clock.part("scoring (gold reward)"):
                scores = rollout_scores(
                    tok,
                    None,
                    [train["text"][i] for i in rollout_prompts],
                    [train["domain"][i] for i in rollout_prompts],
                    [train["chat"][i] for i in rollout_prompts],
                    responses,
                    response_mask,
                )
            scores = scores - args.missing_eos_penalty * (~ended).float()
            kl = common.kl_k3(logprobs, ref_logprobs) * response_mask
            rewards = -args.kl_coef * kl
            rewards[torch.arange(len(rewards)), response_mask.sum(1) - 1] += scores
            advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, response_mask)
            prompt_values = values[:, 0] if args.weights_from == "values" else rewards.sum(1)
            if args.weights_from == "loo":
                weights, _ = cross_fitted_weights(-prompt_values, prompt_ids, args.dro, args.samples_per_prompt)
            else:
                weights, _ = robust.robust_prompt_weights(-prompt_values, prompt_ids, args.dro)
        t1 = clock.now()
        if clock.timing:
            clock.t["_rollout"] += t1 - t0
        policy.train(), critic.train()
        for _ in range(args.num_ppo_epochs):
            for mb in torch.randperm(args.local_batch_size, device=device).split(args.minibatch_size):
                with clock.part("update forward"), lifecycle.autocast(args, device):
                    new_logprobs = common.token_logprobs(policy, ids[mb], mask[mb], context_len, args.temperature)
                    new_values = critic(ids[mb], mask[mb])[:, context_len - 1 : -1]
                pg_loss, vf_loss, _ = ppo_loss(
                    new_logprobs,
                    logprobs[mb],
                    advantages[mb],
                    new_values,
                    values[mb],
                    returns[mb],
                    response_mask[mb],
                    weights[mb] * world * args.local_batch_size / len(mb),
                    args.cliprange,
                    args.cliprange_value,
                    args.max_new_tokens,
                )
                loss = pg_loss + args.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                with clock.part("update backward"):
                    loss.backward()
                with clock.part("update clip + optimizer"):
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    value_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    if not (torch.isfinite(grad_norm) and torch.isfinite(value_grad_norm)):
                        raise FloatingPointError("the gradient norm is not finite")
                    optimizer.step()
        policy.eval(), critic.eval()
        if clock.timing:
            clock.t["_update"] += clock.now() - t1
    memory_result = memory.stop()
    split = dict(clock.t)
    rollout = split.pop("_rollout")
    split["logprobs, values, GAE, weights"] = (
        rollout - split["generation"] - split["reference forward"] - split["scoring (gold reward)"]
    )
    update = split.pop("_update")
    split["update other"] = update - sum(v for k, v in split.items() if k.startswith("update "))
    return {
        "params": n_params,
        "trained": trained,
        "seconds": seconds,
        "rollouts": steps * args.local_batch_size,
        **memory_result,
        "split": split,
    }


def ppo_trl(mode, steps, prompts, device):
    """GRPOTrainer: one generation batch of `prompts` x 2 completions, then num_iterations=4 passes of 2 optimizer
    steps over it (as our 4 epochs x 2 minibatches); steps = generation batches after a warm-up one."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import common
    import ingest

    base = ppo_defaults(prompts)
    tok = common.tiny_tokenizer()
    rows = ingest.load_preferences("synthetic", "train", tok, max_rows=(steps + 2) * prompts)
    ds = Dataset.from_dict({"prompt": list(rows["prompt"]), "domain": list(rows["domain"])})

    def gold(prompts, completions, domain, **kw):
        return list(map(common.synthetic_gold_reward, prompts, completions, domain))

    memory, clock = Memory(device), Clock(device)
    model = new_model(tok, device)
    n_params = sum(p.numel() for p in model.parameters())
    options, peft = trl_options(mode, device)
    per_step = base.local_batch_size // base.num_minibatches
    opt_steps = base.num_minibatches * base.num_ppo_epochs  # optimizer steps per generation batch
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out + "/init")  # GRPO builds its reference from the policy's path
        model.config._name_or_path = out + "/init"
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=per_step,
            steps_per_generation=base.num_minibatches,
            num_iterations=base.num_ppo_epochs,
            num_generations=base.samples_per_prompt,
            max_completion_length=base.max_new_tokens,
            temperature=base.temperature,
            top_k=0,
            top_p=1.0,
            beta=base.kl_coef,
            learning_rate=base.learning_rate,
            max_steps=(steps + 2) * opt_steps,
            shuffle_dataset=False,
            **options,
        )
        trainer = timed_trainer(GRPOTrainer, clock)(
            model=model,
            reward_funcs=gold,
            args=config,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft,
            callbacks=[trl_timing_callback(clock, memory, opt_steps, (steps + 1) * opt_steps, (steps + 2) * opt_steps)],
        )
        clock.hook(trainer.model)
        gen, score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(*a, **kw):
            with clock.part("generation"):
                return gen(*a, **kw)

        def timed_score(*a, **kw):
            with clock.part("_rollout"):
                return score(*a, **kw)

        trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    t = dict(clock.t)  # forwards without gradients (sampling, old and reference log-probs) are in the rollout
    rollout = t["_rollout"]
    split = {
        "generation": t["generation"],
        "rollout logprobs (old + ref), scoring, advantages": rollout - t["generation"],
        "update forward": t.get("policy forward", 0.0),
        "update backward": t["_training_step"] - rollout - t["_compute_loss"],
        "update clip + optimizer": t["clip + optimizer"],
    }
    return {
        "params": n_params,
        "trained": trained,
        "seconds": clock.seconds,
        "rollouts": steps * base.local_batch_size,
        **clock.memory,
        "split": split,
    }


# ----------------------------------------------------------------------------------------------
# Driver: fresh subprocesses, ours and TRL alternating; markdown tables
# ----------------------------------------------------------------------------------------------

RUNNERS = {("dpo", "ours"): dpo_ours, ("dpo", "trl"): dpo_trl, ("ppo", "ours"): ppo_ours, ("ppo", "trl"): ppo_trl}


def child(section, side, mode, steps, size, device):
    import torch

    result = RUNNERS[section, side](mode, steps, size, torch.device(device))
    print(json.dumps(result))


def run_child(section, side, mode, a):
    size = a.batch if section == "dpo" else a.ppo_prompts
    cmd = [sys.executable, os.path.abspath(__file__), "--child", section, side, mode, str(a.steps), str(size)]
    out = subprocess.run(cmd + ["--device", a.device], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(section, results, a):
    unit = "pairs" if section == "dpo" else "rollouts"
    size = a.batch if section == "dpo" else a.ppo_prompts
    what = f"DPO, batch {size} pairs" if section == "dpo" else f"PPO (ours) / GRPO (TRL), {size} prompts x 2 samples"
    first = next((r for rs in results.values() for r in rs if "params" in r), None)
    print(
        f"\n## {what}, {a.device}, {a.steps} timed steps after 1 warm-up, median of {a.rounds} rounds"
        + (f"; model {first['params'] / 1e6:.1f}M parameters" if first else "")
    )
    print(
        f"\n| mode | trainer | trained params | {unit}/s | peak MB total | peak MB step | s/step |\n"
        "|---|---|---|---|---|---|---|"
    )
    splits = {}
    for (mode, side), rs in results.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"| {MODE_NAMES[mode]} | {side} | failed: {rs[0]['error'][:150]} | | | | |")
            continue
        n = a.steps * size if section == "dpo" else ok[0]["rollouts"]
        rate = n / statistics.median(r["seconds"] for r in ok)  # rate and s/step from the same median
        tot = statistics.median(r["mem_total_mb"] for r in ok)
        stp = statistics.median(r["mem_step_mb"] for r in ok)
        sec = statistics.median(r["seconds"] for r in ok) / a.steps
        name = side if section == "dpo" or side == "ours" else "trl (GRPO)"
        print(
            f"| {MODE_NAMES[mode]} | {name} | {ok[0]['trained'] / 1e6:.2f}M | {rate:.1f} | {tot:.0f} | {stp:.0f} "
            f"| {sec:.2f} |"
        )
        parts = sorted({k for r in ok for k in r["split"]})
        median_split = {k: statistics.median(r["split"].get(k, 0.0) for r in ok) / a.steps for k in parts}
        median_split["other"] = sec - sum(median_split.values())
        splits[mode, side] = median_split
    print("\nwhere a step goes (seconds per step, median of rounds):")
    parts = list(dict.fromkeys(k for s in splits.values() for k in s if k != "other")) + ["other"]
    print("| mode | trainer | " + " | ".join(parts) + " |\n|---|---|" + "---|" * len(parts))
    for (mode, side), s in splits.items():
        print(f"| {MODE_NAMES[mode]} | {side} | " + " | ".join(f"{s.get(k, 0.0):.3f}" for k in parts) + " |")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["dpo", "ppo"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps (DPO) / iterations (PPO) after one warm-up")
    p.add_argument("--batch", type=int, default=32, help="DPO pairs per step")
    p.add_argument("--ppo-prompts", type=int, default=16, help="prompts per PPO rollout batch (x 2 samples)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--trainers", nargs="+", choices=["ours", "trl"], default=["ours", "trl"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        section, side, mode, steps, size = a.child
        child(section, side, mode, int(steps), int(size), a.device)
        sys.exit()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}")
    for section in ["dpo", "ppo"] if a.only is None else [a.only]:
        results = {}
        for r in range(a.rounds):
            for mode in a.modes:
                sides = a.trainers if r % 2 == 0 else a.trainers[::-1]  # alternate who goes first
                for side in sides:
                    t = time.time()
                    res = run_child(section, side, mode, a)
                    results.setdefault((mode, side), []).append(res)
                    print(f"  [{section} {mode} {side} round {r + 1}: {time.time() - t:.0f} s]", file=sys.stderr)
        results = {k: results[k] for k in sorted(results, key=lambda k: (MODES.index(k[0]), k[1]))}
        report(section, results, a)
