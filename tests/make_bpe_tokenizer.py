"""Train the small byte-level BPE tokenizer of tests/fixtures/bpe offline (deterministic; rerun to regenerate).

python tests/make_bpe_tokenizer.py
"""

import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def corpus():
    rng = random.Random(0)
    rows = common.synthetic_preferences(3000, {d: 1 for d in common.SYNTHETIC_DOMAINS}, seed=0)
    words = "the a what is how do i you can help with that sure here no yes please thanks answer question".split()
    for r in rows:
        yield r["prompt"] + r["chosen"] + " " + r["rejected"]
        yield " ".join(rng.choice(words) for _ in range(8)) + "?\n"
        yield "user: " + r["prompt"] + "assistant: " + r["chosen"] + "\n"


if __name__ == "__main__":
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.save_pretrained(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bpe"))
