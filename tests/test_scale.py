"""Memory savers and precision: gradient checkpointing gives the gradients of a plain backward, the LoRA reference is
the base model exactly, dropout-free train() is eval(), the saved adapter and merged weights reload, bf16 autocast
stays close to fp32, and the scripts with these options still reduce to ERM at rho = 0 and under DDP."""

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_compat import ARCHITECTURES
from test_reward import SGD_WRAPPER
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import common
import dro_dpo
import dro_ppo
import dro_reward
import ingest
import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TASKS = [(AutoModelForCausalLM, "CAUSAL_LM"), (AutoModelForSequenceClassification, "SEQ_CLS")]


def options(**kw):
    base = dict(
        gradient_checkpointing=False,
        bf16=False,
        lora_r=0,
        lora_alpha=16.0,
        lora_dropout=0.0,
        lora_target_modules=(),
        merge_lora=False,
        model_name_or_path=None,
        save_model=True,
    )
    return SimpleNamespace(**{**base, **kw})


def tiny(auto=AutoModelForCausalLM, seed=0, **config):
    tok = common.tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = common.tiny_config(tok, num_labels=1 if auto is AutoModelForSequenceClassification else None)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = auto.from_config(cfg)
    model.config.pad_token_id = tok.pad_token_id
    return tok, model


def batch(tok, n=6):
    rows = ingest.load_preferences("synthetic", "train", tok, max_rows=n)
    seqs = [tok(r["prompt"] + r["chosen"]).input_ids for r in rows]
    ids, mask = common.pad(seqs, tok.pad_token_id)
    return seqs, ids, mask


def randomise_adapter(model, seed=1):
    """LoRA starts as the identity (B = 0); give it weights so that the adapter changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_disable_dropout_makes_train_the_same_function_as_eval(arch):
    """PPO runs its update forwards in train() (that is what switches gradient checkpointing on): with dropout
    configured everywhere a config allows it, and LoRA dropout, train() gives eval()'s logits after
    disable_dropout, and not before."""
    config = ARCHITECTURES[arch](vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for name, value in vars(config).items():
        if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.3)
    torch.manual_seed(0)
    model = lifecycle.prepare_model(
        AutoModelForCausalLM.from_config(config), options(lora_r=4, lora_dropout=0.3), "CAUSAL_LM"
    )
    randomise_adapter(model)
    ids = torch.randint(0, 64, (3, 12))
    eval_logits = model.eval()(input_ids=ids).logits
    assert not torch.equal(model.train()(input_ids=ids).logits, eval_logits)  # dropout is on in train()
    lifecycle.disable_dropout(model)
    torch.testing.assert_close(model.train()(input_ids=ids).logits, eval_logits, rtol=0, atol=0)


@pytest.mark.parametrize("what", ["policy", "reward_model", "critic"])
def test_gradient_checkpointing_gives_the_same_gradients(what):
    """The layers' activations are recomputed in the backward pass (each layer's MLP runs twice), and the
    gradients equal a plain backward's to float32 rounding."""
    auto = AutoModelForSequenceClassification if what == "reward_model" else AutoModelForCausalLM
    grads, calls = {}, {}
    for gc in (False, True):
        tok, model = tiny(auto)
        if what == "critic":
            model = dro_ppo.Critic(model)
            model.backbone = lifecycle.prepare_model(model.backbone, options(gradient_checkpointing=gc), "x")
            layers = model.backbone.layers
        else:
            model = lifecycle.prepare_model(model, options(gradient_checkpointing=gc), "x")
            layers = model.model.layers
        torch.manual_seed(0)
        torch.nn.init.normal_(model.head.weight) if what == "critic" else None
        model.train()
        calls[gc] = 0
        layers[0].mlp.register_forward_pre_hook(lambda *_, gc=gc: calls.__setitem__(gc, calls[gc] + 1))
        seqs, ids, mask = batch(tok)
        if what == "policy":
            loss = -common.completion_logprobs(model, seqs, [3] * len(seqs), tok.pad_token_id)[0].sum()
        elif what == "reward_model":
            loss = common.sequence_rewards(model, seqs, tok.pad_token_id).pow(2).sum()
        else:
            loss = model(ids, mask).pow(2).sum()
        loss.backward()
        grads[gc] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {False: 1, True: 2}  # the second call is the recomputation in the backward pass
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 10
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6)


def test_lora_reference_is_the_base_model_exactly():
    """With LoRA the reference is the policy with its adapter off: its log-probs equal those of the model before
    the adapter was added, bit for bit, in any mode, while the adapted policy's differ; the policy's mode is kept."""
    tok, base = tiny()
    seqs, ids, mask = batch(tok)
    expected = common.token_logprobs(base.eval(), ids, mask)
    policy = lifecycle.prepare_model(copy.deepcopy(base), options(lora_r=4, lora_dropout=0.5), "CAUSAL_LM")
    randomise_adapter(policy)
    reference = lifecycle.reference_policy(policy, options(lora_r=4))
    assert not any(p.data_ptr() in {q.data_ptr() for q in base.parameters()} for p in policy.parameters())
    for mode in (True, False):
        policy.train(mode)
        with torch.no_grad():
            assert torch.equal(common.token_logprobs(reference, ids, mask), expected)
        assert policy.training == mode
    policy.eval()
    assert not torch.allclose(common.token_logprobs(policy, ids, mask), expected, atol=1e-3)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)


def lora_policy_and_critic(shared, **flags):
    """PPO's LoRA models as dro_ppo.py builds them: (policy, critic, reference), adapters and head made non-zero."""
    args = options(lora_r=4, **flags)
    tok, policy = tiny()
    critic = dro_ppo.Critic(policy, shared=shared)
    torch.manual_seed(0)
    policy = lifecycle.prepare_model(policy, args, "CAUSAL_LM")
    critic.backbone = lifecycle.prepare_model(critic.backbone, args, "FEATURE_EXTRACTION")
    randomise_adapter(policy, seed=1)
    randomise_adapter(critic, seed=2)
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    return tok, policy, critic, lifecycle.reference_policy(policy, args)


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_critic_holds_no_second_frozen_base(tmp_path, bf16):
    """With LoRA the critic's frozen weights are the policy's own tensors (each held once; the copy held them twice),
    sharing changes no output (the policy's, the reference's and the critic's values equal the copy's), and the
    saved adapter is the policy's alone."""
    frozen_storages = {}
    for shared in (False, True):
        tok, policy, critic, reference = lora_policy_and_critic(shared, bf16=bf16)
        frozen = [p for m in (policy, critic) for p in m.parameters() if not p.requires_grad]
        frozen_storages[shared] = {p.untyped_storage().data_ptr() for p in frozen}
        assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in frozen)
        _, ids, mask = batch(tok)
        with torch.no_grad(), lifecycle.autocast(options(bf16=bf16), torch.device("cpu")):
            outputs = [common.token_logprobs(m, ids, mask) for m in (policy, reference)] + [critic(ids, mask)]
        if not shared:
            copied = outputs
    policy_frozen = {p.untyped_storage().data_ptr() for p in policy.parameters() if not p.requires_grad}
    assert frozen_storages[True] == policy_frozen
    assert len(frozen_storages[False]) == 2 * len(policy_frozen)
    assert all(torch.equal(a, b) for a, b in zip(outputs, copied))
    lifecycle.save_run(str(tmp_path), options(lora_r=4, model_name_or_path="base"), policy, tok, 1)
    saved = load_file(str(tmp_path / "model" / "adapter_model.safetensors"))
    assert len(saved) == sum(p.requires_grad for p in policy.parameters())
    assert all(torch.equal(saved[k], policy.state_dict()[k.replace(".weight", ".default.weight")]) for k in saved)


def test_lora_critic_and_policy_updates_stay_apart():
    """One frozen base, two adapters: a value loss's backward reaches only the critic's adapter and head, a policy
    loss's only the policy's adapter (in train() with gradient checkpointing, which recomputes in the backward)."""
    tok, policy, critic, reference = lora_policy_and_critic(True, gradient_checkpointing=True)
    _, ids, mask = batch(tok)
    policy.train(), critic.train()
    policy_adapter = [p for p in policy.parameters() if p.requires_grad]
    critic_trained = [p for p in critic.parameters() if p.requires_grad]
    assert not {id(p) for p in policy_adapter} & {id(p) for p in critic_trained}
    critic(ids, mask).pow(2).sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic_trained)
    critic.zero_grad(set_to_none=True)
    common.token_logprobs(policy, ids, mask).sum().backward()
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy_adapter)
    with torch.no_grad():  # and the reference is still the base: untouched by either adapter
        base = common.token_logprobs(reference, ids, mask)
        for p in critic_trained:
            p.add_(1.0)
        assert torch.equal(common.token_logprobs(reference, ids, mask), base)


@pytest.mark.parametrize("auto,task", TASKS)
def test_lora_with_bf16_stores_frozen_weights_in_bf16_and_trains_in_fp32(auto, task):
    """--bf16 with LoRA: the frozen weights take 2 bytes per parameter, what trains (adapter, head) keeps fp32."""
    _, model = tiny(auto)
    model = lifecycle.prepare_model(model, options(lora_r=4, bf16=True), task)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0.9 * sum(p.numel() for p in model.parameters())


def test_lora_target_modules_that_do_not_exist_are_a_clear_error():
    _, model = tiny()
    with pytest.raises(common.ArgumentError, match="--lora-target-modules nope"):
        lifecycle.prepare_model(model, options(lora_r=4, lora_target_modules=("nope",)), "CAUSAL_LM")


@pytest.mark.parametrize("auto,task", TASKS)
def test_saved_lora_models_reload(tmp_path, auto, task):
    """The adapter alone reloads on its base with peft; --merge-lora (and a changed base) saves merged weights that
    the Auto classes load, a reward model's trained head included, with the adapted model's outputs."""
    from peft import PeftModel

    tok, base = tiny(auto)
    lifecycle.save_atomically(base, tok, str(tmp_path / "base"))
    model = lifecycle.prepare_model(copy.deepcopy(base), options(lora_r=4), task)
    randomise_adapter(model)
    if task == "SEQ_CLS":
        with torch.no_grad():
            model.base_model.model.score.weight.normal_()  # the head is trained (and saved) with the adapter
    _, ids, mask = batch(tok)
    expected = model.eval()(input_ids=ids, attention_mask=mask).logits
    args = options(lora_r=4, model_name_or_path=str(tmp_path / "base"))
    lifecycle.save_run(str(tmp_path / "adapter"), args, model, tok, 1)
    assert os.path.exists(tmp_path / "adapter" / "model" / "adapter_config.json")
    reloaded = PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter" / "model")
    torch.testing.assert_close(reloaded.eval()(input_ids=ids, attention_mask=mask).logits, expected)
    lifecycle.save_run(str(tmp_path / "merged"), args, model, tok, 1, base_changed=True)
    merged = auto.from_pretrained(tmp_path / "merged" / "model").eval()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32():
    """--bf16: the losses of the three scripts are finite and within bf16 rounding of fp32, and come out in fp32."""
    tok, policy = tiny()
    _, reward_model = tiny(AutoModelForSequenceClassification)
    _, reference = tiny(seed=1)
    data = common.tokenize_preferences(
        ingest.load_preferences("synthetic", "train", tok, max_rows=16), tok, 128, "synthetic"
    )
    for bf16 in (False, True):
        with lifecycle.autocast(SimpleNamespace(bf16=bf16), torch.device("cpu")):
            dpo, _, _ = dro_dpo.pair_losses(policy, reference, data, range(16), tok.pad_token_id, 0.1)
            rm = dro_reward.pair_losses(reward_model, data, range(16), tok.pad_token_id)[0]
            critic = dro_ppo.Critic(policy)
            torch.manual_seed(0)
            torch.nn.init.normal_(critic.head.weight, std=0.1)
            values = critic(*common.pad(data["chosen"][:16], tok.pad_token_id))
        if not bf16:
            fp32 = (dpo, rm, values)
        else:
            for low, high in zip((dpo, rm, values), fp32):
                assert low.dtype == torch.float32 and torch.isfinite(low).all()
                torch.testing.assert_close(low, high, rtol=0.05, atol=0.05)
                assert not torch.equal(low, high)  # bf16 did run


def run(script, out, *flags, nproc=1, wrapper=None):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]  # a free port
    launcher += [str(wrapper)] if wrapper else []
    cmd = [*launcher, os.path.join(ROOT, script), "--output-dir", str(out), *flags]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "model" / "model.safetensors"))


SAVERS = ["--lora-r", "4", "--gradient-checkpointing"]
SMALL_RUN = {
    "dro_reward.py": "--total-steps 3 --batch-size 16 --max-train-rows 64 --max-eval-rows 8 --eval-every 0 "
    "--learning-rate 1e-3 --warmup-steps 0",
    "dro_dpo.py": "--total-steps 3 --batch-size 16 --max-train-rows 64 --max-eval-rows 8 --eval-every 0 "
    "--eval-generations 0 --sft-steps 5 --learning-rate 1e-3 --warmup-steps 0",
    "dro_ppo.py": "--total-steps 2 --batch-size 8 --max-train-rows 64 --max-eval-rows 8 --eval-every 0 --sft-steps 5",
}


@pytest.mark.parametrize("case", [*SMALL_RUN, "dro_ppo.py --baseline critic"])
def test_scripts_with_lora_and_checkpointing_reduce_to_erm_at_rho_zero(tmp_path, case):
    """End to end with --lora-r, --gradient-checkpointing and --bf16: rho = 0 trains exactly the model ERM trains,
    and the saved (merged: the tiny model's base exists nowhere else) weights load (PPO's critic: its own adapter
    on the policy's frozen weights)."""
    script, *extra = case.split()
    flags = [*SMALL_RUN[script].split(), *SAVERS, "--bf16", *extra]
    rho0 = run(script, tmp_path / "rho0", *flags, "--dro.kind", "chi2", "--dro.rho", "0")
    erm = run(script, tmp_path / "erm", *flags, "--dro.kind", "erm")
    assert rho0.keys() == erm.keys() and all(torch.equal(rho0[k], erm[k]) for k in erm)


@pytest.mark.parametrize("script", ["dro_reward.py"])
def test_ddp_with_lora_and_checkpointing_equals_one_process(tmp_path, script):
    """The global worst case with the memory savers on: 2 processes (gloo) give one process's weights."""
    flags = [*SMALL_RUN[script].split(), *SAVERS, "--dro.kind", "cvar", "--dro.rho", "0.5"]
    flags += ["--sft-steps", "0"] if script == "dro_dpo.py" else []  # (the warm start averages tokens per rank)
    sgd = tmp_path / "sgd.py"  # the update compared under plain SGD: see test_reward's SGD_WRAPPER for why
    sgd.write_text(SGD_WRAPPER)
    one = run(script, tmp_path / "one", *flags, wrapper=sgd)
    ddp = run(script, tmp_path / "ddp", *flags, nproc=2, wrapper=sgd)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-7)


def test_ppo_refuses_lora_dropout():
    with pytest.raises(ValueError, match="--lora-dropout must be 0"):
        dro_ppo.Args(lora_r=4, lora_dropout=0.1)


@pytest.mark.parametrize("after", ["A 7B model on one 80 GB GPU", "is refused for now."])
def test_the_readmes_7b_recipes_run_as_written(tmp_path, after):
    """The README's recipes for a 7B model (LoRA on one GPU; --fsdp on 8), run as written with a tiny Qwen2 stand-in,
    the fixtures for the hub datasets and 2 processes for 8 (one step): the saved weights load with the Auto classes."""
    import re

    from test_compat import grown_unified_feedback, model_folder

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme[readme.index(after) :]
    block = block[block.index("```bash") + len("```bash") : block.index("```", block.index("```bash") + 3)]
    (command,) = [c for c in re.sub(r"\\\n\s*", "", block).splitlines() if c.strip()]
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    grown_unified_feedback(tmp_path / "uf.jsonl", 128)
    policy, _, _ = model_folder(tmp_path, "qwen2", "chat_template_eos_turns", AutoModelForCausalLM)
    for hub, local in {
        "Qwen/Qwen2.5-7B-Instruct": str(policy),
        "llm-blender/Unified-Feedback": str(tmp_path / "uf.jsonl"),
        "allenai/reward-bench": os.path.join(fixtures, "reward_bench.jsonl"),
        "python dro_dpo.py": f"{sys.executable} dro_dpo.py",
        "torchrun --nproc_per_node 8": f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2",
    }.items():
        command = command.replace(hub, local)
    cmd = [*command.split(), "--output-dir", str(tmp_path / "run"), "--total-steps", "1", "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--lora-r" in command and "merged" in proc.stdout) or "--fsdp" in command
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")


@pytest.mark.parametrize("script", ["dro_reward.py", "dro_dpo.py"])
def test_fsdp_equals_one_process(tmp_path, script):
    """--fsdp under torchrun (2 gloo processes, each holding half of every weight, gradient and Adam moment), with 2
    accumulation steps: the global worst case and the weights of one process with one batch, and the saved model
    is the Auto classes' own (the checkpoint's class name is not FSDP's)."""
    import json

    flags = [*SMALL_RUN[script].split(), "--dro.kind", "cvar", "--dro.rho", "0.5", "--sft-steps", "0"]
    flags = flags[:-2] if script == "dro_reward.py" else flags  # (the reward script has no warm start)
    sgd = tmp_path / "sgd.py"  # the update compared under plain SGD: see test_reward's SGD_WRAPPER for why
    sgd.write_text(SGD_WRAPPER)
    one = run(script, tmp_path / "one", *flags, wrapper=sgd)
    fsdp = run(script, tmp_path / "fsdp", *flags, "--fsdp", "--gradient-accumulation-steps", "2", nproc=2, wrapper=sgd)
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], rtol=0, atol=1e-7)
    assert "FSDP" not in json.load(open(tmp_path / "fsdp" / "model" / "config.json"))["architectures"][0]


def test_ppo_under_fsdp_runs_and_saves(tmp_path):
    """PPO with --fsdp and gradient checkpointing: the policy, critic and reference sharded, rollouts generated in
    step by every process, a checkpoint and the model saved."""
    flags = [*SMALL_RUN["dro_ppo.py"].split(), "--fsdp", "--gradient-checkpointing", "--save-every", "1"]
    run("dro_ppo.py", tmp_path / "fsdp", *flags, nproc=2)
    assert os.path.exists(tmp_path / "fsdp" / "checkpoints" / "step-00000001" / "COMPLETE")


def test_fsdp_with_lora_is_refused():
    for script in (dro_reward, dro_dpo, dro_ppo):
        with pytest.raises(ValueError, match="--fsdp with --lora-r"):
            script.Args(fsdp=True, lora_r=4)
