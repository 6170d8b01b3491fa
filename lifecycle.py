"""The run's lifecycle, shared by the three scripts: what a first reading can skip.

Each script calls these in plain sight, in this order, and keeps the algorithm (its losses, the robust weights,
the optimizer steps and the training loop) to itself:

    args, run = lifecycle.start(Args)          # flags, torchrun, the output folder's previous run, seeding
    run.open_folder()                          # rank 0: lock the folder, metrics.jsonl and TensorBoard
    model = lifecycle.prepare_model(...)       # gradient checkpointing, LoRA; run.distribute: DDP or FSDP2
    resumed = run.resume(modules, ...)         # a checkpoint's weights, optimizer and RNG states, data replayed
    for step in run.steps(...):                # the script's training step, then
        run.stop_on_nonfinite_loss / run.update_is_finite / run.log / run.checkpoint
    run.finish(model, tokenizer)               # the final save, and leaving torchrun together

Nothing here owns the loop, computes a loss or a weight, or steps an optimizer. Below `Run`: the flags every
script shares (`RunArgs`), loading the models users bring, the memory savers and sharding, and checkpoints that
a kill cannot corrupt.
"""

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import common
import ingest
from common import ArgumentError, UserError, device_of, is_sharded


@dataclass
class RunArgs:
    """The flags of the run's lifecycle, the same in the three scripts (each script's `Args` extends this class,
    so they keep their names: --output-dir, --resume, --lora-r, ...)."""

    # Output and tracking
    output_dir: Optional[str] = None
    """where metrics.jsonl, TensorBoard logs, checkpoints and the model go (default: runs/<run_id>)"""
    track: bool = False
    """if toggled, mirror the logs to Weights and Biases (needs wandb installed: checked at parse time)"""
    wandb_project_name: str = "dro-rlhf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    save_model: bool = True
    """save the trained model and tokenizer to <output-dir>/model"""

    # Input checks and model loading
    skip_bad_rows: bool = False
    """skip and count malformed or too long rows instead of stopping with an error"""
    truncation_mode: Literal["error", "keep_start", "keep_end"] = "error"
    """rows over the length limit: an error (skipped with --skip-bad-rows), or cut keeping the start or prompt's end"""
    attn_implementation: Optional[str] = None
    """attention kernel for from_pretrained (sdpa, flash_attention_2, eager, ...); default: transformers' choice"""
    trust_remote_code: bool = False
    """allow models and tokenizers whose code lives in their hub repository"""

    # Memory savers and sharding
    bf16: bool = False
    """bf16 autocast for the forward passes; master weights, optimizer state, log-probs, losses and weights stay fp32
    (with LoRA the frozen weights are stored in bf16)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in the backward pass instead of storing them (less memory, slower)"""
    lora_r: int = 0
    """LoRA rank (0: train every weight); with LoRA only the adapter (and a head) trains, and the reference of DPO
    and PPO is the model with its adapter switched off"""
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

    # Checkpoints and faults
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

    def __post_init__(self):
        check_args(
            self, positive="keep_checkpoints lora_alpha", non_negative="save_every lora_r", fraction="lora_dropout"
        )
        if self.fsdp and self.lora_r:
            raise ValueError("--fsdp with --lora-r is not supported yet: LoRA models are trained replicated (DDP)")
        if self.track and importlib.util.find_spec("wandb") is None:  # refused before anything is written
            raise ValueError(
                "--track mirrors the logs to Weights and Biases, but wandb is not installed (pip install wandb)"
            )


def check_args(args, positive: str = "", non_negative: str = "", fraction: str = ""):
    """Raise a ValueError naming the first field in `positive` (space-separated names) that is not > 0, in
    `non_negative` that is < 0, or in `fraction` outside [0, 1) (None means "not set" and passes); called in
    Args.__post_init__, so tyro reports it at parse time with the flag's name."""
    for names, bad, allowed in (
        (positive, lambda v: v <= 0, "> 0"),
        (non_negative, lambda v: v < 0, ">= 0"),
        (fraction, lambda v: not 0 <= v < 1, "in [0, 1)"),
    ):
        for name in names.split():
            value = getattr(args, name)
            if value is not None and (bad(value) or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {allowed}, got {value}")


# ----------------------------------------------------------------------------------------------
# The run: start-up, the output folder, resume, the non-finite policy, checkpoints, the end
# ----------------------------------------------------------------------------------------------


def start(args_class):
    """Parse the flags into `args_class` (tyro), join torchrun, name the run, find the checkpoint to resume (refusing
    a folder that holds another run unless --resume or --overwrite says what to do with it) and seed every
    generator: the same model initialisation and batch order on every process, which each take their own shard.
    Nothing on disk changes yet. Returns (args, run)."""
    exit_cleanly_on_user_errors()
    args = tyro.cli(args_class)
    return args, Run(args)


class Run:
    """One run of a script: its processes, its output folder and the state of its lifecycle (the step it resumed
    from, the steps skipped as non-finite, the stop signal). Each method is one plainly named moment of the run."""

    def __init__(self, args):
        self.args = args
        self.distributed, self.rank, self.world, self.device = init_distributed()
        self.evaluating = self.rank == 0 or args.fsdp  # with --fsdp every process takes part in each forward
        args.world_size = self.world
        dataset_name, robust = args.dataset.split("/")[-1], f"{args.dro.kind}-{args.dro.rho}"  # e.g. chi2-0.5
        args.run_id = f"{dataset_name}__{args.exp_name}__{robust}__{args.seed}__{int(time.time())}"
        if (args.resume or args.resume_from) and not args.output_dir:
            raise ArgumentError("--resume and --resume-from need the --output-dir of the run to continue")
        self.output_dir = args.output_dir or f"runs/{args.run_id}"
        self.resuming = checkpoint_to_resume(args, self.output_dir)  # None for a new run; keeps its run id
        self.tracker, self.stop, self.start_step, self.skipped_steps = None, None, 0, 0  # (resume sets the last two)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)

    def per_process(self, batch_size: int, parts: int = 1, flag: str = "--batch-size") -> int:
        """This process's share of a global batch split over the processes and `parts` (e.g. accumulation steps);
        a batch that does not split evenly is refused."""
        if batch_size % (self.world * parts):
            raise ArgumentError(f"{flag} {batch_size} must be divisible by processes x {parts} = {self.world * parts}")
        return batch_size // (self.world * parts)

    def print(self, message: str):
        if self.rank == 0:
            print(message)

    def open_folder(self):
        """Rank 0, once the inputs are checked: lock the output folder, clear a previous run (--overwrite) or cut a
        resumed run's metrics back to its checkpoint, and open metrics.jsonl and TensorBoard (wandb with --track)."""
        if self.rank == 0:
            self.lock = claim_folder(self.output_dir, self.resuming)
            self.tracker = Tracker(self.args, self.output_dir, _checkpoint_step(self.resuming))

    def distribute(self, model, frozen: bool = False):
        """The model as it computes under torchrun: DDP (a trained model), FSDP2 with --fsdp, else itself."""
        return distribute(model, self.args, self.distributed, frozen)

    def replicate(self, model):
        """The model under plain DDP (the warm start of a model that is prepared and sharded only afterwards)."""
        return DDP(model) if self.distributed else model

    def resume(self, modules: dict, optimizer, scheduler, batches) -> dict:
        """For a resumed run: the checkpoint's weights, optimizer, scheduler and RNG states, and the data order
        replayed to its step (`batches` advanced). Returns the script's own `extra` state of the checkpoint, or {}
        for a new run."""
        if not self.resuming:
            return {}
        state = load_checkpoint(self.resuming, modules, optimizer, scheduler, self.args, self.rank, self.world)
        self.start_step, self.skipped_steps = state["step"], state["extra"]["skipped_steps"]
        for _ in range(self.start_step):
            next(batches)
        return state["extra"]

    def steps(self, total_steps: int, desc: str):
        """The steps still to run (after a resumed checkpoint's), with a progress bar on rank 0. From here on
        SIGTERM and SIGINT finish the step, save a checkpoint and exit (see `checkpoint`)."""
        self.stop, self.started = StopSignal(), time.time()
        return tqdm(
            range(self.start_step + 1, total_steps + 1),
            initial=self.start_step,
            total=total_steps,
            disable=self.rank != 0,
            desc=desc,
        )

    def stop_on_nonfinite_loss(self, loss: torch.Tensor, step: int):
        """A loss that is NaN or infinite stops the run before anything is saved (unless --skip-nonfinite-steps:
        then its gradient is not finite either, and `update_is_finite` skips the step)."""
        if not torch.isfinite(loss) and not self.args.skip_nonfinite_steps:
            raise FloatingPointError(_nonfinite_message(step, f"the loss is {loss.item()}"))

    def update_is_finite(self, step: int, *grad_norms: torch.Tensor) -> bool:
        """Whether the optimizer may step: every gradient norm is finite (the same on every process, as DDP and
        FSDP averaged the gradients). Otherwise the step is skipped and counted with --skip-nonfinite-steps, or the
        run stops before anything is saved."""
        if all(torch.isfinite(norm) for norm in grad_norms):
            return True
        if self.args.skip_nonfinite_steps:
            self.skipped_steps += 1
            return False
        norms = ", ".join(str(norm.item()) for norm in grad_norms)
        raise FloatingPointError(_nonfinite_message(step, f"the gradient norm is {norms}"))

    def log(self, scalars: dict, step: int):
        """Training scalars to TensorBoard (rank 0)."""
        if self.rank == 0:
            self.tracker.scalars(scalars, step)

    def evaluation_due(self, step: int) -> bool:
        """Whether to evaluate after `step`: every --eval-every steps, on the processes that evaluate (the final
        evaluation after the last step is the script's own)."""
        every = self.args.eval_every
        return self.evaluating and bool(every) and step % every == 0 and step < self.args.total_steps

    def log_eval(self, step: int, split: str, report: dict):
        """One evaluation of a split to metrics.jsonl and TensorBoard (rank 0)."""
        if self.rank == 0:
            self.tracker.eval(step, split, report)

    def checkpoint(self, step: int, modules: dict, optimizer, scheduler, extra: dict):
        """Every --save-every steps, and when SIGTERM or SIGINT arrived (then exit): a checkpoint of everything the
        next step depends on, `extra` being the script's own state."""
        every = self.args.save_every
        if self.stop.requested() or (every and step % every == 0 and step < self.args.total_steps):
            extra = {"skipped_steps": self.skipped_steps, **extra}
            save_checkpoint(
                self.output_dir, step, modules, optimizer, scheduler, extra, self.args, self.rank, self.world
            )
            if self.stop.signum:
                self.stop.exit(self.output_dir, step)

    def finish(self, model, tokenizer, base_changed: bool = False):
        """The end: the model (see `save_run`) and args.json, the logs closed, and every process leaving torchrun
        together (one exiting while another still writes can abort in gloo)."""
        save_run(self.output_dir, self.args, model, tokenizer, self.args.total_steps, base_changed)
        if self.rank == 0:
            self.tracker.close()
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


def parameter_counts(model, *others) -> str:
    """ "N parameters (M trained)" of a model, counting the trained parameters of `others` (e.g. a critic) too."""
    trained = sum(p.numel() for m in (model, *others) for p in m.parameters() if p.requires_grad)
    return f"{sum(p.numel() for p in model.parameters()):,} parameters ({trained:,} trained)"


def _nonfinite_message(step: int, what: str) -> str:
    return f"step {step}: {what}; stopping before anything is saved (--skip-nonfinite-steps skips such steps)"


def exit_cleanly_on_user_errors():
    """Make an uncaught UserError print `error: <message>` and exit with code 2, without a traceback; any other
    exception (a bug) keeps its traceback."""

    def hook(kind, error, traceback):
        if issubclass(kind, UserError):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        sys.__excepthook__(kind, error, traceback)

    sys.excepthook = hook


def init_distributed():
    """(distributed, rank, world size, device): under torchrun a process group (nccl on GPUs, gloo on CPUs)."""
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    return distributed, rank, world, device


# ----------------------------------------------------------------------------------------------
# Models and tokenizers that users bring
# ----------------------------------------------------------------------------------------------


def check_model_path(path: str, flag: str):
    """A clear error for a local model folder that is not there (instead of the hub client's repo-id message)."""
    if ingest._is_local(path) and not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: no such folder")


def load_tokenizer(args):
    """The tokenizer of --tokenizer-name-or-path or of the model (pad = EOS where it has no pad token), or the tiny
    byte-level one for the default tiny model."""
    path = args.tokenizer_name_or_path or args.model_name_or_path
    if path is None:
        return common.tiny_tokenizer()
    from transformers import AutoTokenizer

    check_model_path(path, "--tokenizer-name-or-path" if args.tokenizer_name_or_path else "--model-name-or-path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except OSError as e:  # not a local folder and not on the hub (or offline)
        raise ArgumentError(f"{path}: no tokenizer found ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    return tokenizer


def load_model(auto_class, path: str, args, tokenizer, flag: str = "--model-name-or-path", **kwargs):
    """A pretrained model with float32 master weights whatever dtype its checkpoint is stored in (transformers
    would otherwise load a bf16 checkpoint as bf16, and Adam's updates would then mostly round away); --bf16
    adds bf16 autocast for the forward passes instead. Says what was loaded and how it trains."""
    from transformers import AutoConfig

    check_model_path(path, flag)
    try:
        stored = getattr(AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code), "dtype", None)
        model = auto_class.from_pretrained(
            path,
            dtype=torch.float32,
            attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
            **kwargs,
        )
    except OSError as e:
        raise ArgumentError(f"{flag} {path}: no model found ({e})") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ArgumentError(
            f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens (pad id {tokenizer.pad_token_id}) "
            f"but the model embeds only {rows}: it is not the model's own tokenizer (transformers may "
            f"have built one for the model type from other files); pass --tokenizer-name-or-path"
        )
    print(
        f"{path}: checkpoint stored in {stored or 'float32'}; float32 master weights"
        + (", bf16 autocast" if args.bf16 else "")
    )
    return model


# ----------------------------------------------------------------------------------------------
# Memory: gradient checkpointing, LoRA (the reference is the model with its adapter off), FSDP2
# ----------------------------------------------------------------------------------------------


def prepare_model(model, args, task_type: str):
    """--gradient-checkpointing (the model's own, non-reentrant: it works under DDP and with frozen embeddings),
    then --lora-r > 0: a peft LoRA adapter on --lora-target-modules (default: every linear layer but the output
    one); the adapter (and a classifier's head) are then the only trainable weights, in fp32, and with --bf16 the
    frozen weights are stored in bf16. task_type: peft's (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION)."""
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ArgumentError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # for plain forwards (generate asks for its cache itself)
    if not args.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    if args.bf16:  # frozen weights need no fp32 master copy: stored in bf16 they take half the memory
        model.to(torch.bfloat16)

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules) or "all-linear",
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise ArgumentError(f"--lora-target-modules {' '.join(args.lora_target_modules)}: {e}") from None
    for p in model.parameters():  # what trains keeps fp32 master weights (the adapter, a classifier's head)
        if p.requires_grad:
            p.data = p.data.float()
    return model


class WithoutAdapter:
    """The reference policy under LoRA: the policy itself with its adapter switched off and in eval mode, so the
    frozen weights are shared instead of copied. Called like the model (no gradients flow: callers use no_grad)."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **inputs):
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(**inputs)
        finally:
            self.model.train(training)


def reference_policy(model, args):
    """The frozen reference: with LoRA the model with its adapter off (`WithoutAdapter`), else a frozen copy."""
    if args.lora_r:
        return WithoutAdapter(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def disable_dropout(model):
    """Dropout off everywhere, so that train() (which switches gradient checkpointing on) computes the same
    function as eval(): nn.Dropout modules, LoRA's, and the float rates attention layers apply functionally."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def distribute(model, args, distributed: bool, frozen: bool = False):
    """The model as it computes under torchrun. With --fsdp, FSDP2 shards each transformer layer, then the rest,
    over the processes (weights, gradients and AdamW state: 1/world each; a layer's weights are gathered for its
    forward and backward), frozen models too; otherwise DDP replicates a trained model and leaves a frozen one
    alone. Both average gradients over processes, so the scripts' weighting by the world size holds for both."""
    if not distributed or (frozen and not args.fsdp):
        return model
    if not args.fsdp:
        return DDP(model)
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):  # transformers' decoder (and encoder) layers
            fully_shard(module)
    return fully_shard(model)


def no_sync(model, skip: bool):
    """DDP's no_sync for the micro-batches before the last one (FSDP2 reduces each backward's gradients itself)."""
    return model.no_sync() if skip and isinstance(model, DDP) else contextlib.nullcontext()


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the model's parameters; the total norm as a plain tensor (FSDP2's is a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_weights(model) -> Optional[dict]:
    """The state dict of a model sharded with --fsdp, gathered to rank 0 on the CPU (a collective: every process
    calls it; the others get {}); None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def autocast(args, device: torch.device):
    """bf16 autocast of the forward passes with --bf16 (a no-op context without it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def check_outputs(values, what: str, where: str, must_vary: bool = True):
    """Stop, naming the likely causes, when a model's outputs over an evaluation are not finite (nothing non-finite
    is saved) or the same for every different input (the model reads nothing of the text: a 50% table hides it)."""
    if not all(map(math.isfinite, values)):
        raise FloatingPointError(
            f"{where}: a {what} is not finite; nothing was saved. Likely causes: a learning rate "
            f"too high, fp16/bf16 overflow; --skip-nonfinite-steps skips steps with non-finite gradients"
        )
    if must_vary and len(values) > 2 and len(set(values)) == 1:
        raise RuntimeError(
            f"{where}: every {what} is exactly {values[0]}, whatever the text; the model sees none of "
            f"it (a tokenizer that is not the model's own? a head that was not loaded or trained?)"
        )


# ----------------------------------------------------------------------------------------------
# Runs: the output folder, tracking, checkpoints with exact resume, saving
# ----------------------------------------------------------------------------------------------
# A run's folder holds metrics.jsonl, TensorBoard events, checkpoints/step-<N>/ and, at the end, model/ and
# args.json. Every write that a kill could interrupt goes to a temporary name first and is then renamed onto a
# name that did not exist, so at every instant a complete model or checkpoint exists.

RUN_FILES = ("metrics.jsonl", "args.json", "model", "checkpoints")


def checkpoint_to_resume(args, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from (--resume-from, or with --resume the latest complete one of the output folder),
    after refusing a folder that holds a previous run unless --resume or --overwrite says what to do with it. A
    resumed run keeps the run id of the run it continues (args.run_id)."""
    checkpoint = _locate_checkpoint(args, output_dir)
    if checkpoint:  # checked before anything is touched: the sizes of its files and what wrote it
        meta = json.load(open(os.path.join(checkpoint, "COMPLETE")))
        for name, size in meta["files"].items():
            path = os.path.join(checkpoint, name)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                raise ArgumentError(
                    f"checkpoint {checkpoint} cannot be read: {name} is truncated or missing; "
                    f"resume from another with --resume-from"
                )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for key, mine in (("script", args.exp_name), ("world_size", world), ("model", args.model_name_or_path)):
            if meta[key] != mine:
                raise ArgumentError(
                    f"checkpoint {checkpoint} was written with {key} {meta[key]!r}, this run has {mine!r}"
                )
        args.run_id = meta["run_id"]
    return checkpoint


def _locate_checkpoint(args, output_dir: str) -> Optional[str]:
    """--resume-from's folder, --resume's latest complete checkpoint, or None for a new run (refused in a folder
    that holds a previous run, unless --overwrite)."""
    if args.resume_from:
        if not os.path.exists(os.path.join(args.resume_from, "COMPLETE")):
            raise ArgumentError(f"--resume-from {args.resume_from}: not a complete checkpoint (no COMPLETE marker)")
        return args.resume_from
    folder = os.path.join(output_dir, "checkpoints")
    if args.resume:
        done = (
            sorted(
                c
                for c in os.listdir(folder)
                if c.startswith("step-") and "." not in c and os.path.exists(os.path.join(folder, c, "COMPLETE"))
            )
            if os.path.isdir(folder)
            else []
        )
        if not done:
            raise ArgumentError(f"--resume: {output_dir} has no complete checkpoint to resume from")
        return os.path.join(folder, done[-1])
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if previous and not args.overwrite:
        raise ArgumentError(
            f"{output_dir} holds a previous run ({', '.join(previous)}); pass --resume to continue it, "
            f"--overwrite to replace it, or another --output-dir"
        )
    return None


def _checkpoint_step(checkpoint: Optional[str]) -> Optional[int]:
    return json.load(open(os.path.join(checkpoint, "COMPLETE")))["step"] if checkpoint else None


def claim_folder(output_dir: str, checkpoint: Optional[str]):
    """Lock the output folder for this run (a concurrent run is turned away; the lock holds until the process ends,
    however it ends), then make it the run's: a new run (after --overwrite) removes the previous one's files, a
    resumed one keeps the metrics.jsonl lines up to its checkpoint's step (later ones are written again).
    Returns the lock's open file."""
    import fcntl
    import shutil

    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ArgumentError(f"{output_dir}: another run is writing to this folder right now") from None
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if checkpoint is None:
        for name in RUN_FILES + tuple(f for f in os.listdir(output_dir) if f.startswith("events.out.tfevents")):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
        write_atomically(metrics_path, "")
    else:
        resume_step = _checkpoint_step(checkpoint)
        lines = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        kept = [line for line in lines if line["step"] <= resume_step]
        write_atomically(metrics_path, "".join(json.dumps(line) + "\n" for line in kept))
    return lock


class Tracker:
    """Rank 0's logs: metrics.jsonl (each line with the run's id) and TensorBoard (wandb mirrors it with --track);
    a resumed run's TensorBoard events after its checkpoint's step are purged."""

    def __init__(self, args, output_dir: str, resume_step: Optional[int]):
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if args.track:
            import wandb

            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                sync_tensorboard=True,
                config=dataclasses.asdict(args),  # nested flags (--dro.kind) as nested dicts
                name=args.run_id,
                id=args.run_id,
                resume="allow",
                save_code=True,
            )
        self.run_id = args.run_id
        self.writer = SummaryWriter(output_dir, purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        )

    def scalars(self, scalars: dict, step: int):
        """TensorBoard scalars; NaN entries (e.g. a dual variable the set does not have) are left out."""
        for key, value in scalars.items():
            if not math.isnan(value):
                self.writer.add_scalar(key, value, step)

    def eval(self, step: int, split: str, report: dict):
        """Append one evaluation to metrics.jsonl and TensorBoard (eval/<split>/<metric>[/<domain>])."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **report, "run_id": self.run_id}) + "\n")
        for key, value in report.items():
            for sub, v in value.items() if isinstance(value, dict) else [("", value)]:
                self.writer.add_scalar(f"eval/{split}/{key}" + (f"/{sub}" if sub else ""), v, step)

    def close(self):
        self.writer.close()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str):
    """Write a file under a temporary name, fsync it, then rename it onto `path`."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    output_dir: str, step: int, modules: dict, optimizer, scheduler, extra: dict, args, rank: int = 0, world: int = 1
):
    """Everything the next step depends on: the modules' weights, optimizer, scheduler, every process's RNG
    states, the step and `extra` (anything else the script needs). Written into a temporary folder, fsynced, then
    renamed to checkpoints/step-<N>; only then are checkpoints beyond --keep-checkpoints removed."""
    import shutil

    check_finite(modules, step)
    sharded = any(is_sharded(m) for m in modules.values())
    if sharded:  # --fsdp: the whole weights and optimizer state, gathered to rank 0 (every process takes part)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optimizer_state = get_state_dict(torch.nn.ModuleDict(modules), optimizer, options=options)
    folder = os.path.join(output_dir, "checkpoints", f"step-{step:08d}")
    tmp = folder + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    _fsync(os.path.join(tmp, f"rng-{rank}.pt"))
    _barrier()
    if rank == 0:
        state = {
            "step": step,
            "script": args.exp_name,
            "world_size": world,
            "model": args.model_name_or_path,
            "fsdp": sharded,
            "modules": weights if sharded else {name: m.state_dict() for name, m in modules.items()},
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra,
        }
        torch.save(state, os.path.join(tmp, "state.pt"))
        _fsync(os.path.join(tmp, "state.pt"))
        meta = {
            "step": step,
            "run_id": args.run_id,
            "script": args.exp_name,
            "world_size": world,
            "model": args.model_name_or_path,
            "files": {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)},
        }
        write_atomically(os.path.join(tmp, "COMPLETE"), json.dumps(meta) + "\n")
        _fsync(tmp)
        if os.path.exists(folder):  # only when resuming from an older checkpoint than the latest
            os.replace(folder, folder + ".old")
            shutil.rmtree(folder + ".old")
        os.replace(tmp, folder)
        _fsync(os.path.dirname(folder))
        done = sorted(c for c in os.listdir(os.path.dirname(folder)) if c.startswith("step-") and "." not in c)
        for old in done[: -args.keep_checkpoints]:
            shutil.rmtree(os.path.join(os.path.dirname(folder), old))
    _barrier()


def load_checkpoint(path: str, modules: dict, optimizer, scheduler, args, rank: int = 0, world: int = 1) -> dict:
    """Restore what save_checkpoint wrote (this process's RNG states included); returns the step and `extra`.
    A truncated, corrupt or incompatible checkpoint (another script, model or world size) is a clear error."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False)
    except Exception as e:
        raise ArgumentError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): "
            f"truncated or corrupt; resume from another with --resume-from"
        ) from None
    for key, mine in (("script", args.exp_name), ("world_size", world), ("model", args.model_name_or_path)):
        if state[key] != mine:
            raise ArgumentError(f"checkpoint {path} was written with {key} {state[key]!r}, this run has {mine!r}")
    sharded = any(is_sharded(m) for m in modules.values())
    if state.get("fsdp", False) != sharded:
        raise ArgumentError(f"checkpoint {path} was written {'with' if sharded else 'without'} --fsdp, unlike this run")
    try:
        if sharded:  # every process reads the whole state and keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                torch.nn.ModuleDict(modules),
                optimizer,
                model_state_dict=state["modules"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        for name, module in modules.items() if not sharded else ():
            module.load_state_dict(state["modules"][name])
        if not sharded:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ArgumentError(f"checkpoint {path} does not fit this model ({str(e)[:300]})") from None
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng)
    return state


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag instead of killing the process: the run finishes its step,
    saves a checkpoint and exits. Under torchrun the ranks agree on the flag, so they all stop at the same step."""

    def __init__(self):
        import signal

        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> bool:
        flag = torch.tensor([self.signum], dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0

    def exit(self, output_dir: str, step: int):
        import signal
        import sys

        print(
            f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint saved in {output_dir}/"
            f"checkpoints (continue with --resume)",
            file=sys.stderr,
        )
        sys.exit(128 + self.signum)


def check_finite(modules: dict, step: int):
    """Nothing non-finite is ever saved: stop with the step and the likely causes instead (on every process, also
    when each holds only its shard of the weights)."""
    for name, module in modules.items():
        bad = [
            n
            for n, p in module.state_dict().items()
            if p.is_floating_point() and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
        ]
        if is_sharded(module):  # another process's shard may be the bad one
            flag = torch.tensor([len(bad)], device=device_of(module))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bad or (["(in another process's shard)"] if flag.item() else [])
        if bad:
            raise FloatingPointError(
                f"step {step}: the {name}'s weights are not finite ({', '.join(bad[:3])}...); nothing "
                f"was saved. Likely causes: a learning rate too high, --max-grad-norm too high, fp16/bf16 "
                f"overflow; --skip-nonfinite-steps skips steps whose loss or gradient is not finite"
            )


def save_atomically(model, tokenizer, path: str, state_dict: Optional[dict] = None):
    """save_pretrained into a temporary folder and fsync it, then rename the old `path` away and the new one onto
    `path`, then remove the old one: at every instant a complete model exists (`path`, or `path`.old between the
    two renames, which the next save or a resumed run puts back)."""
    import shutil

    tmp, old = path + ".tmp", path + ".old"
    if os.path.exists(old) and not os.path.exists(path):  # a save killed between its two renames
        os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def save_run(output_dir: str, args, model, tokenizer, step: int, base_changed: bool = False):
    """The trained model and tokenizer in <output_dir>/model (unless --no-save-model), after checking that its
    weights are finite, and args.json; every process calls it, rank 0 writes. With LoRA: the adapter alone, which
    peft applies to --model-name-or-path; the merged weights (they load with the Auto classes) with --merge-lora,
    or when the base exists nowhere else (the tiny model, or `base_changed` by a warm start)."""
    check_finite({"model": model}, step)
    weights = full_weights(model) if args.save_model else None  # --fsdp: gathered by every process
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if args.save_model and args.lora_r and (args.merge_lora or base_changed or not args.model_name_or_path):
        model = model.merge_and_unload()
        print("saving the weights with the LoRA adapter merged")
    if args.save_model:
        save_atomically(model, tokenizer, os.path.join(output_dir, "model"), weights)
    # plain JSON: nested flags (--dro.kind, --dro.rho) as an object, not as their repr
    write_atomically(
        os.path.join(output_dir, "args.json"), json.dumps(vars(args), default=dataclasses.asdict, indent=1)
    )
