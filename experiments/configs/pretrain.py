"""Multimodal pretraining: packed sequences of captions, interleaved documents, OCR, grounding, video.

Paper: 8K packed length, batch 1536, 120k steps, all parameters trained. `runlocal` shrinks it to a laptop.
"""
from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config(arg, stage="pretrain")
    c.data.kind = "caption"
    c.data.seq_len, c.data.batch_size, c.data.patch_budget = 8192, 1536, 1536 * 1024
    c.train.steps = 120_000
    c.train.grad_accum_steps = 6      # 256 rows per micro-batch: one 8K row per chip on 256 chips (AOT: RESULTS.md)
    c.optimizer.update(lr=2e-4, warmup_steps=2000, total_steps=120_000)
    c.model.update(dtype="bfloat16", remat="save_dots_except_mlp")
    if c.runlocal or c.model.preset.startswith("tiny"):
        c.data.update(seq_len=256, batch_size=8, patch_budget=512)
        c.train.update(steps=50, save_every=25, log_every=5, grad_accum_steps=1)
        c.optimizer.update(lr=2e-3, warmup_steps=5, total_steps=50)
        c.model.update(dtype="float32", remat="none")
    return c
