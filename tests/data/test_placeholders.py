"""Placeholder expansion and mm_token_type_ids against HF's Glm4vProcessor (4.1V/4.5V) and Glm46VProcessor (4.6V).

Processors are built without a hub download: the real PIL image processor, a small character-level
tokenizer holding the GLM special tokens, and (HF's video processor needs torchvision) a stand-in video
processor object that only carries `merge_size`; video replacements come from HF's own
`replace_video_token` fed with our grids and frame indices (whose parity with HF's video processor is
tested in test_vision_processing.py).
"""
import types

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Glm4vImageProcessorPil, Glm4vProcessor, Glm46VProcessor, PreTrainedTokenizerFast
from transformers.video_utils import VideoMetadata as HFVideoMetadata

from glmv_jax.data import image_processing as ip
from glmv_jax.data import placeholders as ph
from glmv_jax.data import video_processing as vp
from tests.hf_oracle import with_video_stand_in

SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
            "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>"]
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: i for i, token in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    model.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])


def _processor(cls, tokenizer):
    return with_video_stand_in(cls)(image_processor=Glm4vImageProcessorPil(), tokenizer=tokenizer,
                                    video_processor=types.SimpleNamespace(merge_size=2))


@pytest.fixture(scope="module", params=[(Glm4vProcessor, "glm41v"), (Glm46VProcessor, "glm46v")],
                ids=["glm4v", "glm46v"])
def hf_processor(request, tokenizer):
    cls, style = request.param
    return _processor(cls, tokenizer), style


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _token_ids(tokenizer):
    convert = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=convert("<|image|>"), video_start_id=convert("<|begin_of_video|>"),
                video_end_id=convert("<|end_of_video|>"))


def _padded(rows, pad):
    out = np.full((len(rows), max(map(len, rows))), pad, np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


IMG = "<|begin_of_image|><|image|><|end_of_image|>"
VID = "<|begin_of_video|><|video|><|end_of_video|>"


def test_image_expansion_matches_hf_processor(hf_processor, tokenizer):
    proc, _ = hf_processor
    images = [PIL.Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(50, 50), (90, 130), (28, 300)]]
    texts = [f"[gMASK]<sop><|user|>\n{IMG}What is it?<|assistant|>\n", f"<|user|>\n{IMG} and {IMG} differ?"]
    hf = proc(text=texts, images=images)
    grids = ip.process_images(images)["image_grid_thw"]
    expanded = ph.expand_placeholders(texts, image_grid_thw=grids)
    ours_ids = _ids(tokenizer, expanded)
    assert ours_ids == hf["input_ids"]
    assert expanded[0].count("<|image|>") == grids[0].prod() // 4
    types_ = ph.mm_token_type_ids(_padded(ours_ids, 0), **_token_ids(tokenizer))
    for row, (ids, want) in enumerate(zip(ours_ids, hf["mm_token_type_ids"])):
        np.testing.assert_array_equal(types_[row, :len(ids)], want)
        assert set(want) == {0, 1}


def _videos():
    """(frames, metadata) pairs: fractional fps, a 29.97 fps clip and a long 2 fps video (timestamps > 60 s)."""
    specs = [(21, 7.0, None), (45, 29.97, 1.5), (400, 2.0, 200.0)]
    return [(np.zeros((t, 28, 28, 3), np.uint8), vp.VideoMetadata(fps=fps, total_num_frames=t, duration=d))
            for t, fps, d in specs]


def _hf_video_replacements(proc, ours, metadata):
    hf_meta = [HFVideoMetadata(total_num_frames=m.total_num_frames, fps=m.fps, duration=m.duration,
                               frames_indices=idx) for m, idx in zip(metadata, ours["frame_indices"])]
    video_inputs = {"video_grid_thw": torch.from_numpy(ours["video_grid_thw"]), "video_metadata": hf_meta}
    return [proc.replace_video_token(video_inputs, video_idx=i) for i in range(len(metadata))]


def test_video_expansion_matches_hf_processor(hf_processor, tokenizer):
    proc, style = hf_processor
    videos = _videos()
    config = vp.VideoProcessorConfig(sampling=style)
    ours = vp.process_videos([v for v, _ in videos], [m for _, m in videos], config)
    texts = [f"<|user|>\n{VID}Describe.<|assistant|>\n", f"{VID}{VID}compare"]
    want = proc.get_text_with_replacements(list(texts), [], _hf_video_replacements(proc, ours, [m for _, m in videos]))[0]
    got = ph.expand_placeholders(texts, video_grid_thw=ours["video_grid_thw"],
                                 video_timestamps=ours["video_timestamps"], timestamp_style=style)
    assert got == want
    # 7 fps clip: 4.1V samples frames 0, 4, 7, ... (patch times 0, 1, 2, 2.86 s); 4.6V every frame (0.29 s apart)
    marker = "<|end_of_image|>0.6 seconds<|begin_of_image|>" if style == "glm46v" else "<|end_of_image|>2<|begin"
    assert marker in got[0] and ("seconds" in got[0]) == (style == "glm46v")
    ids = _ids(tokenizer, got)
    types_ = ph.mm_token_type_ids(_padded(ids, 0), **_token_ids(tokenizer))
    for row, (row_ids, hf_types) in enumerate(zip(ids, proc.create_mm_token_type_ids(ids))):
        np.testing.assert_array_equal(types_[row, :len(row_ids)], hf_types)
        assert set(hf_types) == {0, 2}


def test_mixed_images_and_video_match_hf(hf_processor, tokenizer):
    proc, style = hf_processor
    images = [PIL.Image.fromarray(RNG.integers(0, 256, (60, 90, 3), dtype=np.uint8)) for _ in range(2)]
    (frames, meta), = _videos()[:1]
    video = vp.process_videos(frames, meta, vp.VideoProcessorConfig(sampling=style))
    image_out = ip.process_images(images)
    texts = [f"{IMG}then{VID}then{IMG}?"]
    image_repl = [proc.replace_image_token(image_out, image_idx=i) for i in range(2)]
    want = proc.get_text_with_replacements(list(texts), image_repl, _hf_video_replacements(proc, video, [meta]))[0]
    got = ph.expand_placeholders(texts, image_out["image_grid_thw"], video["video_grid_thw"],
                                 video["video_timestamps"], timestamp_style=style)
    assert got == want
    ids = _ids(tokenizer, got)
    np.testing.assert_array_equal(ph.mm_token_type_ids(np.asarray(ids[0]), **_token_ids(tokenizer)),
                                  proc.create_mm_token_type_ids(ids)[0])
    assert ph.expand_placeholders(texts[0], image_out["image_grid_thw"], video["video_grid_thw"],
                                  video["video_timestamps"], timestamp_style=style) == got[0]  # str in, str out


@pytest.mark.parametrize("seconds", [0, 0.04, 0.5, 0.95, 0.99, 1.0, 2.5, 59.95, 123.456, 299.75])
def test_timestamp_text_matches_hf(tokenizer, seconds):
    for cls, style in [(Glm4vProcessor, "glm41v"), (Glm46VProcessor, "glm46v")]:
        proc = _processor(cls, tokenizer)
        want = proc.replace_frame_token_id(seconds, num_image_tokens=3)
        assert ph.video_placeholder([1, 2, 6], [seconds], style) == want
    assert ph.format_timestamp(2.99, "glm41v") == "2" and ph.format_timestamp(2.99, "glm46v") == "3.0 seconds"


def test_count_mismatch_raises_like_hf(hf_processor):
    proc, style = hf_processor
    image = PIL.Image.new("RGB", (56, 56))
    grid = ip.process_images(image)["image_grid_thw"]
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders but 1 images"):
        ph.expand_placeholders(IMG + IMG, image_grid_thw=grid)
    with pytest.raises(ValueError):
        proc(text=[IMG + IMG], images=[image])
    with pytest.raises(ValueError, match="0 <\\|image\\|> placeholders but 1 images"):
        ph.expand_placeholders("no image here", image_grid_thw=grid)
    with pytest.raises(ValueError, match="1 <\\|video\\|> placeholders but 0 videos"):
        ph.expand_placeholders(VID)
    with pytest.raises(ValueError, match="timestamps for 0 videos"):
        ph.expand_placeholders(VID, video_grid_thw=[[2, 4, 4]], timestamp_style=style)
    with pytest.raises(ValueError, match="needs 2 timestamps"):
        ph.expand_placeholders(VID, video_grid_thw=[[2, 4, 4]], video_timestamps=[[0.0]])
    with pytest.raises(ValueError, match="unknown timestamp style"):
        ph.format_timestamp(1.0, "glm5")


def test_mm_token_type_ids_batch_matches_hf(tokenizer):
    proc = _processor(Glm4vProcessor, tokenizer)
    token_ids = _token_ids(tokenizer)
    special = [token_ids["image_token_id"], token_ids["video_start_id"], token_ids["video_end_id"]]
    batch = RNG.choice(special + list(range(20, 40)), size=(6, 50), p=[0.3, 0.05, 0.05] + [0.6 / 20] * 20)
    np.testing.assert_array_equal(ph.mm_token_type_ids(batch, **token_ids),
                                  np.asarray(proc.create_mm_token_type_ids(batch.tolist())))
    with pytest.raises(ValueError, match="integer array"):
        ph.mm_token_type_ids(np.zeros((2, 3), np.float32), **token_ids)
    with pytest.raises(ValueError, match="integer array"):
        ph.mm_token_type_ids(np.zeros((1, 2, 3), np.int64), **token_ids)
