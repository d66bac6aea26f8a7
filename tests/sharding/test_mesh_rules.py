"""Mesh construction and logical-axis rules on 8 simulated CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glmv_jax.sharding.mesh import MeshError, make_mesh, mesh_from_config
from glmv_jax.sharding.rules import (DEFAULT, PURE_FSDP, activation_sharding, check_replication, constrain,
                                     get_rules, logical_to_spec, replication_report, tree_shardings)


def test_auto_fill_and_errors():
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == dict(data=2, fsdp=4, tensor=1, expert=1, sequence=1)
    assert make_mesh().shape["fsdp"] == 8
    assert mesh_from_config({"ici": {"tensor": 2, "fsdp": -1}}).shape["fsdp"] == 4
    with pytest.raises(MeshError, match="do not divide 8 devices"):
        make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(MeshError, match="has 4 devices but 8"):
        make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(MeshError, match="at most one axis"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(MeshError, match="unknown mesh axes"):
        make_mesh({"pipeline": 8})


def test_specs_drop_non_dividing_and_repeated_axes():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh, DEFAULT) == \
        P(None, "fsdp", "tensor", None)
    # one kv head cannot be split over tensor=2: replicated on that dim
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh, DEFAULT) == \
        P(None, "fsdp", None, None)
    assert logical_to_spec(("act_batch", "act_length", "act_embed"), (8, 16, 64), mesh, PURE_FSDP) == \
        P(("data", "fsdp", "tensor"), None, None)
    with pytest.raises(KeyError, match="no entry"):
        logical_to_spec(("not_a_name",), (4,), mesh, DEFAULT)
    with pytest.raises(ValueError, match="unknown logical axis rule set"):
        get_rules("nope")


def test_replication_report_and_check():
    mesh = make_mesh({"fsdp": 8})
    shapes = {"w": jax.ShapeDtypeStruct((64, 32), np.float32), "norm": jax.ShapeDtypeStruct((32,), np.float32)}
    names = {"w": ("embed", "mlp"), "norm": (None,)}
    shardings = tree_shardings(names, shapes, mesh, DEFAULT)
    report = replication_report(shardings, shapes)
    assert report["replicated_bytes"] == 32 * 4
    assert report["per_device_bytes"] == 64 * 32 * 4 / 8 + 32 * 4
    check_replication(shardings, shapes, max_fraction=0.05)
    with pytest.raises(ValueError, match="replicated"):
        check_replication(shardings, shapes, max_fraction=0.001)


def test_constrain_is_noop_outside_context_and_shards_inside():
    x = jax.numpy.ones((8, 4))
    assert constrain(x, ("act_batch", None)) is x
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with activation_sharding(mesh, DEFAULT):
        y = jax.jit(lambda a: constrain(a * 2, ("act_batch", None)))(x)
    assert y.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))


def test_mesh_on_a_subset_of_devices():
    mesh = mesh_from_config({"ici": {"data": 1}, "devices": 1})
    assert mesh.size == 1 and list(mesh.devices.flat) == jax.devices()[:1]
    assert mesh_from_config({"ici": {"fsdp": -1}, "devices": 4}).shape["fsdp"] == 4
    with pytest.raises(MeshError, match="only 8 devices"):
        mesh_from_config({"ici": {"fsdp": -1}, "devices": 16})
