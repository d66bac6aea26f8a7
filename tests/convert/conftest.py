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
