"""Context-parallel attention (ring and all-gather over the "sequence" axis) against the one-device reference
`layers.blocked_attention`: values and gradients on non-padding query rows, packed causal segments with
padding, GQA (G = 3), sequence 2/4/8 with and without batch/tensor axes; the mesh taken from context; the
tiny decoder's forward and gradients under a {"sequence": 4, "fsdp": 2} mesh; clear errors on bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmv_jax.batch import pad_batch
from glmv_jax.models import glmv
from glmv_jax.models.layers import blocked_attention
from glmv_jax.models import context_parallel as context
from glmv_jax.models.context_parallel import context_parallel_attention
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.rules import activation_sharding

B, T, K, G, H = 2, 32, 2, 3, 8
SCALE = H ** -0.5
MESHES = {
    "seq2": {"sequence": 2},
    "seq8": {"sequence": 8},
    "seq4_fsdp2": {"sequence": 4, "fsdp": 2},
    "seq2_data2_tensor2": {"sequence": 2, "data": 2, "tensor": 2},   # batch and heads split too
    "seq2_data4": {"sequence": 2, "data": 4},                         # B=2 not divisible: batch replicated
}


def _mesh(shape: dict):
    """A mesh over the first prod(shape) of the 8 simulated devices."""
    return make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])


def _segments() -> np.ndarray:
    """Row 0: three packed samples then padding; row 1: padding first (left-padded), one sample across
    every shard boundary, then padding again. Segments straddle shard boundaries at every axis size."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :7], seg[0, 7:19], seg[0, 19:27] = 1, 2, 3
    seg[1, 5:29] = 1
    return seg


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((B, T, K * G, H), (B, T, K, H), (B, T, K, H)))
    q = q * 2.0                                           # peaked softmax: a wrong mask shows up clearly
    seg = jnp.asarray(_segments())
    weights = jnp.asarray(rng.normal(size=(B, T, K * G, H)), jnp.float32)
    return q, k, v, seg, weights


def _valid(seg) -> np.ndarray:
    return np.asarray(seg) > 0


def _output_and_grads(attention, weights, seg):
    """Jitted (output, d/dq, d/dk, d/dv of a weighted sum of the output over non-padding rows): the
    reference's padding rows are arbitrary, so they stay out of the scalar."""
    mask = (seg > 0)[:, :, None, None]

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out * weights * mask), out

    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads
    return jax.jit(run)


@pytest.fixture(scope="module")
def reference(inputs):
    q, k, v, seg, weights = inputs
    attention = lambda q, k, v: blocked_attention(q, k, v, seg, seg, SCALE, causal=True, block=8)
    out, grads = _output_and_grads(attention, weights, seg)(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


# (impl, layout, mesh, ring query tile): tiles of 4 and 2 rows exercise the tiled (lax.map / scan) path.
CASES = ([("ring", "contiguous", name, 512) for name in MESHES] + [("ring", "contiguous", "seq2", 4)]
         + [("ring", "zigzag", name, 512) for name in ("seq8", "seq2_data2_tensor2")]
         + [("ring", "zigzag", "seq4_fsdp2", 2)]
         + [("allgather", "contiguous", name, 512) for name in ("seq2", "seq8", "seq4_fsdp2", "seq2_data2_tensor2")])


@pytest.mark.parametrize("impl,layout,mesh_name,block", CASES)
def test_values_and_gradients_match_reference(inputs, reference, impl, layout, mesh_name, block):
    q, k, v, seg, weights = inputs
    mesh = _mesh(MESHES[mesh_name])
    attention = lambda q, k, v: context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh,
                                                           impl=impl, layout=layout, block=block)
    out, grads = _output_and_grads(attention, weights, seg)(q, k, v)
    valid = _valid(seg)
    np.testing.assert_allclose(np.asarray(out)[valid], reference[0][valid], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    assert out.sharding.spec[1] == "sequence"             # the output stays split over the sequence axis
    if impl == "ring":
        assert (np.asarray(out)[~valid] == 0).all()       # padding rows see no key: 0 on the ring
    for name, got, want in zip("qkv", grads, reference[1]):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["ring", "allgather"])
def test_non_causal_matches_reference(inputs, impl):
    q, k, v, seg, _ = inputs
    out = jax.jit(lambda q, k, v: context_parallel_attention(q, k, v, seg, seg, SCALE, causal=False,
                                                             mesh=_mesh({"sequence": 4, "fsdp": 2}),
                                                             impl=impl))(q, k, v)
    want = blocked_attention(q, k, v, seg, seg, SCALE, causal=False)
    np.testing.assert_allclose(np.asarray(out)[_valid(seg)], np.asarray(want)[_valid(seg)], rtol=1e-5, atol=1e-5)


def test_mesh_from_context_and_dispatcher_call(inputs, reference):
    """The dispatcher's call (no mesh argument) finds the activation-sharding mesh or the jax.set_mesh one;
    with no mesh at all it is the one-device reference."""
    q, k, v, seg, _ = inputs
    call = lambda q, k, v: context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True)
    valid = _valid(seg)
    mesh = make_mesh({"sequence": 8})
    with activation_sharding(mesh):
        out = jax.jit(call)(q, k, v)
    assert out.sharding.spec[1] == "sequence"
    np.testing.assert_allclose(np.asarray(out)[valid], reference[0][valid], rtol=1e-5, atol=1e-5)
    with jax.set_mesh(make_mesh({"sequence": 4, "fsdp": 2})):
        out = jax.jit(call)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[valid], reference[0][valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(call(q, k, v)),
                                  np.asarray(blocked_attention(q, k, v, seg, seg, SCALE, causal=True)))


def test_zigzag_layout_round_trip():
    """Shard i of P holds chunks i and 2P-1-i of 2P after _zigzag; the inverse restores natural order."""
    mesh = _mesh({"sequence": 4})
    x = jnp.arange(16, dtype=jnp.int32)[None]             # 8 chunks of 2 tokens

    def run(x):
        there = context._zigzag(x, "sequence")
        return there, context._zigzag(there, "sequence", inverse=True)
    spec = jax.sharding.PartitionSpec(None, "sequence")
    there, back = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=spec, out_specs=(spec, spec)))(x)
    chunks = [0, 7, 1, 6, 2, 5, 3, 4]
    np.testing.assert_array_equal(np.asarray(there)[0], np.concatenate([[2 * c, 2 * c + 1] for c in chunks]))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_bad_inputs_raise(inputs):
    q, k, v, seg, _ = inputs
    mesh = make_mesh({"sequence": 8})
    with pytest.raises(ValueError, match=r"T=12 is not divisible by the 'sequence' mesh axis of size 8"):
        context_parallel_attention(q[:, :12], k[:, :12], v[:, :12], seg[:, :12], seg[:, :12], SCALE,
                                   causal=True, mesh=mesh)
    with pytest.raises(ValueError, match="unknown context-parallel attention impl 'flash'"):
        context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh, impl="flash")
    with pytest.raises(ValueError, match="self-attention"):
        context_parallel_attention(q, k[:, :16], v[:, :16], seg, seg[:, :16], SCALE, causal=True, mesh=mesh)
    with pytest.raises(ValueError, match="not a multiple of 4 kv heads"):
        context_parallel_attention(q, jnp.tile(k, (1, 1, 2, 1)), jnp.tile(v, (1, 1, 2, 1)), seg, seg, SCALE,
                                   causal=True, mesh=mesh)
    with pytest.raises(ValueError, match="segment ids must be"):
        context_parallel_attention(q, k, v, seg[:1], seg, SCALE, causal=True, mesh=mesh)
    with pytest.raises(ValueError, match=r"layout='zigzag' needs T=24 divisible by 2 x the 'sequence' axis size"):
        context_parallel_attention(q[:, :24], k[:, :24], v[:, :24], seg[:, :24], seg[:, :24], SCALE,
                                   causal=True, mesh=mesh, layout="zigzag")
    with pytest.raises(ValueError, match="unknown context-parallel layout 'striped'"):
        context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh, layout="striped")
    with pytest.raises(ValueError, match="zigzag' is a ring option"):
        context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh, impl="allgather",
                                   layout="zigzag")
    with pytest.raises(ValueError, match="block must be a positive number of query rows, got 0"):
        context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh, block=0)
    with pytest.raises(ValueError, match="mesh has no axis 'context'"):
        context_parallel_attention(q, k, v, seg, seg, SCALE, causal=True, mesh=mesh, axis="context")


# ----------------------------------------------------------------------------------------------
# The whole tiny model with its decoder attention split over the sequence axis.

@pytest.fixture(scope="module")
def tiny_model():
    """tiny() with O(1)-scale weights (at the 0.02 init attention is nearly uniform and mask bugs hide):
    kernels ~ N(0, 1/16), embeddings ~ N(0, 1), biases ~ N(0, 1/4), norm scales 1 (numpy draws)."""
    from glmv_jax.config import tiny
    config = tiny()
    shapes = glmv.model_graph(config)[1].to_pure_dict()
    std = {"kernel": 0.25, "embedding": 1.0, "bias": 0.5}
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        assert name in std or name == "scale", f"no rule for parameter {name}"
        value = std[name] * rng.standard_normal(leaf.shape) if name in std else np.ones(leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    return config, jax.tree_util.tree_map_with_path(draw, shapes)


def _decoder_batch(config, length: int = 32) -> dict:
    """Row 0: text, one 4x4-patch image (4 tokens), text, right-padded (prepare_inputs); row 1: two packed
    text samples, then padding. 32 tokens: every shard of a 4-way sequence split holds 8."""
    rng = np.random.default_rng(2)
    image = [config.image_start_token_id] + [config.image_token_id] * 4 + [config.image_end_token_id]
    ids = np.concatenate([rng.integers(2, 200, 5), image, rng.integers(2, 200, 6)])[None]
    pixels = rng.standard_normal((16, config.vision.patch_dim)).astype(np.float32)
    batch, _ = glmv.prepare_inputs(config, ids, pixel_values=pixels, image_grid_thw=np.array([[1, 4, 4]]))
    batch = pad_batch(batch, length, 16)
    seg = np.zeros(length, np.int32)
    seg[:11], seg[11:27] = 1, 2
    pos = np.where(seg > 0, np.arange(length) - np.where(seg == 2, 11, 0), 0)
    batch["input_ids"] = np.stack([batch["input_ids"][0], np.where(seg > 0, rng.integers(2, 200, length), 0)])
    batch["segment_ids"] = np.stack([batch["segment_ids"][0], seg]).astype(np.int32)
    batch["token_type"] = np.stack([batch["token_type"][0], np.zeros(length, np.int32)])
    batch["position_ids"] = np.concatenate([batch["position_ids"], np.broadcast_to(pos, (3, 1, length))], axis=1)
    return {key: jnp.asarray(val) for key, val in batch.items()}


def test_tiny_decoder_forward_and_grads_with_sequence_axis(tiny_model, monkeypatch):
    """glmv.apply under activation_sharding({"sequence": 4, "fsdp": 2}): the decoder's attention goes through
    models.attention.attend -> context_parallel_attention (ring); logits and parameter gradients (scanned
    layers: the ring's custom VJP inside lax.scan) equal the one-device run."""
    config, params = tiny_model
    batch = _decoder_batch(config)
    valid = np.asarray(batch["segment_ids"]) > 0
    targets = jnp.asarray(np.random.default_rng(3).integers(0, config.text.vocab_size, valid.shape))

    def loss(params):
        logits = glmv.apply(config, params, batch)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * valid), logits

    run = lambda: jax.jit(jax.value_and_grad(loss, has_aux=True))(params)    # a fresh jit: traced again
    (_, want), want_grads = run()
    calls = []
    real = context.context_parallel_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "context_parallel_attention", counting)     # what the dispatcher calls
    with activation_sharding(make_mesh({"sequence": 4, "fsdp": 2})):
        (_, got), got_grads = run()
    assert calls, "the decoder never reached context_parallel_attention"
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-4, atol=1e-4)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        scale = float(np.abs(np.asarray(w)).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(w) / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
