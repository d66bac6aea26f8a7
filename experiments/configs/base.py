"""Shared experiment config: the blocks every stage has, the variant parser, and validation.

A stage config file is `get_config(arg)` returning `base_config(arg, stage=...)` with its own values.
`arg` is the text after the colon in `--config=experiments/configs/sft.py:model=glm41v_9b,mesh=fsdp8`:
comma-separated `key=value` variants, plus bare flags (`runlocal`: tiny sizes for a laptop).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from glmv_jax import config_schema

MESHES = {  # name -> ICI axis sizes (-1: all remaining devices)
    "auto": {"fsdp": -1},
    "single": {"data": 1},
    "fsdp8": {"fsdp": 8},
    "dp2_fsdp4": {"data": 2, "fsdp": 4},
    "dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp2_ep4": {"fsdp": 2, "expert": 4},
    "fsdp_tp": {"fsdp": -1, "tensor": 4},
}
STAGES = config_schema.STAGES


def parse_variants(arg: str | None) -> dict[str, str]:
    """"model=tiny,mesh=fsdp8,runlocal" -> {"model": "tiny", "mesh": "fsdp8", "runlocal": "1"}."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() if _ else "1"
    return out


def base_config(arg: str | None, stage: str) -> ml_collections.ConfigDict:
    variants = parse_variants(arg)
    known = {"model", "mesh", "rules", "runlocal"}
    unknown = set(variants) - known
    if unknown:
        raise ValueError(f"unknown config variants {sorted(unknown)}; expected some of {sorted(known)}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.runlocal = "runlocal" in variants

    c.model = ml_collections.ConfigDict(dict(
        preset=variants.get("model", "tiny"),
        dtype="float32",          # compute dtype; "bfloat16" on accelerators
        param_dtype="float32",
        scan_layers=True,
        remat="none",             # none | full | minimal | save_dots_except_mlp
        attention="auto",         # auto | einsum | xla_sdpa | cudnn | splash
        hf_checkpoint="",         # a local HF directory to start from (load_pretrained)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        ici=MESHES.get(variants.get("mesh", "auto"), None) or _bad("mesh", variants.get("mesh"), MESHES),
        dcn={},
        devices=0,                # 0: all devices; n: only the first n
        rules=variants.get("rules", "default"),
        max_replicated_fraction=0.05,
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",       # synthetic | jsonl
        manifests=[],             # JSONL manifests for source=jsonl
        domains=["counting", "math", "ocr", "chart", "grounding", "gui", "choice"],
        kind="caption",           # caption | sft | rl
        seq_len=256,
        batch_size=8,
        patch_budget=512,         # Np: patch rows per batch
        frame_len=config_dict.placeholder(int),  # patch_frames [F, L] (ViT per-frame attention): None = the
        frames=config_dict.placeholder(int),     # longest frame of image_size / derived F; frame_len=0: none
        on_bad_record="skip",     # skip (counted) | raise
        num_workers=0,
        image_size=56,
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=10, total_steps=100, final_lr_fraction=0.1, b1=0.9, b2=0.98, eps=1e-8,
        weight_decay=0.01, clip_norm=1.0, freeze=[],
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=100, grad_accum_steps=1, log_every=10, save_every=50, keep=3, nonfinite="skip", z_loss=0.0,
        loss_chunk=1024,          # cross-entropy over this many positions at a time (no whole [B, T, V] logits); 0 = off
        moe_bias_rate=1e-3,       # aux-loss-free router bias update speed (MoE decoders; 0 = off)
        moe_seq_aux_coef=0.0,     # sequence-level balance loss coefficient (1e-4 in the paper; 0 = off)
        init_from="",             # a previous stage's work directory: params only
        export_hf="",             # write the final params as an HF checkpoint here
    ))
    return c


def _bad(what, value, table):
    raise ValueError(f"unknown {what} variant {value!r}; expected one of {sorted(table)}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Config errors reported before anything is compiled (glmv_jax/config_schema.py)."""
    config_schema.validate(c)
