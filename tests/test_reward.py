"""dro_reward.py: the robust loss at rho = 0 is ERM, padding does not move rewards, saved models score the
same, DDP and gradient accumulation give the update of one big batch, and an end-to-end smoke run."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

import common
import ingest
import lifecycle
from dro_reward import pair_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = common.tiny_tokenizer()
    model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    rows = ingest.load_preferences("synthetic", "validation", tok, max_rows=32)
    return tok, model, common.tokenize_preferences(rows, tok, 64, "synthetic")


@pytest.mark.parametrize("kind", ["tv", "chi2", "kl", "cvar"])
def test_rho_zero_gives_erm_gradients(setup, kind):
    tok, model, data = setup

    def grads(robust):
        model.zero_grad()
        losses, _, _ = pair_losses(model, data, range(32), tok.pad_token_id)
        if robust:
            w, _ = common.robust_prompt_weights(losses, torch.tensor(data["prompt_id"]), common.DROArgs(kind, 0.0))
            (w * losses).sum().backward()
        else:
            losses.mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # and a positive radius does change the gradient (the comparison above can fail)
    w, _ = common.robust_prompt_weights(torch.rand(32), torch.tensor(data["prompt_id"]), common.DROArgs(kind, 0.5))
    assert not torch.allclose(w, torch.full_like(w, 1 / 32))


def test_pair_losses_are_bradley_terry(setup):
    tok, model, data = setup
    losses, chosen, rejected = pair_losses(model, data, [3, 1], tok.pad_token_id)
    for j, i in enumerate([3, 1]):
        r_c, r_r = common.sequence_rewards(model, [data["chosen"][i], data["rejected"][i]], tok.pad_token_id)
        assert chosen[j].item() == pytest.approx(r_c.item(), abs=1e-5) and rejected[j].item() == pytest.approx(
            r_r.item(), abs=1e-5
        )
        assert losses[j].item() == pytest.approx(-F.logsigmoid(r_c - r_r).item(), abs=1e-5)


def test_saved_model_reloads_and_scores_identically(setup, tmp_path):
    tok, model, data = setup
    lifecycle.save_atomically(model, tok, str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left behind
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    a = pair_losses(model, data, range(32), tok.pad_token_id)
    b = pair_losses(again, data, range(32), tok.pad_token_id)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def run_script(out, *flags, launcher=(sys.executable,)):
    cmd = [*launcher, os.path.join(ROOT, "dro_reward.py"), "--output-dir", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_run(tmp_path):
    proc = run_script(
        tmp_path,
        "--total-steps",
        "6",
        "--eval-every",
        "3",
        "--log-every",
        "2",
        "--max-eval-rows",
        "64",
        "--dro.kind",
        "tv",
        "--dro.rho",
        "0.2",
    )
    assert "worst" in proc.stdout and "test_uniform" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["step"] for r in rows} == {3, 6}
    assert {r["split"] for r in rows} == {"validation", "test_id", "test_uniform", "test_minority"}
    assert set(rows[0]) == {"step", "split", "accuracy", "worst_domain_accuracy", "domain_accuracy", "run_id"}
    assert set(rows[0]["domain_accuracy"]) == set(common.SYNTHETIC_DOMAINS)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.num_labels == 1


def test_bad_radius_is_rejected_by_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "dro_reward.py"), "--dro.kind", "tv", "--dro.rho", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "[0, 1]" in proc.stderr


SGD_WRAPPER = """import runpy, sys, torch
torch.optim.AdamW = lambda params, lr, weight_decay=0.0, **_: torch.optim.SGD(params, lr, weight_decay=weight_decay)
sys.argv = sys.argv[1:]
sys.path[0] = __import__("os").path.dirname(sys.argv[0])  # the script's folder, as when it is run itself
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("robust", ["--dro.kind tv --dro.rho 0.3", "--dro.kind group --dro.group-step 1.0"])
def test_ddp_and_accumulation_equal_one_big_batch(tmp_path, robust):
    """The worst case is over the global batch: 2 processes (gloo) and 4 accumulation steps both give
    the parameters of one process with one batch of 32, after 3 robust steps (group DRO: the same domain weights).

    The update is compared under plain SGD (the script's AdamW swapped by a wrapper): Adam divides by sqrt(v) + eps,
    so a gradient element near zero turns float rounding of the reordered sums into differences of up to ~lr, and
    no tolerance both tolerates that and detects a wrong weighting (which also moves weights by ~lr). Under SGD
    theta changes by lr * g: with 3 steps, lr 1e-3, |g_i| <= 1 (clipped to norm 1) and the reordered float32 sums'
    rounding <= 1e-5 relative, runs that agree differ by <= 3e-8; atol 1e-7 has margin, while a wrong weighting
    moves the weights by ~lr * |g_i| (checked below to be far above it)."""
    flags = "--total-steps 3 --batch-size 32 --max-train-rows 128 --max-eval-rows 8 --eval-every 0 --warmup-steps 0"
    flags = [*flags.split(), *robust.split()]
    wrapper = tmp_path / "sgd.py"
    wrapper.write_text(SGD_WRAPPER)
    script = os.path.join(ROOT, "dro_reward.py")

    def run(name, *more, launcher=(sys.executable,)):
        cmd = [*launcher, str(wrapper), script, "--output-dir", str(tmp_path / name), *flags, *more]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("one")
    run("one_erm", "--dro.kind", "erm")  # what a wrong weighting (none at all) would give
    run("accum", "--gradient-accumulation-steps", "4")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")  # a free port
    run("ddp", "--gradient-accumulation-steps", "2", launcher=torchrun)
    load = lambda name: AutoModelForSequenceClassification.from_pretrained(tmp_path / name / "model").state_dict()
    one, accum, ddp, erm = load("one"), load("accum"), load("ddp"), load("one_erm")
    init = AutoModelForSequenceClassification.from_config(common.tiny_config(common.tiny_tokenizer(), num_labels=1))
    assert not torch.allclose(one["score.weight"], init.state_dict()["score.weight"])  # it did train
    assert max((erm[k] - one[k]).abs().max().item() for k in one) > 1e-5  # the weighting is visible at this atol
    for k in one:
        torch.testing.assert_close(accum[k], one[k], rtol=0, atol=1e-7)
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-7)
