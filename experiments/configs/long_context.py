"""Long-context continual training: 32K packed sequences, video added, from the pretraining checkpoint.

Paper: 32K length, 10k steps, same data mixture plus long video and long interleaved documents.
"""
from experiments.configs.base import base_config, parse_variants


def get_config(arg=None):
    c = base_config(arg, stage="long_context")
    c.data.kind = "caption"
    c.data.seq_len, c.data.batch_size, c.data.patch_budget = 32768, 384, 384 * 4096
    c.train.steps = 10_000
    c.optimizer.update(lr=1e-4, warmup_steps=200, total_steps=10_000)
    c.model.update(dtype="bfloat16", remat="full")
    if "mesh" not in parse_variants(arg):         # an explicit mesh= variant wins
        c.mesh.ici = {"fsdp": -1, "sequence": 4}
    if c.runlocal or c.model.preset.startswith("tiny"):
        c.data.update(seq_len=512, batch_size=4, patch_budget=1024)
        c.train.update(steps=20, save_every=10, log_every=5)
        c.optimizer.update(lr=1e-3, warmup_steps=2, total_steps=20)
        c.model.update(dtype="float32", remat="none")
        if "mesh" not in parse_variants(arg):
            c.mesh.ici = {"fsdp": -1}
    return c
