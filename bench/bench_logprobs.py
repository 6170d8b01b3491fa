"""The logits term of the memory rule: what `common.token_logprobs` adds to a step at a real vocabulary.

    OMP_NUM_THREADS=2 python bench/bench_logprobs.py                      # CPU, ~2 min
    python bench/bench_logprobs.py --device cuda --size 0.5b --rows 8 --lengths 512 2048

Forward and backward of the summed log-probs of --rows sequences on bench_vocab's Qwen2.5 shape (151,936 tokens),
three ways: `common.token_logprobs` (the output layer's logits computed a chunk at a time and dropped), the model's
own logits with the chunked log-prob (`logprobs.of_logits`, the path Gemma 2 takes), and the model's own
logits with a float32 log_softmax (what a direct implementation does). Peak memory: bench_scale.Memory's growth over
the call (the weights are held before it), median seconds of --repeats calls, each way in turn.
"""

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]
import bench_scale as scale  # noqa: E402
import bench_vocab as vocab  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import logprobs  # noqa: E402


def direct(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=common.positions(mask)).logits[:, :-1]
    return logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


WAYS = {
    "token_logprobs": common.token_logprobs,
    "own logits, chunked": lambda m, ids, mask: logprobs.of_logits(
        common.next_token_logits(m, ids, mask), ids[:, 1:], 1.0, False
    ),
    "own logits, log_softmax": direct,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2, help="sequences per call")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per way (median)")
    p.add_argument("--size", choices=["cpu", "0.5b"], default="cpu", help="bench_vocab's Qwen2.5 shape")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = vocab.new_model("causal", a.size, device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}, Qwen2.5 shape {a.size}, "
        f"vocab {vocab.VOCAB:,}, {a.rows} rows\n"
    )
    print("| tokens per row | log-probs from | s / call | peak MB over the call | MB per token |")
    print("|---|---|---|---|---|")
    for length in a.lengths:
        ids = torch.randint(3, vocab.VOCAB, (a.rows, length), device=device)
        mask = torch.ones_like(ids)
        for name, way in WAYS.items():
            seconds = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                way(model, ids, mask).sum().backward()
                seconds.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
            memory = scale.Memory(device)
            memory.start()
            way(model, ids, mask).sum().backward()
            peak = memory.stop()["mem_step_mb"]
            model.zero_grad(set_to_none=True)
            per_token = peak / (a.rows * length)
            print(
                f"| {length} | {name} | {statistics.median(seconds):.2f} | {peak:.0f} | {per_token:.2f} |", flush=True
            )


if __name__ == "__main__":
    main()
