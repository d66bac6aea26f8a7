"""Block-wise FP8 checkpoints (GLM-4.5V-FP8 / GLM-4.6V-FP8 format): the quantise / dequantise helpers, a
round trip through load_pretrained on tiny models, and the errors for missing or mis-shaped scales.

Error bound of one e4m3 element x in a block with scale s (x/s lies in [-448, 448]): with 3 mantissa bits
round-to-nearest is off by at most 2^-4 of |x| in the normal range (|x/s| >= 2^-6), and by at most half the
subnormal step 2^-9, i.e. 2^-10 * s, below it. So |x - dequant(x)| <= 2^-4 |x| + 2^-10 s (+ fp32 rounding).
"""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from glmv_jax.convert.fp8 import FP8, dequantize_fp8_blockwise, quantize_fp8_blockwise, scale_shape
from glmv_jax.convert.hf import (ConversionError, flatten, load_pretrained, params_to_hf_state_dict, save_pretrained,
                                 unflatten)

BLOCK = (16, 24)        # small and not dividing every tiny dimension (64 = 2*24 + 16): partial edge blocks
BF16 = np.dtype(ml_dtypes.bfloat16)
Q1 = "model.language_model.layers.1.self_attn.q_proj.weight"


def _bound(x: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """Per-element e4m3 error bound (module docstring), with fp32 rounding slack."""
    s = np.repeat(np.repeat(scale_inv, block[0], axis=-2), block[1], axis=-1)[..., :x.shape[-2], :x.shape[-1]]
    return (2.0 ** -4 + 2.0 ** -20) * np.abs(x) + 2.0 ** -10 * s


def test_dequantize_multiplies_each_block_by_its_scale():
    rng = np.random.default_rng(0)
    q = rng.uniform(-448, 448, (2, 40, 70)).astype(np.float32).astype(FP8)
    scale = rng.uniform(0.5, 2, scale_shape(q.shape, BLOCK)).astype(np.float32)
    assert scale.shape == (2, 3, 3)
    want = np.empty(q.shape, np.float32)
    for e, i, j in np.ndindex(*q.shape):
        want[e, i, j] = float(q[e, i, j]) * scale[e, i // BLOCK[0], j // BLOCK[1]]
    np.testing.assert_array_equal(dequantize_fp8_blockwise(q, scale, BLOCK), want)
    bf16 = dequantize_fp8_blockwise(q, scale, BLOCK, BF16)
    assert bf16.dtype == BF16
    np.testing.assert_array_equal(bf16, want.astype(BF16))
    for r0, r1, c0, c1 in ((5, 38, 30, 31), (16, 32, 0, 70), (17, 18, 47, 70)):   # boxes starting mid-block
        sub = scale[:, r0 // BLOCK[0]:-(-r1 // BLOCK[0]), c0 // BLOCK[1]:-(-c1 // BLOCK[1])]
        box = dequantize_fp8_blockwise(q[:, r0:r1, c0:c1], sub, BLOCK, origin=(r0 % BLOCK[0], c0 % BLOCK[1]))
        np.testing.assert_array_equal(box, want[:, r0:r1, c0:c1])


def test_quantize_within_the_e4m3_bound():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50, 70)).astype(np.float32) * np.exp(rng.uniform(-6, 6, (3, 50, 1))).astype(np.float32)
    x[0, :BLOCK[0], :BLOCK[1]] = 0                                       # an all-zero block
    q, scale = quantize_fp8_blockwise(x, BLOCK)
    assert q.dtype == FP8 and q.shape == x.shape
    assert scale.dtype == np.float32 and scale.shape == scale_shape(x.shape, BLOCK) == (3, 4, 3)
    assert scale[0, 0, 0] == 1 and not np.any(np.isnan(q.astype(np.float32)))
    back = dequantize_fp8_blockwise(q, scale, BLOCK)
    err = np.abs(back - x)
    assert np.all(err <= _bound(x, scale, BLOCK))
    assert err.max() > 0                                                 # really quantised
    blocks = np.abs(q.astype(np.float32))[1, :48, :48].reshape(3, 16, 2, 24)
    np.testing.assert_array_equal(blocks.max(axis=(1, 3)), 448)          # each block's max |x| maps to 448


# ----------------------------------------------------------------------------------------------
# Checkpoints

def _load(file) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays, fp8 included (safetensors' numpy backend has no float8)."""
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: t.view(torch.uint8).numpy().view(FP8) if t.dtype == torch.float8_e4m3fn else t.numpy()
            for k, t in tensors.items()}


def _quantise(key: str, array: np.ndarray) -> bool:
    """The tensors the released FP8 checkpoints quantise: decoder linear weights (not norms, embeddings,
    router gates, lm_head or the vision tower)."""
    return (key.startswith("model.language_model.layers.") and array.ndim >= 2 and ".mlp.gate." not in key
            and "layernorm" not in key)


def _to_fp8(src, dst, block=BLOCK) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Copies checkpoint `src` to `dst` with the chosen weights as fp8 + weight_scale_inv in their shard and
    quantization_config in config.json. Returns key -> (fp8, scale_inv) of what it quantised."""
    shutil.copytree(src, dst)
    quantised, index_file = {}, dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard in sorted(dst.glob("model*.safetensors")):
        tensors = _load(shard)
        for key in [k for k in tensors if _quantise(k, tensors[k])]:
            q, scale = quantised[key] = quantize_fp8_blockwise(tensors[key], block)
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            if index is not None:
                index["weight_map"][key + "_scale_inv"] = shard.name
        save_file(tensors, str(shard), metadata={"format": "pt"})
    if index is not None:
        index_file.write_text(json.dumps(index))
    hf = json.loads((dst / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": list(block),
                                 "modules_to_not_convert": ["lm_head", "model.visual", "mlp.gate"]}
    (dst / "config.json").write_text(json.dumps(hf))
    return quantised


@pytest.fixture(scope="module")
def fp8_checkpoint(hf_checkpoint, tmp_path_factory):
    """name -> (config, original HF state on disk, fp8 checkpoint dir, quantised tensors); sharded saves."""
    cache = {}

    def get(name):
        if name not in cache:
            config, _, path = hf_checkpoint(name)
            _, params = load_pretrained(path)
            root = tmp_path_factory.mktemp(f"fp8_{name}")
            save_pretrained(config, params, root / "orig", max_shard_size="30KB")
            quantised = _to_fp8(root / "orig", root / "fp8")
            cache[name] = (config, params_to_hf_state_dict(config, params), root / "fp8", quantised)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["glm4v", "glm4v_moe", "glm46v_moe"])     # glm46v: fused 3-D experts
def test_fp8_checkpoint_round_trip(fp8_checkpoint, name):
    config, orig, path, quantised = fp8_checkpoint(name)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    assert any(q.ndim == 3 for q, _ in quantised.values()) == (name == "glm46v_moe")
    loaded_config, params = load_pretrained(path)
    assert loaded_config == config
    back = params_to_hf_state_dict(config, params)
    for key, x in orig.items():
        if key not in quantised:
            np.testing.assert_array_equal(back[key], x, err_msg=key)
            continue
        q, scale = quantised[key]
        np.testing.assert_array_equal(back[key], dequantize_fp8_blockwise(q, scale, BLOCK), err_msg=key)
        err = np.abs(back[key] - x)
        assert np.all(err <= _bound(x, scale, BLOCK)), (key, float(err.max()))
        assert err.max() > 0, key


def test_fp8_loads_in_the_requested_dtype(fp8_checkpoint):
    config, _, path, quantised = fp8_checkpoint("glm4v_moe")
    _, fp32 = load_pretrained(path)
    _, bf16 = load_pretrained(path, dtype="bfloat16")
    for p, a in flatten(bf16).items():
        want = np.float32 if p.endswith(("router/kernel", "router/correction_bias")) else BF16
        assert a.dtype == want, p
        np.testing.assert_array_equal(a, flatten(fp32)[p].astype(want), err_msg=p)   # fp32 dequant, one rounding
    _, kept = load_pretrained(path, dtype=None)       # the checkpoint's dtypes: fp8 weights dequantise to fp32
    assert all(a.dtype == np.float32 for a in flatten(kept).values())


@pytest.fixture
def fp8_single(hf_checkpoint, tmp_path):
    """A writable single-file fp8 copy of the tiny MoE checkpoint."""
    _, _, path = hf_checkpoint("glm4v_moe")
    _to_fp8(path, tmp_path / "fp8")
    return tmp_path / "fp8"


def _edit(path, edit):
    tensors = _load(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_fp8_weight_without_its_scale(fp8_single):
    _edit(fp8_single, lambda t: t.pop(Q1 + "_scale_inv"))
    with pytest.raises(ConversionError, match=rf"1 fp8 weights .*: {Q1}: float8 tensor without its scale {Q1}_scale_inv"):
        load_pretrained(fp8_single)


def test_fp8_scale_of_the_wrong_shape(fp8_single):
    _edit(fp8_single, lambda t: t.update({Q1 + "_scale_inv": np.ones((4, 4), np.float32)}))
    with pytest.raises(ConversionError, match=rf"{Q1}_scale_inv: expected shape \(4, 3\) \(16x24 blocks of {Q1} "
                                              r"\(64, 64\)\), found \(4, 4\)"):
        load_pretrained(fp8_single)


def test_fp8_without_quantization_config(fp8_single):
    hf = json.loads((fp8_single / "config.json").read_text())
    del hf["quantization_config"]
    (fp8_single / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConversionError, match="float8 tensors .* but config.json has no quantization_config"):
        load_pretrained(fp8_single)


def test_unsupported_quantization_config(fp8_single):
    hf = json.loads((fp8_single / "config.json").read_text())
    hf["quantization_config"]["weight_block_size"] = None
    (fp8_single / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConversionError, match="weight_block_size None must be two positive ints"):
        load_pretrained(fp8_single)


def test_scale_of_an_unquantised_weight_is_unexpected(fp8_single):
    key = "lm_head.weight_scale_inv"
    _edit(fp8_single, lambda t: t.update({key: np.ones((16, 3), np.float32)}))
    with pytest.raises(ConversionError, match=rf"1 unexpected keys: {key}"):
        load_pretrained(fp8_single)


@pytest.mark.parametrize("name", ["glm4v_moe", "glm46v_moe"])
def test_fp8_sharded_load_equals_host_load(fp8_checkpoint, name):
    """Shard boxes cut the 16 x 24 blocks mid-block (64 = 8 x 8 rows): each box takes its blocks' scales."""
    config, _, path, quantised = fp8_checkpoint(name)
    _, host = load_pretrained(path, dtype="bfloat16")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    flat_host = flatten(host)
    shardings = {p: NamedSharding(mesh, P(*([None] * (a.ndim - 2)), "b", "a")) for p, a in flat_host.items()
                 if a.ndim >= 2 and a.shape[-2] % 4 == 0 and a.shape[-1] % 2 == 0}
    stats = {}
    _, placed = load_pretrained(path, dtype="bfloat16", shardings=unflatten(shardings), stats=stats)
    for p, a in flatten(placed).items():
        assert (p in shardings) == isinstance(a, jax.Array), p
        np.testing.assert_array_equal(np.asarray(a), flat_host[p], err_msg=p)
    assert any(p.endswith("attn/q/kernel") for p in shardings) and len(quantised) > 10
