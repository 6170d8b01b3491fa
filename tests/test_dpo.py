"""dro_dpo.py: the DPO loss against an independent computation, completion log-probs that ignore padding,
rho = 0 equals plain DPO for a full training step, and an end-to-end smoke run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_reward import SGD_WRAPPER
from transformers import AutoModelForCausalLM

import common
import ingest
import lifecycle
from dro_dpo import dpo_loss, pair_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    policy = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    rows = ingest.load_preferences("synthetic", "validation", tok, max_rows=16)
    return tok, policy, common.tokenize_preferences(rows, tok, 64, "synthetic")


def test_dpo_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(50, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    got = dpo_loss(pc, pr, rc, rr, beta=0.3)
    for i in range(50):
        z = 0.3 * ((pc[i] - rc[i]).item() - (pr[i] - rr[i]).item())
        expected = math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))  # -log sigmoid(z)
        assert got[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert torch.isfinite(
        dpo_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    ).all()


def test_rho_zero_step_equals_plain_dpo(setup):
    tok, policy, data = setup
    ref = AutoModelForCausalLM.from_config(common.tiny_config(tok))
    idx = list(range(16))

    def one_step(robust):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(common.tiny_config(tok))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pc, pr = pair_logps(model, data, idx, tok.pad_token_id)
        with torch.no_grad():
            rc, rr = pair_logps(ref, data, idx, tok.pad_token_id)
        losses = dpo_loss(pc, pr, rc, rr, 0.1)
        if robust:
            w, _ = common.robust_prompt_weights(
                losses.detach(), torch.tensor(data["prompt_id"][:16]), common.DROArgs("chi2", 0.0)
            )
            (w * losses).sum().backward()
        else:
            losses.mean().backward()
        opt.step()
        return model.state_dict()

    robust, plain = one_step(True), one_step(False)
    for k in plain:
        torch.testing.assert_close(robust[k], plain[k], rtol=1e-6, atol=1e-7)


def test_smoke_run(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "dro_dpo.py"),
        "--output-dir",
        str(tmp_path),
        "--total-steps",
        "4",
        "--sft-steps",
        "2",
        "--eval-every",
        "2",
        "--max-eval-rows",
        "32",
        "--eval-generations",
        "8",
        "--max-new-tokens",
        "4",
        "--log-every",
        "1",
        "--dro.kind",
        "tv",
        "--dro.rho",
        "0.2",
        "--precompute-ref-logps",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["step"] for r in rows} == {0, 2, 4}
    last = rows[-1]
    assert {
        "accuracy",
        "worst_domain_accuracy",
        "domain_accuracy",
        "gold_reward",
        "worst_domain_gold_reward",
        "domain_gold_reward",
        "kl",
    } <= set(last) and last["kl"] >= 0
    assert "gold reward of sampled responses" in proc.stdout
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.vocab_size == 384


def test_evaluations_neither_change_training_nor_differ_by_anything_but_the_policy(tmp_path):
    """Each evaluation samples its own fixed random stream (lifecycle.evaluation_rng): --eval-every changes no
    trained weight (dropout kept on, so training draws random numbers too) and no other evaluation's samples."""
    from safetensors.torch import load_file

    tok = common.tiny_tokenizer()
    config = common.tiny_config(tok)
    config.attention_dropout = 0.1  # (the embedded task's tiny model has none)
    lifecycle.save_atomically(AutoModelForCausalLM.from_config(config), tok, str(tmp_path / "base"))
    for name, every in (("every", "1"), ("ends", "0")):
        cmd = [sys.executable, os.path.join(ROOT, "dro_dpo.py"), "--output-dir", str(tmp_path / name)]
        cmd += ["--model-name-or-path", str(tmp_path / "base")]
        cmd += ["--total-steps", "2", "--sft-steps", "2", "--eval-every", every, "--max-eval-rows", "16"]
        cmd += ["--eval-generations", "16", "--max-new-tokens", "4", "--keep-dropout", "--seed", "3"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("every", "ends"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {r: [json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in ("every", "ends")}
    rows = {r: [row for row in rs if "gold_reward" in row] for r, rs in rows.items()}
    assert {row["step"] for row in rows["every"]} == {0, 1, 2} and {row["step"] for row in rows["ends"]} == {0, 2}
    for row in rows["every"] + rows["ends"]:
        del row["run_id"]
    assert [row for row in rows["every"] if row["step"] != 1] == rows["ends"]


def test_ddp_and_accumulation_equal_one_big_batch(tmp_path):
    """Robust DPO steps with 4 accumulation steps, and with 2 processes (gloo) x 2 accumulation steps, give the
    parameters of one process with one batch."""
    flags = [
        "--total-steps",
        "2",
        "--batch-size",
        "16",
        "--max-train-rows",
        "64",
        "--max-eval-rows",
        "8",
        "--eval-generations",
        "0",
        "--sft-steps",
        "0",
        "--eval-every",
        "0",
        "--warmup-steps",
        "0",
        "--learning-rate",
        "1e-3",
        "--dro.kind",
        "cvar",
        "--dro.rho",
        "1.0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sgd = tmp_path / "sgd.py"  # the update compared under plain SGD: see test_reward's SGD_WRAPPER for why
    sgd.write_text(SGD_WRAPPER)
    for name, extra, launcher in [
        ("one", [], [sys.executable]),
        ("accum", ["--gradient-accumulation-steps", "4"], [sys.executable]),
        (
            "ddp",
            ["--gradient-accumulation-steps", "2"],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        ),
    ]:
        cmd = [*launcher, str(sgd), os.path.join(ROOT, "dro_dpo.py"), "--output-dir", str(tmp_path / name)]
        cmd += [*flags, *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
    one, accum, ddp = load("one"), load("accum"), load("ddp")
    init = AutoModelForCausalLM.from_config(common.tiny_config(common.tiny_tokenizer())).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k.endswith("norm.weight"))  # (init: ones)
    assert moved > 1e-6  # it did train, by 10x the tolerance below at least
    for k in one:  # SGD: lr * |g| with |g| <= 1 per step, float32 rounding of reordered sums far below 1e-7
        torch.testing.assert_close(accum[k], one[k], rtol=0, atol=1e-7)
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-7)
