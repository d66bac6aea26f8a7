"""The files an HF export needs besides config.json and the weights to load with AutoTokenizer and
AutoProcessor: the tokenizer, its chat template (chat_template.jinja) and the image / video processor configs.

    save_processor_files("out_dir", config, tokenizer, processor)           # ours (the suite tokenizer, ...)
    save_processor_files("out_dir", config, source="GLM-4.1V-9B-Thinking/") # the HF source directory's

The files of a `source` directory are copied; what it lacks is written (tokenizer_config.json, the hub chat
template of the processor's template, preprocessor_config.json, video_preprocessor_config.json).
A SentencePiece tokenizer is written as tokenizer.model, with a tokenizer_config.json naming transformers'
TokenizersBackend (which converts the model when it loads); an HF tokenizer as its tokenizer.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from glmv_jax.config import ModelConfig
from glmv_jax.data.hub_templates import JINJA_TEMPLATES
from glmv_jax.data.tokenizer import TOKENIZER_FILES, tokenizer_file
from glmv_jax.data.transforms import TEMPLATE_OF_MODEL, Processor

# Files of an HF checkpoint directory besides config.json and the weights.
PROCESSOR_FILES = TOKENIZER_FILES + (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json")
log = logging.getLogger(__name__)
HF_PROCESSOR_CLASS = {"glm4v": "Glm4vProcessor", "glm4v_moe": "Glm4vProcessor", "glm46v": "Glm46VProcessor"}


def copy_processor_files(source: str | Path, out: Path) -> list[Path]:
    """Copies the PROCESSOR_FILES that `source` holds into `out` (removing tokenizer files it lacks, so no
    stale one is loaded instead); returns the copies."""
    source, copied = Path(source), []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            if not (out / name).exists() or not (out / name).samefile(source / name):
                shutil.copyfile(source / name, out / name)
            copied.append(out / name)
        elif name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
    return copied


# What save_processor_files writes where the source has none; <|endoftext|> is every GLM tokenizer's.
TOKENIZER_CONFIG = {"tokenizer_class": "TokenizersBackend", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "padding_side": "left", "add_bos_token": False, "add_eos_token": False,
                    "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}


def vision_processor_config(processor: Processor, model_type: str, kind: str) -> dict:
    """preprocessor_config.json (kind "image") or video_preprocessor_config.json ("video") of `processor`."""
    settings = processor.image if kind == "image" else processor.video
    prefix = "Glm46V" if model_type == "glm46v" else "Glm4v"
    out = {f"{kind}_processor_type": f"{prefix}{'Image' if kind == 'image' else 'Video'}Processor",
           "processor_class": HF_PROCESSOR_CLASS.get(model_type, "Glm4vProcessor"),
           "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
           "patch_size": settings.patch_size, "temporal_patch_size": settings.temporal_patch_size,
           "merge_size": settings.merge_size, "image_mean": list(settings.image_mean),
           "image_std": list(settings.image_std), "do_resize": True, "do_rescale": True,
           "rescale_factor": settings.rescale_factor, "do_normalize": True, "do_convert_rgb": True}
    if kind == "video":
        out.update(fps=settings.fps, max_duration=settings.max_duration, do_sample_frames=True)
    return out


def default_files(processor: Processor, model_type: str) -> dict[str, str]:
    """File name -> text, for the tokenizer config, the chat template (`processor.template`'s hub template)
    and the image / video processor configs."""
    as_json = lambda value: json.dumps(value, indent=2) + "\n"
    return {"tokenizer_config.json": as_json(TOKENIZER_CONFIG),
            "chat_template.jinja": JINJA_TEMPLATES[processor.template],
            "preprocessor_config.json": as_json(vision_processor_config(processor, model_type, "image")),
            "video_preprocessor_config.json": as_json(vision_processor_config(processor, model_type, "video"))}


def has_chat_template(folder: Path) -> bool:
    """chat_template.jinja / .json, or a "chat_template" in tokenizer_config.json (older exports)."""
    config = folder / "tokenizer_config.json"
    return ((folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
            or (config.is_file() and "chat_template" in json.loads(config.read_text())))


def save_tokenizer_file(tokenizer, out: Path) -> Path:
    """tokenizer.model (SentencePiece) or tokenizer.json (HF), the other one removed (it would be loaded)."""
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    tokenizer.save(out / tokenizer.file_name)
    return out / tokenizer.file_name


def save_processor_files(out: str | Path, config: ModelConfig, tokenizer=None, processor: Processor | None = None,
                         source: str | Path | None = None) -> list[Path]:
    """Copies `source`'s tokenizer and processor files when it has a tokenizer, else saves `tokenizer`; then
    writes each of default_files that was not copied (from `processor`; default: HF's settings with the
    model's patch sizes and its model_type's hub template). Returns the files written."""
    out = Path(out)
    processor = processor or Processor.for_model(config, template=TEMPLATE_OF_MODEL.get(config.model_type, "glm41v"))
    copied = bool(source) and tokenizer_file(source) is not None
    written = copy_processor_files(source, out) if copied else []
    if not copied and tokenizer is not None:
        written.append(save_tokenizer_file(tokenizer, out))
    elif not copied:
        log.warning("no tokenizer files in %s (pass a tokenizer or an HF source directory): transformers cannot "
                    "load its tokenizer or processor", out)
    for name, text in default_files(processor, config.model_type).items():
        if out / name in written or (name == "chat_template.jinja" and copied and has_chat_template(Path(source))):
            continue
        (out / name).write_text(text)
        written.append(out / name)
    return written
