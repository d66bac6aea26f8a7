"""Bad checkpoints and bad trees raise ConversionError naming the key, file or leaf; MTP layers are skipped and counted."""
import json
import logging
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from glmv_jax.convert.hf import ConversionError, hf_state_dict_to_params, load_pretrained, save_pretrained
from glmv_jax.convert.hf import parse_size

Q1 = "model.language_model.layers.1.self_attn.q_proj.weight"
UP = "model.language_model.layers.2.mlp.experts.5.up_proj.weight"


@pytest.fixture
def moe_dir(hf_checkpoint, tmp_path):
    """A writable copy of the tiny glm4v_moe checkpoint (per-expert keys on disk)."""
    config, model, path = hf_checkpoint("glm4v_moe")
    shutil.copytree(path, tmp_path / "ckpt")
    return config, model, tmp_path / "ckpt"


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, edit):
    hf = json.loads((path / "config.json").read_text())
    edit(hf)
    (path / "config.json").write_text(json.dumps(hf))


def test_unknown_model_type(moe_dir):
    _, _, path = moe_dir
    _edit_config(path, lambda hf: hf.update(model_type="qwen2_vl"))
    with pytest.raises(ConversionError, match=r"config.json.*'qwen2_vl'"):
        load_pretrained(path)


def test_missing_and_invalid_config_json(moe_dir):
    _, _, path = moe_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(ConversionError, match=f"missing config.json in {path}"):
        load_pretrained(path)


def test_no_weights_file(moe_dir):
    _, _, path = moe_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(path)


def test_missing_shard_and_broken_index(moe_dir, tmp_path):
    config, _, path = moe_dir
    _, params = load_pretrained(path)
    out = tmp_path / "sharded"
    files = save_pretrained(config, params, out, max_shard_size="30KB")
    assert len(files) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files[1].unlink()
    with pytest.raises(ConversionError, match=files[1].name):
        load_pretrained(out)
    save_pretrained(config, params, out, max_shard_size="30KB")
    index["weight_map"]["model.visual.blocks.0.norm1.weight"] = files[-1].name     # the index lies
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"model.visual.blocks.0.norm1.weight \(in model-000"):
        load_pretrained(out)
    (out / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ConversionError, match="model.safetensors.index.json is not a valid safetensors index"):
        load_pretrained(out)


@pytest.mark.parametrize("cut", [0, 5, 100, -8])
def test_truncated_or_corrupt_file(moe_dir, cut):
    _, _, path = moe_dir
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut >= 0 else data[:cut] + b"\x00" * 3)
    with pytest.raises(ConversionError, match=r"model.safetensors: corrupt or truncated safetensors file"):
        load_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage_header", "empty"])
def test_corrupt_shard_names_the_file(moe_dir, tmp_path, damage):
    config, _, path = moe_dir
    _, params = load_pretrained(path)
    files = save_pretrained(config, params, tmp_path / "sharded", max_shard_size="30KB")
    shard = files[len(files) // 2]
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    shard.write_bytes({"truncate_data": data[:(header_end + len(data)) // 2], "truncate_header": data[:header_end - 10],
                       "garbage_header": data[:8] + b"\xff" * (header_end - 8) + data[header_end:],
                       "empty": b""}[damage])
    with pytest.raises(ConversionError, match=rf"{re.escape(str(shard))}: corrupt or truncated safetensors file"):
        load_pretrained(tmp_path / "sharded")


def test_wrong_shape_names_key_expected_and_found(moe_dir):
    _, _, path = moe_dir
    _edit_tensors(path, lambda t: t.update({Q1: t[Q1][:63]}))
    with pytest.raises(ConversionError, match=rf"{Q1}: expected shape \(64, 64\), found \(63, 64\)"):
        load_pretrained(path)


def test_missing_key(moe_dir):
    _, _, path = moe_dir
    _edit_tensors(path, lambda t: t.pop(UP))
    with pytest.raises(ConversionError, match=rf"1 missing keys: {UP}$"):
        load_pretrained(path)


def test_unexpected_key(moe_dir):
    _, _, path = moe_dir
    extra = "model.visual.blocks.0.attn.qkv.bias"
    _edit_tensors(path, lambda t: t.update({extra: np.zeros(96, np.float32)}))
    with pytest.raises(ConversionError, match=rf"1 unexpected keys: {extra}"):
        load_pretrained(path)


def test_attention_bias_only_where_the_config_has_it(moe_dir):
    _, _, path = moe_dir
    _edit_config(path, lambda hf: hf["text_config"].update(attention_bias=False))
    with pytest.raises(ConversionError, match=r"9 unexpected keys: .*self_attn.q_proj.bias"):
        load_pretrained(path)


MTP_PREFIXES = ["model.language_model.layers.{n}.", "model.layers.{n}.", "language_model.model.layers.{n}.",
                "model.mtp.", "model.nextn.", "mtp.layers.0.", "model.mtp_layers.0."]


@pytest.mark.parametrize("prefix", MTP_PREFIXES)
def test_mtp_layers_skipped_with_one_warning(moe_dir, caplog, prefix):
    config, _, path = moe_dir
    p = prefix.format(n=config.text.num_hidden_layers)
    mtp = {p + "eh_proj.weight": np.zeros((64, 128), np.float32), p + "enorm.weight": np.zeros(64, np.float32),
           p + "hnorm.weight": np.zeros(64, np.float32), p + "mlp.experts.0.gate_proj.weight": np.zeros((32, 64), np.float32),
           p + "shared_head.norm.weight": np.zeros(64, np.float32)}
    _, reference = load_pretrained(path)
    _edit_tensors(path, lambda t: t.update(mtp))
    with caplog.at_level(logging.WARNING, logger="glmv_jax.convert.hf"):
        _, params = load_pretrained(path)
    assert len(caplog.records) == 1
    first = "; ".join(sorted(mtp)[:3])
    assert caplog.records[0].getMessage() == \
        f"skipped 5 tensors of MTP/next-n layers (not part of the model): {first} ... and 2 more"
    np.testing.assert_array_equal(params["lm_head"]["kernel"], reference["lm_head"]["kernel"])


def test_decoder_layers_under_another_prefix_are_not_mtp(moe_dir):
    _, _, path = moe_dir
    key = "model.layers.1.self_attn.q_proj.weight"       # a decoder layer number: a wrong prefix, not an MTP layer
    _edit_tensors(path, lambda t: t.update({key: np.zeros((64, 64), np.float32)}))
    with pytest.raises(ConversionError, match=rf"1 unexpected keys: {key}"):
        load_pretrained(path)


def test_both_expert_layouts_for_one_layer_is_a_duplicate(moe_dir):
    config, model, path = moe_dir
    state = dict(load_file(str(path / "model.safetensors")))
    state["model.language_model.layers.1.mlp.experts.gate_up_proj"] = \
        model.state_dict()["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    with pytest.raises(ConversionError, match=r"duplicate tensors: model.language_model.layers.1.mlp.experts.gate_up_proj"):
        hf_state_dict_to_params(state, config)


def test_in_memory_wrong_shape_and_missing(hf_checkpoint):
    config, model, _ = hf_checkpoint("glm4v")
    state = dict(model.state_dict())
    key = "model.language_model.layers.0.mlp.gate_up_proj.weight"
    state[key] = state[key][:-1]
    del state["lm_head.weight"]
    with pytest.raises(ConversionError, match=rf"{key}: expected shape \(192, 64\), found \(191, 64\).*"
                                              r"missing keys: .*lm_head.weight"):
        hf_state_dict_to_params(state, config)


def test_save_rejects_a_tree_that_does_not_match(moe_dir, tmp_path):
    config, _, path = moe_dir
    _, params = load_pretrained(path)
    params["text"]["moe_layers"]["moe"]["experts"]["up"] = np.zeros((2, 8, 64, 31), np.float32)
    del params["vision"]["merger"]["norm"]["bias"]
    params["text"]["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(ConversionError, match=r"text/moe_layers/moe/experts/up: expected shape \(2, 8, 64, 32\), "
                                              r"found \(2, 8, 64, 31\).*missing leaves: vision/merger/norm/bias.*"
                                              r"unexpected leaves: text/extra/kernel"):
        save_pretrained(config, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()                 # nothing written


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9
    assert parse_size("200MiB") == 200 * 2 ** 20
    assert parse_size("20KB") == 20_000
    assert parse_size(123) == 123
    with pytest.raises(ConversionError, match="max_shard_size 'lots'"):
        parse_size("lots")
