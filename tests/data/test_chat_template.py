"""The Python chat templates against the hub Jinja templates rendered with jinja2 the way transformers does
(trim_blocks, lstrip_blocks, loopcontrols, its tojson), and the token-level training examples built from them."""
import json

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import pytest

from glmv_jax.data import chat_template as ct
from glmv_jax.data.hub_templates import JINJA_TEMPLATES
from glmv_jax.data.synthetic import DOMAINS, generate
from glmv_jax.data.tool_calls import TOOLS_FOOTER, TOOLS_HEADER, ToolCall
from glmv_jax.data.tokenizer import SPECIAL_TOKENS, HFTokenizer, SentencePieceTokenizer

assert JINJA_TEMPLATES["glm46v"] != JINJA_TEMPLATES["glm45v"]


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter (jinja's own escapes HTML characters and sorts keys)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = tojson
JINJA = {name: _ENV.from_string(t) for name, t in JINJA_TEMPLATES.items()}


def jinja_render(messages, template, add_generation_prompt=False, enable_thinking=None, tools=None):
    """The reference: user string content with <image>/<video> markers becomes media items first."""
    msgs = [dict(m, content=ct.split_media_markers(m["content"]))
            if m["role"] == "user" and isinstance(m["content"], str) and ("<image>" in m["content"] or
                                                                          "<video>" in m["content"]) else m
            for m in messages]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return JINJA[template].render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)


# -- worked examples of the released templates ---------------------------------------------------------------
IMG = "<|begin_of_image|><|image|><|end_of_image|>"


def test_doc_examples_glm41v():
    q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    assert ct.render(q, "glm41v", add_generation_prompt=True) == \
        f"[gMASK]<sop><|user|>\n{IMG}What is in this image?<|assistant|>\n"
    sys = [{"role": "system", "content": "You are a helpful assistant."}] + q
    assert ct.render(sys, "glm41v", add_generation_prompt=True) == \
        f"[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\n{IMG}What is in this image?<|assistant|>\n"
    two = [{"role": "user", "content": "<image>How many cats?"},
           {"role": "assistant", "content": "<think>I count two cats.</think><answer>There are "
                                            "<|begin_of_box|>2<|end_of_box|> cats.</answer>"},
           {"role": "user", "content": "What colour are they?"}]
    assert ct.render(two, "glm41v", add_generation_prompt=True) == (
        f"[gMASK]<sop><|user|>\n{IMG}How many cats?<|assistant|>\n<think>I count two cats.</think><answer>There are "
        "<|begin_of_box|>2<|end_of_box|> cats.</answer><|user|>\nWhat colour are they?<|assistant|>\n")


def test_doc_examples_glm45v():
    q = [{"role": "user", "content": "<image>What is in this image?"}]
    for template in ("glm45v", "glm46v"):
        assert ct.render(q, template, add_generation_prompt=True) == \
            f"[gMASK]<sop><|user|>\n{IMG}What is in this image?<|assistant|>\n"
        assert ct.render(q, template, add_generation_prompt=True, enable_thinking=False) == \
            f"[gMASK]<sop><|user|>\n{IMG}What is in this image?/nothink<|assistant|>\n<think></think>\n"
    two = [{"role": "user", "content": "<image>How many cats?"},
           {"role": "assistant", "content": "<think>I count two cats.</think>\nThere are "
                                            "<|begin_of_box|>2<|end_of_box|> cats."},
           {"role": "user", "content": "What colour are they?"}]
    assert ct.render(two, "glm45v", add_generation_prompt=True) == (
        f"[gMASK]<sop><|user|>\n{IMG}How many cats?<|assistant|>\n<think></think>\nThere are "
        "<|begin_of_box|>2<|end_of_box|> cats.<|user|>\nWhat colour are they?<|assistant|>\n")


# -- many random conversations against jinja -------------------------------------------------------------
USER_STRINGS = ["<image>How many shapes?", "Compare <image> and <image>.", "<video>Describe this video.",
                "plain question", "  padded \n question /nothink", "<image>", "a\n\nb<image>c/nothink", ""]
ITEMS = [{"type": "image"}, {"type": "image", "image": "a.png"}, {"image": "b.png"}, {"type": "video"},
         {"video": ["f0.png", "f1.png"]}, {"type": "text", "text": "Look: "}, {"type": "text", "text": " end\n"},
         {"type": "text", "text": "/nothink"}]
ANSWERS = ["<think>I count two.</think><answer><|begin_of_box|>2<|end_of_box|></answer>",
           "<think>\nstep one\n\n</think>\n\nThere are <|begin_of_box|>3<|end_of_box|>.  ",
           "no thinking here", "", "  \n", "<think></think>", "a</think>b</think>c", "x<think>y</think>",
           "<think>r</think>\n<|begin_of_box|>[[1,2,3,4]]<|end_of_box|>"]
SYSTEMS = ["You are a helpful assistant.", "", " two\nlines "]


def random_conversation(rng, template):
    msgs = []
    if rng.random() < 0.4:
        content = SYSTEMS[rng.integers(len(SYSTEMS))]
        if template != "glm41v" and rng.random() < 0.3:
            content = [{"type": "text", "text": content}, {"type": "image"}]
        msgs.append({"role": "system", "content": content})
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            content = USER_STRINGS[rng.integers(len(USER_STRINGS))]
        else:
            content = [ITEMS[i] for i in rng.integers(len(ITEMS), size=int(rng.integers(1, 4)))]
        msgs.append({"role": "user", "content": content})
        if rng.random() < 0.8:
            msg = {"role": "assistant", "content": ANSWERS[rng.integers(len(ANSWERS))]}
            if template == "glm41v" and rng.random() < 0.2:
                msg["metadata"] = "meta"
            if template != "glm41v" and rng.random() < 0.2:
                msg["reasoning_content"] = " explicit\nreasoning "
            if template != "glm41v" and rng.random() < 0.15:
                msg["content"] = [{"type": "text", "text": msg["content"]}]
            msgs.append(msg)
            if template != "glm41v" and rng.random() < 0.2:
                msgs += [{"role": "tool", "content": "result"}] * int(rng.integers(1, 3))
    return msgs


@pytest.mark.parametrize("template", ["glm41v", "glm45v", "glm46v"])
def test_random_conversations_match_jinja(template):
    rng = np.random.default_rng(0)
    for _ in range(300):
        msgs = random_conversation(rng, template)
        gen = bool(rng.random() < 0.5)
        thinking = None if template == "glm41v" else [None, True, False][rng.integers(3)]
        expected = jinja_render(msgs, template, gen, thinking)
        assert ct.render(msgs, template, gen, thinking) == expected, msgs
        segments = ct.render_segments(msgs, template, gen, thinking)
        assert "".join(text for text, _ in segments) == expected


def test_render_errors():
    with pytest.raises(ct.ChatTemplateError, match="unknown chat template"):
        ct.render([{"role": "user", "content": "x"}], "glm5")
    with pytest.raises(ct.ChatTemplateError, match="no role 'tool'"):
        ct.render([{"role": "tool", "content": "x"}], "glm41v")
    with pytest.raises(ct.ChatTemplateError, match="unknown type"):
        ct.render([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "glm41v")
    with pytest.raises(ct.ChatTemplateError, match="lacks 'role' or 'content'"):
        ct.render([{"role": "user"}], "glm45v")
    with pytest.raises(ct.ChatTemplateError, match="no enable_thinking"):
        ct.render([{"role": "user", "content": "x"}], "glm41v", enable_thinking=False)
    with pytest.raises(ct.ChatTemplateError, match="system content must be a string"):
        ct.render([{"role": "system", "content": [{"type": "text", "text": "x"}]}], "glm41v")
    with pytest.raises(ct.ChatTemplateError, match="unknown response style"):
        ct.format_response("t", "1", style="glm5")


def test_format_response():
    assert ct.format_response("t", "42") == "<think>t</think><answer><|begin_of_box|>42<|end_of_box|></answer>"
    assert ct.format_response("t", "42", "It is ", style="glm45v") == \
        "<think>t</think>\nIt is <|begin_of_box|>42<|end_of_box|>"


# -- tools ---------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "crop", "description": "Crop <box> & zoom in",
                                           "parameters": {"type": "object", "properties": {
                                               "box": {"type": "array", "items": {"type": "number"}}}}}},
         {"name": "calculator", "description": "Évalue 2+2", "parameters": {"type": "object", "properties": {
             "expression": {"type": "string"}}, "required": ["expression"]}}]
ARG_KEYS = ["box", "expression", "image_index", "ключ"]
ARG_VALUES = ["a b", "é ü 中", "", "42", "line\nbreak", '"quoted"', 3, -1.5, True, None, [1, 2, 3, 4],
              {"a": [1, {"b": "c"}]}, 1e-7]
RESULT_ITEMS = [{"type": "text", "text": "Cropped:"}, {"type": "image"}, {"type": "image", "image": "crop.png"},
                {"type": "image_url", "image_url": {"url": "x"}}, {"type": "Video"}, "plain", {"output": "out"},
                {"type": "json_blob", "v": [1, "é"]}, {"type": "text"}]


def random_call(rng):
    keys = [ARG_KEYS[i] for i in rng.choice(len(ARG_KEYS), size=int(rng.integers(0, 4)), replace=False)]
    args = {k: ARG_VALUES[rng.integers(len(ARG_VALUES))] for k in keys}
    name = ["crop", "calculator", "web.search"][rng.integers(3)]
    style = rng.integers(3)
    if style == 0:
        return ToolCall(name, args)
    return {"name": name, "arguments": args} if style == 1 else \
        {"type": "function", "function": {"name": name, "arguments": args}}


def random_result(rng, template):
    if rng.random() < 0.5:
        return ["result", "", " two\nlines ", "Cropped:<|begin_of_image|>"][rng.integers(4)]
    items = RESULT_ITEMS if template == "glm46v" else ["plain", {"output": "out"}, ""]
    return [items[i] for i in rng.integers(len(items), size=int(rng.integers(1, 4)))]


def random_tool_conversation(rng, template):
    """random_conversation's turns with tool calls on some assistant turns, each followed by tool results."""
    msgs = []
    for msg in random_conversation(rng, template):
        if msg["role"] == "tool":
            continue
        msgs.append(msg)
        if msg["role"] == "assistant" and rng.random() < 0.6:
            msg["tool_calls"] = [random_call(rng) for _ in range(int(rng.integers(0, 3)))]
            msgs += [{"role": "tool", "content": random_result(rng, template)} for _ in range(int(rng.integers(1, 3)))]
    return msgs


@pytest.mark.parametrize("template", ["glm45v", "glm46v"])
def test_random_tool_conversations_match_jinja(template):
    rng = np.random.default_rng(1)
    for _ in range(300):
        msgs = random_tool_conversation(rng, template)
        tools = [TOOLS, TOOLS[1:], [], None][rng.integers(4)]
        gen = bool(rng.random() < 0.5)
        thinking = [None, True, False][rng.integers(3)]
        expected = jinja_render(msgs, template, gen, thinking, tools=tools)
        assert ct.render(msgs, template, gen, thinking, tools=tools) == expected, msgs
        segments = ct.render_segments(msgs, template, gen, thinking, tools=tools)
        assert "".join(text for text, _ in segments) == expected


def test_tool_doc_example_glm46v():
    """A crop call answered with an image: the call is assistant output, the result an observation turn."""
    msgs = [{"role": "user", "content": "<image>What does the sign say?"},
            {"role": "assistant", "content": "<think>Too small; zoom in.</think>",
             "tool_calls": [ToolCall("crop", {"box": [10, 20, 300, 400]})]},
            {"role": "tool", "content": [{"type": "text", "text": "Cropped:"}, {"type": "image"}]}]
    tools = [{"name": "calculator"}]
    expected = (f"[gMASK]<sop>{TOOLS_HEADER}{{\"name\": \"calculator\"}}\n{TOOLS_FOOTER}<|user|>\n{IMG}What does "
                "the sign say?<|assistant|>\n<think>Too small; zoom in.</think>\n<tool_call>crop\n<arg_key>box"
                "</arg_key>\n<arg_value>[10, 20, 300, 400]</arg_value>\n</tool_call><|observation|>\n<tool_response>\n"
                f"Cropped:{IMG}\n</tool_response><|assistant|>\n")
    assert ct.render(msgs, "glm46v", add_generation_prompt=True, tools=tools) == expected
    assert jinja_render(msgs, "glm46v", True, tools=tools) == expected
    segments = ct.render_segments(msgs, "glm46v", tools=tools)
    assert [text for text, out in segments if out] == [
        "<think>Too small; zoom in.</think>\n<tool_call>crop\n<arg_key>box</arg_key>\n<arg_value>[10, 20, 300, 400]"
        "</arg_value>\n</tool_call>"]
    assert ct.count_media(msgs) == (2, 0)


def test_tool_render_errors():
    calls = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "", "tool_calls": [ToolCall("crop", {"box": [1, 2, 3, 4]})]}]
    with pytest.raises(ct.ChatTemplateError, match="no tools"):
        ct.render(calls, "glm41v")
    with pytest.raises(ct.ChatTemplateError, match="no tools"):
        ct.render(calls[:1], "glm41v", tools=TOOLS)
    # ... because the released GLM-4.1V template drops them without a word
    assert jinja_render(calls, "glm41v", tools=TOOLS) == "[gMASK]<sop><|user|>\nx<|assistant|>\n"
    image_result = calls + [{"role": "tool", "content": [{"type": "image"}]}]
    with pytest.raises(ct.ChatTemplateError, match="Python reprs"):
        ct.render(image_result, "glm45v")
    assert "{'type': 'image'}" in jinja_render(image_result, "glm45v")  # the repr the error spares us
    for bad, match in [({"role": "tool", "content": [{"image": "a.png"}]}, "Python repr"),
                       ({"role": "tool", "content": [3]}, "Python repr"),
                       ({"role": "tool", "content": {"output": "x"}}, "string or a list"),
                       ({"role": "tool", "content": [{"type": "text", "text": 3}]}, "string 'text'"),
                       ({"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": '{"a": 1}'}]},
                        "OpenAI-style"),
                       ({"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}, "name"),
                       ({"role": "assistant", "content": "", "tool_calls": [ToolCall("f", {"a": {1, 2}})]},
                        "JSON-serializable")]:
        with pytest.raises(ct.ChatTemplateError, match=match):
            ct.render(calls[:1] + [bad], "glm46v")
    with pytest.raises(ct.ChatTemplateError, match="list of dicts"):
        ct.render(calls[:1], "glm46v", tools=["crop"])


def test_training_example_with_tool_calls(tok):
    """The calls are trained with their turn, then `<|observation|>` (which ends it); the results are not."""
    msgs = [{"role": "user", "content": "<image>Sign?"},
            {"role": "assistant", "content": "<think>zoom</think>",
             "tool_calls": [ToolCall("crop", {"box": [1, 2, 3, 4]})]},
            {"role": "tool", "content": [{"type": "image"}]},
            {"role": "assistant", "content": "<think>reads STOP</think>\n<|begin_of_box|>STOP<|end_of_box|>"}]
    record = {"id": "t", "images": ["a.png", "crop.png"], "messages": msgs}
    ids, mask = ct.build_training_example(record, tok, "glm46v")
    first, second = [text for text, out in ct.render_segments(msgs, "glm46v") if out]
    assert first.endswith("</tool_call>")
    assert _targets(ids, mask, tok) == first + "<|observation|>" + second + "<|user|>"
    assert (ids == tok.image_id).sum() == 2 and not mask[ids == tok.image_id].any()
    with_tools, tools_mask = ct.build_training_example(record, tok, "glm46v", tools=TOOLS)
    assert with_tools.tolist() == tok.encode(ct.render(msgs, "glm46v", tools=TOOLS)) + [tok.token_to_id("<|user|>")]
    assert _targets(with_tools, tools_mask, tok) == _targets(ids, mask, tok)
    prompt = ct.build_prompt(record, tok, "glm46v", tools=TOOLS)
    assert tok.decode(prompt).startswith("[gMASK]<sop>" + TOOLS_HEADER) and with_tools[:len(prompt)].tolist() == \
        tok.encode(ct.render(msgs[:1], "glm46v", add_generation_prompt=True, tools=TOOLS))


# -- tokens ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [jinja_render(random_conversation(np.random.default_rng(i), "glm41v"), "glm41v") for i in range(200)]
    return SentencePieceTokenizer.train(texts, vocab_size=320, cache_dir=tmp_path_factory.mktemp("spm"))


def _targets(ids, mask, tok):
    return tok.decode(ids[mask.astype(bool)])


SFT = {"id": "r1", "images": ["a.png"], "messages": [
    {"role": "user", "content": "<image>How many?"},
    {"role": "assistant", "content": "<think>two</think><answer><|begin_of_box|>2<|end_of_box|></answer>"}]}


@pytest.mark.parametrize("template", ["glm41v", "glm45v"])
def test_training_example_single_turn(tok, template):
    ids, mask = ct.build_training_example(SFT, tok, template)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    text = ct.render(SFT["messages"], template)
    assert ids.tolist() == tok.encode(text) + [tok.token_to_id("<|user|>")]
    prompt = ct.render(SFT["messages"][:1], template, add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt))
    assert ids[:n_prompt].tolist() == tok.encode(prompt)  # the header `<|assistant|>\n` is prompt, untrained
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()
    assert _targets(ids, mask, tok) == text[len(prompt):] + "<|user|>"


@pytest.mark.parametrize("template", ["glm41v", "glm45v"])
def test_training_example_multi_turn(tok, template):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>First?"},
            {"role": "assistant", "content": "<think>a</think>one"}, {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "<think>b</think>two"}]
    record = {"id": "m", "images": ["x.png"], "messages": msgs}
    ids, mask = ct.build_training_example(record, tok, template, end_of_turn="<|endoftext|>")
    assert ids.tolist() == tok.encode(ct.render(msgs, template)) + [tok.eos_id]
    targets = "".join(text for text, is_out in ct.render_segments(msgs, template) if is_out)
    first, second = [text for text, is_out in ct.render_segments(msgs, template) if is_out]
    assert targets == first + second
    assert _targets(ids, mask, tok) == first + "<|user|>" + second + "<|endoftext|>"
    user_id = tok.token_to_id("<|user|>")
    user_positions = np.flatnonzero(ids == user_id)
    assert mask[user_positions].tolist() == [0, 1]  # the user turn after an answer ends that answer


def test_training_example_image_expansion_and_errors(tok):
    ids, mask = ct.build_training_example(SFT, tok, image_token_counts=[5])
    plain_ids, plain_mask = ct.build_training_example(SFT, tok)
    assert (ids == tok.image_id).sum() == 5 and len(ids) == len(plain_ids) + 4
    assert mask.sum() == plain_mask.sum() and not mask[ids == tok.image_id].any()
    two = {"id": "t", "images": [1, 2], "messages": [{"role": "user", "content": "<image><image>Same?"},
                                                      {"role": "assistant", "content": "yes"}]}
    ids, _ = ct.build_training_example(two, tok, image_token_counts=[2, 3])
    runs = np.flatnonzero(ids == tok.image_id)
    assert len(runs) == 5
    with pytest.raises(ct.ChatTemplateError, match="image_token_counts"):
        ct.build_training_example(two, tok, image_token_counts=[2])
    with pytest.raises(ct.ChatTemplateError, match="1 image markers but 2 images"):
        ct.build_training_example(dict(SFT, images=[1, 2]), tok)
    with pytest.raises(ct.ChatTemplateError, match="no assistant turn"):
        ct.build_training_example(dict(SFT, messages=SFT["messages"][:1]), tok)
    with pytest.raises(ct.ChatTemplateError, match="over max_length=10"):
        ct.build_training_example(SFT, tok, max_length=10)
    with pytest.raises(ct.ChatTemplateError, match="'messages' list"):
        ct.build_training_example({"id": "x"}, tok)


@pytest.mark.parametrize("template,thinking", [("glm41v", None), ("glm45v", None), ("glm45v", False)])
def test_build_prompt(tok, template, thinking):
    prompt = ct.build_prompt(SFT, tok, template, enable_thinking=thinking)  # the answer turn is dropped
    text = ct.render(SFT["messages"][:1], template, add_generation_prompt=True, enable_thinking=thinking)
    assert prompt.tolist() == tok.encode(text) and text.endswith("<|assistant|>\n" + ("<think></think>\n"
                                                                                       if thinking is False else ""))
    expanded = ct.build_prompt(SFT, tok, template, image_token_counts=16, enable_thinking=thinking)
    assert (expanded == tok.image_id).sum() == 16
    with pytest.raises(ct.ChatTemplateError, match="no user turn"):
        ct.build_prompt({"id": "x", "messages": []}, tok)


def test_count_media():
    msgs = [{"role": "system", "content": "<image> literal in a system turn"},
            {"role": "user", "content": "<image><video>x"},
            {"role": "user", "content": [{"type": "image"}, {"image": "p"}, {"type": "text", "text": "<image>"}]}]
    assert ct.count_media(msgs) == (3, 1)


def glm_style_hf_tokenizer(texts):
    """Byte-level BPE behind GLM-4's pre-tokenizer split, GLM-V special tokens appended as added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return HFTokenizer(tk)


@pytest.mark.parametrize("template,style", [("glm41v", "glm41v"), ("glm45v", "glm45v")])
def test_suite_records_tokenize_like_whole_text(tok, template, style):
    """On suite records, segment-wise ids equal the whole text's ids, for SentencePiece and GLM-style BPE,
    and the ids before the answer are exactly the inference prompt's."""
    records = [r for d in DOMAINS for r in generate(d, 6, seed=2, style=style)]
    hf = glm_style_hf_tokenizer([ct.render(r["messages"], template) for r in records])
    for tokenizer in (tok, hf):
        for r in records:
            ids, mask = ct.build_training_example(r, tokenizer, template)
            assert ids.tolist() == tokenizer.encode(ct.render(r["messages"], template)) + [
                tokenizer.token_to_id("<|user|>")]
            prompt = ct.build_prompt(r, tokenizer, template)
            assert ids[:len(prompt)].tolist() == prompt.tolist()
            assert not mask[:len(prompt)].any() and mask[len(prompt):].all()
