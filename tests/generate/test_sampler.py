"""Generation engine: KV-cached decoding against full forwards, greedy against HF generate, sampling
filters and log-probs, stop ids, forced answering, GRPO rollout batches, the chat command."""

import contextlib
import io
import json

import jax
import numpy as np
import PIL.Image
import pytest
import torch

from experiments import chat
from experiments.configs import sft
from glmv_jax.config import tiny
from glmv_jax.convert.hf import hf_state_dict_to_params
from glmv_jax.data.synthetic import generate as suite
from glmv_jax.data.transforms import Processor
from glmv_jax.generate import kv_cache, loading, sampler
from glmv_jax.generate.loading import load_model
from glmv_jax.generate.prompts import batch_prompts
from glmv_jax.models import glmv
from glmv_jax.models.glmv import init_params
from glmv_jax.rl import rollout
from glmv_jax.rl.grpo import token_logprobs
from glmv_jax.train.checkpoint import Checkpointer
from glmv_jax.train.experiment import _tokenizer, model_config_for
from glmv_jax.train.optimizer import build_optimizer
from glmv_jax.train.state import train_state_from_params
from tests.helpers import SPANS, full_logits, prompt_of, rel_err, tiny_hf_dir
from tests.hf_oracle import build_hf_model, multimodal_inputs

N = 6


@pytest.fixture(scope="module")
def config():
    return tiny()


@pytest.fixture(scope="module")
def hf_model(config):
    return build_hf_model(config, seed=0)


@pytest.fixture(scope="module")
def params(config, hf_model):
    return hf_state_dict_to_params({k: v.numpy() for k, v in hf_model.state_dict().items()}, config)


@pytest.fixture(scope="module")
def inputs(config):
    """image, video and text prompts of different lengths (12, 26 and 8 tokens)."""
    return [multimodal_inputs(config, SPANS[name], seed=i, text_len=2 + 3 * i) for i, name in enumerate(SPANS)]


@pytest.fixture(scope="module")
def prompts(config, inputs):
    return [prompt_of(config, x) for x in inputs]


@pytest.fixture(scope="module")
def greedy(config, params, prompts):
    return sampler.generate(config, params, prompts, max_new_tokens=N, temperature=0.0)


# ----------------------------------------------------------------------------------------------- KV cache

def test_cached_decode_equals_full_forward(config, params, inputs, prompts):
    batch = batch_prompts(prompts)
    tp = batch["input_ids"].shape[1]
    assert tp == 28 and (batch["segment_ids"].sum(1) == [12, 26, 8]).all() and batch["segment_ids"][:, -1].all()
    feed = np.random.default_rng(0).integers(2, 200, size=(3, N)).astype(np.int32)
    logits, caches = jax.jit(lambda p, b: kv_cache.prefill(config, p, b, tp + N))(params, batch)
    assert caches["layers"].k.shape == (2, 3, tp + N, 2, 16)
    step = jax.jit(lambda p, c, t, s, pos: kv_cache.decode_step(config, p, c, t, s, pos, np.ones(3, bool)))
    got = [np.asarray(logits)]
    for j in range(N - 1):
        logits, caches = step(params, caches, feed[:, j], tp + j, batch["prompt_len"] + j + batch["rope_delta"])
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    for r, (x, p) in enumerate(zip(inputs, prompts)):
        length = len(p["input_ids"])
        ref = full_logits(config, params, x, feed[r, :N - 1])[length - 1:]
        assert rel_err(got[r], ref) <= 1e-5, r


def test_batch_prompts_shares_vision_between_samples(config, prompts):
    batch = batch_prompts(prompts, num_samples=2)
    assert batch["input_ids"].shape[0] == 6 and (batch["prompt_len"] == [12, 12, 26, 26, 8, 8]).all()
    real = int((batch["patch_segment"] > 0).sum())
    assert real == len(prompts[0]["pixel_values"]) + len(prompts[1]["pixel_values"])   # patches once per prompt
    vis = batch["token_type"] > 0
    assert (batch["vision_index"][0][vis[0]] == batch["vision_index"][1][vis[1]]).all()
    assert batch["vision_index"][2][vis[2]].min() == len(prompts[0]["pixel_values"]) // 4


# ----------------------------------------------------------------------------------------------- greedy vs HF

@pytest.mark.parametrize("name", ["image", "video"])
def test_greedy_equals_hf_generate(name, hf_model, inputs, greedy):
    """HF generates each prompt alone; ours is the row of the left-padded 3-prompt batch."""
    i = list(SPANS).index(name)
    hf_in = {k: torch.from_numpy(v) for k, v in inputs[i].items()}
    with torch.no_grad():
        ref = hf_model.generate(**hf_in, max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[0, hf_in["input_ids"].shape[1]:].numpy()
    assert greedy["tokens"][i].tolist() == ref.tolist()
    assert greedy["lengths"][i] == N and greedy["truncated"][i] and not greedy["forced"][i]


def test_moe_greedy_equals_hf_generate():
    """GLM-4.5V layout (half-split rope, routed experts on one token per step): image + text prompts batched."""
    config = tiny(moe=True)
    hf = build_hf_model(config, seed=0)
    params = hf_state_dict_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    inputs = [multimodal_inputs(config, SPANS[name], seed=i, text_len=2 + 3 * i) for i, name in enumerate(("image", "text"))]
    out = sampler.generate(config, params, [prompt_of(config, x) for x in inputs], max_new_tokens=4, temperature=0.0)
    for r, x in enumerate(inputs):
        with torch.no_grad():
            ref = hf.generate(**{k: torch.from_numpy(v) for k, v in x.items()}, max_new_tokens=4, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out["tokens"][r].tolist() == ref[0, x["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------- sampling

def test_sampling_is_deterministic_and_filters_reduce_to_greedy(config, params, prompts, greedy):
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = sampler.generate(config, params, prompts, rng=jax.random.key(3), **kw)
    b = sampler.generate(config, params, prompts, rng=jax.random.key(3), **kw)
    c = sampler.generate(config, params, prompts, rng=jax.random.key(4), **kw)
    assert (a["tokens"] == b["tokens"]).all() and (a["logprobs"] == b["logprobs"]).all()
    assert (a["tokens"] != c["tokens"]).any() and (a["tokens"] != greedy["tokens"]).any()
    for filt in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)):
        out = sampler.generate(config, params, prompts, rng=jax.random.key(5), **kw, **filt)
        assert (out["tokens"] == greedy["tokens"]).all(), filt
    wide = sampler.generate(config, params, prompts, rng=jax.random.key(3), top_k=10 ** 6, top_p=1.0 - 1e-7, **kw)
    assert (wide["tokens"] == a["tokens"]).all()            # filters that keep everything change nothing


def test_filter_logits():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = lambda **kw: np.isfinite(np.where(sampler.filter_logits(x, **kw) > -1e30, 1, np.inf))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.9) == [True, True, True, False]


def test_rollout_logprobs_equal_full_forward(config, params, prompts):
    """old_logp of the rollout batch == token_logprobs(apply(batch), targets, T) wherever response_mask."""
    temp = 0.7
    kw = dict(num_samples=1, max_new_tokens=N, stop_ids=(), rng=jax.random.key(1), temperature=temp)
    traj = rollout.rollout(config, params, prompts, **kw)
    merge_area = config.vision.spatial_merge_size ** 2
    batch = rollout.assemble_batch(prompts, 1, traj.generation(), merge_area=merge_area)
    mask = batch["response_mask"] > 0
    assert mask.sum(1).tolist() == [N] * 3
    assert (batch["targets"][mask].reshape(3, N) == traj.tokens).all()
    logits = jax.jit(lambda p, b: glmv.apply(config, p, b))(params, batch)
    ref = np.asarray(token_logprobs(logits, batch["targets"], temperature=temp))
    np.testing.assert_allclose(batch["old_logp"][mask], ref[mask], rtol=0, atol=2e-5)
    presplit = rollout.grpo_batch(prompts, traj, np.zeros(3), num_minibatches=3, merge_area=merge_area)
    assert presplit["input_ids"].shape == (3, 1) + batch["input_ids"].shape[1:]
    assert presplit["position_ids"].shape[:3] == (3, 3, 1)
    np.testing.assert_array_equal(presplit["old_logp"].reshape(batch["old_logp"].shape), batch["old_logp"])
    assert int((presplit["patch_segment"][2] > 0).sum()) == 0                     # the text-only row
    assert int((presplit["patch_segment"][0] > 0).sum()) == len(prompts[0]["pixel_values"])


# ----------------------------------------------------------------------------------------------- stop / force

def test_stop_ids_end_rows_independently(config, params, prompts, greedy):
    stop = int(greedy["tokens"][0, 2])
    out = sampler.generate(config, params, prompts, max_new_tokens=N, temperature=0.0, stop_ids=[stop], pad_id=0)
    for r in range(3):
        hits = np.flatnonzero(greedy["tokens"][r] == stop)
        length = int(hits[0]) + 1 if hits.size else N
        assert out["lengths"][r] == length and out["finished"][r] == bool(hits.size)
        assert out["truncated"][r] == (not hits.size)
        assert (out["tokens"][r, :length] == greedy["tokens"][r, :length]).all()
        assert (out["tokens"][r, length:] == 0).all() and (out["logprobs"][r, length:] == 0).all()
        assert out["response_mask"][r].sum() == length
    assert out["lengths"][0] <= 3 and out["finished"][0]
    assert not out["finished"].all()              # another row ran on after row 0 stopped


def test_forced_answering(config, params, inputs, prompts, greedy):
    budget, n = 2, N
    first = greedy["tokens"][:, :budget]
    # row 0 closes its thinking on its own (its 2nd greedy token plays `</think>`); the others get forced
    think_end = int(first[0, 1])
    assert not (first[1:] == think_end).any()
    opener = next(t for t in range(2, 200) if t != think_end)
    force = [think_end, opener]
    out = sampler.generate(config, params, prompts, max_new_tokens=n, temperature=0.0, thinking_budget=budget,
                           force_answer_ids=force)
    assert out["forced"].tolist() == [False, True, True]
    assert (out["tokens"][0] == greedy["tokens"][0]).all()
    for r in (1, 2):
        assert (out["tokens"][r, :budget] == first[r]).all()
        assert out["tokens"][r, budget:budget + 2].tolist() == force
        assert out["forced_mask"][r].tolist() == [j in (budget, budget + 1) for j in range(n)]
        assert out["response_mask"][r].tolist() == [j not in (budget, budget + 1) for j in range(n)]
        # the forced tokens went through the cache: what follows is the full forward's greedy continuation
        so_far = out["tokens"][r, :budget + 2]
        ref = full_logits(config, params, inputs[r], so_far)[-1]
        assert out["tokens"][r, budget + 2] == int(np.argmax(ref))
    traj = rollout.rollout(config, params, prompts, num_samples=1, max_new_tokens=n, stop_ids=(),
                           rng=None, temperature=0.0, thinking_budget=budget, force_answer_ids=force)
    batch = rollout.assemble_batch(prompts, 1, traj.generation())
    plen = len(prompts[1]["input_ids"])
    assert batch["response_mask"][1, plen - 1:plen - 1 + n].tolist() == out["response_mask"][1].tolist()


def test_response_text_keeps_answer_drops_turn_end():
    class Tok:
        stop_ids = (9,)
        def decode(self, ids):
            return "|".join(map(str, ids))
    assert sampler.response_text(Tok(), [3, 4, 9, 0], 3) == "3|4"
    assert sampler.response_text(Tok(), [3, 4, 5, 0], 3) == "3|4|5"


def test_bad_inputs_raise(config, params, prompts):
    run = lambda **kw: sampler.generate(config, params, prompts, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="top_p"):
        run(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        run(temperature=-1.0)
    with pytest.raises(ValueError, match="needs force_answer_ids"):
        run(thinking_budget=2)
    with pytest.raises(ValueError, match="thinking_budget 3 must be"):
        run(thinking_budget=3, force_answer_ids=[5, 6])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(stop_ids=[10 ** 6])
    with pytest.raises(ValueError, match="lacks"):
        sampler.generate(config, params, [{"input_ids": [1]}], max_new_tokens=2)
    bad = dict(prompts[0], pixel_values=prompts[0]["pixel_values"][:8])
    with pytest.raises(ValueError, match="patch rows"):
        sampler.generate(config, params, [bad], max_new_tokens=2)


# ----------------------------------------------------------------------------------------------- chat / generate_fn

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF checkpoint whose vocabulary and special ids are those of a tokenizer.json built here."""
    return tiny_hf_dir(tmp_path_factory.mktemp("tiny_chat"))


def test_chat_command_runs(hf_dir, tmp_path):
    image = tmp_path / "img.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(image)
    argv = ["--checkpoint", str(hf_dir), "--image", str(image), "--prompt", "How many shapes?",
            "--max-new-tokens", "8", "--min-pixels", "256", "--max-pixels", "1280"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        response = chat.main(argv)
    assert printed.getvalue() == response + "\n" and response.strip()
    assert chat.main(argv) == response                                  # greedy by default: reproducible
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.main(["--checkpoint", str(hf_dir), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="neither an HF checkpoint"):
        chat.main(["--checkpoint", str(tmp_path), "--image", str(image)])


def test_make_generate_fn_for_difficulty(hf_dir):
    bundle = load_model(hf_dir)
    processor = Processor.for_model(bundle.config, min_pixels=1024, max_pixels=1024)
    records = suite("counting", 2, seed=0, kind="rl", image_size=32)
    fn = loading.make_generate_fn(bundle.params, bundle.config, bundle.tokenizer, processor, max_new_tokens=6,
                                  temperature=1.0, top_p=1.0, seed=0, style="glm41v")
    texts = fn(records, 2)
    assert [len(group) for group in texts] == [2, 2] and all(isinstance(t, str) for g in texts for t in g)
    again = loading.make_generate_fn(bundle.params, bundle.config, bundle.tokenizer, processor, max_new_tokens=6,
                                     temperature=1.0, top_p=1.0, seed=0, style="glm41v")(records, 2)
    assert again == texts                                              # seeded


def test_load_model_from_a_run_work_directory(tmp_path):
    """experiments.run layout: <work>/config.json with stages, <work>/<i>_<stage>/checkpoints (orbax)."""
    cfg = sft.get_config("model=tiny")
    stage = json.loads(cfg.to_json_best_effort())
    (tmp_path / "config.json").write_text(json.dumps({"stages": [stage, stage]}))
    model_config = model_config_for(cfg, _tokenizer(cfg))
    abstract = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))    # no init compile
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    with Checkpointer(tmp_path / "1_sft" / "checkpoints", save_every=1) as ckpt:
        ckpt.save(train_state_from_params(params, build_optimizer(cfg.optimizer), jax.random.key(0)), None, 4)
    bundle = load_model(tmp_path)               # the pipeline directory: its last stage with checkpoints
    assert bundle.config == model_config and bundle.processor.template == "glm41v"
    jax.tree.map(np.testing.assert_array_equal, bundle.params, jax.device_get(params))
