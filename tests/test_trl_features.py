"""What TRL users reach for, each against TRL 1.16's own formula (read from its installed source, cited per test):
dropout off by default, DPO's loss types and label smoothing, the reward model's reward centring, top-p / top-k
sampling; and the small ones: --track without wandb refused at parse time, args.json as plain JSON, readable run ids.

TRL computes its losses inside trainer methods that need a built trainer (DPOTrainer._compute_loss,
RewardTrainer.compute_loss), so, as in test_trl_parity_loss.py, the tests write TRL's expressions as its source
does and assert that the source still contains them."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import dro_dpo
import dro_ppo
import dro_reward
import robust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE = os.path.join(ROOT, "tests", "fixtures", "bpe")
LN2 = np.float32(math.log(2))


def trl_source(module):
    """The text of a TRL module, read without importing it (importing the trainers takes seconds)."""
    pytest.importorskip("trl")
    with open(importlib.util.find_spec(module).origin) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------
# Dropout off by default (TRL: DPOConfig/RewardConfig disable_dropout=True)
# ----------------------------------------------------------------------------------------------


def gpt2_folder(path, auto):
    """A tiny GPT-2 (dropout 0.1 in attention, residuals and embeddings: GPT2Config's defaults) with the test BPE
    tokenizer, saved as a user's --model-name-or-path."""
    tok = AutoTokenizer.from_pretrained(BPE)
    tok.bos_token = tok.pad_token = tok.eos_token  # GPT-2's situation
    tok.save_pretrained(path)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        vocab_size=len(tok),
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.1
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(path)
    return tok


def run(script, out, *flags):
    cmd = [sys.executable, os.path.join(ROOT, script), "--output-dir", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scalar(out, tag, step=1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    return next(e.value for e in events.Scalars(tag) if e.step == step)


SMALL_RUN = "--total-steps 1 --log-every 1 --batch-size 8 --max-train-rows 8 --max-eval-rows 4 --max-length 128"


def test_dpo_first_step_loss_is_ln2_with_dropout_configured(tmp_path):
    """Policy == reference at the first step, so every logit is 0 and the loss is ln 2, exactly in float32 (the
    logged ERM loss is the float64 mean of float32 losses). With the dropout kept, the policy's train-mode forward
    would be another function than the reference's eval-mode one (the user measured 0.694339)."""
    gpt2_folder(tmp_path / "gpt2", AutoModelForCausalLM)
    flags = [*SMALL_RUN.split(), "--model-name-or-path", str(tmp_path / "gpt2"), "--eval-generations", "0"]
    run("dro_dpo.py", tmp_path / "run", *flags, "--no-save-model")
    assert np.float32(scalar(tmp_path / "run", "dro/erm_loss")) == LN2
    assert scalar(tmp_path / "run", "dro/robust_loss") == pytest.approx(LN2, rel=2**-22)
    assert scalar(tmp_path / "run", "rewards/margins") == 0.0
    model, ids = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # the check has teeth: this model's dropout changes its train-mode forward
        assert not torch.equal(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_reward_model_trains_the_function_it_evaluates(tmp_path):
    """One step at learning rate 0 (--warmup-steps 1) of a GPT-2 reward model with dropout configured: the logged
    rewards of the training batch (train mode) are those of the saved model in eval mode. The same run checks
    args.json (plain JSON, --dro as an object) and the run id."""
    tok = gpt2_folder(tmp_path / "gpt2", AutoModelForSequenceClassification)
    out = tmp_path / "run"
    run("dro_reward.py", out, *SMALL_RUN.split(), "--model-name-or-path", str(tmp_path / "gpt2"), "--warmup-steps", "1")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    _, data = common.load_pairs("synthetic", "train", tok, 128, max_rows=8)  # the whole (only) batch
    with torch.no_grad():
        _, chosen, rejected = dro_reward.pair_losses(model.eval(), data, range(8), tok.pad_token_id)
        ids = torch.tensor([data["chosen"][0]])
        assert not torch.equal(model.train()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)  # dropout
    assert scalar(out, "rewards/chosen") == pytest.approx(chosen.mean().item(), rel=1e-5, abs=1e-6)
    assert scalar(out, "rewards/rejected") == pytest.approx(rejected.mean().item(), rel=1e-5, abs=1e-6)

    args = json.load(open(out / "args.json"))
    assert args["dro"]["kind"] == "chi2" and args["dro"]["rho"] == 0.5 and args["keep_dropout"] is False
    assert re.fullmatch(r"synthetic__dro_reward__chi2-0\.5__1__\d+", args["run_id"])
    assert {json.loads(line)["run_id"] for line in open(out / "metrics.jsonl")} == {args["run_id"]}


def test_lora_dropout_needs_keep_dropout():
    for args_class in (dro_reward.Args, dro_dpo.Args):
        with pytest.raises(ValueError, match="--keep-dropout"):
            args_class(lora_r=4, lora_dropout=0.1)
        assert args_class(lora_r=4, lora_dropout=0.1, keep_dropout=True).lora_dropout == 0.1


# ----------------------------------------------------------------------------------------------
# DPO loss types (TRL 1.16: trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, f_divergence_type "reverse_kl")
# ----------------------------------------------------------------------------------------------


def test_the_dpo_formulas_are_trls():
    src = trl_source("trl.trainer.dpo_trainer")
    for line in (
        "chosen_logratios = chosen_logps - ref_chosen_logps",
        "delta_score = chosen_scores - rejected_scores",
        'if loss_type == "sigmoid":\n                per_sequence_loss = -F.logsigmoid(self.beta * delta_score)',
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",
        # conservative DPO: 1.16's sigmoid ignores label_smoothing; its aot losses keep the expression
        "-F.logsigmoid(self.beta * delta) * (1 - self.label_smoothing)\n"
        "                    - F.logsigmoid(-self.beta * delta) * self.label_smoothing",
    ):
        assert line in src, line


def trl_dpo(loss_type, policy, reference, completion_mask, beta, label_smoothing=0.0):
    """TRL 1.16's per-pair losses, written as DPOTrainer._compute_loss writes them; `completion_mask` is the
    [2N, T] mask of the completion tokens, chosen rows first."""
    chosen_logratios = policy[0] - reference[0]
    rejected_logratios = policy[1] - reference[1]
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid" and label_smoothing:  # the expression of its aot branches (and older TRL's sigmoid)
        delta = delta_score
        return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    return (ipo_delta - 1 / (2 * beta)) ** 2


@pytest.fixture(scope="module")
def dpo_setup():
    tok = common.tiny_tokenizer()
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    reference = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    _, data = common.load_pairs("synthetic", "validation", tok, 64, max_rows=12)
    return tok, policy, reference, data


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_types_are_trls(dpo_setup, loss_type, eps):
    """dro_dpo.pair_losses (real forwards; IPO's token counts from the rows) equals TRL's formula on the same
    log-probs, bit for bit, and its gradient under the robust weights at rho = 0 is that of TRL's mean."""
    tok, policy, reference, data = dpo_setup
    idx, pad, beta = range(12), tok.pad_token_id, 0.5
    losses, _, _ = dro_dpo.pair_losses(policy, reference, data, idx, pad, beta, None, loss_type, eps)
    with torch.no_grad():
        ref = dro_dpo.pair_logps(reference, data, idx, pad)
    pol = dro_dpo.pair_logps(policy, data, idx, pad)
    seqs = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    _, completion_mask = common.completion_logprobs(policy, seqs, [data["prompt_len"][i] for i in idx] * 2, pad)
    expected = trl_dpo(loss_type, pol, ref, completion_mask.long(), beta, eps)
    assert torch.equal(losses, expected)
    assert len(set(losses.tolist())) > 1 and (loss_type != "hinge" or (losses > 0).any())

    prompts = torch.tensor([data["prompt_id"][i] for i in idx])
    weights, _ = robust.robust_prompt_weights(losses.detach(), prompts, robust.DROArgs("chi2", 0.0))
    ours = torch.autograd.grad((weights * losses).sum(), list(policy.parameters()), allow_unused=True)
    trls = torch.autograd.grad(expected.mean(), list(policy.parameters()), allow_unused=True)
    for a, b in zip(ours, trls):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the worst case sees the loss type: chi2 weights differ from uniform on these losses
    robust_weights, _ = robust.robust_prompt_weights(losses.detach(), prompts, robust.DROArgs("chi2", 0.5))
    assert not torch.allclose(robust_weights, weights)


def test_dpo_loss_options_are_checked_at_parse_time():
    assert dro_dpo.Args().loss_type == "sigmoid" and dro_dpo.Args().label_smoothing == 0.0
    for kw, message in (
        (dict(loss_type="ipo", label_smoothing=0.1), "applies to --loss-type sigmoid"),
        (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(top_k=-1), "--top-k"),
    ):
        with pytest.raises(ValueError, match=message):
            dro_dpo.Args(**kw)
    with pytest.raises(SystemExit):
        tyro.cli(dro_dpo.Args, args=["--loss-type", "kto"])


# ----------------------------------------------------------------------------------------------
# Reward centring (TRL 1.16: trl/trainer/reward_trainer.py, RewardTrainer.compute_loss)
# ----------------------------------------------------------------------------------------------


def test_center_rewards_is_trls_at_rho_zero_and_robust_weights_see_it():
    src = trl_source("trl.trainer.reward_trainer")
    assert "loss = -nn.functional.logsigmoid(rewards_chosen - rewards_rejected).mean()" in src
    assert "loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)" in src
    tok, coef = common.tiny_tokenizer(), 0.01
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    with torch.no_grad():
        model.score.weight.mul_(300)  # rewards of order 1, so that the centring term matters
    _, data = common.load_pairs("synthetic", "validation", tok, 64, max_rows=16)
    prompts = torch.tensor(data["prompt_id"][:16])

    losses, chosen, rejected = dro_reward.pair_losses(model, data, range(16), tok.pad_token_id, coef)
    plain, _, _ = dro_reward.pair_losses(model, data, range(16), tok.pad_token_id)
    torch.testing.assert_close(losses.detach(), plain.detach() + coef * (chosen + rejected) ** 2)
    weights, _ = robust.robust_prompt_weights(losses.detach(), prompts, robust.DROArgs("chi2", 0.0))
    ours = torch.autograd.grad((weights * losses).sum(), list(model.parameters()))
    seqs = [data["chosen"][i] for i in range(16)] + [data["rejected"][i] for i in range(16)]
    rewards_chosen, rewards_rejected = common.sequence_rewards(model, seqs, tok.pad_token_id).split(16)
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()  # TRL's two lines
    loss += coef * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    assert (weights * losses).sum().item() == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(ours, torch.autograd.grad(loss, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    centred, _ = robust.robust_prompt_weights(losses.detach(), prompts, robust.DROArgs("chi2", 0.5))
    uncentred, _ = robust.robust_prompt_weights(plain.detach(), prompts, robust.DROArgs("chi2", 0.5))
    assert not torch.allclose(centred, uncentred)  # the worst case is over the centred losses
    with pytest.raises(ValueError, match="--center-rewards-coefficient"):
        dro_reward.Args(center_rewards_coefficient=-1.0)


# ----------------------------------------------------------------------------------------------
# top-p / top-k (TRL 1.16: trl/trainer/grpo_trainer.py samples with them, computes log-probs at the temperature)
# ----------------------------------------------------------------------------------------------


def test_top_p_and_top_k_sample_as_trl_does():
    src = trl_source("trl.trainer.grpo_trainer")
    assert '"top_p": self.top_p,\n                "top_k": self.top_k,' in src  # generation_kwargs
    assert "temperature=self.temperature,\n            cast_lm_head_to_fp32" in src  # log-probs: temperature only

    tok = common.tiny_tokenizer()
    default = common.sampling_config(tok, 6, 0.7)
    assert (default.do_sample, default.top_k, default.top_p, default.temperature) == (True, 0, 1.0, 0.7)
    config = common.sampling_config(tok, 6, 0.7, top_p=0.9, top_k=5)
    assert (config.top_k, config.top_p) == (5, 0.9)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(common.tiny_config(tok)).eval()
    prompts = [common.encode_prompt(tok, p) for p in ("copy: kqzt", "add: 3+4", "say: xlab")]
    end = common.end_token_id(tok)
    greedy = common.generate(model, prompts, tok.pad_token_id, end, common.sampling_config(tok, 6, 1.0, greedy=True))
    for truncated in (dict(top_k=1), dict(top_p=1e-6)):  # one token left: sampling is greedy decoding
        sampled = common.generate(
            model, prompts, tok.pad_token_id, end, common.sampling_config(tok, 6, 1.0, **truncated)
        )
        assert torch.equal(sampled[2], greedy[2])
    untruncated = [common.generate(model, prompts, tok.pad_token_id, end, default)[2] for _ in range(2)]
    assert not all(torch.equal(u, greedy[2]) for u in untruncated)  # the check has teeth

    for args_class in (dro_dpo.Args, dro_ppo.Args):
        args = tyro.cli(args_class, args=["--top-p", "0.9", "--top-k", "20"])
        assert (args.top_p, args.top_k) == (0.9, 20)
        for flag in (["--top-p", "0"], ["--top-k", "-1"]):
            with pytest.raises(SystemExit):
                tyro.cli(args_class, args=flag)


# ----------------------------------------------------------------------------------------------
# --track without wandb
# ----------------------------------------------------------------------------------------------


def test_track_without_wandb_is_refused_at_parse_time(monkeypatch, capsys, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "run"
    for args_class in (dro_reward.Args, dro_dpo.Args, dro_ppo.Args):
        with pytest.raises(SystemExit) as e:
            tyro.cli(args_class, args=["--track", "--output-dir", str(out)])
        message = re.sub(r"[\s│]+", " ", capsys.readouterr().err)  # tyro's box, wrapped at the terminal's width
        assert e.value.code == 2 and "--track" in message and "wandb is not installed" in message
        assert tyro.cli(args_class, args=["--output-dir", str(out)]).track is False
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Run folders of bench/sweep.py, read by bench/plot.py
# ----------------------------------------------------------------------------------------------


def test_sweep_names_runs_as_run_ids_read_and_plot_reads_both_names(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plot
    import sweep

    monkeypatch.setattr(sweep, "ROOT", str(tmp_path))
    runs = tmp_path / "runs" / "sweep_dro_reward"
    assert sweep.run_folder("sweep_dro_reward", "chi2", "0.5", 1, 8) == str(runs / "chi2-0.5_s1_n8")
    for name in ("chi2-0.5_s1_n8", "chi20.5_s2_n8", "erm-0_s1_n8", "chi2-1_s1_n8"):  # new and earlier names
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text(json.dumps({"step": 8, "split": "validation"}) + "\n")
        (runs / name / "args.json").write_text("{}")
    assert sweep.run_folder("sweep_dro_reward", "chi2", "0.5", 2, 8) == str(runs / "chi20.5_s2_n8")  # reused
    found = plot.load_runs(str(runs), 8, "validation")
    assert {k: len(v) for k, v in found.items()} == {"chi2:0.5": 2, "erm:0": 1, "chi2:1": 1}
