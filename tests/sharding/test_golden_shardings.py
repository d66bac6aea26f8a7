"""Golden sharding tables: every parameter's shape, logical axes and PartitionSpec for the presets under each
rule set, on a representative abstract mesh, compared against tests/sharding/golden/<preset>_<rules>.txt.

Built from abstract shapes only (jax.eval_shape), so the 106B glm45v costs nothing. A deliberate change of
the model's parameters or of the rules shows up as a readable diff; rewrite the tables with

    GLMV_REGEN_GOLDEN=1 python -m pytest tests/sharding/test_golden_shardings.py

and review the diff of tests/sharding/golden/ before committing it.
"""

import difflib
import functools
import os
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from glmv_jax.config import get_preset
from glmv_jax.models.glmv import logical_axes
from glmv_jax.train.aot import abstract_params_of, per_device_bytes
from glmv_jax.sharding.mesh import AXES, make_mesh
from glmv_jax.sharding.rules import RULE_SETS, get_rules, logical_to_spec, replication_report, tree_shardings
from glmv_jax.train.optimizer import path_str

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("GLMV_REGEN_GOLDEN") == "1"
DENSE_MESH = {"data": 2, "fsdp": 2, "tensor": 2}
MOE_MESH = {"fsdp": 2, "expert": 4}
PRESETS = ("tiny", "tiny_moe", "glm41v_9b", "glm45v")


def abstract_mesh(sizes: dict) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))


@functools.lru_cache(maxsize=None)
def preset_tree(preset: str):
    """(abstract params, logical axes) of a preset: shapes only."""
    config = get_preset(preset)
    return abstract_params_of(config), logical_axes(config)


def sharding_table(preset: str, rules_name: str) -> str:
    config = get_preset(preset)
    sizes = MOE_MESH if config.text.moe else DENSE_MESH
    mesh = abstract_mesh(sizes)
    params, names = preset_tree(preset)
    rules = get_rules(rules_name)
    lines = [f"# {preset} / rules {rules_name} / mesh {sizes}",
             "# path | shape | logical axes | PartitionSpec"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    name_leaves = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    assert len(leaves) == len(name_leaves)
    for (path, leaf), logical in zip(leaves, name_leaves):
        spec = logical_to_spec(logical, leaf.shape, mesh, rules)
        lines.append(f"{path_str(path)} | {tuple(leaf.shape)} | {logical} | {spec}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("rules_name", sorted(RULE_SETS))
@pytest.mark.parametrize("preset", PRESETS)
def test_sharding_table_matches_golden(preset, rules_name):
    table = sharding_table(preset, rules_name)
    path = GOLDEN / f"{preset}_{rules_name}.txt"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(table)
    if not path.exists():
        pytest.fail(f"no golden table {path}; write it with GLMV_REGEN_GOLDEN=1 and review it")
    expected = path.read_text()
    if table != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), table.splitlines(True),
                                            fromfile=f"golden/{path.name}", tofile="now"))
        pytest.fail(f"sharding table of {preset} / {rules_name} changed (GLMV_REGEN_GOLDEN=1 rewrites it "
                    f"after review):\n{diff}")


def test_golden_tables_cover_every_parameter_and_shard_the_big_ones():
    """The files are not empty stand-ins: one line per parameter, and the big kernels of the real presets
    are split (a table of all-None specs would also "match" itself)."""
    for preset in PRESETS:
        params, _ = preset_tree(preset)
        for rules_name in RULE_SETS:
            lines = (GOLDEN / f"{preset}_{rules_name}.txt").read_text().splitlines()
            assert len([l for l in lines if not l.startswith("#")]) == len(jax.tree.leaves(params))
    default = (GOLDEN / "glm45v_default.txt").read_text()
    assert "text/moe_layers/moe/experts/gate | (45, 128, 4096, 1408) | " \
           "('layers', 'exp', 'moe_embed', 'moe_mlp') | P(None, 'expert', 'fsdp', None)" in default
    dense = (GOLDEN / "glm41v_9b_default.txt").read_text()
    assert "text/embed/embedding | (151552, 4096) | ('vocab', 'embed') | P('tensor', 'fsdp')" in dense


@pytest.mark.parametrize("preset", ["tiny", "glm41v_9b", "glm45v"])
def test_fsdp8_per_device_bytes_bounded_by_the_replication_report(preset):
    """On fsdp 8 every parameter is split 8 ways or replicated: a device holds exactly
    (total - replicated) / 8 + replicated bytes, so at most total / 8 + replicated."""
    params, names = preset_tree(preset)
    mesh = make_mesh({"fsdp": 8})
    shardings = tree_shardings(names, params, mesh, get_rules("default"))
    report = replication_report(shardings, params)
    held = per_device_bytes(params, shardings)
    total, replicated = report["total_bytes"], report["replicated_bytes"]
    assert held <= total / 8 + replicated
    assert held == pytest.approx((total - replicated) / 8 + replicated, rel=1e-12)
    assert held == report["per_device_bytes"]
    if preset != "tiny":   # the real presets: almost everything sharded
        assert report["replicated_fraction"] < 0.01 and held < total / 7.9
