"""Generation: a jitted prefill + `lax.while_loop` decode over a preallocated KV cache (generate/kv_cache.py; the
loop runs kv_cache.decode_layers, i.e. TextDecoder.decode_step, over per-layer weight and cache buffers split once
per call).

    out = generate(config, params, prompts, max_new_tokens=256, temperature=1.0, stop_ids=tok.stop_ids,
                   rng=jax.random.key(0), thinking_budget=200, force_answer_ids=[id("</think>"), id("<answer>")])
    out["tokens"] [B, N], out["logprobs"] [B, N], out["lengths"] [B], out["finished"] / ["truncated"] / ["forced"] [B],
    out["response_mask"] [B, N] (sampled tokens: excludes forced tokens and everything after the end)

Sampling per step: temperature 0 is greedy; otherwise logits / temperature, then top-k and top-p (nucleus)
filtering, then a categorical draw with row b's key fold_in(fold_in(rng, b), step) (b: the row in the whole
batch, so a row's draws do not depend on the other rows or its slot). The recorded log-prob of every emitted token
is log_softmax(logits / temperature) (fp32, unfiltered: what grpo.token_logprobs computes at the same
temperature; temperature 0 records log_softmax(logits)). A row ends after emitting any stop id (the stop
token is kept with its log-prob) or after max_new_tokens. Forced answering (docs/rl.md section 2): a row that has
produced `thinking_budget` tokens without emitting force_answer_ids[0] (`</think>`) gets force_answer_ids
appended over the next steps (their log-probs are recorded, their response_mask is 0) and then continues.
Shapes are fixed per (rows, bucketed prompt length, patch bucket, N) and the sampling settings, stop ids
and forced ids are traced arguments, so recompiles are rare.

Compaction (generate(..., compact_every=S)): rows end at very different lengths in RL, and the one loop steps
all B rows until the last ends. With S > 0 the same loop body runs in jitted segments of at most S steps; after
a segment that leaves at least half the rows finished, their results are stored on the host and the others'
state (caches, tokens so far, counters) is gathered into a batch of the next power of two (one compile per
size), so finished rows stop costing steps. The outputs are the one loop's.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glmv_jax.config import ModelConfig
from glmv_jax.generate import kv_cache
from glmv_jax.generate.prompts import batch_prompts


# ----------------------------------------------------------------------------------------------
# Sampling one token

def filter_logits(x: jax.Array, top_k: Any = 0, top_p: Any = 1.0) -> jax.Array:
    """x [B, V] (already divided by the temperature) -> x with every token outside the top_k (0 = all)
    and outside the smallest set whose renormalized top-k probability reaches top_p set to -inf; the most
    likely token always stays. top_k / top_p may be traced scalars (one compiled loop serves all values)."""
    v = x.shape[-1]
    ordered = jnp.sort(x, axis=-1)[:, ::-1]
    rank = jnp.arange(v)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    probs = jax.nn.softmax(jnp.where(rank < k, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                  # mass of strictly more likely tokens
    kept = jnp.sum((before < top_p) & (rank < k), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
    return jnp.where(x < threshold, jnp.finfo(x.dtype).min, x)


def sample_token(logits: jax.Array, keys: jax.Array, temperature: Any, top_k: Any, top_p: Any, filtered: bool):
    """logits [B, V] fp32, keys [B] (one per row) -> (tokens [B] int32, log_softmax [B, V] at the temperature).
    temperature 0 is greedy (log-probs at temperature 1; the random draw, ~20x an argmax on CPU, is skipped by a
    lax.cond); `filtered` (static) turns the top-k / top-p pass on."""
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.log_softmax(logits, axis=-1)

    def draw(_):
        x = logits / temperature
        tokens = jax.vmap(jax.random.categorical)(keys, filter_logits(x, top_k, top_p) if filtered else x)
        return tokens.astype(jnp.int32), jax.nn.log_softmax(x, axis=-1)

    return jax.lax.cond(jnp.asarray(temperature) <= 0, greedy, draw, None)


# ----------------------------------------------------------------------------------------------
# The decode loop: state, steps, result

STORED = ("tokens", "logprobs", "forced_mask", "lengths", "finished")     # the per-row results of the state


def step_keys(rng: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
    """rows [B] int (each slot's row in the whole batch) -> [B] keys fold_in(fold_in(rng, row), step): a row's
    draws do not depend on which batch slot it occupies."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, r), step))(rows)


def _start(config: ModelConfig, params: Any, batch: dict, n: int) -> tuple[kv_cache.DecodeWeights, dict]:
    """Prefill -> (decode weights, the loop state before step 0). State: j (steps run), row [B] (row in the
    whole batch), base [B] (prompt_len + rope_delta), logits [B, V], per-layer caches, tokens / logprobs /
    forced_mask [B, N], done / finished / closed (thinking closed) [B], force_pos [B] (-1: not forcing),
    lengths [B]."""
    rows, tp = batch["input_ids"].shape
    logits, caches = kv_cache.prefill(config, params, batch, tp + n)
    weights = kv_cache.decode_weights(config, params)              # per-layer buffers, once per call
    zeros = lambda dtype: jnp.zeros((rows, n), dtype)
    state = dict(j=jnp.int32(0), row=jnp.arange(rows, dtype=jnp.int32), base=batch["prompt_len"] + batch["rope_delta"],
                 logits=logits, caches=kv_cache.unstack_caches(caches), tokens=zeros(jnp.int32),
                 logprobs=zeros(jnp.float32), forced_mask=zeros(bool), done=jnp.zeros(rows, bool),
                 finished=jnp.zeros(rows, bool), closed=jnp.zeros(rows, bool),
                 force_pos=jnp.full(rows, -1, jnp.int32), lengths=jnp.zeros(rows, jnp.int32))
    return weights, state


def _decode(config: ModelConfig, params: Any, weights: kv_cache.DecodeWeights, state: dict, rng: jax.Array,
            settings: dict, until: Any, filtered: bool, pad_id: int) -> dict:
    """Runs decode steps on `state` (_start's) while j < until (<= N) and some row is not done -> the state."""
    n = state["tokens"].shape[1]
    tp = next(iter(state["caches"].values())).valid.shape[1] - n
    force_ids, force_len, budget = settings["force_ids"], settings["force_len"], settings["budget"]
    think_end = jnp.where(force_len > 0, force_ids[0], -1)

    def body(s):
        j = s["j"]
        sampled, logp_all = sample_token(s["logits"], step_keys(rng, s["row"], j), settings["temperature"],
                                         settings["top_k"], settings["top_p"], filtered)
        active = ~s["done"]
        start = (budget >= 0) & (j == budget) & active & ~s["closed"] & (s["force_pos"] < 0)
        force_pos = jnp.where(start, 0, s["force_pos"])
        forcing = active & (force_pos >= 0) & (force_pos < force_len)
        token = jnp.where(forcing, force_ids[jnp.clip(force_pos, 0, force_ids.shape[0] - 1)], sampled)
        logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
        token = jnp.where(active, token, pad_id)
        stopped = active & ~forcing & jnp.isin(token, settings["stop_ids"])
        out = dict(s, j=j + 1,
                   tokens=s["tokens"].at[:, j].set(token),
                   logprobs=s["logprobs"].at[:, j].set(jnp.where(active, logp, 0.0)),
                   forced_mask=s["forced_mask"].at[:, j].set(forcing),
                   done=s["done"] | stopped, finished=s["finished"] | stopped,
                   closed=s["closed"] | (active & (token == think_end)),
                   force_pos=jnp.where(forcing, force_pos + 1, force_pos),
                   lengths=s["lengths"] + active.astype(jnp.int32))
        out["logits"], out["caches"] = kv_cache.decode_layers(config, params, weights, s["caches"], token, tp + j,
                                                              s["base"] + j, active & ~stopped)
        return out

    return jax.lax.while_loop(lambda s: (s["j"] < until) & ~jnp.all(s["done"]), body, state)


def _result(tokens, logprobs, forced_mask, lengths, finished) -> dict:
    """The per-row results (jax or numpy arrays; STORED) -> generate's outputs."""
    in_response = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return dict(tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished, truncated=~finished,
                forced=forced_mask.any(axis=1), forced_mask=forced_mask, response_mask=in_response & ~forced_mask)


@functools.lru_cache(maxsize=32)
def _generation_fn(config: ModelConfig, max_new_tokens: int, filtered: bool, pad_id: int):
    """jit(run(params, batch, rng, settings)): prefill and one loop to the end. settings are traced:
    temperature, top_k, top_p, stop_ids [s] (-1 padded), force_ids [f] (padded), force_len, budget (-1 = no
    forced answering)."""
    n = max_new_tokens

    def run(params, batch, rng, settings):
        weights, state = _start(config, params, batch, n)
        state = _decode(config, params, weights, state, rng, settings, n, filtered, pad_id)
        return _result(*(state[k] for k in STORED))

    return jax.jit(run)


# ----------------------------------------------------------------------------------------------
# Compaction: decode in segments, finished rows dropped between them

@functools.lru_cache(maxsize=32)
def _segment_fns(config: ModelConfig, max_new_tokens: int, filtered: bool, pad_id: int):
    """(jit(start(params, batch)) -> (weights, state), jit(decode(params, weights, state, rng, settings, until))
    -> state, the state donated)."""
    start = jax.jit(lambda params, batch: _start(config, params, batch, max_new_tokens))
    decode = jax.jit(lambda params, weights, state, rng, settings, until: _decode(
        config, params, weights, state, rng, settings, until, filtered, pad_id), donate_argnums=2)
    return start, decode


@jax.jit
def _gather(state: dict, slots: jax.Array) -> dict:
    """The state of batch slots `slots` [b] (every array but the step counter j has the rows first)."""
    return jax.tree.map(lambda a: a if a.ndim == 0 else jnp.take(a, slots, axis=0), state)


def compacted_slots(done: np.ndarray) -> np.ndarray | None:
    """done [b] -> the slots [b'] of the compacted batch (the unfinished rows, then finished ones as padding up
    to a power of two: fewer than b rows), or None when fewer than half are finished."""
    alive = np.flatnonzero(~done)
    if 2 * len(alive) > len(done):
        return None
    size = 1 << max(len(alive) - 1, 0).bit_length()
    return np.concatenate([alive, np.flatnonzero(done)[:size - len(alive)]])


def _store(results: dict, state: dict, ids: np.ndarray, slots: np.ndarray) -> None:
    """results[k][ids[slots]] = state[k][slots] for the per-row results k (STORED)."""
    got = jax.device_get({k: state[k] for k in STORED})
    for k in STORED:
        results[k][ids[slots]] = got[k][slots]


def _generate_compacted(fns, params: Any, batch: dict, rng: jax.Array, settings: dict, every: int) -> dict:
    """Decodes in segments of `every` steps; after a segment that leaves at least half the batch finished, the
    finished rows' results are stored and decoding goes on with the rest (compacted_slots). -> _result's
    outputs (numpy), equal to the one-loop path's."""
    start, decode = fns
    weights, state = start(params, batch)
    n = state["tokens"].shape[1]
    ids = np.arange(batch["input_ids"].shape[0])              # the row of each slot; -1 = padding
    results = {k: np.zeros((len(ids),) + state[k].shape[1:], state[k].dtype) for k in STORED}
    for until in range(every, n + every, every):
        state = decode(params, weights, state, rng, settings, np.int32(min(until, n)))
        done = np.asarray(state["done"])
        if until >= n or done.all():
            break
        slots = compacted_slots(done)
        if slots is not None:
            _store(results, state, ids, np.flatnonzero(done & (ids >= 0)))
            ids = np.where(np.arange(len(slots)) < (~done).sum(), ids[slots], -1)
            state = _gather(state, slots)
    _store(results, state, ids, np.flatnonzero(ids >= 0))
    return _result(**results)


def _padded_ids(ids: Sequence[int], multiple: int, fill: int) -> np.ndarray:
    """ids padded to a multiple of `multiple` (at least one), so changing id lists rarely recompiles."""
    size = max(1, -(-len(ids) // multiple)) * multiple
    return np.asarray(list(ids) + [fill] * (size - len(ids)), np.int32)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, thinking_budget,
                   force_answer_ids) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if thinking_budget is not None:
        if not force_answer_ids:
            raise ValueError("thinking_budget needs force_answer_ids (e.g. the ids of </think><answer>)")
        if not 0 <= thinking_budget <= max_new_tokens - len(force_answer_ids):
            raise ValueError(f"thinking_budget {thinking_budget} must be in [0, max_new_tokens - "
                             f"len(force_answer_ids)] = [0, {max_new_tokens - len(force_answer_ids)}]")


def generate(config: ModelConfig, params: Any, prompts: Sequence[dict] | dict, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (),
             rng: Any = None, thinking_budget: int | None = None, force_answer_ids: Sequence[int] | None = None,
             num_samples: int = 1, pad_id: int = 0, compact_every: int = 0) -> dict[str, np.ndarray]:
    """Samples continuations of `prompts` (PromptTransform dicts, or a prompts.batch_prompts batch).

    Rows: len(prompts) * num_samples, prompt i at rows [i * num_samples, (i + 1) * num_samples).
    Returns numpy arrays: tokens [B, N] int32 (pad_id after the end), logprobs [B, N] fp32 (0 after the
    end), lengths [B] (tokens emitted, stop token included), finished [B] (ended on a stop id), truncated
    [B] (hit max_new_tokens), forced [B], forced_mask [B, N], response_mask [B, N] (emitted and not forced),
    and batch (the prompt batch used). compact_every S > 0 decodes in segments of S steps and drops finished rows
    between them once at least half are (batch padded to a power of two; the same outputs as S = 0, one loop)."""
    if compact_every < 0:
        raise ValueError(f"compact_every must be >= 0 (0 = off), got {compact_every}")
    check_sampling(max_new_tokens, temperature, top_p, top_k, thinking_budget, force_answer_ids)
    vocab = config.text.vocab_size
    bad = [int(i) for i in list(stop_ids) + list(force_answer_ids or []) if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"stop / forced token ids {bad} are outside the vocabulary of size {vocab}")
    if isinstance(prompts, dict):
        if num_samples != 1:
            raise ValueError("num_samples applies to a list of prompt dicts; a prebuilt batch has its rows")
        batch = prompts
    else:
        batch = batch_prompts(prompts, num_samples, pad_id=pad_id, merge_area=config.vision.spatial_merge_size ** 2)
    rng = jax.random.key(0) if rng is None else (jax.random.key(rng) if isinstance(rng, int) else rng)
    force = [int(i) for i in force_answer_ids or ()]
    settings = dict(temperature=np.float32(temperature), top_k=np.int32(top_k), top_p=np.float32(top_p),
                    stop_ids=_padded_ids([int(i) for i in stop_ids], 8, -1), force_ids=_padded_ids(force, 4, pad_id),
                    force_len=np.int32(len(force)), budget=np.int32(-1 if thinking_budget is None else thinking_budget))
    static = (config, int(max_new_tokens), bool(top_k > 0 or top_p < 1.0), int(pad_id))
    if compact_every:
        out = _generate_compacted(_segment_fns(*static), params, batch, rng, settings, int(compact_every))
    else:
        out = jax.device_get(_generation_fn(*static)(params, batch, rng, settings))
    out = {k: np.asarray(v) for k, v in out.items()}
    out["batch"] = batch
    return out


# ----------------------------------------------------------------------------------------------
# Text

def response_text(tokenizer, tokens: Sequence[int], length: int, end_ids: Sequence[int] | None = None) -> str:
    """The response as the verifier sees it: tokens[:length] decoded with special tokens kept
    (`</think>`, `</answer>`, box tokens are content), without a final turn-ending token (end_ids, by
    default tokenizer.stop_ids: `<|endoftext|>`, `<|user|>`, `<|observation|>`)."""
    ids = [int(t) for t in tokens[:int(length)]]
    ends = set(tokenizer.stop_ids if end_ids is None else end_ids)
    if ids and ids[-1] in ends:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def answer_ids(tokenizer, style: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(force_answer_ids, extra stop ids) of a response style (docs/rl.md section 2): glm41v forces
    `</think><answer>` and also stops after `</answer>` (as GLM-V's bench script); glm45v/glm46v force
    `</think>` and stop on the turn-ending ids only."""
    ids = tokenizer.special_ids
    if style == "glm41v":
        if "<answer>" not in ids or "</answer>" not in ids:
            raise ValueError("style glm41v needs <answer> and </answer> tokens in the tokenizer")
        return (ids["</think>"], ids["<answer>"]), (ids["</answer>"],)
    if style in ("glm45v", "glm46v"):
        return (ids["</think>"],), ()
    raise ValueError(f"unknown response style {style!r}; expected glm41v, glm45v or glm46v")

