"""The batch contract of glmv_jax/data/BATCH.md: which keys a batch holds and how each is laid out.

Every producer (data pipelines, rollouts, evaluation) and consumer (train step, global batches, the
model's forward) reads the layout from here.
"""
from __future__ import annotations

PATCH_KEYS = ("pixel_values", "patch_pos", "patch_grid", "patch_segment")   # [Np, ...] packed patch rows
ROW_AXIS = {"position_ids": 1}   # batch entries whose row axis B is not axis 0 (position_ids is [3, B, T])
