"""The converter's leaves (mapping.param_specs) are exactly the model's parameter tree: paths, shapes, dtypes."""
from dataclasses import replace

import jax
import pytest

from glmv_jax.config import tiny
from glmv_jax.convert.hf import flatten
from glmv_jax.convert.mapping import param_specs

glmv = pytest.importorskip("glmv_jax.models.glmv")

CONFIGS = {"dense": tiny(), "moe": tiny(moe=True),
           "moe_k2_nobias": tiny(moe=True).replace(text=replace(tiny(moe=True).text, attention_bias=False,
                                                                first_k_dense_replace=2))}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_specs_match_the_model_tree(name):
    config = CONFIGS[name]
    abstract = flatten(jax.eval_shape(lambda: glmv.init_params(config, jax.random.key(0))))
    specs = param_specs(config)
    assert sorted(abstract) == sorted(specs)
    for path, spec in specs.items():
        assert tuple(abstract[path].shape) == spec.shape, path
        assert str(abstract[path].dtype) == "float32", path
