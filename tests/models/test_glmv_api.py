"""Parameter tree, logical axes and input validation of glmv.py (no HF forward, no model compile)."""

import jax
import numpy as np
import pytest

from glmv_jax.config import tiny
from glmv_jax.convert.hf import hf_state_dict_to_params
from glmv_jax.models import glmv
from tests.hf_oracle import build_hf_model, multimodal_inputs
from tests.models.conftest import reference_params

is_axes = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


@pytest.mark.parametrize("moe", [False, True])
def test_param_tree_matches_converter_and_axes(moe):
    """The model's abstract tree (what init_params fills) = the converter's tree, with one logical
    axis name per dimension on every leaf."""
    config = tiny(moe=moe)
    abstract = glmv.model_graph(config)[1].to_pure_dict()
    hf = build_hf_model(config)
    converted = hf_state_dict_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    assert jax.tree.structure(abstract) == jax.tree.structure(converted)
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, converted)
    axes = glmv.logical_axes(config)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(abstract)
    for names, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(abstract)):
        assert len(names) == len(leaf.shape) and leaf.dtype == np.float32
    stacked = axes["text"]["moe_layers" if moe else "layers"]["attn"]["q"]["kernel"]
    assert stacked == ("layers", "embed", "heads", "head_dim")


def test_init_params_is_seeded():
    config = tiny()
    a, b, c = glmv.init_params(config, 0), glmv.init_params(config, 0), glmv.init_params(config, 1)
    assert jax.tree.map(np.shape, a) == jax.tree.map(np.shape, glmv.model_graph(config)[1].to_pure_dict())
    kernel = lambda p: np.asarray(p["text"]["layers"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(kernel(a), kernel(b))
    assert not np.array_equal(kernel(a), kernel(c))
    assert not np.array_equal(kernel(a)[0], kernel(a)[1])          # layers drawn independently
    assert 0.015 < kernel(a).std() < 0.025                          # HF initializer_range 0.02
    np.testing.assert_array_equal(a["text"]["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(a["text"]["layers"]["attn"]["q"]["bias"], 0.0)


def test_converter_matches_independent_mapping(config, hf_model):
    state_dict = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    ours, theirs = reference_params(state_dict, config), hf_state_dict_to_params(state_dict, config)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def _case(config, name):
    inputs = multimodal_inputs(config, [("image", (1, 4, 6))])
    img = config.image_token_id
    if name == "more_placeholders":
        inputs["input_ids"] = np.concatenate([inputs["input_ids"], [[img, img]]], axis=1)
        inputs["mm_token_type_ids"] = np.concatenate([inputs["mm_token_type_ids"], [[1, 1]]], axis=1)
        inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
    elif name == "fewer_placeholders":
        inputs["image_grid_thw"] = np.array([[1, 4, 6], [1, 2, 2]])
        inputs["pixel_values"] = np.concatenate([inputs["pixel_values"], inputs["pixel_values"][:4]])
    elif name == "no_pixels":
        del inputs["pixel_values"], inputs["image_grid_thw"]
    elif name == "grid_vs_rows":
        inputs["pixel_values"] = inputs["pixel_values"][:20]
    elif name == "odd_grid":
        inputs["image_grid_thw"] = np.array([[1, 3, 8]])
    elif name == "row_width":
        inputs["pixel_values"] = inputs["pixel_values"][:, :-1]
    elif name == "grid_without_pixels":
        del inputs["pixel_values"]
    elif name == "ids_1d":
        inputs["input_ids"] = inputs["input_ids"][0]
    elif name == "mask_shape":
        inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    return inputs


@pytest.mark.parametrize("name,message", [
    ("more_placeholders", "8 image tokens in the prompt, 6 features"),
    ("fewer_placeholders", "6 image tokens in the prompt, 7 features"),
    ("no_pixels", "6 image tokens in the prompt, 0 features"),
    ("grid_vs_rows", "covers 24 patches but image pixel values has 20 rows"),
    ("odd_grid", "multiples of 2"),
    ("row_width", r"must be \[N, 96\]"),
    ("grid_without_pixels", "must be given together"),
    ("ids_1d", r"integer \[B, T\]"),
    ("mask_shape", "attention_mask"),
])
def test_bad_inputs_raise(name, message, config):
    params = None                       # validation happens before any array work
    with pytest.raises(ValueError, match=message):
        glmv.forward(config, params, **_case(config, name))
