"""Long-CoT supervised fine-tuning: chat conversations, loss only on assistant tokens.

Responses follow `<think>...</think><answer>...<|begin_of_box|>X<|end_of_box|></answer>`.
"""
from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config(arg, stage="sft")
    c.data.kind = "sft"
    c.data.seq_len, c.data.batch_size, c.data.patch_budget = 32768, 32, 32 * 4096
    c.train.steps = 5_000
    c.optimizer.update(lr=2e-5, warmup_steps=100, total_steps=5_000, weight_decay=0.0)
    c.model.update(dtype="bfloat16", remat="full")
    if c.runlocal or c.model.preset.startswith("tiny"):
        c.data.update(seq_len=256, batch_size=8, patch_budget=512)
        c.train.update(steps=50, save_every=25, log_every=5)
        c.optimizer.update(lr=1e-3, warmup_steps=5, total_steps=50)
        c.model.update(dtype="float32", remat="none")
    return c
