"""The run's lifecycle, shared by the three scripts: what a first reading can skip.

Each script calls these in plain sight, in this order, and keeps the algorithm (its losses, the robust weights,
the optimizer steps and the training loop) to itself:

    args, run = lifecycle.start(Args)          # flags, signals, torchrun, the previous run and checkpoint, seeding
    run.open_folder(model)                     # once data and models are checked: the folder becomes this run's
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
from common import ArgumentError, NonFiniteError, TrainingFailure, UserError, device_of, is_sharded

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
"""transformers' schedulers that need nothing but the warm-up and total steps (the others need a metric or more
arguments)"""


MEANINGFUL_RANGES = (
    ("gamma", 0.0, 1.0, "a discount"),
    ("lam", 0.0, 1.0, "GAE's lambda"),
    ("temperature", 1e-2, 1e2, "below, logits / temperature overflow (use --eval-greedy); above, sampling is noise"),
)
"""(flag, low, high, why) of values outside which training is meaningless, checked at parse time."""

SKIPPED_IN_A_ROW = 10
"""With --skip-nonfinite-steps, the run stops once this many steps in a row (or all of --total-steps, if fewer) had
no finite update: a skipped step leaves the model as it was, so a streak is a broken state, not a bad batch."""


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
        if self.merge_lora and not self.lora_r:
            raise ValueError("--merge-lora needs --lora-r > 0 (without LoRA there is no adapter to merge)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")
        seed = getattr(self, "seed", 0)
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
        for name, low, high, why in MEANINGFUL_RANGES:  # flags of some scripts, where they have them
            value = getattr(self, name, None)
            if value is not None and not low <= value <= high:
                raise ValueError(f"--{name} must be in [{low}, {high}], got {value}: {why}")
        scheduler = getattr(self, "lr_scheduler_type", None)
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"--lr-scheduler-type must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
        if self.track:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
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
    """Parse the flags into `args_class` (tyro), join torchrun, name the run, check the output folder and find the
    checkpoint to resume (refusing a folder that holds another run unless --resume or --overwrite says what to do
    with it, and a resume whose flags would change the result) and seed every generator: the same model
    initialisation and batch order on every process, which each take their own shard. SIGTERM and SIGINT stop the
    run cleanly from here on. Nothing on disk changes yet. Returns (args, run)."""
    exit_cleanly_on_user_errors()
    stop = StopSignal()  # before the loop a signal stops the run at once, with a message (see StopSignal)
    args = tyro.cli(args_class)
    return args, Run(args, stop)


class Run:
    """One run of a script: its processes, its output folder and the state of its lifecycle (the step it resumed
    from, the steps skipped as non-finite, the stop signal). Each method is one plainly named moment of the run."""

    def __init__(self, args, stop=None):
        self.args, self.stop = args, stop or StopSignal()
        self.flags = flags_of(args)  # as parsed: what a checkpoint stores and a resume compares
        self.distributed, self.rank, self.world, self.device = init_distributed()
        exit_cleanly_on_user_errors(self.rank)  # again: torch.distributed wraps the hook, which loses the message
        self.evaluating = self.rank == 0 or args.fsdp  # with --fsdp every process takes part in each forward
        args.world_size = self.world
        if args.fsdp and not self.distributed:
            raise ArgumentError("--fsdp shards over the processes of torchrun: run the script under torchrun")
        dataset_name, robust = args.dataset.rstrip("/").split("/")[-1], f"{args.dro.kind}-{args.dro.rho}"  # chi2-0.5
        args.run_id = f"{dataset_name}__{args.exp_name}__{robust}__{args.seed}__{int(time.time())}"
        if (args.resume or args.resume_from) and not args.output_dir:
            raise ArgumentError("--resume and --resume-from need the --output-dir of the run to continue")
        self.output_dir = args.output_dir or f"runs/{args.run_id}"
        check_output_dir(self.output_dir)
        self.resuming = checkpoint_to_resume(args, self.output_dir)  # None for a new run; keeps its run id
        self.replacing = previous_run(self.output_dir, args, self.resuming)  # another run's files, to delete
        if self.replacing:
            check_inputs_outside(args, self.output_dir)
        self.loaded = read_checkpoint(self.resuming, self.rank) if self.resuming else None  # before anything changes
        self.resume_step = self.loaded[0]["step"] if self.resuming else None
        if self.resuming:
            check_same_flags(self.resuming, self.flags, self.resume_step)
            if not self.replacing:
                read_metrics(os.path.join(self.output_dir, "metrics.jsonl"))  # a damaged file refused now, not later
        self.tracker, self.start_step, self.skipped_steps, self.updated_step = None, 0, 0, 0  # (resume sets the last 3)
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

    def open_folder(self, *models):
        """The last step of start-up, once the data are read and the `models` loaded: check what preparing them will
        need (LoRA's target modules, gradient checkpointing), then, on rank 0, lock the output folder, delete a
        previous run (--overwrite) or cut a resumed run's metrics back to its checkpoint, and open metrics.jsonl and
        TensorBoard (wandb with --track). Nothing before this changes anything on disk."""
        for model in models:
            check_preparable(model, self.args)
        if self.rank == 0:
            self.lock = claim_folder(self.output_dir, self.resume_step, self.replacing)
            self.tracker = Tracker(self.args, self.output_dir, self.resume_step)
        self.stop.claimed = self.output_dir if self.rank == 0 and not self.resuming else None

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
        state = load_checkpoint(
            self.resuming, modules, optimizer, scheduler, self.args, self.rank, self.world, self.loaded
        )
        self.loaded = None  # (its memory)
        self.start_step, self.skipped_steps = state["step"], state["extra"]["skipped_steps"]
        self.updated_step = state["extra"].get("updated_step", self.start_step)  # (older checkpoints lack it)
        for _ in range(self.start_step):
            next(batches)
        return state["extra"]

    def steps(self, total_steps: int, desc: str):
        """The steps still to run (after a resumed checkpoint's), with a progress bar on rank 0. From here on
        SIGTERM and SIGINT finish the step, save a checkpoint and exit (see `checkpoint`)."""
        self.stop.in_loop = True
        self.started = time.time()
        return tqdm(
            range(self.start_step + 1, total_steps + 1),
            initial=self.start_step,
            total=total_steps,
            disable=self.rank != 0,
            desc=desc,
        )

    def stop_on_nonfinite_loss(self, loss: torch.Tensor, step: int):
        """A loss that is NaN or infinite stops the run before anything more is saved (unless --skip-nonfinite-steps:
        then its gradient is not finite either, and `update_is_finite` skips the step)."""
        if not torch.isfinite(loss) and not self.args.skip_nonfinite_steps:
            upstream = "a value upstream that is not finite (the model's outputs, the rewards or the robust weights)"
            raise NonFiniteError(_nonfinite_message(step, f"the training loss is {loss.item()}, from {upstream}"))

    def update_is_finite(self, step: int, *grad_norms: torch.Tensor) -> bool:
        """Whether the optimizer may step: every gradient norm is finite (the same on every process, as DDP and
        FSDP averaged the gradients). Otherwise the step is skipped and counted with --skip-nonfinite-steps, or the
        run stops before anything more is saved; it also stops once SKIPPED_IN_A_ROW steps in a row (or every step
        of a shorter run) had no finite update: the model is not training."""
        if all(torch.isfinite(norm) for norm in grad_norms):
            self.updated_step = step
            return True
        norms = ", ".join(str(norm.item()) for norm in grad_norms)
        if not self.args.skip_nonfinite_steps:
            raise NonFiniteError(_nonfinite_message(step, f"the gradient norm is {norms}"))
        self.skipped_steps += 1
        in_a_row = step - self.updated_step  # steps without a finite update, this one included
        if in_a_row >= min(SKIPPED_IN_A_ROW, self.args.total_steps):
            raise NonFiniteError(
                _nonfinite_message(
                    step,
                    f"the gradient norm is {norms}, and no step since step {self.updated_step} had a finite update "
                    f"({in_a_row} skipped in a row by --skip-nonfinite-steps): the model is not training",
                )
            )
        return False

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
            extra = {"skipped_steps": self.skipped_steps, "updated_step": self.updated_step, **extra}
            save_checkpoint(
                self.output_dir,
                step,
                modules,
                optimizer,
                scheduler,
                extra,
                self.args,
                self.rank,
                self.world,
                self.flags,
            )
            if self.stop.signum:
                self.stop.exit(self.output_dir, step)

    def finish(self, model, tokenizer, base_changed: bool = False):
        """The end: the model (see `save_run`) and args.json, the logs closed, and every process leaving torchrun
        together (one exiting while another still writes can abort in gloo). (A run whose steps were all skipped as
        non-finite never gets here: see `update_is_finite`.)"""
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
    return (
        f"step {step}: {what}. Stopping; earlier checkpoints are kept, nothing more is saved. Likely causes: a "
        f"learning rate too high, fp16/bf16 overflow, an extreme flag (--beta, --kl-coef, ...); "
        f"--skip-nonfinite-steps skips a step whose gradient is not finite"
    )


def exit_cleanly_on_user_errors(rank: int = 0):
    """Make an uncaught UserError print `error: <message>` and exit with code 2, without a traceback, and so an error
    of the environment (a full disk, a read-only or missing folder: an OSError naming its file) print
    `error: <file>: <reason>` and exit with code 1, and a run stopped by a NaN or infinite value or collapsed outputs
    (`TrainingFailure`) print `error: <message>` and exit with code 1; a stop before the training loop (`Stopped`)
    prints its message and exits with 128 + the signal; any other exception (a bug) keeps its traceback. Under
    torchrun the same message raised by several processes is printed once (the first to print it leaves a mark in the
    temp folder)."""

    def hook(kind, error, traceback):
        if issubclass(kind, Stopped):
            _print_once(str(error), rank)
            sys.exit(128 + error.signum)
        if issubclass(kind, UserError):
            _print_once(f"error: {error}", rank)
            sys.exit(2)
        if issubclass(kind, TrainingFailure):
            _print_once(f"error: {error}", rank)
            sys.exit(1)
        if issubclass(kind, OSError) and error.filename is not None:
            _print_once(f"error: {environment_message(error)}", rank)
            sys.exit(1)
        sys.__excepthook__(kind, error, traceback)

    sys.excepthook = hook


def _print_once(message: str, rank: int):
    """Print to stderr; under torchrun only if no other process of this launch printed the same message."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        import hashlib
        import tempfile

        launch = f"{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ.get('MASTER_PORT')}-{os.getppid()}"  # torchrun's pid
        key = hashlib.sha1((launch + message).encode()).hexdigest()[:16]
        try:
            os.close(os.open(os.path.join(tempfile.gettempdir(), f"dro-rlhf-error-{key}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # another process printed it
        except OSError:
            pass
        message = f"[rank {rank}] {message}" if rank else message
    print(message, file=sys.stderr, flush=True)


def environment_message(error: OSError) -> str:
    """An OSError as one line naming the file and the reason, and for a full disk what is kept."""
    import errno

    message = f"{error.filename}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        message += " (no space left on the disk: free some, then continue with --resume from the last checkpoint)"
    elif error.errno == errno.EROFS:
        message += " (a read-only file system: pass an --output-dir where this user can write)"
    return message


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
        raise ArgumentError(
            f"{flag} {path}: " + ("a file, not a model folder" if os.path.exists(path) else "no such folder")
        )


def _adapter_base(path: str) -> Optional[str]:
    """The base model of a saved LoRA adapter folder (its adapter_config.json), or None for any other path."""
    config = os.path.join(path, "adapter_config.json")
    if not (ingest._is_local(path) and os.path.exists(config)):
        return None
    try:
        base = json.load(open(config))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArgumentError(f"{path}: a LoRA adapter folder whose adapter_config.json cannot be read ({e})") from None
    if not base:
        raise ArgumentError(f"{path}: a LoRA adapter folder that does not say which base model it adapts")
    return base


def load_tokenizer(args):
    """The tokenizer of --tokenizer-name-or-path or of the model (pad = EOS where it has no pad token), or the tiny
    byte-level one for the default tiny model. A LoRA adapter folder without a tokenizer uses its base model's."""
    path = args.tokenizer_name_or_path or args.model_name_or_path
    if path is None:
        return common.tiny_tokenizer()
    check_model_path(path, "--tokenizer-name-or-path" if args.tokenizer_name_or_path else "--model-name-or-path")
    try:
        tokenizer = _auto_tokenizer(path, args)
    except (OSError, ValueError, TypeError, KeyError) as e:  # no tokenizer there, not on the hub (or offline)
        base = _adapter_base(path)
        if base is None:
            raise ArgumentError(f"{path}: no tokenizer found ({type(e).__name__}: {str(e)[:300]})") from None
        tokenizer = _auto_tokenizer(base, args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    return tokenizer


def _auto_tokenizer(path: str, args):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)


def load_model(auto_class, path: str, args, tokenizer, flag: str = "--model-name-or-path", frozen=False, **kwargs):
    """A pretrained model with float32 master weights whatever dtype its checkpoint is stored in (transformers
    would otherwise load a bf16 checkpoint as bf16, and Adam's updates would then mostly round away); --bf16
    adds bf16 autocast for the forward passes instead. A saved LoRA adapter folder is loaded onto its base model
    and merged. A `frozen` model (a reward or reference model: never trained here) must have every weight in its
    checkpoint (a causal LM as a reward model would score with a random head) and the run's tokenizer. Says what was
    loaded and how it trains."""
    from transformers import AutoConfig

    check_model_path(path, flag)
    base = _adapter_base(path)
    options = dict(
        dtype=torch.float32,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
        **kwargs,
    )
    try:
        stored = getattr(
            AutoConfig.from_pretrained(base or path, trust_remote_code=args.trust_remote_code), "dtype", None
        )
        if base:  # peft's Auto classes load the base, then the adapter (and a trained head) onto it
            import peft

            peft_class = getattr(peft, auto_class.__name__.replace("AutoModel", "AutoPeftModel"))
            model, missing = peft_class.from_pretrained(path, **options).merge_and_unload(), []
        else:
            model, info = auto_class.from_pretrained(path, output_loading_info=True, **options)
            missing = info["missing_keys"]
    except (OSError, ValueError, KeyError) as e:  # no folder or hub repository, no config, an unknown model type
        raise ArgumentError(f"{flag} {path}: no model found ({type(e).__name__}: {str(e)[:300]})") from None
    if frozen and missing:
        raise ArgumentError(
            f"{flag} {path}: {', '.join(sorted(missing)[:3])} are not in the checkpoint, so they would be random "
            f"and never trained (a causal LM given where a trained reward model is needed?)"
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ArgumentError(
            f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens (pad id {tokenizer.pad_token_id}) "
            f"but the model embeds only {rows}: it is not the model's own tokenizer (transformers may "
            f"have built one for the model type from other files); pass --tokenizer-name-or-path"
        )
    if frozen:
        check_same_tokenizer(path, tokenizer, flag, args)
    print(
        f"{path}: "
        + (f"a LoRA adapter on {base}, merged; " if base else "")
        + f"checkpoint stored in {stored or 'float32'}; float32 master weights"
        + (", bf16 autocast" if args.bf16 else "")
    )
    return model


def check_same_tokenizer(path: str, tokenizer, flag: str, args):
    """A model that reads the policy's tokens (a reward or reference model) must have been trained on the same
    tokenizer: the same vocabulary and special tokens. Checked against the tokenizer saved with it, if any."""
    try:
        theirs = _auto_tokenizer(path, args)
    except Exception:  # no tokenizer saved with the model: nothing to compare
        return
    special = ("bos_token", "eos_token", "unk_token")
    mine_special = {k: getattr(tokenizer, k) for k in special}
    theirs_special = {k: getattr(theirs, k) for k in special}
    if theirs.get_vocab() != tokenizer.get_vocab() or mine_special != theirs_special:
        raise ArgumentError(
            f"{flag} {path}: its tokenizer differs from the policy's ({len(theirs)} tokens, special "
            f"{theirs_special}; the policy's: {len(tokenizer)} tokens, {mine_special}): it would read other "
            f"token ids than it was trained on; pass a model trained with the policy's tokenizer"
        )


def check_preparable(model, args):
    """What prepare_model will need, checked before the output folder is claimed: gradient checkpointing support and
    LoRA target modules that the model has (as peft matches them: the name or its last components)."""
    if args.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise ArgumentError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    if not args.lora_r or not args.lora_target_modules:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in args.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        last = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ArgumentError(
            f"--lora-target-modules: {type(model).__name__} has no module named {', '.join(missing)}; its linear "
            f"layers: {', '.join(last)}"
        )


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

    @property
    def config(self):
        return self.model.config

    def get_output_embeddings(self):  # (common.token_logprobs computes the log-probs inside this layer)
        return self.model.get_output_embeddings()

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


@contextlib.contextmanager
def evaluation_rng(seed: int, run):
    """Sample an evaluation from its own fixed random stream, apart from training's: two evaluations then differ by
    the policy alone (common random numbers: a smaller gain shows), and --eval-every changes no training result."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed + 20_000 + run.rank)
        yield


def autocast(args, device: torch.device):
    """bf16 autocast of the forward passes with --bf16 (a no-op context without it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def check_outputs(values, what: str, where: str, must_vary: bool = True):
    """Stop, naming the likely causes, when a model's outputs over an evaluation are not finite (nothing non-finite
    is saved) or the same for every different input (the model reads nothing of the text: a 50% table hides it)."""
    if not all(map(math.isfinite, values)):
        raise NonFiniteError(
            f"{where}: a {what} is not finite; nothing was saved. Likely causes: a learning rate "
            f"too high, fp16/bf16 overflow; --skip-nonfinite-steps skips steps with non-finite gradients"
        )
    if must_vary and len(values) > 2 and len(set(values)) == 1:
        raise TrainingFailure(
            f"{where}: every {what} is exactly {values[0]}, whatever the text; the model sees none of it (a "
            f"learning rate so high that training collapsed it? a tokenizer that is not the model's own? a head that "
            f"was not loaded or trained?); nothing was saved"
        )


# ----------------------------------------------------------------------------------------------
# Runs: the output folder, tracking, checkpoints with exact resume, saving
# ----------------------------------------------------------------------------------------------
# A run's folder holds metrics.jsonl, TensorBoard events, checkpoints/step-<N>/ and, at the end, model/ and
# args.json. Every write that a kill could interrupt goes to a temporary name first and is then renamed onto a
# name that did not exist, so at every instant a complete model or checkpoint exists.

RUN_FILES = ("metrics.jsonl", "args.json", "model", "checkpoints")


RESUMABLE_FLAGS = {
    "eval_every": "evaluation cadence",
    "eval_batch_size": "evaluation batch",
    "log_every": "logging",
    "save_every": "checkpoint cadence",
    "keep_checkpoints": "checkpoints kept",
    "save_model": "the final save",
    "merge_lora": "the final save",
    "output_dir": "output",
    "track": "tracking",
    "wandb_project_name": "tracking",
    "wandb_entity": "tracking",
    "resume": "resuming",
    "resume_from": "resuming",
    "overwrite": "resuming",
    "total_steps": "more steps (not fewer than the checkpoint's)",
}
"""The flags a resumed run may change: they cannot change the trained model. Any other difference is refused."""


def flags_of(args) -> dict:
    """The flags as parsed, as plain JSON values (nested dataclasses such as --dro.* as dicts)."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


def _flag_differences(old: dict, new: dict, prefix: str = "") -> list:
    """[(flag, old value, new value)] of every flag that differs, nested ones as --dro.rho."""
    differences = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _flag_differences(a, b, prefix + key + ".")
        elif a != b:
            differences.append((prefix + key, a, b))
    return differences


def check_same_flags(checkpoint: str, flags: dict, step: int):
    """Refuse to resume with flags that would change the result (every one is named with its old and new value);
    only RESUMABLE_FLAGS may change, and --total-steps not below the checkpoint's step."""
    meta = _read_complete(checkpoint)
    if "flags" not in meta:  # a checkpoint of an older version, which did not store them
        print(f"note: checkpoint {checkpoint} does not record its flags: they cannot be compared with this run's")
        return
    if flags["total_steps"] < step:
        raise ArgumentError(
            f"--total-steps {flags['total_steps']}: checkpoint {checkpoint} is already at step {step}; "
            f"resume with --total-steps >= {step}, or resume from an earlier checkpoint with --resume-from"
        )
    derived = {"run_id", "world_size", "micro_batch_size", "local_batch_size", "minibatch_size"}  # computed
    changed = [
        f"--{name.replace('_', '-')} {old!r} -> {new!r}"
        for name, old, new in _flag_differences(meta["flags"], flags)
        if name not in RESUMABLE_FLAGS and name not in derived
    ]
    if changed:
        raise ArgumentError(
            f"checkpoint {checkpoint} was written with other flags, which would change the result: "
            f"{'; '.join(changed)}. Resume with the flags of that run (only {', '.join(_resumable())} may "
            f"change), or start a new run in another --output-dir"
        )


def _resumable() -> list:
    return ["--" + name.replace("_", "-") for name in RESUMABLE_FLAGS if name not in ("resume", "resume_from")]


def _read_complete(checkpoint: str) -> dict:
    """A checkpoint's COMPLETE marker (what wrote it, its step and its files' sizes); a damaged one is an error."""
    try:
        with open(os.path.join(checkpoint, "COMPLETE")) as f:
            meta = json.load(f)
        meta["step"], meta["files"]  # noqa: B018 (the keys every marker has)
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArgumentError(
            f"checkpoint {checkpoint}: its COMPLETE marker cannot be read ({type(e).__name__}); "
            f"resume from another with --resume-from"
        ) from None


def checkpoint_to_resume(args, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from (--resume-from, or with --resume the latest complete one of the output folder),
    after refusing a folder that holds a previous run unless --resume or --overwrite says what to do with it. A
    resumed run keeps the run id of the run it continues (args.run_id)."""
    checkpoint = _locate_checkpoint(args, output_dir)
    if checkpoint:  # checked before anything is touched: the sizes of its files and what wrote it
        meta = _read_complete(checkpoint)
        for name, size in meta["files"].items():
            path = os.path.join(checkpoint, name)
            if not os.path.exists(path) or os.path.getsize(path) != size:
                raise ArgumentError(
                    f"checkpoint {checkpoint} cannot be read: {name} is truncated or missing; "
                    f"resume from another with --resume-from"
                )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for key, flag, mine in (
            ("script", "--exp-name", args.exp_name),
            ("world_size", "the number of processes", world),
            ("model", "--model-name-or-path", _normalised(args.model_name_or_path)),
        ):
            if _normalised(meta[key]) != mine:
                raise ArgumentError(
                    f"checkpoint {checkpoint} was written with {flag} {meta[key]!r}, this run has {mine!r}"
                )
        args.run_id = meta["run_id"]
    return checkpoint


def _normalised(path):
    """A local path without a trailing slash (the same folder however it is written); anything else as it is."""
    return os.path.normpath(path) if isinstance(path, str) and ingest._is_local(path) else path


def _locate_checkpoint(args, output_dir: str) -> Optional[str]:
    """--resume-from's folder, --resume's latest complete checkpoint, or None for a new run (refused in a folder
    that holds a previous run, unless --overwrite; with --resume, a folder that holds no run at all starts one)."""
    if args.resume_from:
        if not os.path.isdir(args.resume_from):
            raise ArgumentError(f"--resume-from {args.resume_from}: no such folder")
        if not os.path.exists(os.path.join(args.resume_from, "COMPLETE")):
            raise ArgumentError(f"--resume-from {args.resume_from}: not a complete checkpoint (no COMPLETE marker)")
        return args.resume_from
    folder = os.path.join(output_dir, "checkpoints")
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
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
        if done:
            return os.path.join(folder, done[-1])
        if previous:
            raise ArgumentError(f"--resume: {output_dir} has no complete checkpoint to resume from")
        print(f"--resume: {output_dir} holds no run yet (none was started or it stopped before step 1): a new run")
        return None
    if previous and not args.overwrite:
        raise ArgumentError(
            f"{output_dir} holds a previous run ({', '.join(previous)}); pass --resume to continue it, "
            f"--overwrite to replace it, or another --output-dir"
        )
    return None


def check_output_dir(output_dir: str):
    """The output folder can be made and written, checked without creating anything: an existing path that is not
    a folder, or no write permission on it or on the nearest folder above it (a read-only file system), is refused."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ArgumentError(f"--output-dir {output_dir}: exists and is not a folder")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ArgumentError(f"--output-dir {output_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"--output-dir {output_dir}: {existing} cannot be written (permissions or read-only)")


def _run_id_of_folder(output_dir: str) -> Optional[str]:
    """The run id of the run whose files a folder holds (args.json, metrics.jsonl or its latest checkpoint)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        return json.load(open(os.path.join(output_dir, "args.json")))["run_id"]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return read_metrics(os.path.join(output_dir, "metrics.jsonl"), quiet=True)[0]["run_id"]
    folder = os.path.join(output_dir, "checkpoints")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        latest = sorted(c for c in os.listdir(folder) if c.startswith("step-") and "." not in c)[-1]
        return json.load(open(os.path.join(folder, latest, "COMPLETE")))["run_id"]
    return None


def previous_run(output_dir: str, args, checkpoint: Optional[str]) -> bool:
    """Whether the output folder holds files of a run other than the one this run makes or continues, which
    claiming the folder will delete: a new run's --overwrite, or --resume-from a checkpoint of another run (refused
    without --overwrite: it would mix two runs' models and metrics in one folder)."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if not present:
        return False
    if checkpoint is None:
        return True  # (without --overwrite, _locate_checkpoint refused it already)
    inside = os.path.realpath(checkpoint).startswith(os.path.realpath(os.path.join(output_dir, "checkpoints")) + "/")
    if inside or _run_id_of_folder(output_dir) == args.run_id:
        return False
    if not args.overwrite:
        raise ArgumentError(
            f"{output_dir} holds another run ({_run_id_of_folder(output_dir) or 'unknown id'}: "
            f"{', '.join(present)}) than the one checkpoint {checkpoint} continues ({args.run_id}); pass an "
            f"empty --output-dir, the checkpoint's own run folder, or --overwrite to replace that run"
        )
    return True


def check_inputs_outside(args, output_dir: str):
    """Refuse an input (a model, tokenizer, dataset or checkpoint flag) that lies inside a previous run's files in
    the output folder, which claiming the folder deletes (e.g. --model-name-or-path <dir>/model --overwrite)."""
    doomed = [os.path.realpath(os.path.join(output_dir, f)) for f in RUN_FILES]
    for name, value in vars(args).items():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if not isinstance(item, str) or not item or not os.path.exists(item) or name == "output_dir":
                continue
            path = os.path.realpath(item)
            if any(path == d or path.startswith(d + "/") for d in doomed):
                raise ArgumentError(
                    f"--{name.replace('_', '-')} {item} lies inside the previous run in {output_dir}, which "
                    f"--overwrite would delete; copy it elsewhere first or pass another --output-dir"
                )


def read_checkpoint(path: str, rank: int = 0):
    """(state, rng) of a checkpoint, read whole before anything changes on disk: one that cannot be read is an
    error naming it, and a resume that fails on it has touched nothing."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False, map_location="cpu")
        rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False)
        state["step"], state["modules"], state["extra"]  # noqa: B018 (the keys every checkpoint has)
    except Exception as e:
        raise ArgumentError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}): "
            f"truncated or corrupt; resume from another with --resume-from"
        ) from None
    return state, rng


def read_metrics(path: str, quiet: bool = False) -> list:
    """The lines of metrics.jsonl as dicts. Blank lines are ignored and a last line cut short (a crash in the
    middle of a write) is dropped with a note; any other line that is not a JSON object is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer step")
        except (UnicodeDecodeError, ValueError) as e:
            if i == len(lines) - 1:
                if not quiet:
                    print(f"{path}, line {number}: cut short (a crash while writing it?); dropped")
                continue
            raise ArgumentError(f"{path}, line {number}: not a metrics line ({e}); repair or remove it") from None
        rows.append(row)
    return rows


def claim_folder(output_dir: str, resume_step: Optional[int], replacing: bool = False):
    """Lock the output folder for this run (a concurrent run is turned away; the lock holds until the process ends,
    however it ends), then make it the run's: `replacing` removes a previous run's files (--overwrite), a resumed
    run keeps the metrics.jsonl lines up to its checkpoint's step (later ones are written again), a new run starts
    an empty metrics.jsonl. Returns the lock's open file."""
    import fcntl
    import shutil

    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ArgumentError(f"{output_dir}: another run is writing to this folder right now") from None
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if replacing:
        for name in RUN_FILES + tuple(f for f in os.listdir(output_dir) if f.startswith("events.out.tfevents")):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
    kept = [] if replacing or resume_step is None else read_metrics(metrics_path)
    kept = [line for line in kept if line["step"] <= resume_step] if kept else []
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


@contextlib.contextmanager
def _writing(folder: str):
    """A write that fails on a full disk (torch's and safetensors' writers raise RuntimeErrors without the reason) as
    an OSError(ENOSPC) naming the folder; the previous checkpoint or model is kept."""
    import errno
    import shutil

    try:
        yield
    except OSError:
        raise
    except Exception as e:
        free = shutil.disk_usage(folder if os.path.exists(folder) else os.path.dirname(folder)).free
        if free >= 2**20:  # not a full disk: the error as it is
            raise
        raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__}: {str(e)[:200]})", folder) from None


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    output_dir: str,
    step: int,
    modules: dict,
    optimizer,
    scheduler,
    extra: dict,
    args,
    rank: int = 0,
    world: int = 1,
    flags: Optional[dict] = None,
):
    """Everything the next step depends on: the modules' weights, optimizer, scheduler, every process's RNG
    states, the step and `extra` (anything else the script needs), and in COMPLETE the run's `flags` (as parsed,
    which a resume compares with its own). Written into a temporary folder, fsynced, then renamed to
    checkpoints/step-<N>; only then are checkpoints beyond --keep-checkpoints removed."""
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
    with _writing(tmp):
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
        with _writing(tmp):
            torch.save(state, os.path.join(tmp, "state.pt"))
        _fsync(os.path.join(tmp, "state.pt"))
        meta = {
            "step": step,
            "run_id": args.run_id,
            "script": args.exp_name,
            "world_size": world,
            "model": args.model_name_or_path,
            "files": {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)},
            **({"flags": flags} if flags is not None else {}),
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


def load_checkpoint(
    path: str, modules: dict, optimizer, scheduler, args, rank: int = 0, world: int = 1, loaded=None
) -> dict:
    """Restore what save_checkpoint wrote (this process's RNG states included; `loaded`: what read_checkpoint read
    already); returns the step and `extra`. A truncated, corrupt or incompatible checkpoint (another script, model
    or world size) is a clear error."""
    state, rng = loaded or read_checkpoint(path, rank)
    for key, mine in (("script", args.exp_name), ("world_size", world), ("model", args.model_name_or_path)):
        if _normalised(state[key]) != _normalised(mine):
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


class Stopped(BaseException):
    """A SIGTERM or SIGINT before the training loop (a BaseException, like KeyboardInterrupt, so that no `except
    Exception` of a loader turns it into another error)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C), from the start of the run. Before the training loop (reading data, loading
    models, the warm start, the step-0 evaluation) they stop the run at once with `Stopped`: one line says so, and a
    new run's files are removed, so that the same command (or --resume) starts it again. In the loop they set a flag
    instead: the run finishes its step, saves a checkpoint and exits. Under torchrun the ranks agree on the flag, so
    they all stop at the same step."""

    def __init__(self):
        import signal

        self.signum, self.in_loop, self.claimed = 0, False, None  # claimed: a new run's folder, once it wrote there
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.signum = signum
        if self.in_loop:
            return
        name = signal.Signals(signum).name
        if self.claimed:  # a new run stopped before its first step: nothing worth keeping
            for name_ in os.listdir(self.claimed):
                if name_ == "metrics.jsonl" or name_.startswith("events.out.tfevents"):
                    os.remove(os.path.join(self.claimed, name_))
        raise Stopped(
            signum,
            f"stopped by {name} before the first training step; nothing was saved"
            + (f" (the files of this run in {self.claimed} were removed)" if self.claimed else "")
            + ": run the same command again to start over, or --resume to continue from a checkpoint if there is one",
        )

    def requested(self) -> bool:
        flag = torch.tensor([self.signum], dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0

    def exit(self, output_dir: str, step: int):
        import signal

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
            raise NonFiniteError(
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
    with _writing(tmp):
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
