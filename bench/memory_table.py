"""What fits: the memory a run holds besides activations, per mode, for Qwen2.5 0.5B, 1.5B and 7B.

    python bench/memory_table.py

1. Measured: one training step of each script's models on the tiny Llama in each mode (fp32, --bf16, --lora-r 16,
   --lora-r 16 --bf16), the optimizer built as the scripts build it; then every tensor the run holds is counted:
   the weights of the trained model, of the reference (DPO, PPO) and of the critic (PPO), their gradients and
   AdamW's state. Printed as bytes per parameter of the base model (adapters counted apart), so the accounting can
   be checked against the rule below (it is asserted).
2. The rule, with exact parameter counts of the Qwen2.5 configs (built on the meta device, adapters from peft on
   every linear layer at r = 16): GB for each script and mode. --gradient-checkpointing changes none of these
   numbers, only the activations (stored per layer boundary instead of inside each layer); --bf16 autocast holds
   bf16 copies of the trained weights from the forward to the backward (+2 bytes per trained parameter at the
   peak, not counted here).
"""

import os
import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dro_ppo  # noqa: E402
import lifecycle  # noqa: E402

MODES = {
    "fp32 (default)": dict(bf16=False, lora_r=0),
    "--bf16": dict(bf16=True, lora_r=0),
    "--lora-r 16": dict(bf16=False, lora_r=16),
    "--lora-r 16 --bf16": dict(bf16=True, lora_r=16),
}
QWEN = {  # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "0.5B": (896, 4864, 24, 14, 2, True),
    "1.5B": (1536, 8960, 28, 12, 2, True),
    "7B": (3584, 18944, 28, 28, 4, False),
}


def args_of(mode):
    return SimpleNamespace(
        gradient_checkpointing=False,
        lora_alpha=32.0,
        lora_dropout=0.0,
        lora_target_modules=(),
        **MODES[mode],
    )


def build(script, args, config):
    """The trained modules of `script` as the scripts build them: (modules that train, the reference or None)."""
    auto = AutoModelForSequenceClassification if script == "reward" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.config.pad_token_id = 0
    critic = dro_ppo.Critic(model, shared=args.lora_r > 0) if script == "ppo" else None
    model = lifecycle.prepare_model(model, args, "SEQ_CLS" if script == "reward" else "CAUSAL_LM")
    trained = [model]
    if critic is not None:
        critic.backbone = lifecycle.prepare_model(critic.backbone, args, "FEATURE_EXTRACTION")
        trained.append(critic)
    reference = lifecycle.reference_policy(model, args) if script != "reward" else None
    return trained, reference


def held_bytes(trained, reference, optimizer):
    """Bytes of every distinct tensor storage the run holds: weights, gradients, optimizer state (but AdamW's step
    counters, one scalar per weight tensor)."""
    seen, total = set(), 0
    tensors = [p for m in trained for p in m.parameters()] + [p.grad for m in trained for p in m.parameters()]
    if isinstance(reference, torch.nn.Module):  # a copy (with LoRA the reference is the model itself)
        tensors += list(reference.parameters())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def rule(mode, frozen, trained, reference):
    """Bytes held: 4 (weights) + 4 (gradients) + 8 (AdamW's two moments) per trained parameter, 4 per frozen one
    (2 when LoRA's frozen weights are stored in bf16 with --bf16), and the reference: a frozen fp32 copy of the
    policy (none with LoRA: the policy with its adapter off). PPO's critic is a second model: trained in full, or
    with LoRA its own adapter and head over the policy's frozen weights (held once, counted once)."""
    frozen_bytes = 2 if MODES[mode]["lora_r"] and MODES[mode]["bf16"] else 4
    return 16 * trained + frozen_bytes * frozen + 4 * reference


def counts(config, script, mode):
    """(frozen, trained, reference) parameter counts of `script`'s models in `mode`, built on the meta device."""
    with torch.device("meta"):
        models, reference = build(script, args_of(mode), config)
    params = list({id(p): p for m in models for p in m.parameters()}.values())  # (LoRA's critic shares the frozen)
    trained = sum(p.numel() for p in params if p.requires_grad)
    copy = sum(p.numel() for p in reference.parameters()) if isinstance(reference, torch.nn.Module) else 0
    return sum(p.numel() for p in params) - trained, trained, copy


def main():
    tok = common.tiny_tokenizer()
    print("1. Held after one step on the tiny Llama, bytes per policy parameter (equal to the rule, asserted)\n")
    print("| mode | reward model | DPO | PPO |\n|---|---|---|---|")
    for mode in MODES:
        cells = []
        for script in ("reward", "dpo", "ppo"):
            torch.manual_seed(0)
            args = args_of(mode)
            config = common.tiny_config(tok, num_labels=1 if script == "reward" else None)
            trained, reference = build(script, args, config)
            optimizer = torch.optim.AdamW(
                [p for m in trained for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True
            )
            ids = torch.randint(3, 200, (4, 16))
            with lifecycle.autocast(args, torch.device("cpu")):
                loss = sum(
                    (m(ids, torch.ones_like(ids)) if script == "ppo" and i == 1 else m(input_ids=ids).logits)
                    .float()
                    .sum()
                    for i, m in enumerate(trained)
                )
            loss.backward()
            optimizer.step()
            n = counts(config, script, mode)
            held, expected = held_bytes(trained, reference, optimizer), rule(mode, *n)
            assert held == expected, (script, mode, held, expected)
            base = sum(p.numel() for n, p in trained[0].named_parameters() if "lora_" not in n)
            cells.append(f"{held / base:.1f}")
        print(f"| {mode} | " + " | ".join(cells) + " |")

    print("\n2. GB held per process besides activations, Qwen2.5 (reward model / DPO / PPO; PPO with a learned reward")
    print("   model: add 4 bytes per reward-model parameter)\n")
    sizes = {}
    for name, (hidden, inter, layers, heads, kv, tied) in QWEN.items():
        config = Qwen2Config(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=151936,
            tie_word_embeddings=tied,
        )
        sizes[name] = {(s, m): counts(config, s, m) for s in ("reward", "dpo", "ppo") for m in MODES}
    full, lora = "fp32 (default)", "--lora-r 16"
    header = " | ".join(
        f"{n} ({sizes[n]['dpo', full][1] / 1e9:.2f}B, adapter {sizes[n]['dpo', lora][1] / 1e6:.0f}M)" for n in QWEN
    )
    print(f"| mode | {header} |\n|---|---|---|---|")
    for mode in MODES:
        cells = [
            " / ".join(f"{rule(mode, *sizes[n][s, mode]) / 1e9:.1f}" for s in ("reward", "dpo", "ppo")) for n in QWEN
        ]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
