"""Tokenizers: the suite's SentencePiece model (trained on the fly, cached) and HF tokenizer.json files, with
every GLM-V special token a single never-split id; transformers' fast tokenizer is the oracle for the latter."""
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from glmv_jax.data import tokenizer as T
from glmv_jax.data.chat_template import render
from glmv_jax.data.synthetic import DOMAINS, generate
from tests.helpers import build_tokenizer_json

# GLM-4's pre-tokenizer split (cl100k-style), then byte-level, as in GLM checkpoints' tokenizer.json.
MIXED = ["[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>How many shapes?<|assistant|>\n"
         "<think>I see 2 red circles.</think><answer><|begin_of_box|>2<|end_of_box|></answer><|user|>",
         "a<think>b</think>c", "<think><think>", "x <|image|> y\n\n<|video|>\tz", "  lead  and trail  ",
         "digits 1234567 and 3.25, [[12,340,56,780]]", 'é ü 中文 🙂 {"action":"click","box":[1,2,3,4]}',
         "<|begin_of_video|><|video|><|end_of_video|>/nothink<answer>7</answer>", "<|not_special|> <image>", ""]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    cache = tmp_path_factory.mktemp("suite_cache")
    return T.suite_tokenizer(vocab_size=512, cache_dir=cache, records_per_domain=30), cache


def check_specials(tok, tokens=T.SPECIAL_TOKENS):
    ids = [tok.token_to_id(t) for t in tokens]
    assert len(set(ids)) == len(ids)
    for token, token_id in zip(tokens, ids):
        assert tok.encode(token) == [token_id] == [tok.special_ids[token]]
        assert tok.decode([token_id]) == token and tok.id_to_token(token_id) == token


def check_text_around_specials(tok, texts):
    for text in texts:
        pieces = [tok.encode(part) for part in T.split_special(text, tok.special_ids)]
        assert tok.encode(text) == [i for piece in pieces for i in piece], text


def test_suite_specials_and_round_trip(suite):
    tok, _ = suite
    assert tok.vocab_size == 512
    check_specials(tok)
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.stop_ids == tuple(tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert (tok.image_id, tok.video_id) == (tok.token_to_id("<|image|>"), tok.token_to_id("<|video|>"))
    texts = MIXED + [render(r["messages"], "glm41v") for d in DOMAINS for r in generate(d, 3, seed=5)]
    check_text_around_specials(tok, texts)
    for text in texts:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, np.int32)) == text
    ids = tok.encode("<think>2</think>x")
    assert tok.decode(ids, skip_special_tokens=True) == "2x"


def test_suite_tokenizer_is_compact_on_suite_text(suite):
    """Words the suite uses are merged pieces, digits are single pieces (split_digits)."""
    tok, _ = suite
    assert len(tok.encode("How many shapes are in the image?")) < len("How many shapes are in the image?") / 2
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]


def test_suite_training_is_deterministic_and_cached(suite, tmp_path, monkeypatch):
    tok, cache = suite
    files = sorted(cache.glob("*.model"))
    assert len(files) == 1 and files[0].read_bytes() == tok.model_proto
    again = T.suite_tokenizer(vocab_size=512, cache_dir=tmp_path, records_per_domain=30)  # trained afresh
    assert again.model_proto == tok.model_proto

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds the model")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    cached = T.suite_tokenizer(vocab_size=512, cache_dir=cache, records_per_domain=30)
    assert cached.model_proto == tok.model_proto
    with pytest.raises(AssertionError, match="retrained"):  # other inputs -> another key -> trains
        T.suite_tokenizer(vocab_size=500, cache_dir=cache, records_per_domain=30)


def test_suite_without_byte_fallback(tmp_path):
    """A ~256 smaller vocabulary for tiny models: suite text still round-trips, unseen characters -> <unk>."""
    tok = T.suite_tokenizer(vocab_size=200, cache_dir=tmp_path, records_per_domain=30, byte_fallback=False)
    assert tok.vocab_size == 200
    check_specials(tok)
    texts = [render(r["messages"], t) for d in DOMAINS for r in generate(d, 3, seed=7) for t in ("glm41v", "glm45v")]
    check_text_around_specials(tok, texts)
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("\n")) == 1 and tok.encode("中") == [0]


def test_sentencepiece_save_load(suite, tmp_path):
    tok, _ = suite
    tok.save(tmp_path / "suite.model")
    loaded = T.load_tokenizer(tmp_path / "suite.model")
    assert isinstance(loaded, T.SentencePieceTokenizer)
    assert loaded.encode(MIXED[0]) == tok.encode(MIXED[0])
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED[0]) == tok.encode(MIXED[0])  # grain workers pickle it


def test_errors(suite, tmp_path):
    tok, _ = suite
    with pytest.raises(T.TokenizerError, match="not in the vocabulary"):
        tok.token_to_id("<|no_such_token|>")
    with pytest.raises(T.TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(T.TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(["a"])
    with pytest.raises(T.TokenizerError, match="empty text"):
        T.SentencePieceTokenizer.train(["", "\n"], cache_dir=tmp_path)
    with pytest.raises(T.TokenizerError, match="vocab_size=100000"):
        T.SentencePieceTokenizer.train(["tiny corpus"], vocab_size=100000, cache_dir=tmp_path)
    with pytest.raises(T.TokenizerError, match="no tokenizer.json"):
        T.load_tokenizer(tmp_path)
    with pytest.raises(T.TokenizerError, match="no SentencePiece model"):
        T.load_tokenizer(tmp_path / "missing.model")


# -- HF tokenizer.json ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    return build_tokenizer_json(tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_hf_tokenizer_matches_transformers(hf_file):

    tok = T.HFTokenizer.from_file(hf_file)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(hf_file))
    assert tok.vocab_size == len(oracle)
    check_specials(tok)
    assert min(tok.special_ids.values()) >= tok.vocab_size - len(T.SPECIAL_TOKENS)  # appended, GLM-style
    texts = MIXED + [render(r["messages"], t) for d in DOMAINS for r in generate(d, 2, seed=3)
                     for t in ("glm41v", "glm45v")]
    check_text_around_specials(tok, texts)
    for text in texts:
        ids = tok.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False) == text
    from_dir = T.load_tokenizer(hf_file.parent)
    assert isinstance(from_dir, T.HFTokenizer) and from_dir.encode(MIXED[0]) == tok.encode(MIXED[0])
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED[0]) == tok.encode(MIXED[0])


def test_hf_tokenizer_optional_tokens_and_stop_ids(tmp_path):
    path = build_tokenizer_json(tmp_path / "tokenizer.json", specials=T.REQUIRED_SPECIAL_TOKENS)  # 4.5V-like
    tok = T.HFTokenizer.from_file(path, extra_stop_ids=[7])
    assert "<answer>" not in tok.special_ids and "<think>" in tok.special_ids
    assert tok.stop_ids[-1] == 7 and len(tok.stop_ids) == 4
    with pytest.raises(T.TokenizerError, match="outside the vocabulary"):
        T.HFTokenizer.from_file(path, extra_stop_ids=[10 ** 6])


def test_hf_tokenizer_rejects_missing_or_split_specials(tmp_path):
    missing = [t for t in T.REQUIRED_SPECIAL_TOKENS if t != "<|image|>"]
    path = build_tokenizer_json(tmp_path / "a.json", specials=missing)
    with pytest.raises(T.TokenizerError, match=r"lacks GLM-V special tokens \['<\|image\|>'\]"):
        T.HFTokenizer.from_file(path)
    # "<think>" in the BPE vocabulary but not an added token: the pre-tokenizer splits it into pieces
    path = build_tokenizer_json(tmp_path / "b.json", specials=[t for t in T.REQUIRED_SPECIAL_TOKENS if t != "<think>"])
    spec = json.loads(path.read_text())
    spec["model"]["vocab"]["<think>"] = max(spec["model"]["vocab"].values()) + len(T.REQUIRED_SPECIAL_TOKENS) + 1
    path.write_text(json.dumps(spec))
    assert Tokenizer.from_file(str(path)).token_to_id("<think>") is not None
    with pytest.raises(T.TokenizerError, match="'<think>' encodes to"):
        T.HFTokenizer.from_file(path)


def test_a_directory_with_only_a_sentencepiece_model_loads(tmp_path):
    """An HF-style directory with tokenizer.model and no tokenizer.json (trained here with SentencePiece)."""
    text = tmp_path / "text.txt"
    text.write_text("How many red circles are there?\nThere are 3 red circles.\nRead the sign: OPEN 24 HOURS.\n" * 4)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=80,
                                   hard_vocab_limit=False, user_defined_symbols=list(T.SPECIAL_TOKENS),
                                   add_dummy_prefix=False, minloglevel=2)
    text.unlink()
    tok = T.load_tokenizer(tmp_path)
    assert isinstance(tok, T.SentencePieceTokenizer)
    check_specials(tok)
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    sample = "<|user|>How many red circles?<|assistant|><think>3</think>"
    assert tok.encode(sample) == reference.encode(sample) and tok.decode(tok.encode(sample)) == sample
    build_tokenizer_json(tmp_path / "tokenizer.json")                    # both files: tokenizer.json wins
    assert isinstance(T.load_tokenizer(tmp_path), T.HFTokenizer)
