"""load_pretrained(shardings=...) in one process over 8 devices: each leaf equals the host load and lands on
its sharding, only the distinct shard boxes are read (bytes counted), and save_pretrained writes the
sharded state back byte for byte."""
import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from glmv_jax.convert.hf import ConversionError, flatten, load_plan, load_pretrained, save_pretrained, unflatten
from glmv_jax.convert.placement import device_boxes
from glmv_jax.models.glmv import init_params, logical_axes
from glmv_jax.sharding.mesh import make_mesh
from glmv_jax.sharding.rules import get_rules, tree_shardings

MESHES = {"fsdp8": {"fsdp": 8}, "dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2},
          "fsdp2_ep4": {"fsdp": 2, "expert": 4}}


def model_shardings(config, mesh_shape, rules="default"):
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return tree_shardings(logical_axes(config), abstract, make_mesh(mesh_shape), get_rules(rules))


def distinct_box_bytes(shardings, host, devices=None) -> int:
    """What a process holding `devices` must read of an all-fp32 checkpoint: each distinct shard box once."""
    flat = flatten(shardings)
    return sum(math.prod(b - a for a, b in box) * 4 for path, leaf in flatten(host).items()
               for box in device_boxes(flat[path], leaf.shape, devices))


def check_placed(placed, host, shardings):
    flat_s = flatten(shardings)
    for path, leaf in flatten(placed).items():
        assert isinstance(leaf, jax.Array) and leaf.sharding == flat_s[path], path
        np.testing.assert_array_equal(np.asarray(leaf), flatten(host)[path], err_msg=path)


@pytest.mark.parametrize("name,mesh,rules", [("glm4v", "fsdp8", "default"), ("glm4v", "dp2_fsdp2_tp2", "default"),
                                             ("glm4v_moe", "fsdp2_ep4", "default"),
                                             ("glm46v_moe", "fsdp8", "pure_fsdp"),      # fused 3-D experts
                                             ("glm4v_moe_k2_nobias", "dp2_fsdp2_tp2", "default")])
def test_sharded_load_equals_host_load_and_reads_each_box_once(hf_checkpoint, name, mesh, rules):
    config, _, path = hf_checkpoint(name)
    _, host = load_pretrained(path)
    shardings = model_shardings(config, MESHES[mesh], rules)
    stats = {}
    _, placed = load_pretrained(path, shardings=shardings, stats=stats)
    check_placed(placed, host, shardings)
    want = distinct_box_bytes(shardings, host)
    assert stats["bytes_read"] == want == load_plan(path, shardings, jax.devices())
    half = jax.devices()[:4]                  # what a process with half the devices would read
    assert load_plan(path, shardings, half) == distinct_box_bytes(shardings, host, half)
    if mesh != "dp2_fsdp2_tp2":               # (there the first four devices are one whole data replica)
        assert load_plan(path, shardings, half) < 0.75 * want


def test_layers_sharded_and_head_dim_cut(hf_checkpoint):
    """Shardings the rules never make: the layer axis split, one head's columns split (several pieces per box)."""
    config, _, path = hf_checkpoint("glm4v_moe")
    _, host = load_pretrained(path)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    q = NamedSharding(mesh, P("a", None, None, "b"))          # (layers, D, N, H): layers / 2, head_dim / 4
    gate = NamedSharding(mesh, P("a", "b", None, None))       # (layers, E, D, F)
    shardings = unflatten({"text/moe_layers/attn/q/kernel": q, "text/moe_layers/moe/experts/gate": gate,
                           "vision/patch_embed/kernel": NamedSharding(mesh, P("b", None))})   # the merged C*T*P*P dim
    stats = {}
    _, placed = load_pretrained(path, shardings=shardings, stats=stats)
    flat = flatten(placed)
    for path_, leaf in flat.items():
        np.testing.assert_array_equal(np.asarray(leaf), flatten(host)[path_], err_msg=path_)
    assert flat["text/moe_layers/attn/q/kernel"].sharding == q
    assert isinstance(flat["text/embed/embedding"], np.ndarray)
    assert stats["bytes_read"] == sum(a.nbytes for a in flatten(host).values())   # every element once


@pytest.mark.parametrize("name", ["glm4v_moe", "glm46v_moe"])
def test_save_from_sharded_state_rewrites_the_checkpoint(hf_checkpoint, tmp_path, name):
    config, _, path = hf_checkpoint(name)
    shardings = model_shardings(config, MESHES["fsdp2_ep4"])
    _, placed = load_pretrained(path, shardings=shardings)
    save_pretrained(config, placed, tmp_path / "one", expert_layout="per_expert")
    save_pretrained(config, placed, tmp_path / "many", max_shard_size="30KB", expert_layout="per_expert")
    orig = load_file(str(path / "model.safetensors")) if name == "glm4v_moe" else None
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = {}
    for file in sorted((tmp_path / "many").glob("model-*.safetensors")):
        many.update(load_file(str(file)))
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 2 and sorted(many) == sorted(one)
    for key, a in one.items():
        np.testing.assert_array_equal(many[key], a, err_msg=key)
        if orig is not None:
            np.testing.assert_array_equal(a, orig[key], err_msg=key)
    _, reloaded = load_pretrained(tmp_path / "many")
    for p, a in flatten(reloaded).items():
        np.testing.assert_array_equal(a, np.asarray(flatten(placed)[p]), err_msg=p)


@pytest.mark.parametrize("damage", ["truncate_data", "garbage_header"])
def test_corrupt_shard_names_the_file_when_loading_sharded(hf_checkpoint, tmp_path, damage):
    config, _, path = hf_checkpoint("glm4v_moe")
    _, params = load_pretrained(path)
    files = save_pretrained(config, params, tmp_path / "sharded", max_shard_size="30KB")
    shard = files[len(files) // 2]
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    shard.write_bytes({"truncate_data": data[:(header_end + len(data)) // 2],
                       "garbage_header": data[:8] + b"\xff" * (header_end - 8) + data[header_end:]}[damage])
    shardings = model_shardings(config, MESHES["fsdp8"])
    with pytest.raises(ConversionError, match=rf"{re.escape(str(shard))}: corrupt or truncated safetensors file"):
        load_pretrained(tmp_path / "sharded", shardings=shardings)
    with pytest.raises(ConversionError, match=re.escape(str(shard))):
        load_plan(tmp_path / "sharded", shardings, jax.devices()[:4])
