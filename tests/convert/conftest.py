"""Tiny HF checkpoints (transformers save_pretrained) shared by the converter tests, one per model family."""
from dataclasses import replace

import pytest

from glmv_jax.config import tiny
from tests.hf_oracle import save_hf_model

CONFIGS = {
    "glm4v": lambda: tiny(),
    "glm4v_moe": lambda: tiny(moe=True),
    "glm46v_dense": lambda: replace(tiny(), model_type="glm46v"),
    "glm46v_moe": lambda: replace(tiny(moe=True), model_type="glm46v"),
    # no attention bias, two leading dense layers: MoE layers numbered after them on disk
    "glm4v_moe_k2_nobias": lambda: tiny(moe=True).replace(
        text=replace(tiny(moe=True).text, attention_bias=False, first_k_dense_replace=2)),
}


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (config, HF model, checkpoint dir), built once per session on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            config = CONFIGS[name]()
            path = tmp_path_factory.mktemp(f"hf_{name}")
            cache[name] = (config, save_hf_model(config, path), path)
        return cache[name]
    return get
