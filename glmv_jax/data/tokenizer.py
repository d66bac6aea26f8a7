"""Tokenizers behind one interface: a SentencePiece model trained on the built-in task suite, or an HF
`tokenizer.json` (how real GLM-V checkpoints ship). A checkpoint directory with a SentencePiece
`tokenizer.model` and no tokenizer.json (a stage directory, some HF exports) loads as SentencePiece.

Every GLM-V special token (`SPECIAL_TOKENS`) encodes to exactly one id and is never split; the text
around it is tokenized as if the special token were a boundary. Ids are plain Python ints.

    tok = suite_tokenizer(vocab_size=512)           # trained on the fly, cached on disk
    tok = HFTokenizer.from_file("ckpt/tokenizer.json")
    tok = load_tokenizer("ckpt/")                   # its tokenizer.json, else its tokenizer.model
    ids = tok.encode("<|user|>\\nHi")                # [id(<|user|>), id("\\n"), ...]
    tok.decode(ids) == "<|user|>\\nHi"
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer

from glmv_jax.data.synthetic import corpus_texts

# Tokens every GLM-V tokenizer must hold as single, never-split ids.
REQUIRED_SPECIAL_TOKENS = (
    "<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>",
    "<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>",
)
# GLM-4.1V uses the answer tags; GLM-4.5V/4.6V vocabularies may not hold them, and "/nothink" is a
# GLM-4.5V special token. Looked up when present.
OPTIONAL_SPECIAL_TOKENS = ("<answer>", "</answer>", "/nothink")
SPECIAL_TOKENS = REQUIRED_SPECIAL_TOKENS + OPTIONAL_SPECIAL_TOKENS
# Generation stops at any of these (docs/data.md section 4: `<|endoftext|>`, `<|user|>`, `<|observation|>`).
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# A checkpoint directory's tokenizer files, in order of preference.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(ValueError):
    """A tokenizer file or request that cannot be served (missing special token, unknown id, ...)."""


class GlmTokenizer:
    """Shared interface. Subclasses implement `_encode`, `_decode`, `_piece_to_id`, `_id_to_piece`, `vocab_size`."""

    vocab_size: int
    file_name: str          # what `save` writes in a checkpoint or stage directory

    def __init__(self, extra_stop_ids: Sequence[int] = ()):
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if self._piece_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks GLM-V special tokens {missing}")
        self.special_ids = {t: self._piece_to_id(t) for t in SPECIAL_TOKENS if self._piece_to_id(t) is not None}
        for token, token_id in self.special_ids.items():
            got = self._encode(token)
            if got != [token_id]:
                raise TokenizerError(f"special token {token!r} encodes to {got}, not the single id {token_id}")
        self.eos_id = self.special_ids["<|endoftext|>"]
        self.pad_id = self.eos_id
        self.image_id = self.special_ids["<|image|>"]
        self.video_id = self.special_ids["<|video|>"]
        stops = [self.special_ids[t] for t in STOP_TOKENS] + [int(i) for i in extra_stop_ids]
        self.stop_ids = tuple(dict.fromkeys(stops))
        for i in self.stop_ids:
            self._check_id(i)

    # -- public API --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text (special tokens written literally) -> ids; no BOS/EOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; special tokens are written out unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        if skip_special_tokens:
            specials = set(self.special_ids.values())
            ids = [i for i in ids if i not in specials]
        return self._decode(ids)

    def token_to_id(self, token: str) -> int:
        token_id = self._piece_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._id_to_piece(int(token_id))

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary of size {self.vocab_size}")

    # -- backend hooks -----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def _id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(GlmTokenizer):
    """A SentencePiece BPE model with the special tokens as user-defined symbols, identity normalisation and
    no dummy prefix. With byte fallback (256 byte pieces) any text round-trips, `decode(encode(s)) == s`;
    without it the vocabulary is ~256 smaller and characters unseen in training become `<unk>`."""

    file_name = "tokenizer.model"   # in a checkpoint or stage directory

    def __init__(self, model_proto: bytes, extra_stop_ids: Sequence[int] = ()):

        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.vocab_size = self._sp.get_piece_size()
        super().__init__(extra_stop_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 512, cache_dir: str | os.PathLike | None = None,
              byte_fallback: bool = True) -> "SentencePieceTokenizer":
        """Train deterministically on `texts` (split into lines), or load the model cached under
        `cache_dir` for the same inputs (key: hash of texts, vocab size, options, library version)."""

        lines = [line for text in texts for line in text.split("\n") if line]
        if not lines:
            raise TokenizerError("cannot train a SentencePiece model on empty text")
        symbols = list(SPECIAL_TOKENS) + ([] if byte_fallback else ["\n"])  # lines never hold "\n" itself
        options = dict(model_type="bpe", vocab_size=int(vocab_size), user_defined_symbols=symbols,
                       byte_fallback=bool(byte_fallback), split_digits=True, normalization_rule_name="identity",
                       add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0,
                       unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2)
        digest = hashlib.sha256(repr((sorted(options.items()), spm.__version__)).encode())
        for line in lines:
            digest.update(line.encode("utf-8") + b"\n")
        cache_path = _cache_dir(cache_dir) / f"spm-{vocab_size}-{digest.hexdigest()[:24]}.model"
        if cache_path.exists():
            return cls.from_file(cache_path)
        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, **options)
        except RuntimeError as err:  # e.g. "Vocabulary size is too high/small"
            raise TokenizerError(f"SentencePiece training failed for vocab_size={vocab_size}: {err}") from err
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(proto.getvalue())
        os.replace(tmp, cache_path)  # atomic: concurrent trainers write identical bytes
        return cls(proto.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.model_proto)

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return None if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id) else token_id

    def _id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class HFTokenizer(GlmTokenizer):
    """A `tokenizers` JSON tokenizer (e.g. a GLM-V checkpoint's tokenizer.json); the special tokens must be
    added tokens so the library never splits them."""

    file_name = "tokenizer.json"    # in a checkpoint or stage directory

    def __init__(self, tokenizer, extra_stop_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        super().__init__(extra_stop_ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike, extra_stop_ids: Sequence[int] = ()) -> "HFTokenizer":
        """`path` is a tokenizer.json or a checkpoint directory holding one."""

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(str(path)), extra_stop_ids)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def _id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


def tokenizer_file(folder: str | os.PathLike) -> Path | None:
    """The first of TOKENIZER_FILES in `folder`, or None."""
    return next((Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()), None)


def load_tokenizer(path: str | os.PathLike, extra_stop_ids: Sequence[int] = ()) -> GlmTokenizer:
    """A file (*.model -> SentencePieceTokenizer, else an HF tokenizer.json -> HFTokenizer) or a checkpoint
    directory (its tokenizer_file)."""
    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model (SentencePiece) in {path}")
        path = found
    if path.suffix == ".model":
        if not path.is_file():
            raise TokenizerError(f"no SentencePiece model at {path}")
        return SentencePieceTokenizer(path.read_bytes(), extra_stop_ids)
    return HFTokenizer.from_file(path, extra_stop_ids)


def suite_tokenizer(vocab_size: int = 512, cache_dir: str | os.PathLike | None = None,
                    records_per_domain: int = 300, byte_fallback: bool = True) -> SentencePieceTokenizer:
    """The SentencePiece tokenizer of the built-in task suite, trained on the text it produces (prompts,
    SFT answers in both response styles, captions, rendered through both chat templates)."""

    return SentencePieceTokenizer.train(corpus_texts(records_per_domain), vocab_size, cache_dir, byte_fallback)


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("GLMV_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glmv_jax")
    return Path(root) / "tokenizers"


def split_special(text: str, specials: Iterable[str] = SPECIAL_TOKENS) -> list[str]:
    """Split text into runs of plain text and single special tokens (longest match first)."""
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [part for part in re.split(pattern, text) if part]
