"""save_pretrained's tokenizer, chat template and processor configs: an export of the suite tokenizer and one
copied from an HF source directory load in transformers (AutoTokenizer, AutoImageProcessor and Glm4vProcessor,
with the video stand-in of tests/data/test_placeholders.py) and agree with ours."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer, Glm4vProcessor, processing_utils

from glmv_jax.convert.hf import load_pretrained, save_pretrained
from glmv_jax.data import chat_template as ct
from glmv_jax.data import image_processing as ip
from glmv_jax.data import placeholders as ph
from glmv_jax.data import tokenizer as T
from glmv_jax.data.transforms import Processor
from glmv_jax.models.glmv import init_params
from tests.helpers import config_for, noise_image, tiny_hf_dir
from tests.hf_oracle import with_video_stand_in

TEXTS = ["[gMASK]<sop><|user|>\nHow many red circles?<|assistant|>\n<think>I count 3.</think>"
         "<answer><|begin_of_box|>3<|end_of_box|></answer><|user|>", "digits 1234567 and  spaces\n\nnew lines", ""]
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]


@pytest.fixture(scope="module")
def suite_export(tmp_path_factory):
    """(our tokenizer, processor, export dir) of the tiny model with the suite tokenizer."""
    tok = T.suite_tokenizer(vocab_size=512, cache_dir=tmp_path_factory.mktemp("cache"), records_per_domain=30)
    config = config_for(tok)
    processor = Processor.for_model(config, template="glm41v", min_pixels=1024, max_pixels=4608)
    out = tmp_path_factory.mktemp("export")
    save_pretrained(config, init_params(config, jax.random.key(0)), out, tokenizer=tok, processor=processor)
    return tok, processor, out


class VideoStandIn(dict):
    """The exported video_preprocessor_config.json as a dict with `merge_size`, all the processor reads of a
    video processor when it expands text (a dict, so the processor's repr can serialize it)."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        stand_in = cls(json.loads((Path(path) / "video_preprocessor_config.json").read_text()))
        stand_in.merge_size = stand_in["merge_size"]
        return stand_in


def hf_processor(path, monkeypatch):
    """Glm4vProcessor.from_pretrained(path), with VideoStandIn for AutoVideoProcessor (needs torchvision)."""
    auto = {key: processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING[key] for key in ("image_processor", "tokenizer")}
    monkeypatch.setattr(processing_utils, "MODALITY_TO_AUTOPROCESSOR_MAPPING", {**auto, "video_processor": VideoStandIn})
    return with_video_stand_in(Glm4vProcessor).from_pretrained(str(path))


def check_tokenizer(path, ours, template):
    hf = AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
        assert hf.decode(ours.encode(text)) == text
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ct.render(CHAT, template, add_generation_prompt=True)
    assert T.load_tokenizer(path).encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_suite_tokenizer_export_loads_in_transformers(suite_export):
    tok, _, out = suite_export
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model",
                                              "tokenizer_config.json", "chat_template.jinja",
                                              "preprocessor_config.json", "video_preprocessor_config.json"}
    check_tokenizer(out, tok, "glm41v")


def test_exported_processor_matches_ours(suite_export, monkeypatch):
    tok, processor, out = suite_export
    image = noise_image(0, 50, 70)
    text = ct.render(CHAT, "glm41v", add_generation_prompt=True)
    hf = hf_processor(out, monkeypatch)(text=[text], images=[image])
    ours = ip.process_images(image, processor.image)
    np.testing.assert_array_equal(hf["image_grid_thw"], ours["image_grid_thw"])
    np.testing.assert_allclose(hf["pixel_values"], ours["pixel_values"], atol=1e-5)
    expanded = ph.expand_placeholders(text, image_grid_thw=ours["image_grid_thw"], merge_size=processor.merge_size)
    assert list(hf["input_ids"][0]) == tok.encode(expanded)


def test_export_from_an_hf_directory_copies_its_tokenizer(tmp_path, monkeypatch):
    (tmp_path / "source").mkdir()
    source = tiny_hf_dir(tmp_path / "source")
    config, params = load_pretrained(source)
    out = tmp_path / "out"
    save_pretrained(config, params, out, source=source)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    check_tokenizer(out, T.load_tokenizer(source), "glm41v")
    assert hf_processor(out, monkeypatch).image_processor.merge_size == config.vision.spatial_merge_size
