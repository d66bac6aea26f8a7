"""The whole VLM: visual tokens from the ViT + adapter replace image-token embeddings in the decoder.

Two layers of API:
* `apply(config, params, batch) -> logits`: the pure, jittable array work over a batch dict laid out as
  glmv_jax/data/BATCH.md says (the trainer calls this inside its step).
* `forward(config, params, input_ids, ...)`: HF-processor-shaped inputs. `prepare_inputs` does the
  integer preprocessing in numpy (token types, M-RoPE positions, patch order and coordinates), then a
  jitted `apply` (compiled once per config and shape) runs the model.

`init_params`, `model_graph` and `logical_axes` give the parameter tree of PARAM_TREE.md, built
through NNX with logical axis names on every parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmv_jax.batch import bucket, frame_grids, frame_slots, get_rope_index, pad_batch, patch_layout
from glmv_jax.config import ModelConfig
from glmv_jax.models.decoder import TextDecoder
from glmv_jax.models.layers import linear, matvec
from glmv_jax.models.vision import VisionTower

Params = dict[str, Any]


class GlmV(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        self.dtype = jnp.dtype(config.dtype)
        self.vision = VisionTower(config, rngs)
        self.text = TextDecoder(config, rngs)
        self.lm_head = linear(config.text.hidden_size, config.text.vocab_size, ("embed", "vocab"), rngs=rngs)

    def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        hidden, aux = self.hidden(batch)
        return self.logits(hidden), aux

    def hidden(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Final decoder hidden states [B, T, D] (after the last norm) and the aux dict, without the lm_head."""
        return self.text(self.embed(batch), self.text.context(batch["position_ids"], batch["segment_ids"]))

    def embed(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The decoder's input embeddings [B, T, D]: token embeddings, the ViT's merged features at the vision
        tokens (merge_vision_tokens) when the batch has patch rows. The ViT attends per frame when the batch
        has patch_frames (else over all patch rows, segment-masked: the same values)."""
        x = self.text.embed(batch["input_ids"], self.dtype)
        if batch.get("pixel_values") is None or not batch["pixel_values"].shape[0]:
            return x
        features = self.vision(batch["pixel_values"], batch["patch_pos"], batch["patch_grid"], batch["patch_segment"],
                               batch.get("patch_frames"))
        return merge_vision_tokens(x, features, batch["token_type"], batch.get("vision_index"))

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """hidden [..., D] -> fp32 logits [..., V] (the lm_head). rows: the lm_head kernel in decode layout [V, D]
        (kv_cache.decode_weights; then hidden is [B, D]), used instead of the stored [D, V] one."""
        if rows is not None:
            return matvec(hidden, rows, jnp.float32)
        kernel = self.lm_head.kernel[...].astype(hidden.dtype)
        return jnp.einsum("...D,DV->...V", hidden, kernel, preferred_element_type=jnp.float32)


def merge_vision_tokens(x: jax.Array, features: jax.Array, token_type: jax.Array,
                        vision_index: jax.Array | None = None) -> jax.Array:
    """x [B, T, D]; features [M, D]; token_type [B, T] -> x with vision tokens (token_type > 0) replaced.

    vision_index [B, T] (BATCH.md, e.g. from multi-host `sharding.global_batch`): the feature row of each
    vision token (other positions ignored). Without it the k-th vision token (row-major) takes features[k],
    right only when the patch rows are packed without gaps."""
    b, t, d = x.shape
    is_vision = token_type.reshape(-1) > 0
    index = jnp.cumsum(is_vision) - 1 if vision_index is None else vision_index.reshape(-1)
    index = jnp.clip(index, 0, features.shape[0] - 1)
    merged = jnp.where(is_vision[:, None], features[index].astype(x.dtype), x.reshape(-1, d))
    return merged.reshape(b, t, d)


# ----------------------------------------------------------------------------------------------
# Parameters

def _build(config: ModelConfig, rngs: nnx.Rngs) -> GlmV:
    # Params are born sharded only when built under a mesh (jax.set_mesh + nnx.logical_axis_rules).
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
        return GlmV(config.validate(), rngs)


@functools.lru_cache(maxsize=16)
def model_graph(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of the model: shapes, dtypes and logical axes, no arrays."""
    return nnx.split(nnx.eval_shape(lambda: _build(config, nnx.Rngs(0))))


def init_params(config: ModelConfig, rng) -> Params:
    """A random init with the PARAM_TREE.md structure (HF-style: normal(0.02) kernels, unit norms).
    `rng` is an int seed or a PRNG key; jitted (wrap it in jax.jit with out_shardings to shard)."""
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    return _jitted_init(config)(key)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: ModelConfig):
    def init(key):
        _, state = nnx.split(_build(config, nnx.Rngs(params=key)))
        return state.to_pure_dict()
    return jax.jit(init)


def logical_axes(config: ModelConfig) -> dict[str, Any]:
    """The tree of logical axis-name tuples matching `params` (the tuples are the leaves)."""
    _, state = model_graph(config)
    specs = nnx.get_partition_spec(state).to_pure_dict()
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def apply(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    """Logits [B, T, V] fp32 for a BATCH.md batch (keys input_ids, segment_ids, position_ids,
    token_type, and for vision pixel_values, patch_pos, patch_grid, patch_segment, optionally patch_frames).
    Pure; jit it."""
    return apply_with_aux(config, params, batch)[0]


def apply_with_aux(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(logits, aux) where aux["moe"] holds per-MoE-layer routing statistics (empty for dense models)."""
    graphdef, _ = model_graph(config)
    return nnx.merge(graphdef, params)(batch)


def apply_hidden(config: ModelConfig, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict]:
    """(hidden [B, T, D], lm_head kernel [D, V] in the hidden's dtype, aux): the logits are hidden @ kernel,
    left to the caller (e.g. losses.chunked_cross_entropy, which never materializes [B, T, V])."""
    graphdef, _ = model_graph(config)
    model = nnx.merge(graphdef, params)
    hidden, aux = model.hidden(batch)
    return hidden, model.lm_head.kernel[...].astype(hidden.dtype), aux


@functools.lru_cache(maxsize=16)
def _jitted_apply(config: ModelConfig):
    return jax.jit(functools.partial(apply, config))


@functools.lru_cache(maxsize=16)
def _jitted_vision(config: ModelConfig):
    def run(params, pixel_values, patch_pos, patch_grid, patch_segment, patch_frames=None):
        graphdef, _ = model_graph(config)
        return nnx.merge(graphdef, params).vision(pixel_values, patch_pos, patch_grid, patch_segment, patch_frames)
    return jax.jit(run)


def vision_features(config: ModelConfig, params: Params, pixel_values, grid_thw) -> list[np.ndarray]:
    """Merged visual tokens per grid row (HF get_image_features' pooler_output), each [t*h*w/4, O]."""
    grid = _check_grid(config, "grid_thw", grid_thw, pixel_values)
    layout = patch_layout(grid, config.vision.spatial_merge_size)
    layout["patch_frames"] = frame_slots(layout["patch_segment"])
    out = np.asarray(_jitted_vision(config)(params, np.asarray(pixel_values, np.float32), **layout))
    return np.split(out, np.cumsum(grid.prod(-1) // 4)[:-1])


# ----------------------------------------------------------------------------------------------
# HF-shaped inputs -> batch (numpy)

def _check_grid(config: ModelConfig, name: str, grid, pixels, pixel_name: str = "pixel rows") -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"{name} must be an integer [n, 3] array of (t, h, w) patch grids, got {grid.shape}")
    merge = config.vision.spatial_merge_size
    if (grid <= 0).any() or (grid[:, 1:] % merge).any():
        raise ValueError(f"{name} {grid.tolist()}: t, h, w must be positive and h, w multiples of {merge}")
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != config.vision.patch_dim:
        raise ValueError(f"{pixel_name} must be [N, {config.vision.patch_dim}] (3*2*P*P), got {pixels.shape}")
    if pixels.shape[0] != int(grid.prod(-1).sum()):
        raise ValueError(f"{name} covers {int(grid.prod(-1).sum())} patches but {pixel_name} has "
                         f"{pixels.shape[0]} rows")
    return grid.astype(np.int64)


def token_types(config: ModelConfig, input_ids: np.ndarray) -> np.ndarray:
    """The processor's mm_token_type_ids: image tokens between video start/end are 2, others 1."""
    is_image = input_ids == config.image_token_id
    depth = np.cumsum(input_ids == config.video_start_token_id, -1) - np.cumsum(
        input_ids == config.video_end_token_id, -1)
    return np.where(is_image, np.where(depth > 0, 2, 1), 0).astype(np.int32)


def _items(config, kind, grid, pixels):
    """(row start, row stop, (t, h, w)) per image, or per video frame for kind 'video'."""
    if grid is None:
        return []
    grid = frame_grids(grid) if kind == "video" else grid
    stops = np.cumsum(grid.prod(-1))
    return [(int(stop - g.prod()), int(stop), tuple(int(x) for x in g)) for stop, g in zip(stops, grid)]


def prepare_inputs(config: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None):
    """Validates HF-processor inputs and builds the BATCH.md batch (numpy) and rope_deltas [B]."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer [B, T] array, got {ids.dtype} {ids.shape}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
    types = token_types(config, ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids, np.int32)
    if types.shape != ids.shape:
        raise ValueError(f"mm_token_type_ids {types.shape} does not match input_ids {ids.shape}")
    types = np.where(mask > 0, types, 0)
    sources = {}
    for kind, code, grid, pixels in (("image", 1, image_grid_thw, pixel_values),
                                     ("video", 2, video_grid_thw, pixel_values_videos)):
        if (grid is None) != (pixels is None):
            raise ValueError(f"{kind} pixel values and {kind}_grid_thw must be given together")
        if grid is not None:
            grid = _check_grid(config, f"{kind}_grid_thw", grid, pixels, f"{kind} pixel values")
        tokens, features = int((types == code).sum()), 0 if grid is None else int(grid.prod(-1).sum() // 4)
        if tokens != features:
            raise ValueError(f"{kind} placeholders and {kind} features do not match: {tokens} {kind} tokens in "
                             f"the prompt, {features} features from the {kind} grids")
        sources[code] = (None if pixels is None else np.asarray(pixels, np.float32), _items(config, kind, grid, pixels))
    position_ids, deltas = get_rope_index(config, ids, types, image_grid_thw, video_grid_thw, mask)
    # Order images and frames by where their first token appears (row-major): the k-th vision token
    # then takes the k-th merged feature.
    flat = types.reshape(-1)
    order = []
    for code, (pixels, items) in sources.items():
        starts = np.flatnonzero(flat == code)
        first = np.concatenate([[0], np.cumsum([np.prod(g) // 4 for _, _, g in items])])[:-1].astype(int)
        order += [(int(starts[f]), pixels[a:b], g) for f, (a, b, g) in zip(first, items)]
    order.sort(key=lambda item: item[0])
    batch = dict(input_ids=ids.astype(np.int32), segment_ids=mask, position_ids=position_ids.astype(np.int32),
                 token_type=types)
    if order:
        batch["pixel_values"] = np.concatenate([rows for _, rows, _ in order])
        batch.update(patch_layout([g for _, _, g in order], config.vision.spatial_merge_size))
        longest = max(int(np.prod(g[1:])) for _, _, g in order)
        batch["patch_frames"] = frame_slots(batch["patch_segment"], frame_len=bucket(longest, 256))
    return batch, deltas


def forward(config: ModelConfig, params: Params, input_ids, attention_mask=None, pixel_values=None,
            image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> jax.Array:
    """Logits [B, T, V] float32 for inputs shaped as the HF processor makes them (numpy or jax).

    Vision features replace image-token embeddings in row-major order, images and videos placed by
    token type (so, unlike HF, one prompt may hold both). Positions follow get_rope_index with the
    attention mask also for text-only inputs (HF's plain forward uses arange there; generate does not).
    Tokens (1/16-octave steps: <= 6% padding) and patch rows are padded to `batch.bucket` sizes so similar
    prompts share a compiled function."""
    batch, _ = prepare_inputs(config, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw, mm_token_type_ids)
    length = batch["input_ids"].shape[1]
    patches = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    padded = pad_batch(batch, bucket(length, 64, steps=16), bucket(patches, 256))
    return _jitted_apply(config)(params, padded)[:, :length]
