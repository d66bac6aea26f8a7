"""Every attention implementation behind ModelConfig.attention against the masked reference
(layers.dot_product_attention with the equivalent [B, T, S] mask), fp32; the "auto" choice; clear errors;
the context-parallel hand-off; and the whole model's logits with each implementation."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glmv_jax.batch import frame_slots
from glmv_jax.config import ATTENTION_IMPLS, REMAT_NAMES, ConfigError, tiny
from glmv_jax.models import attention, glmv, layers, vision
from glmv_jax.models.layers import causal_segment_mask, dot_product_attention
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.rules import activation_sharding
from tests.hf_oracle import multimodal_inputs
from tests.models.conftest import pad_prompts

CPU_IMPLS = ["einsum", "xla_sdpa", "splash"]      # splash runs in Pallas interpret mode off TPU
RNG = np.random.default_rng(0)


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module")
def packed():
    """Decoder case: packed causal segments, right and left padding, GQA with G = 3."""
    b, t, n, k, h = 3, 37, 6, 2, 8
    seg = np.zeros((b, t), np.int32)
    seg[0] = np.repeat([1, 2, 3], [10, 20, 7])
    seg[1, :30] = np.repeat([1, 2], [5, 25])
    seg[2, 4:] = 1
    q, kk, v = _normal(b, t, n, h), _normal(b, t, k, h), _normal(b, t, k, h)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_segment_mask(index, index, seg, seg)
    weights = _normal(b, t, n, h) * jnp.asarray(seg > 0)[..., None, None]      # a loss that ignores padding
    loss = lambda out: jnp.sum(out * weights)
    ref_grads = jax.grad(lambda q, k, v: loss(dot_product_attention(q, k, v, mask, h ** -0.5)), (0, 1, 2))(q, kk, v)
    return dict(q=q, k=kk, v=v, seg=seg, scale=h ** -0.5, ref=dot_product_attention(q, kk, v, mask, h ** -0.5),
                loss=loss, ref_grads=ref_grads)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_causal_packed_segments_match_reference(impl, packed):
    p = packed
    run = jax.jit(lambda q, k, v: attention.attend(q, k, v, p["seg"], p["seg"], p["scale"], causal=True, impl=impl))
    out = np.asarray(run(p["q"], p["k"], p["v"]))
    real = p["seg"] > 0
    assert out.shape == p["q"].shape and np.isfinite(out).all()
    np.testing.assert_allclose(out[real], np.asarray(p["ref"])[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradients_match_reference(impl, packed):
    """d(loss)/d(q, k, v) with a loss over real rows (splash has its own backward kernels)."""
    p = packed
    fn = lambda q, k, v: p["loss"](attention.attend(q, k, v, p["seg"], p["seg"], p["scale"], causal=True, impl=impl))
    grads = jax.jit(jax.grad(fn, (0, 1, 2)))(p["q"], p["k"], p["v"])
    for got, want in zip(grads, p["ref_grads"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_vit_frames_match_reference(impl):
    """ViT per-frame non-causal attention through vision.frame_attention: frames of different sizes packed
    into shared rows (-1 in empty slots) and padding rows (segment 0) in no frame, which get zeros."""
    segment = np.repeat([1, 2, 3, 0], [12, 7, 5, 4]).astype(np.int32)
    n_rows, heads, hd = len(segment), 2, 8
    layout = vision.frame_layout(segment, frame_slots(segment, frames=3, frame_len=16))
    q, k, v = (_normal(n_rows, heads, hd) for _ in range(3))
    out = jax.jit(lambda q, k, v: vision.frame_attention(q, k, v, layout, 0.3, block=8, impl=impl))(q, k, v)
    mask = (segment[:, None] == segment[None, :]) & (segment[None, :] > 0)
    ref = dot_product_attention(q[None], k[None], v[None], jnp.asarray(mask)[None], 0.3)[0]
    real = segment > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)
    assert (np.asarray(out)[~real] == 0).all()


def test_noncausal_minus_one_and_zero_segments_match_reference():
    """attend directly with ViT-style segment ids (-1 empty slots, 0 padding) in a batch of frame rows, MHA."""
    seg = np.stack([np.repeat([1, 2, 0], [12, 11, 6]), np.repeat([-1, 3, 4], [3, 16, 10])]).astype(np.int32)
    q, k, v = (_normal(2, 29, 4, 8) for _ in range(3))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    ref = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask), 0.3))
    real = seg > 0
    for impl in ("einsum", "xla_sdpa"):
        out = np.asarray(attention.attend(q, k, v, seg, seg, 0.3, causal=False, impl=impl))
        np.testing.assert_allclose(out[real], ref[real], rtol=1e-5, atol=1e-6, err_msg=impl)


def test_auto_picks_by_backend():
    q16, k16 = jnp.zeros((1, 8, 4, 64), jnp.bfloat16), jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert jax.default_backend() == "cpu"
    assert attention.resolve("auto") == "einsum"
    assert attention.resolve("auto", q16, k16) == "einsum"
    assert attention.resolve("auto", backend="tpu") == "splash"
    assert attention.resolve("auto", jnp.zeros((1, 8, 4, 128)), None, backend="tpu") == "splash"
    assert attention.resolve("auto", q16, k16, backend="tpu") == "einsum"      # head dim 64: not lane aligned
    assert attention.resolve("auto", q16, k16, backend="gpu") == "cudnn"
    assert attention.resolve("auto", q16.astype(jnp.float32), k16, backend="gpu") == "einsum"   # fp32: no cuDNN
    assert attention.resolve("xla") == "einsum"             # the config field's old name
    assert attention.resolve("splash", backend="cpu") == "splash"


def test_auto_follows_the_active_mesh_platform(monkeypatch):
    """An AOT compile for a TPU topology runs on a CPU host: "auto" must pick by the mesh's devices."""
    tpu_mesh = types.SimpleNamespace(abstract_device=types.SimpleNamespace(platform="tpu"))
    monkeypatch.setattr(attention, "_active_mesh", lambda: (tpu_mesh, None))
    assert attention.resolve("auto", jnp.zeros((1, 8, 4, 128)), None) == "splash"
    monkeypatch.setattr(attention, "_active_mesh", lambda: (None, None))
    assert attention.resolve("auto", jnp.zeros((1, 8, 4, 128)), None) == "einsum"


def test_unknown_impl_raises():
    q = jnp.zeros((1, 4, 2, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention.attend(q, q, q, seg, seg, 1.0, causal=True, impl="flash")
    with pytest.raises(ConfigError, match="unknown attention implementation 'flash'"):
        tiny().replace(attention="flash").validate()
    assert set(ATTENTION_IMPLS) == set(attention.ACCEPTED)
    for impl in attention.ACCEPTED:
        tiny().replace(attention=impl).validate()
    assert tiny().attention == "auto"


def test_config_remat_names_mirror_the_policy_table():
    assert set(REMAT_NAMES) == {"none"} | set(layers.REMAT_POLICIES)
    with pytest.raises(ConfigError, match="unknown remat policy 'ful'"):
        tiny().replace(remat="ful").validate()


def test_bad_shapes_raise():
    q, k = jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        attention.attend(q, k, k, seg, seg, 1.0, causal=True, impl="einsum")
    with pytest.raises(ValueError, match="segment ids"):
        attention.attend(k, k, k, seg[:, :3], seg, 1.0, causal=True, impl="einsum")


def test_cudnn_restrictions_are_named():
    q, k = jnp.zeros((1, 8, 4, 64), jnp.float32), jnp.zeros((1, 8, 2, 64), jnp.float32)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="cuDNN needs an NVIDIA GPU backend.*bfloat16 or float16"):
        attention.attend(q, k, k, seg, seg, 1.0, causal=True, impl="cudnn")
    bf = lambda shape: jnp.zeros(shape, jnp.bfloat16)
    assert attention.cudnn_problems(bf((1, 8, 4, 64)), bf((1, 8, 2, 64)), backend="gpu") == []
    (problem,) = attention.cudnn_problems(bf((1, 8, 4, 12)), bf((1, 8, 2, 12)), backend="gpu")
    assert "multiple of 8" in problem and "got 12" in problem
    (problem,) = attention.cudnn_problems(bf((1, 8, 4, 192)), bf((1, 8, 2, 192)), backend="gpu",
                                          compute_capability="8.0")
    assert "at most 128" in problem
    assert attention.cudnn_problems(bf((1, 8, 4, 192)), bf((1, 8, 2, 192)), backend="gpu",
                                    compute_capability="9.0") == []
    (problem,) = attention.cudnn_problems(bf((1, 7, 4, 64)), bf((1, 7, 2, 64)), backend="gpu")
    assert "even" in problem


def test_splash_under_a_mesh_runs_per_device_and_matches_reference():
    """Under a (data 2, fsdp 2, tensor 2) activation mesh splash runs inside shard_map (batch over data+fsdp,
    q and kv heads over tensor, GQA groups whole) with the reference's values."""
    b, t, n, k, h = 4, 20, 4, 2, 8
    q, kk, v = _normal(b, t, n, h), _normal(b, t, k, h), _normal(b, t, k, h)
    seg = np.ones((b, t), np.int32)
    seg[0, 15:] = 0
    seg[1, :7] = 2
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    ref = np.asarray(dot_product_attention(q, kk, v, causal_segment_mask(index, index, seg, seg), h ** -0.5))
    with activation_sharding(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        run = jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, seg, h ** -0.5, causal=True, impl="splash"))
        assert "manual_computation" in run.lower(q, kk, v).as_text()
        out = np.asarray(run(q, kk, v))
    np.testing.assert_allclose(out[seg > 0], ref[seg > 0], rtol=1e-5, atol=1e-6)


def _sequence_mesh():
    return make_mesh({"sequence": 4, "fsdp": 2})


def test_sequence_mesh_hands_causal_attention_to_context_parallel(monkeypatch, packed):
    """Under an activation-sharding mesh with sequence > 1, causal attend calls
    models.context_parallel.context_parallel_attention (whatever impl says); non-causal and mesh-less calls do not."""
    calls = []

    def spy(q, k, v, q_segment, kv_segment, scale, *, causal):
        calls.append((q.shape, k.shape, np.asarray(q_segment).shape, scale, causal))
        return jnp.full_like(q, 7.0)

    module = sys.modules.get("glmv_jax.models.context_parallel")
    if module is None:
        try:
            import glmv_jax.models.context_parallel as module
        except ImportError:
            module = types.ModuleType("glmv_jax.models.context_parallel")
            monkeypatch.setitem(sys.modules, "glmv_jax.models.context_parallel", module)
    monkeypatch.setattr(module, "context_parallel_attention", spy, raising=False)
    p = packed
    args = (p["q"], p["k"], p["v"], p["seg"], p["seg"], p["scale"])
    with activation_sharding(_sequence_mesh()):
        out = attention.attend(*args, causal=True, impl="xla_sdpa")
        assert attention.sequence_parallel_size() == 4
        attention.attend(*args, causal=False, impl="einsum")
    attention.attend(*args, causal=True, impl="einsum")
    assert (np.asarray(out) == 7.0).all()
    assert calls == [(p["q"].shape, p["k"].shape, p["seg"].shape, p["scale"], True)]


def test_context_parallel_through_attend_matches_reference(packed):
    """With the real glmv_jax.models.context_parallel (when present): attend under a sequence-4 mesh equals the
    single-device reference on real rows. T must divide by the sequence axis, so the case is cut to 36."""
    pytest.importorskip("glmv_jax.models.context_parallel")
    p = packed
    t = 36
    seg = p["seg"][:, :t]
    q, k, v = p["q"][:, :t], p["k"][:, :t], p["v"][:, :t]
    index = jnp.broadcast_to(jnp.arange(t), seg.shape)
    ref = np.asarray(dot_product_attention(q, k, v, causal_segment_mask(index, index, seg, seg), p["scale"]))
    with activation_sharding(_sequence_mesh()):
        out = np.asarray(jax.jit(lambda q, k, v: attention.attend(q, k, v, seg, seg, p["scale"], causal=True))(q, k, v))
    np.testing.assert_allclose(out[seg > 0], ref[seg > 0], rtol=1e-5, atol=1e-6)


def test_whole_model_logits_equal_einsum(config, params):
    """ModelConfig.attention reaches the ViT and the decoder: the tiny VLM on a padded multimodal batch gives
    the einsum path's logits on valid positions with splash (the kernel furthest from the reference; the
    einsum path itself is checked against HF in test_glmv_parity)."""
    impl = "splash"
    model = nnx.merge(*glmv.model_graph(config.replace(attention=impl)))
    assert model.text.layers.attn.impl == impl and model.vision.blocks.attn.impl == impl
    assert nnx.merge(*glmv.model_graph(config.replace(attention="xla"))).text.layers.attn.impl == "einsum"
    spans = [[("image", (1, 4, 6))], [("image", (1, 6, 6)), ("image", (1, 2, 4))]]
    batch = pad_prompts([multimodal_inputs(config, s, seed=i, text_len=2 + 2 * i) for i, s in enumerate(spans)],
                        "right")
    valid = batch["attention_mask"].astype(bool)
    ref = np.asarray(glmv.forward(config.replace(attention="einsum"), params, **batch))
    out = np.asarray(glmv.forward(config.replace(attention=impl), params, **batch))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-4, atol=1e-4 * np.abs(ref).max())
