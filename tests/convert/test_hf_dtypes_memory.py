"""bf16 checkpoints, placement onto shardings, and the memory bound of streaming load / save."""
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from glmv_jax.config import ModelConfig, TextConfig, VisionConfig
from glmv_jax.convert.hf import (flatten, hf_state_dict_to_params, load_pretrained, params_to_hf_state_dict,
                                 save_pretrained, unflatten)
from glmv_jax.convert.mapping import param_specs
from tests.hf_oracle import hf_classes

BF16 = np.dtype(ml_dtypes.bfloat16)
ROUTER = ("moe/router/kernel", "moe/router/correction_bias")


@pytest.fixture(scope="module")
def bf16_checkpoint(hf_checkpoint, tmp_path_factory):
    """HF's own bf16 save of the tiny MoE model (router weight and correction bias stay fp32 on disk)."""
    config, _, path = hf_checkpoint("glm4v_moe")
    _, model_cls = hf_classes(config.model_type)
    model = model_cls.from_pretrained(str(path), dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(str(out))
    return config, model, out


def test_bf16_checkpoint_loads(bf16_checkpoint):
    config, model, path = bf16_checkpoint
    disk = load_file(str(path / "model.safetensors"))
    assert disk["lm_head.weight"].dtype == BF16
    assert disk["model.language_model.layers.1.mlp.gate.weight"].dtype == np.float32

    _, params = load_pretrained(path)                         # default: everything fp32
    assert all(a.dtype == np.float32 for a in flatten(params).values())
    np.testing.assert_array_equal(params["lm_head"]["kernel"], model.lm_head.weight.detach().float().numpy().T)
    back = params_to_hf_state_dict(config, params, dtype="bfloat16")   # exact: bf16 -> fp32 -> bf16
    assert sorted(back) == sorted(disk)
    for k, a in disk.items():
        assert back[k].dtype == a.dtype, k
        np.testing.assert_array_equal(back[k], a, err_msg=k)

    from_memory = flatten(hf_state_dict_to_params(model.state_dict(), config))   # bf16 torch tensors, fused experts
    for p, a in flatten(params).items():
        np.testing.assert_array_equal(from_memory[p], a, err_msg=p)

    _, kept = load_pretrained(path, dtype=None)               # keep the checkpoint's dtypes
    for p, a in flatten(kept).items():
        assert a.dtype == (np.float32 if p.endswith(ROUTER) else BF16), p


def test_bf16_save_loads_in_transformers_identically(bf16_checkpoint, tmp_path):
    config, model, path = bf16_checkpoint
    _, model_cls = hf_classes(config.model_type)
    _, fp32_params = load_pretrained(path)
    _, bf16_params = load_pretrained(path, dtype=None)
    for out, params, dtype in ((tmp_path / "cast", fp32_params, "bfloat16"), (tmp_path / "kept", bf16_params, None)):
        save_pretrained(config, params, out, dtype=dtype)
        reloaded = model_cls.from_pretrained(str(out), dtype="auto")
        want, got = model.state_dict(), reloaded.state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            assert torch.equal(got[k], want[k]), k


def test_load_onto_shardings_and_save_from_jax_arrays(hf_checkpoint, tmp_path):
    config, _, path = hf_checkpoint("glm4v_moe")
    _, host = load_pretrained(path)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    by_vocab, by_expert = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P(None, "model", None, None))
    shardings = {"lm_head": {"kernel": by_vocab}, "text": {"moe_layers": {"moe": {"experts": {"gate": by_expert}}}}}
    _, placed = load_pretrained(path, shardings=shardings)
    for leaf, sharding in ((placed["lm_head"]["kernel"], by_vocab),
                           (placed["text"]["moe_layers"]["moe"]["experts"]["gate"], by_expert)):
        assert isinstance(leaf, jax.Array) and leaf.sharding == sharding
        assert len(leaf.addressable_shards) == 8
    for p, a in flatten(placed).items():
        np.testing.assert_array_equal(np.asarray(a), flatten(host)[p], err_msg=p)
    assert isinstance(placed["text"]["embed"]["embedding"], np.ndarray)    # no sharding given: host numpy
    save_pretrained(config, jax.tree.map(jax.numpy.asarray, placed), tmp_path)   # sharded jax arrays gather per slice
    for k, a in load_file(str(path / "model.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(tmp_path / "model.safetensors"))[k], a, err_msg=k)


def _medium_config() -> ModelConfig:
    """~250 MB of fp32 parameters, mostly embeddings and stacked experts."""
    vision = VisionConfig(depth=2, hidden_size=256, num_heads=4, out_hidden_size=512, intermediate_size=1024)
    text = TextConfig(vocab_size=16000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(4, 6, 6), moe=True,
                      moe_intermediate_size=256, n_routed_experts=32, num_experts_per_tok=4, first_k_dense_replace=1,
                      pad_token_id=0, eos_token_id=(1,))
    return ModelConfig(model_type="glm4v_moe", vision=vision, text=text, image_token_id=100, video_token_id=101,
                       image_start_token_id=102, image_end_token_id=103, video_start_token_id=104,
                       video_end_token_id=105).validate()


def test_streaming_load_and_save_hold_no_second_copy(tmp_path):
    config = _medium_config()
    rng = np.random.default_rng(0)
    flat = {p: rng.standard_normal(s.shape, np.float32) for p, s in param_specs(config).items()}
    params = unflatten(flat)
    model_bytes = sum(a.nbytes for a in flat.values())
    largest = max(a.nbytes for a in flat.values())
    assert model_bytes > 200e6

    tracemalloc.start()
    try:
        save_pretrained(config, params, tmp_path, max_shard_size="64MB")
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        _, loaded = load_pretrained(tmp_path)
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    load_extra = load_peak - base
    print(f"\nmodel {model_bytes / 1e6:.0f} MB (largest tensor {largest / 1e6:.0f} MB): "
          f"save peak {save_peak / 1e6:.0f} MB, load peak {load_extra / 1e6:.0f} MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    assert save_peak < 0.5 * model_bytes        # tensor by tensor: never a whole shard or model buffered
    assert load_extra < 1.5 * model_bytes       # the loaded model once, plus a tensor or two in flight
    for p, a in flatten(loaded).items():
        np.testing.assert_array_equal(a, flat[p], err_msg=p)
