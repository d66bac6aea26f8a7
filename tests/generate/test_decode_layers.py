"""The one decode path (TextDecoder.decode_step), as the sampler's loop runs it (kv_cache.decode_layers over
per-layer weights and caches) and stepped from stacked caches (kv_cache.decode_step), against the full forward;
the loop's compiled HLO (no per-step weight or cache copies); and the ViT's per-frame layout (patch_frames) in
prefill and GRPO batches against the all-patches path."""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.config import tiny
from glmv_jax.convert.hf import hf_state_dict_to_params
from glmv_jax.generate import kv_cache, sampler
from glmv_jax.generate.prompts import batch_prompts
from glmv_jax.models import glmv
from glmv_jax.rl import rollout
from tests.helpers import SPANS, full_logits, prompt_of, rel_err
from tests.hf_oracle import build_hf_model, multimodal_inputs

N = 6


def setup(moe: bool):
    config = tiny(moe=moe)
    hf = build_hf_model(config, seed=0)
    params = hf_state_dict_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    inputs = [multimodal_inputs(config, SPANS[name], seed=i, text_len=2 + 3 * i) for i, name in enumerate(SPANS)]
    return config, params, inputs, [prompt_of(config, x) for x in inputs]


@pytest.fixture(scope="module")
def dense():
    return setup(False)


@pytest.fixture(scope="module")
def moe():
    return setup(True)


# ----------------------------------------------------------------------------------------------- same math

@pytest.mark.parametrize("which", ["dense", "moe"])
def test_decode_equals_full_forward(which, request):
    """Logits at every decoded position (the prompt's last token, then each fed token) equal the uncached
    forward's, for decode_layers (weights prepared once) and decode_step (stacked caches) alike."""
    config, params, inputs, prompts = request.getfixturevalue(which)
    batch = batch_prompts(prompts)
    tp = batch["input_ids"].shape[1]
    feed = np.random.default_rng(1).integers(2, 200, size=(3, N)).astype(np.int32)
    active = np.array([True, True, False])            # an ended row: masked out of MoE routing statistics

    @jax.jit
    def both(params, batch):
        logits, stacked = kv_cache.prefill(config, params, batch, tp + N)
        weights, layered = kv_cache.decode_weights(config, params), kv_cache.unstack_caches(stacked)
        stepped_logits, layered_logits = [logits], [logits]
        for j in range(N - 1):
            pos = batch["prompt_len"] + j + batch["rope_delta"]
            a, stacked = kv_cache.decode_step(config, params, stacked, feed[:, j], tp + j, pos, active)
            b, layered = kv_cache.decode_layers(config, params, weights, layered, feed[:, j], tp + j, pos, active)
            stepped_logits.append(a)
            layered_logits.append(b)
        return jnp.stack(stepped_logits, 1), jnp.stack(layered_logits, 1), stacked, kv_cache.stack_caches(layered)

    stepped, layered, stepped_cache, layered_cache = jax.device_get(both(params, batch))
    np.testing.assert_allclose(layered, stepped, rtol=0, atol=1e-5 * np.abs(stepped).max())
    for name in stepped_cache:
        np.testing.assert_array_equal(layered_cache[name].valid, stepped_cache[name].valid)
        np.testing.assert_allclose(layered_cache[name].k, stepped_cache[name].k, rtol=0, atol=1e-5)
        np.testing.assert_allclose(layered_cache[name].v, stepped_cache[name].v, rtol=0, atol=1e-5)
    for r, (x, p) in enumerate(zip(inputs, prompts)):
        ref = full_logits(config, params, x, feed[r, :N - 1])[len(p["input_ids"]) - 1:]
        assert rel_err(layered[r], ref) <= 1e-5, r


def test_cache_layout_round_trip(dense):
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((2, 3, 7, 2, 4)), jnp.float32) for _ in range(2))
    caches = {"layers": kv_cache.KVCache(k, v, jnp.ones((3, 7), bool))}
    split = kv_cache.unstack_caches(caches)
    assert len(split["layers"].k) == 2 and split["layers"].k[1].shape == (3, 2, 7, 4)     # [B, K, S, H]
    back = kv_cache.stack_caches(split)["layers"]
    np.testing.assert_array_equal(back.k, k)
    np.testing.assert_array_equal(back.v, v)


# ----------------------------------------------------------------------------------------------- the HLO

def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, comps[head.group(1)] = head.group(1), []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line.strip())
    return comps


def loop_copies(hlo: str, carried: str, min_elements: int = 1024) -> Counter:
    """Copy-like ops (copy, transpose, slice, dynamic-slice, concatenate) of >= min_elements elements run by
    the while loops whose carried tuple holds an array typed `carried` (e.g. "f32[3,2,34,16]") or by any
    computation they call (fusions, nested loops), counted by (op, type)."""
    comps = _computations(hlo)
    loops = [m.group(2) for m in re.finditer(r"= \((.*?)\) while\(.*?body=%([\w.\-]+)", hlo) if carried in m.group(1)]
    assert loops, f"no while loop carries {carried}"
    seen, todo, found = set(), list(loops), Counter()
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for line in comps[comp]:
            todo += re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", line)
            todo += [c.strip().lstrip("%") for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
                     for c in group.split(",")]
            op = re.match(r"(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(", line)
            if op and op.group(3) in ("copy", "transpose", "slice", "dynamic-slice", "concatenate"):
                if np.prod([int(d) for d in op.group(2).split(",") if d]) >= min_elements:
                    found[(op.group(3), f"{op.group(1)}[{op.group(2)}]")] += 1
    return found


def test_decode_loop_copies_no_weights_or_caches(dense):
    """Inside the sampler's compiled decode loop no op copies, slices or transposes anything as large as a
    weight (the smallest, o, has 64 x 64 elements) or a layer's cache (3 x 2 x 34 x 16); decode_step in the
    same kind of loop (weights prepared and stacked caches split every step) does (the check can fail)."""
    config, params, _, prompts = dense
    batch = batch_prompts(prompts)
    settings = dict(temperature=np.float32(0), top_k=np.int32(0), top_p=np.float32(1.0),
                    stop_ids=np.full(8, -1, np.int32), force_ids=np.zeros(4, np.int32), force_len=np.int32(0),
                    budget=np.int32(-1))
    fn = sampler._generation_fn(config, N, False, 0)
    hlo = fn.lower(params, batch, jax.random.key(0), settings).compile().as_text()
    tp = batch["input_ids"].shape[1]
    assert loop_copies(hlo, f"f32[3,2,{tp + N},16]") == Counter()

    def stepped(params, caches, tokens):
        def body(s):
            j, tok, c = s
            logits, c = kv_cache.decode_step(config, params, c, tok, tp + j, jnp.full(3, tp) + j, jnp.ones(3, bool))
            return j + 1, jnp.argmax(logits, -1).astype(jnp.int32), c
        return jax.lax.while_loop(lambda s: s[0] < N, body, (0, tokens, caches))[1]

    zeros = jnp.zeros((2, 3, tp + N, 2, 16), jnp.float32)
    caches = {"layers": kv_cache.KVCache(zeros, zeros, jnp.ones((3, tp + N), bool))}
    hlo = jax.jit(stepped).lower(params, caches, jnp.zeros(3, jnp.int32)).compile().as_text()
    assert loop_copies(hlo, f"f32[2,3,{tp + N},2,16]")          # per-step weight slices and cache transposes


# ----------------------------------------------------------------------------------------------- patch_frames

def test_prefill_with_patch_frames_equals_all_patches(dense):
    config, params, _, prompts = dense
    batch = batch_prompts(prompts, num_samples=2)
    frames = batch["patch_frames"]
    real = np.flatnonzero(batch["patch_segment"] > 0)
    assert frames.shape[1] == 256 and sorted(frames[frames >= 0].tolist()) == real.tolist()   # each row once
    plain = {k: v for k, v in batch.items() if k != "patch_frames"}
    run = jax.jit(lambda p, b: kv_cache.prefill(config, p, b, batch["input_ids"].shape[1] + 2))
    (with_frames, caches), (without, plain_caches) = run(params, batch), run(params, plain)
    assert rel_err(with_frames, np.asarray(without)) <= 1e-5
    np.testing.assert_allclose(caches["layers"].k, plain_caches["layers"].k, rtol=0, atol=1e-5)
    fixed = batch_prompts(prompts, frame_len=384, frames=3)
    assert fixed["patch_frames"].shape == (3, 384)
    with pytest.raises(ValueError, match="does not fit"):
        batch_prompts(prompts, frame_len=8)
    with pytest.raises(ValueError, match="patch_frames has 1"):
        batch_prompts(prompts, frame_len=32, frames=1)


def test_grpo_batch_with_patch_frames_equals_all_patches(dense):
    config, params, _, prompts = dense
    rng = np.random.default_rng(2)
    rows, n = 6, 5
    generation = dict(tokens=rng.integers(2, 200, (rows, n)).astype(np.int32), lengths=np.array([5, 3, 5, 1, 4, 5]),
                      logprobs=-rng.random((rows, n)).astype(np.float32), response_mask=np.ones((rows, n), bool))
    batch = rollout.assemble_batch(prompts, 2, generation, num_minibatches=3)
    assert batch["patch_frames"].shape[0] == 3 and (batch["patch_frames"][2] == -1).all()    # text-only minibatch
    apply = jax.jit(lambda p, b: glmv.apply(config, p, b))
    for m in range(3):
        mb = {k: v[m] for k, v in batch.items() if k not in ("targets", "loss_mask", "response_mask", "old_logp")}
        plain = {k: v for k, v in mb.items() if k != "patch_frames"}
        ref = np.asarray(apply(params, plain))
        assert rel_err(apply(params, mb), ref) <= 1e-5, m
