"""SFT trains on assistant tokens only: the pipeline's loss_mask marks exactly each assistant turn (its
content plus the token that ends the turn), and the gradient of the runner's loss (supervised.make_loss_fn)
does not depend on any target outside that mask, while it does depend on every assistant target."""

import jax
import numpy as np
import pytest

from experiments.configs import sft
from glmv_jax.data.pipeline import data_config, make_pipeline, synthetic_records
from glmv_jax.train.experiment import setup
from glmv_jax.train.supervised import make_loss_fn

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}    # same math, faster compile
END_OF_TURN = "<|user|>"


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    cfg = sft.get_config("model=tiny")
    cfg.data.update(seq_len=128, batch_size=2, patch_budget=256, image_size=32, num_records=2, shuffle=False)
    cfg.mesh.ici, cfg.mesh.devices = {"data": 1}, 1
    return setup(cfg, str(tmp_path_factory.mktemp("sft_mask")))


@pytest.fixture(scope="module")
def grad_fn(exp):
    loss_fn = make_loss_fn(exp)
    return jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]), compiler_options=COMPILER_OPTIONS)


@pytest.fixture(scope="module")
def params(exp):
    """Random params of the model's tree (no init program to compile)."""
    from glmv_jax.models.glmv import init_params
    abstract = jax.eval_shape(lambda: init_params(exp.model_config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), abstract)


def segments(batch):
    """(row, segment id, positions) of every packed sample."""
    for row in range(batch["segment_ids"].shape[0]):
        for seg in range(1, batch["segment_ids"][row].max() + 1):
            yield row, seg, np.flatnonzero(batch["segment_ids"][row] == seg)


def test_loss_mask_marks_exactly_the_assistant_turn(exp):
    records = synthetic_records(data_config(exp.cfg.data))
    questions = {}        # assistant text -> the user texts it answers
    for r in records:
        user, assistant = r["messages"]
        questions.setdefault(assistant["content"], []).append(user["content"].replace("<image>", ""))
    tok = exp.tokenizer
    it = make_pipeline(exp.cfg.data, tok, exp.processor, seed=0)
    seen = 0
    while seen < len(records):
        batch = next(it)
        assert not batch["loss_mask"][batch["segment_ids"] == 0].any()              # never on padding
        assert not batch["loss_mask"][batch["token_type"] != 0].any()               # never on image tokens
        for row, _, pos in segments(batch):
            masked = pos[batch["loss_mask"][row, pos] > 0]
            # one contiguous run that ends on the segment's last target (the end-of-turn token)
            np.testing.assert_array_equal(masked, np.arange(masked[0], pos[-1]))
            answer = tok.decode(batch["targets"][row, masked].tolist())
            prompt = tok.decode(batch["input_ids"][row, pos[0]:masked[0] + 1].tolist())
            assert answer.endswith(END_OF_TURN), answer
            assert answer[:-len(END_OF_TURN)] in questions, answer          # exactly a record's assistant text
            assert prompt.endswith("<|assistant|>\n"), prompt              # everything before it is prompt
            assert any(q in prompt for q in questions[answer[:-len(END_OF_TURN)]]), (prompt, answer)
            seen += 1
    assert it.stats()["skipped_total"] == 0


def test_sft_gradient_comes_only_from_assistant_targets(exp, grad_fn, params):
    batch = next(make_pipeline(exp.cfg.data, exp.tokenizer, exp.processor, seed=0))
    mask = batch["loss_mask"] > 0
    assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum() / 2           # most tokens are prompt/images
    vocab = exp.model_config.text.vocab_size
    rng = np.random.default_rng(1)
    base = jax.device_get(grad_fn(params, batch))

    outside = dict(batch, targets=np.where(mask, batch["targets"], rng.integers(0, vocab, mask.shape)).astype(np.int32))
    assert (outside["targets"] != batch["targets"]).sum() > 0.9 * (~mask).sum()
    padding = batch["segment_ids"] == 0
    outside["input_ids"] = np.where(padding, rng.integers(0, vocab, mask.shape), batch["input_ids"]).astype(np.int32)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(grad_fn(params, outside)), base)

    row, col = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    inside = dict(batch, targets=batch["targets"].copy())
    inside["targets"][row, col] = (batch["targets"][row, col] + 1) % vocab
    changed = jax.device_get(grad_fn(params, inside))
    lm = lambda g: g["lm_head"]["kernel"] if "lm_head" in g else g["text"]["embed"]["embedding"]
    assert np.abs(lm(changed) - lm(base)).max() > 1e-4
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), changed, base))
    assert sum(d > 0 for d in diffs) > len(diffs) // 2          # one target moves most gradients


def test_make_loss_fn_rejects_misshapen_targets(exp, params):
    batch = next(make_pipeline(exp.cfg.data, exp.tokenizer, exp.processor, seed=0))
    bad = dict(batch, loss_mask=batch["loss_mask"][:, :-1])
    with pytest.raises(ValueError, match="targets .* and loss_mask .* must have the same shape"):
        jax.eval_shape(lambda p: make_loss_fn(exp)(p, bad, None), params)


def test_chunked_loss_equals_whole_logits_loss(exp, params):
    """train.loss_chunk: the cross-entropy over 32-position chunks (no [B, T, V] logits) == over whole logits,
    in value, token count and gradient; a chunk that does not divide seq_len is refused."""
    batch = next(make_pipeline(exp.cfg.data, exp.tokenizer, exp.processor, seed=0))
    whole, chunked = make_loss_fn(exp, loss_chunk=0), make_loss_fn(exp, loss_chunk=32)
    (loss_w, (count_w, _)), grad_w = jax.value_and_grad(lambda p: whole(p, batch, None), has_aux=True)(params)
    (loss_c, (count_c, _)), grad_c = jax.value_and_grad(lambda p: chunked(p, batch, None), has_aux=True)(params)
    assert float(count_w) == float(count_c) > 0
    np.testing.assert_allclose(float(loss_c), float(loss_w), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 grad_c, grad_w)
    with pytest.raises(ValueError, match="loss_chunk 48 must be 0"):
        make_loss_fn(exp, loss_chunk=48)
