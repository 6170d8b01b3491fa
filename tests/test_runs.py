"""Never lose a run: a run killed (SIGKILL or SIGTERM) and resumed ends exactly like an uninterrupted one, saves are
atomic at every point, nothing non-finite is saved, output folders are never clobbered, and the end of a run cannot
fail on reporting."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
import lifecycle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {  # a few fast steps, a checkpoint after every one, an evaluation every 2
    "dro_reward.py": [
        "--total-steps",
        "8",
        "--batch-size",
        "16",
        "--max-train-rows",
        "200",
        "--max-eval-rows",
        "16",
        "--eval-every",
        "2",
        "--save-every",
        "1",
    ],
    "dro_dpo.py": [
        "--total-steps",
        "8",
        "--batch-size",
        "16",
        "--max-train-rows",
        "200",
        "--max-eval-rows",
        "16",
        "--eval-every",
        "2",
        "--save-every",
        "1",
        "--sft-steps",
        "2",
        "--eval-generations",
        "4",
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        "0",
    ],
    "dro_ppo.py": [
        "--total-steps",
        "8",
        "--batch-size",
        "8",
        "--max-train-rows",
        "200",
        "--max-eval-rows",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "1",
        "--sft-steps",
        "2",
    ],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(script, out, *flags):
    return [sys.executable, os.path.join(ROOT, script), "--output-dir", str(out), *SMALL[script], *flags]


def run(script, out, *flags, check=True):
    proc = subprocess.run(command(script, out, *flags), cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    """metrics.jsonl without the run id (a resumed run keeps its own id; an uninterrupted one has another)."""
    return [{k: v for k, v in json.loads(line).items() if k != "run_id"} for line in open(out / "metrics.jsonl")]


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def kill_after_checkpoint(script, out, sig, step=3, flags=()):
    """Start a run and send it `sig` once the checkpoint of `step` exists (before the run ends)."""
    proc = subprocess.Popen(
        command(script, out, *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 240
    while not os.path.exists(out / "checkpoints" / f"step-{step:08d}" / "COMPLETE") and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert not os.path.exists(out / "model"), "the run ended before it was killed: the test tested nothing"
    return proc.returncode, err


@pytest.mark.parametrize("case", [*SMALL, "dro_ppo.py --baseline critic --lora-r 4"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, case):
    """The metrics and weights of the uninterrupted run (PPO with LoRA and the critic too: two adapters over one
    frozen base, whose tensors the checkpoint holds once)."""
    script, *flags = case.split()
    run(script, tmp_path / "whole", *flags)
    code, _ = kill_after_checkpoint(script, tmp_path / "killed", signal.SIGKILL, flags=flags)
    assert code == -signal.SIGKILL
    run(script, tmp_path / "killed", *flags, "--resume")
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = {json.loads(line)["run_id"] for line in open(tmp_path / "killed" / "metrics.jsonl")}
    assert len(ids) == 1  # the resumed run kept the id of the run it continued


def test_sigterm_saves_a_checkpoint_and_exits_then_resumes(tmp_path):
    script = "dro_reward.py"
    run(script, tmp_path / "whole")
    code, err = kill_after_checkpoint(script, tmp_path / "term", signal.SIGTERM, step=2)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM after step" in err and "Traceback" not in err
    run(script, tmp_path / "term", "--resume")
    assert metrics(tmp_path / "term") == metrics(tmp_path / "whole")
    a, b = weights(tmp_path / "term"), weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_or_foreign_checkpoint_is_a_clear_error_that_touches_nothing(tmp_path):
    out = tmp_path / "run"
    run("dro_reward.py", out, "--total-steps", "3")
    before = (out / "metrics.jsonl").read_text()
    proc = run("dro_dpo.py", out, "--resume", check=False)  # another script's checkpoint
    assert proc.returncode == 2 and "was written with --exp-name 'dro_reward', this run has 'dro_dpo'" in proc.stderr
    latest = sorted((out / "checkpoints").iterdir())[-1]
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    proc = run("dro_reward.py", out, "--resume", check=False)
    assert proc.returncode == 2 and f"checkpoint {latest} cannot be read: state.pt is truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and (out / "metrics.jsonl").read_text() == before


def test_output_folder_is_never_clobbered(tmp_path):
    out = tmp_path / "run"
    run("dro_reward.py", out, "--total-steps", "2")
    before = (out / "metrics.jsonl").read_text()
    proc = run("dro_reward.py", out, "--total-steps", "2", check=False)
    assert proc.returncode == 2 and "holds a previous run" in proc.stderr and "--resume" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
    with open(out / ".lock", "w") as lock:  # a concurrent run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run("dro_reward.py", out, "--total-steps", "2", "--overwrite", check=False)
    assert proc.returncode == 2 and "another run is writing to this folder" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
    run("dro_reward.py", out, "--total-steps", "2", "--overwrite")
    assert len(list(out.glob("events.out.tfevents*"))) == 1  # the previous run's files are gone


@pytest.mark.parametrize("script", ["dro_reward.py", "dro_dpo.py"])
def test_nan_in_the_last_update_saves_nothing(tmp_path, script):
    out = tmp_path / "run"
    proc = run(
        script,
        out,
        "--total-steps",
        "1",
        "--warmup-steps",
        "0",
        "--learning-rate",
        "1e9",
        "--save-every",
        "0",
        "--eval-every",
        "0",
        check=False,
    )
    assert proc.returncode != 0 and "not finite" in proc.stderr and "nothing was saved" in proc.stderr
    assert not os.path.exists(out / "model") and not os.path.exists(out / "args.json")


INJECT_NAN = """
import runpy, sys, torch
clip, calls = torch.nn.utils.clip_grad_norm_, [0]
def nan_once(params, max_norm):  # the gradient of step 2 turns NaN
    params = list(params)
    calls[0] += 1
    if calls[0] == 2:
        for p in params:
            p.grad.fill_(float("nan"))
    return clip(params, max_norm)
torch.nn.utils.clip_grad_norm_ = nan_once
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_nonfinite_gradient_stops_the_run_or_is_skipped_and_counted(tmp_path):
    script = os.path.join(ROOT, "dro_reward.py")
    base = [
        sys.executable,
        "-c",
        INJECT_NAN,
        script,
        "--total-steps",
        "3",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--max-train-rows",
        "200",
        "--max-eval-rows",
        "16",
    ]
    proc = subprocess.run(
        base + ["--output-dir", str(tmp_path / "stop")], cwd=ROOT, capture_output=True, text=True, env=ENV
    )
    assert proc.returncode != 0 and "step 2: the gradient norm is nan" in proc.stderr
    assert not os.path.exists(tmp_path / "stop" / "model")
    proc = subprocess.run(
        base + ["--output-dir", str(tmp_path / "skip"), "--skip-nonfinite-steps"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.isfinite(weights(tmp_path / "skip")["score.weight"]).all()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "skip")).Reload()
    assert [e.value for e in events.Scalars("charts/skipped_steps")] == [0, 1, 1]


@pytest.mark.parametrize("fail_at", range(8))
def test_a_save_killed_at_any_point_leaves_a_complete_model(tmp_path, monkeypatch, fail_at):
    """save_atomically with a failure injected before its k-th file operation: a complete model always remains
    (the new or the old one, at model/ or, between the two renames, model.old/), and the next save recovers."""
    from transformers import AutoModelForSequenceClassification

    tok = common.tiny_tokenizer()
    old_model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    new_model = AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1))
    path = str(tmp_path / "model")
    lifecycle.save_atomically(old_model, tok, path)
    calls = {"n": 0}
    real = {name: getattr(os, name) for name in ("replace", "fsync")}

    def failing(name):
        def op(*a, **kw):
            calls["n"] += 1
            if calls["n"] > fail_at:
                raise KeyboardInterrupt("killed")
            return real[name](*a, **kw)

        return op

    for name in real:
        monkeypatch.setattr(os, name, failing(name))
    try:
        lifecycle.save_atomically(new_model, tok, path)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    survivor = path if os.path.exists(path) else path + ".old"
    loaded = AutoModelForSequenceClassification.from_pretrained(survivor).state_dict()
    expected = [m.state_dict() for m in (old_model, new_model)]
    assert any(all(torch.equal(loaded[k], e[k]) for k in e) for e in expected)
    lifecycle.save_atomically(new_model, tok, path)  # the next save puts everything right
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_ppo_writes_its_model_with_every_reward_and_eval_combination(tmp_path):
    """gold / reward model x embedded eval / a non-embedded eval set / none: the run always reports and saves."""
    from transformers import AutoModelForSequenceClassification

    tok = common.tiny_tokenizer()
    lifecycle.save_atomically(
        AutoModelForSequenceClassification.from_config(common.tiny_config(tok, num_labels=1)), tok, str(tmp_path / "rm")
    )
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "What is 2+2?\n", "chosen": "4", "rejected": "5"}) + "\n")
    fast = ["--total-steps", "1", "--save-every", "0", "--eval-every", "0"]
    for i, (reward, evals) in enumerate(
        [
            ([], []),
            ([], ["--eval-datasets", str(other), "synthetic"]),
            (["--reward-model-path", str(tmp_path / "rm")], ["--eval-datasets", str(other)]),
            (["--reward-model-path", str(tmp_path / "rm")], []),
        ]
    ):
        out = tmp_path / f"run{i}"
        dataset = ["--dataset", str(other), "--batch-size", "1", "--sft-steps", "0"] if reward and not evals else []
        run("dro_ppo.py", out, *fast, *reward, *evals, *dataset)
        assert os.path.exists(out / "model" / "config.json") and os.path.exists(out / "args.json"), (reward, evals)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]])
def test_torchrun_killed_and_resumed_equals_uninterrupted(tmp_path, sharding):
    """2 gloo processes: rank 0 writes the checkpoint, every rank restores its own RNG state (with --fsdp: the
    shards are gathered into the checkpoint and each process takes its own back)."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]  # a free port: the two cases may run at once
    cmd = lambda out, *extra: [*torchrun, *command("dro_reward.py", out)[1:], *sharding, *extra]
    subprocess.run(cmd(tmp_path / "whole"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(
        cmd(tmp_path / "killed"),
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while (
        not os.path.exists(tmp_path / "killed" / "checkpoints" / "step-00000003" / "COMPLETE")
        and time.time() < deadline
    ):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait(timeout=60)
    assert not os.path.exists(tmp_path / "killed" / "model")
    subprocess.run(
        cmd(tmp_path / "killed", "--resume"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300
    )
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "whole")
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fail_at", range(0, 12, 2))
def test_a_checkpoint_save_killed_at_any_point_leaves_a_complete_checkpoint(tmp_path, monkeypatch, fail_at):
    """save_checkpoint with a failure injected before its k-th file operation: --resume still finds a complete
    checkpoint (the previous one), which loads."""
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = SimpleNamespace(
        exp_name="t",
        model_name_or_path=None,
        run_id="r",
        keep_checkpoints=2,
        resume=True,
        resume_from=None,
        overwrite=False,
    )
    lifecycle.save_checkpoint(str(tmp_path), 1, {"model": model}, optimizer, None, {}, args)
    calls, real = {"n": 0}, {name: getattr(os, name) for name in ("replace", "fsync")}

    def failing(name):
        def op(*a, **kw):
            calls["n"] += 1
            if calls["n"] > fail_at:
                raise KeyboardInterrupt("killed")
            return real[name](*a, **kw)

        return op

    for name in real:
        monkeypatch.setattr(os, name, failing(name))
    try:
        lifecycle.save_checkpoint(str(tmp_path), 2, {"model": model}, optimizer, None, {}, args)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    found = lifecycle.checkpoint_to_resume(args, str(tmp_path))
    assert found.endswith(("step-00000001", "step-00000002"))
    assert lifecycle.load_checkpoint(found, {"model": model}, optimizer, None, args)["step"] in (1, 2)


@pytest.mark.parametrize("script", ["dro_reward.py", "dro_dpo.py"])
def test_a_local_dataset_with_no_eval_set_reports_and_saves(tmp_path, script):
    data = tmp_path / "data.jsonl"
    rows = common.synthetic_preferences(40, common.TRAIN_MIXTURE, seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(script, tmp_path / "run", "--dataset", str(data), "--total-steps", "2", "--save-every", "0")
    assert os.path.exists(tmp_path / "run" / "model" / "config.json") and os.path.exists(tmp_path / "run" / "args.json")


def test_every_script_trains_on_synthetic_groups_and_ppo_on_a_file_of_embedded_rows(tmp_path):
    """--dataset synthetic-groups trains all three scripts and evaluates per group; PPO takes the gold reward from a
    .jsonl of embedded rows of both datasets in another mixture, with the cross-fitted worst case."""
    for script in ("dro_reward.py", "dro_dpo.py"):
        out = tmp_path / script
        run(script, out, "--dataset", "synthetic-groups", "--total-steps", "2", "--save-every", "0")
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert {r["split"] for r in rows} == {"validation", "test_id", "test_uniform", "test_minority"}
        assert set().union(*(r["domain_accuracy"] for r in rows)) == set(common.GROUPS)
    mixed = common.group_preferences(30, {"wants_refusal": 1.0}, seed=0)
    mixed += common.synthetic_preferences(10, {"reasoning": 1.0}, seed=0)
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    out = tmp_path / "ppo"
    flags = [
        "--dataset",
        str(data),
        "--eval-datasets",
        "synthetic-groups",
        "--weights-from",
        "loo",
        "--save-every",
        "0",
    ]
    run("dro_ppo.py", out, *flags, "--max-train-rows", "40", "--sft-batch-size", "8", "--total-steps", "2")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert set().union(*(r["domain_gold_reward"] for r in rows)) == set(common.GROUPS) and len(rows) == 8
    proc = run("dro_ppo.py", tmp_path / "bad", *flags, "--samples-per-prompt", "1", "--baseline", "critic", check=False)
    assert proc.returncode == 2 and "--weights-from loo" in proc.stderr and "--samples-per-prompt >= 2" in proc.stderr
    run("dro_ppo.py", tmp_path / "group", "--dro.kind", "group", "--total-steps", "1", "--save-every", "0")
