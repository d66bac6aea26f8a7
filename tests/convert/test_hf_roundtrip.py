"""HF save_pretrained -> load_pretrained -> save_pretrained -> HF from_pretrained, for dense and MoE glm4v / glm46v.

Three independent checks of the loaded tree: every tensor through the key table (plumbing: each slice lands
in its stacked leaf), every transform against the HF module that uses the weight (semantics: module(x) equals
x @ kernel), and the in-memory fused HF state_dict converting to the same tree as the per-expert files.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from glmv_jax.config import ConfigError, from_hf_config, glm41v_9b, tiny, to_hf_config
from glmv_jax.convert.hf import (flatten, hf_state_dict_to_params, load_pretrained, params_to_hf_state_dict,
                                 save_pretrained)
from glmv_jax.convert.mapping import key_table, param_specs
from tests.hf_oracle import hf_classes

NAMES = ["glm4v", "glm4v_moe", "glm46v_dense", "glm46v_moe", "glm4v_moe_k2_nobias"]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    cache = {}

    def get(name):
        if name not in cache:
            config, model, path = hf_checkpoint(name)
            cache[name] = (config, model, path, *load_pretrained(path))
        return cache[name]
    return get


def _disk(path):
    return load_file(str(path / "model.safetensors"))


def _hf_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_config_and_tree_shapes(loaded, name):
    config, _, path, loaded_config, params = loaded(name)
    assert loaded_config == config
    flat = flatten(params)
    specs = param_specs(config)
    assert sorted(flat) == sorted(specs)
    for p, spec in specs.items():
        assert flat[p].shape == spec.shape, p
        assert flat[p].dtype == np.float32, p
    assert ("text/moe_layers/moe/experts/gate" in flat) == config.text.moe
    assert ("text/layers/attn_out_norm/scale" in flat) == (not config.text.moe)


def _flat(hf):
    """The July-2025 GLM-4.1V layout: text_config's fields at the top level (its model_type dropped)."""
    text = {k: v for k, v in hf["text_config"].items() if k != "model_type"}
    return {**text, **{k: v for k, v in hf.items() if k != "text_config"}}


# GLM-4.1V-9B-Thinking's config.json as released in July 2025 (as transformers 4.53 printed it): text fields
# flat, legacy rope keys, vision_config nested.
JULY_2025_GLM41V = {
    "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "attention_bias": True,
    "attention_dropout": 0.0, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338, 151348],
    "image_start_token_id": 151339, "image_end_token_id": 151340, "video_start_token_id": 151341,
    "video_end_token_id": 151342, "image_token_id": 151343, "video_token_id": 151344, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 65536,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 151552, "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
    "vision_config": {"hidden_size": 1536, "depth": 24, "num_heads": 12, "attention_bias": False,
                      "intermediate_size": 13696, "hidden_act": "silu", "image_size": 336, "patch_size": 14,
                      "out_hidden_size": 4096, "rms_norm_eps": 1e-05, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
}


@pytest.mark.parametrize("config", [glm41v_9b(), tiny(), tiny(moe=True)], ids=["glm41v_9b", "tiny", "tiny_moe"])
def test_flat_config_equals_the_nested_one(config):
    assert from_hf_config(_flat(to_hf_config(config))) == config


def test_july_2025_flat_glm41v_config():
    assert from_hf_config(JULY_2025_GLM41V) == glm41v_9b()
    no_partial = {k: v for k, v in JULY_2025_GLM41V.items() if k != "partial_rotary_factor"}
    with pytest.raises(ConfigError, match="no partial_rotary_factor"):   # as HF: no silent full-width rotary
        from_hf_config(no_partial)


def test_flat_config_checkpoint_loads(loaded, tmp_path):
    config, _, path, _, params = loaded("glm4v")
    shutil.copytree(path, tmp_path / "flat")
    hf = json.loads((path / "config.json").read_text())
    (tmp_path / "flat" / "config.json").write_text(json.dumps(_flat(hf)))
    flat_config, flat_params = load_pretrained(tmp_path / "flat")
    assert flat_config == config
    for p, a in flatten(params).items():
        np.testing.assert_array_equal(flatten(flat_params)[p], a, err_msg=p)


@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_through_the_table(loaded, name):
    config, _, path, _, params = loaded(name)
    disk, flat = _disk(path), flatten(params)
    layout = "fused" if any(k.endswith("experts.gate_up_proj") for k in disk) else "per_expert"
    table = key_table(config, layout)
    assert sorted(e.key for e in table) == sorted(disk)
    written = {p: 0 for p in flat}
    for entry in table:
        for target, part in zip(entry.targets, entry.to_params(disk[entry.key])):
            np.testing.assert_array_equal(flat[target.path][target.index], part, err_msg=entry.key)
            written[target.path] += part.size
    assert written == {p: a.size for p, a in flat.items()}       # every element written exactly once


@pytest.mark.parametrize("name", NAMES)
def test_in_memory_fused_state_dict_gives_the_same_tree(loaded, name):
    config, model, _, _, params = loaded(name)
    from_memory = flatten(hf_state_dict_to_params(model.state_dict(), config))
    for p, a in flatten(params).items():
        np.testing.assert_array_equal(from_memory[p], a, err_msg=p)


def _lin(x, kernel, n_in=1):
    """x @ kernel with the kernel's first n_in axes as input and the rest flattened as output."""
    k = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1)
    return x.reshape(x.shape[0], -1) @ k


def _swiglu(x, g, u, d):
    a = x @ g
    return (a / (1 + np.exp(-a)) * (x @ u)) @ d


def _close(torch_out, ours, what):
    np.testing.assert_allclose(torch_out.detach().numpy(), ours, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_transforms_match_hf_modules(loaded, name):
    """Each weight used the way the model uses it: HF module(x) == x @ kernel (+ bias)."""
    config, model, _, _, params = loaded(name)
    v, t = config.vision, config.text
    rng = np.random.default_rng(0)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    vis, P = model.model.visual, params["vision"]
    with torch.no_grad():
        x = rng.standard_normal((5, v.patch_dim)).astype(np.float32)
        _close(vis.patch_embed(torch.from_numpy(x)), f64(x) @ P["patch_embed"]["kernel"] + P["patch_embed"]["bias"],
               "conv3d patch embed")
        blocks = P["blocks"]
        for l, block in enumerate(vis.blocks):
            x = rng.standard_normal((5, v.hidden_size)).astype(np.float32)
            _close(block.attn.qkv(torch.from_numpy(x)), _lin(f64(x), blocks["attn"]["qkv"]["kernel"][l]), "qkv")
            y = rng.standard_normal((5, v.num_heads, v.head_dim)).astype(np.float32)
            _close(block.attn.proj(torch.from_numpy(y.reshape(5, -1))), _lin(f64(y), blocks["attn"]["out"]["kernel"][l], 2),
                   "attn proj")
            mlp = {k: blocks["mlp"][k]["kernel"][l] for k in ("gate", "up", "down")}
            _close(block.mlp(torch.from_numpy(x)), _swiglu(f64(x), mlp["gate"], mlp["up"], mlp["down"]), "vision mlp")
            np.testing.assert_array_equal(blocks["norm1"]["scale"][l], block.norm1.weight.numpy())
        grid = rng.standard_normal((3, v.hidden_size, 2, 2)).astype(np.float32)
        tokens = grid.transpose(0, 2, 3, 1).reshape(3, 4 * v.hidden_size)   # the 2x2 block's tokens, row-major
        _close(vis.downsample(torch.from_numpy(grid)).reshape(3, -1),
               f64(tokens) @ P["downsample"]["kernel"] + P["downsample"]["bias"], "conv2d downsample")
        x = rng.standard_normal((4, v.out_hidden_size)).astype(np.float32)
        m = P["merger"]
        _close(vis.merger.proj(torch.from_numpy(x)), f64(x) @ m["proj"]["kernel"], "merger proj")
        _close(vis.merger.down_proj(vis.merger.act_fn(vis.merger.gate_proj(torch.from_numpy(x))) *
                                    vis.merger.up_proj(torch.from_numpy(x))),
               _swiglu(f64(x), m["gate"]["kernel"], m["up"]["kernel"], m["down"]["kernel"]), "merger swiglu")
        np.testing.assert_array_equal(m["norm"]["bias"], vis.merger.post_projection_norm.bias.numpy())

        lm = model.model.language_model
        T = params["text"]
        ids = rng.integers(0, t.vocab_size, 6)
        _close(lm.embed_tokens(torch.from_numpy(ids)), T["embed"]["embedding"][ids], "embedding")
        x = rng.standard_normal((6, t.hidden_size)).astype(np.float32)
        _close(model.lm_head(torch.from_numpy(x)), f64(x) @ params["lm_head"]["kernel"], "lm_head")
        for l_hf, layer in enumerate(lm.layers):
            stack, i = ("layers", l_hf) if l_hf < t.num_dense_layers else ("moe_layers", l_hf - t.num_dense_layers)
            S, xt = T[stack], torch.from_numpy(x)
            for proj in ("q", "k", "v"):
                out = _lin(f64(x), S["attn"][proj]["kernel"][i])
                assert ("bias" in S["attn"][proj]) == t.attention_bias
                out = out + S["attn"][proj]["bias"][i].reshape(-1) if t.attention_bias else out
                _close(getattr(layer.self_attn, f"{proj}_proj")(xt), out, f"text {proj} layer {l_hf}")
            y = rng.standard_normal((6, t.num_attention_heads, t.dim_per_head)).astype(np.float32)
            _close(layer.self_attn.o_proj(torch.from_numpy(y.reshape(6, -1))), _lin(f64(y), S["attn"]["o"]["kernel"][i], 2),
                   "o_proj")
            np.testing.assert_array_equal(S["mlp_norm"]["scale"][i], layer.post_attention_layernorm.weight.numpy())
            if stack == "layers":
                mlp = {k: S["mlp"][k]["kernel"][i] for k in ("gate", "up", "down")}
                _close(layer.mlp(xt), _swiglu(f64(x), mlp["gate"], mlp["up"], mlp["down"]), f"dense mlp layer {l_hf}")
                if not t.moe:
                    np.testing.assert_array_equal(S["mlp_out_norm"]["scale"][i], layer.post_mlp_layernorm.weight.numpy())
                continue
            moe = S["moe"]
            _close(xt @ layer.mlp.gate.weight.T, f64(x) @ moe["router"]["kernel"][i], "router")
            np.testing.assert_array_equal(moe["router"]["correction_bias"][i], layer.mlp.gate.e_score_correction_bias.numpy())
            for e in range(t.n_routed_experts):
                idx, w = torch.full((6, 1), e), torch.ones(6, 1)
                ex = moe["experts"]
                _close(layer.mlp.experts(xt, idx, w), _swiglu(f64(x), ex["gate"][i, e], ex["up"][i, e], ex["down"][i, e]),
                       f"expert {e} layer {l_hf}")
            sh = {k: moe["shared"][k]["kernel"][i] for k in ("gate", "up", "down")}
            _close(layer.mlp.shared_experts(xt), _swiglu(f64(x), sh["gate"], sh["up"], sh["down"]), "shared expert")


@pytest.mark.parametrize("name", NAMES)
def test_params_to_hf_state_dict_is_the_on_disk_form(loaded, name):
    config, _, path, _, params = loaded(name)
    disk, ours = _disk(path), params_to_hf_state_dict(config, params)
    assert sorted(ours) == sorted(disk)
    for k, a in disk.items():
        assert ours[k].dtype == a.dtype, k
        np.testing.assert_array_equal(ours[k], a, err_msg=k)


def _assert_hf_loads_identically(config, model, out):
    _, model_cls = hf_classes(config.model_type)
    reloaded, info = model_cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want, got = _hf_state(model), _hf_state(reloaded)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_loads_in_transformers(loaded, name, tmp_path):
    config, model, path, _, params = loaded(name)
    files = save_pretrained(config, params, tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    assert from_hf_config(json.loads((tmp_path / "config.json").read_text())) == config
    assert sorted(load_file(str(files[0]))) == sorted(_disk(path))     # the same keys HF itself writes
    _assert_hf_loads_identically(config, model, tmp_path)


@pytest.mark.parametrize("name", ["glm4v", "glm4v_moe"])
def test_sharded_save_loads_back_identically(loaded, name, tmp_path):
    config, model, _, _, params = loaded(name)
    save_pretrained(config, params, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    for shard in shards:                      # each shard within the limit unless one tensor exceeds it
        tensors = load_file(str(tmp_path / shard))
        assert sum(a.nbytes for a in tensors.values()) <= 20_000 or len(tensors) == 1, shard
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in params_to_hf_state_dict(config, params).values())
    reloaded_config, reloaded = load_pretrained(tmp_path)
    assert reloaded_config == config
    for p, a in flatten(params).items():
        np.testing.assert_array_equal(flatten(reloaded)[p], a, err_msg=p)
    _assert_hf_loads_identically(config, model, tmp_path)
    # a later single-file save into the same folder replaces the shards and the index
    save_pretrained(config, params, tmp_path)
    assert sorted(f.name for f in tmp_path.glob("model*")) == ["model.safetensors"]
