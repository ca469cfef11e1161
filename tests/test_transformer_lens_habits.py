"""The everyday TransformerLens and HF calls, on every family (the toy, and tiny random Qwen2.5-Omni,
video-SALMONN 2+ and Qwen3-Omni with their offline tokenizers), each against TransformerLens's documented
behaviour or an independent reference: text in (a string is the family's text-only prompt), answers as words,
the loss over HF's labels (against a hand-written cross-entropy), stop_at_layer / start_at_layer, gradients
(every hook point's against autograd on the same activations), sampling (against a loop without a KV cache
that samples with the same generator), the conditional hook points, and the weights and config (TransformerLens's
shapes, values against the checkpoint's tensors). The HF comparisons are in test_hf_habits.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_cases import NAMES, family, tokenizer

from hooked_av.utils import conditional, get_act_name, position_major

torch.set_num_threads(1)
CASES = ("toy", *NAMES)
QUESTION = {"toy": "what colour is the shape ?"} | {n: "Which clip has the dog ?" for n in NAMES}
WORDS = {"toy": ("red", "blue")} | {n: ("dog", "cat") for n in NAMES}


def build(name: str, dtype=torch.float32):
    if name == "toy":
        import hooked_av

        return hooked_av.load("toy", dtype=dtype)
    model, _ = family(name)
    model.tokenizer = tokenizer(name)
    return model.to(dtype)


def media_prompt(model, name: str, answer: str | None = None) -> dict:
    """One prompt with media, from the family's own prepare: the toy's clip, else an image."""
    if name == "toy":
        from hooked_av.toy.clips import SAMPLE_RATE, render_clips

        _, video, audio = render_clips(1, seed=3)
        return model.prepare(QUESTION[name], video=video[0].round().astype("uint8"), audio=(audio[0], SAMPLE_RATE),
                             answer=answer)
    img = (np.random.default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)
    return model.prepare(QUESTION[name], image=img, answer=answer)


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in CASES}


def no_grad(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


# ---- text in ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_a_string_is_the_familys_text_only_prompt_and_the_token_helpers_agree_with_it(models, name):
    model, q = models[name], QUESTION[name]
    tok = model.tokenizer
    inputs = model.prepare(q)
    ids = model.to_tokens(q)
    assert torch.equal(ids, inputs["input_ids"])  # what model(q) runs
    assert torch.equal(no_grad(model, q), no_grad(model, **inputs))
    _, cache = model.run_with_cache(q, names_filter="blocks.0.hook_resid_pre")
    assert cache["blocks.0.hook_resid_pre"].shape[:2] == ids.shape
    strs = model.to_str_tokens(q)
    assert strs == [tok.decode([i]) for i in ids[0].tolist()] and len(strs) == ids.shape[1]  # one per token
    assert model.to_str_tokens(ids) == strs == model.to_str_tokens(ids[0])
    with pytest.raises(ValueError, match="one row"):
        model.to_str_tokens(torch.cat([ids, ids]))
    assert model.to_string(ids[0]) == tok.decode(ids[0].tolist(), clean_up_tokenization_spaces=False)
    assert model.to_string(ids) == [model.to_string(ids[0])]
    word, other = WORDS[name]
    assert model.to_single_token(word) == tok.convert_tokens_to_ids(word)
    assert model.to_tokens(word, prepend_bos=False).tolist() == [[model.to_single_token(word)]]
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token(f"{word} {other}")
    where = [i for i, s in enumerate(strs) if s == "the"]
    assert model.get_token_position("the", q) == where[0] and model.get_token_position("the", ids, mode="last") == where[-1]
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(other, q)
    # a list: left-padded rows, each as its own prompt runs
    short = " ".join(q.split()[-2:])
    both = model.to_tokens([q, short])
    mask = model.text_inputs([q, short])["attention_mask"]
    logits = no_grad(model, [q, short])
    alone = no_grad(model, short)
    torch.testing.assert_close(logits[1, mask[1].bool()], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(model.padding_mask(both), mask)  # ids without a mask: the leading pads, as TransformerLens infers
    torch.testing.assert_close(no_grad(model, both)[1, mask[1].bool()], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_generate_takes_a_string_and_returns_its_text(models, name):
    model, q = models[name], QUESTION[name]
    new = model.generate(model.to_tokens(q), max_new_tokens=3)
    text = model.generate(q, max_new_tokens=3)
    assert isinstance(text, str) and text == model.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    assert torch.equal(model.generate(q, max_new_tokens=3, return_type="tokens"), new)
    assert model.generate([q, q], max_new_tokens=3, return_type="str") == [text, text]


# ---- answers as words ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_answers_as_words_are_their_first_token_after_the_prompt(models, name):
    from patching import AnswerProb, LogitDiff, dominance

    model = models[name]
    inputs = media_prompt(model, name)
    word, other = WORDS[name]
    ids = [model.to_single_token(w) for w in (word, other)]
    assert model.answer_tokens([word, other]).tolist() == ids
    assert model.answer_tokens([word], inputs).tolist() == ids[:1]
    assert model.answer_tokens(torch.tensor(ids)).tolist() == ids  # ids pass through
    metric = AnswerProb([word]).check(model, 1, inputs)
    assert metric.answer.tolist() == ids[:1]
    logits = no_grad(model, **inputs)[:, -1]
    torch.testing.assert_close(metric(logits), AnswerProb(ids[:1])(logits))
    with pytest.raises(ValueError, match="become token ids"):
        AnswerProb([word])(logits)  # never silently unresolved
    with pytest.raises(ValueError, match="same token"):
        LogitDiff([word], [word]).check(model, 1, inputs)
    with pytest.raises(ValueError, match="does not know"):
        model.answer_tokens(["zebra"])
    if name == "toy":  # the methods take the words as they take ids
        from patching import dla, knockout, logit_lens

        assert dominance(model, inputs, answers=[word]).equals(dominance(model, inputs, answers=ids[:1]))
        for method, kw in ((knockout, dict(window=1, centres=[1], progress=False)), (logit_lens, {}), (dla, dict(layers=[3]))):
            by_word, by_id = method(model, inputs, [word], **kw), method(model, inputs, ids[:1], **kw)
            assert by_word.df.equals(by_id.df), method.__name__


def test_an_answer_that_could_continue_the_word_before_it_is_refused(models):
    """A byte-level BPE (as Qwen's): after text that ends mid-word, "dog" may be a new word (" dog") or the word
    continued; after a newline or a template token it is "dog"; with its space written it is " dog"."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the dog and the cat", "dog cat hotdog", "the\ndog"] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|im_start|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, additional_special_tokens=["<|im_start|>"])
    model = models["qwen2_5_omni"]
    keep = model.tokenizer
    model.tokenizer = tok
    try:
        plain, spaced = tok.encode("dog")[0], tok.encode(" dog")[0]
        assert plain != spaced
        ctx = lambda text: {"input_ids": torch.tensor([tok.encode(text)])}  # noqa: E731
        assert model.answer_tokens(["dog"], ctx("the\n")).tolist() == [plain]
        assert model.answer_tokens(["dog"], ctx("<|im_start|>")).tolist() == [plain]
        assert model.answer_tokens([" dog"], ctx("the")).tolist() == [spaced]
        with pytest.raises(ValueError, match="ambiguous"):
            model.answer_tokens(["dog"], ctx("the"))
    finally:
        model.tokenizer = keep


# ---- the loss -----------------------------------------------------------------------------------------------
def cross_entropy(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, per target [batch, pos - 1]) by hand: -log softmax of position t - 1 at label t, labelled t only."""
    logp = logits.double().log_softmax(-1)
    per = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    for b, t in (labels[:, 1:] != -100).nonzero().tolist():
        per[b, t] = -logp[b, t, labels[b, t + 1]]
    return per.sum() / (labels[:, 1:] != -100).sum(), per


@pytest.mark.parametrize("name", CASES)
def test_loss_scores_the_answer_prepare_appended_as_hf_labels_it(models, name):
    model = models[name]
    word = WORDS[name][0]
    inputs = media_prompt(model, name, answer=word)
    ids = inputs["input_ids"]
    labels = model.loss_labels(ids, inputs["attention_mask"], inputs["text_parts"])
    want = torch.full_like(ids, -100)
    want[0, -1] = model.to_single_token(word)  # the answer only: media, template and question are -100
    assert torch.equal(labels, want)
    logits = no_grad(model, **inputs)
    mean, per = cross_entropy(logits, labels)
    with torch.no_grad():
        loss = model(**inputs, return_type="loss")
        per_token = model(**inputs, return_type="loss", loss_per_token=True)
        both = model(**inputs, return_type="both")
        custom = model(**inputs, return_type="loss", loss_fn=lambda lg, lb: (lg.shape, lb.clone()))
    assert abs(loss.item() - mean.item()) < 1e-5 and per_token.shape == (1, ids.shape[1] - 1)
    torch.testing.assert_close(per_token.double(), per, atol=1e-5, rtol=0)
    assert torch.equal(both.logits, logits) and both.loss.item() == loss.item()
    assert custom[0] == logits.shape and torch.equal(custom[1], labels)  # HF's loss_function(logits, labels)
    with pytest.raises(ValueError, match="logits_at does not apply"):
        model(**inputs, return_type="loss", logits_at="last")
    with pytest.raises(ValueError, match="apply only to a loss"):
        model(**inputs, loss_per_token=True)


@pytest.mark.parametrize("name", CASES)
def test_loss_without_an_answer_scores_the_text_after_the_prompt_else_the_users_text(models, name):
    model = models[name]
    inputs = media_prompt(model, name)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tm = model.token_map(inputs)
    user = model.loss_labels(ids, mask, inputs.get("text_parts"))
    assert torch.equal(user != -100, tm.mask("question"))  # the user's words; not media, system or template
    extra = model.to_tokens(" ".join(WORDS[name]), prepend_bos=False)  # an answer appended by hand
    longer = model.loss_labels(torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1))
    assert (longer != -100).nonzero()[:, 1].tolist() == list(range(ids.shape[1], ids.shape[1] + extra.shape[1]))
    ext = dict(inputs, input_ids=torch.cat([ids, extra], 1), attention_mask=torch.cat([mask, torch.ones_like(extra)], 1))
    ext.pop("text_parts", None)
    mean, _ = cross_entropy(no_grad(model, **ext), longer)
    assert abs(no_grad(model, **ext, return_type="loss").item() - mean.item()) < 1e-5
    q = QUESTION[name]  # a string: the loss of its words in its chat context
    text = model.text_inputs(q)
    labels = model.loss_labels(text["input_ids"], text["attention_mask"], text.get("text_parts"))
    assert torch.equal(labels != -100, model.token_map(text).mask("question"))
    assert model.to_str_tokens(labels[labels != -100]) == model.to_str_tokens(q, prepend_bos=False)
    mean, _ = cross_entropy(no_grad(model, q), labels)
    assert abs(no_grad(model, q, return_type="loss").item() - mean.item()) < 1e-5


# ---- stop_at_layer / start_at_layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_start_at_layer_continues_a_residual_as_transformer_lens(models, name):
    model = models[name]
    n = model.cfg.n_layers
    inputs = media_prompt(model, name)
    full = no_grad(model, **inputs)
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in inputs.items() if k != "text_parts"})
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    try:
        for k in (0, 1, n - 1, n, -1):
            resid = no_grad(model, **inputs, stop_at_layer=k)
            ran.clear()
            out = no_grad(model, resid, start_at_layer=k, position_ids=enc["position_ids"],
                          attention_mask=inputs["attention_mask"], injections=enc.get("injections"))
            assert ran == list(range(k % (n + 1) if k >= 0 else k + n, n)), (k, ran)  # the blocks from k on, only
            torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    finally:
        for h in handles:
            h.remove()
    q = QUESTION[name]  # a text prompt: positions 0..pos-1, as TransformerLens's
    torch.testing.assert_close(no_grad(model, no_grad(model, q, stop_at_layer=2), start_at_layer=2), no_grad(model, q),
                               atol=1e-5, rtol=0)
    loss = no_grad(model, no_grad(model, q, stop_at_layer=1), start_at_layer=1, tokens=model.to_tokens(q),
                   return_type="loss")
    assert abs(loss.item() - no_grad(model, q, return_type="loss").item()) < 1e-5
    with pytest.raises(ValueError, match="media placeholders"):
        model(resid, start_at_layer=n - 1, tokens=inputs["input_ids"], return_type="loss")
    with pytest.raises(ValueError, match="start_at_layer"):
        model(resid, start_at_layer=n + 1)
    with pytest.raises(ValueError, match="has no loss"):
        model(q, stop_at_layer=1, return_type="loss")


# ---- gradients -----------------------------------------------------------------------------------------------
NO_GRADIENT = ("attn.hook_attn_mask", "mlp.hook_router_choice")  # a constant; integer expert choices


@pytest.mark.parametrize("name", CASES)
def test_gradients_at_every_hook_point_equal_autograd_on_the_activations(models, name):
    model = models[name]
    assert all(p.requires_grad for p in model.parameters())  # as TransformerLens and HF load them
    inputs = media_prompt(model, name, answer=WORDS[name][0])
    kept = {}

    def keep(t, hook):  # the point's output is this copy: its .grad is d loss / d (what the hook passes on)
        t = t.clone()
        if t.requires_grad:
            t.retain_grad()
        kept[hook.name] = t
        return t

    try:
        with model.hooks(fwd_hooks=[(lambda n: True, keep)]):
            loss = model(**inputs, return_type="loss")
            loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None and n.startswith(("embed", "blocks", "ln_final", "unembed"))]
        assert missing == []  # every language-model weight has its gradient
        assert any(p.grad is not None for n, p in model.named_parameters() if n.startswith("vision_encoder"))
        model.zero_grad(set_to_none=True)
        again, cache = model.run_with_cache(**inputs, return_type="loss", incl_bwd=True)
        assert again.item() == loss.item()
        grads = {k.removesuffix("_grad") for k in cache.keys() if k.endswith("_grad")}
        ran = {k for k in cache.keys() if not k.endswith("_grad")}
        leaves = {k.rsplit(".", 1)[-1] for k in ran - grads}
        # every point that ran has its gradient but constants (masks) and the towers' observe-only LayerNorm scale
        assert all(k.endswith(NO_GRADIENT) or (k.endswith("hook_scale") and not k.startswith(("blocks.", "ln_final")))
                   for k in ran - grads), sorted(ran - grads)
        assert leaves <= {"hook_attn_mask", "hook_scale", "hook_router_choice"}
        for k in sorted(grads):
            if kept[k].grad is not None:
                torch.testing.assert_close(cache[k + "_grad"], kept[k].grad, atol=1e-6, rtol=1e-5)
        assert any(k.startswith(("audio_encoder.", "vision_encoder.")) for k in grads)  # the towers' too
        assert all(model.blocks[l].attn.last_path == "exact" for l in range(model.cfg.n_layers))  # patterns hooked
    finally:
        model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="one number"):
        model.run_with_cache(**inputs, incl_bwd=True)
    with torch.no_grad():  # incl_bwd turns gradients on for its own run
        _, cache = model.run_with_cache(**inputs, return_type="loss", incl_bwd=True, names_filter="blocks.0.hook_resid_pre")
    assert "blocks.0.hook_resid_pre_grad" in cache.cache_dict
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", CASES)
def test_backward_hooks_see_and_replace_gradients(models, name):
    model = models[name]
    q = QUESTION[name]
    seen = []
    try:
        with model.hooks(bwd_hooks=[("hook_embed", lambda g, hook: seen.append(g.detach().clone()))]):
            model(q).sum().backward()
        assert len(seen) == 1 and seen[0].shape[-1] == model.cfg.d_model
        model.zero_grad(set_to_none=True)
        with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: (g * 0,))]):
            model(q).sum().backward()
        # nothing reaches the embedding but through the residual stream after block 0: zeroed there, zero here
        assert not model.cfg.tie_word_embeddings
        assert model.embed.weight.grad is None or float(model.embed.weight.grad.abs().max()) == 0
        assert float(model.blocks[0].mlp.down_proj.weight.grad.abs().max() if hasattr(model.blocks[0].mlp, "down_proj")
                     else model.blocks[0].mlp.experts.down_proj.grad.abs().max()) == 0
    finally:
        model.zero_grad(set_to_none=True)


# ---- generation ----------------------------------------------------------------------------------------------
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=8, top_p=0.9)
STEPS = 3


def sampled_by_hand(model, inputs, seed, n=1, hooks=()):
    """Each step: a whole forward of the prompt and the tokens so far (no KV cache) under `hooks`, its last
    logits in fp32 through HF's warpers, then torch.multinomial with one generator seeded `seed`."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(0.8), TopKLogitsWarper(8), TopPLogitsWarper(0.9)]
    g = torch.Generator().manual_seed(seed)
    ids = inputs["input_ids"].repeat_interleave(n, 0)
    mask = inputs["attention_mask"].repeat_interleave(n, 0)
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "text_parts")}
    media = {k: torch.cat([v] * n) if k in ("pixel_values", "image_grid_thw", "input_features", "feature_attention_mask",
                                            "pixel_values_videos", "video_grid_thw", "video_second_per_grid") else v
             for k, v in media.items()}
    out = []
    for _ in range(STEPS):
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            scores = model(input_ids=ids, attention_mask=mask, **media)[:, -1].float()
        for w in warpers:
            scores = w(None, scores)
        nxt = torch.multinomial(scores.softmax(-1), 1, generator=g)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def fp64():
    return {name: build(name, torch.float64) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_sampling_equals_a_loop_without_cache_with_the_same_generator_under_interventions_too(fp64, name):
    model = fp64[name]
    inputs = media_prompt(model, name)
    halve = [("blocks.1.hook_mlp_out", lambda t, hook: t * 0.5)]
    got = {}
    for hooks in ((), halve):
        with model.hooks(fwd_hooks=hooks):
            got[len(hooks)] = model.generate(**inputs, max_new_tokens=STEPS, seed=5, **SAMPLING)
            two = model.generate(**inputs, max_new_tokens=STEPS, seed=5, num_return_sequences=2, **SAMPLING)
        assert torch.equal(got[len(hooks)], sampled_by_hand(model, inputs, 5, hooks=hooks))
        assert torch.equal(two, sampled_by_hand(model, inputs, 5, n=2, hooks=hooks))
        assert two.shape == (2, STEPS)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, generator=g, **SAMPLING), got[0])


@pytest.mark.parametrize("name", CASES)
def test_eos_stops_rows_and_unknown_arguments_are_refused_before_the_towers(models, name):
    model = models[name]
    inputs = media_prompt(model, name)
    greedy = model.generate(**inputs, max_new_tokens=4)
    first = int(greedy[0, 0])
    stopped = model.generate(**inputs, max_new_tokens=4, eos_token_id=first, pad_token_id=first + 1)
    assert stopped.tolist() == [[first]]  # every row done: decoding stops there
    assert model.generate(**inputs, max_new_tokens=4, stop_at_eos=True).shape[1] <= 4
    ran = []
    towers = [m for n, m in model.named_children() if n.endswith(("encoder", "qformer"))]
    handles = [t.register_forward_pre_hook(lambda m, a: ran.append(1)) for t in towers]
    try:
        for kwargs, message in [(dict(temprature=0.5), r"unsupported argument\(s\) \['temprature'\]; supported: .*'temperature'"),
                                (dict(num_beams=2), "unsupported"),
                                (dict(temperature=0.5), "apply only to sampling"),
                                (dict(do_sample=True, temperature=0), "temperature must be > 0"),
                                (dict(do_sample=True, top_p=1.5), "top_p must be in"),
                                (dict(do_sample=True, top_k=0), "top_k must be"),
                                (dict(do_sample=True, seed=1, generator=torch.Generator()), "seed or generator"),
                                (dict(num_return_sequences=0), "num_return_sequences"),
                                (dict(stop_at_eos=False, eos_token_id=3), "never stops"),
                                (dict(return_type="text"), "return_type")]:
            with pytest.raises((TypeError, ValueError), match=message):
                model.generate(**inputs, max_new_tokens=2, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert ran == []


# ---- conditional hook points ------------------------------------------------------------------------------------
FLAGS = {"set_use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
         "set_use_attn_in": ("hook_attn_in",), "set_use_hook_mlp_in": ("hook_mlp_in",),
         "set_use_attn_result": ("attn.hook_result",)}


@pytest.mark.parametrize("name", CASES)
def test_conditional_hook_points_are_exact_when_on_and_cost_nothing_when_off(models, name, monkeypatch):
    from hooked_av.core.attention import Attention

    model = models[name]
    c = model.cfg
    inputs = media_prompt(model, name)
    b, p = inputs["input_ids"].shape
    shapes = {"hook_q_input": (b, p, c.n_heads, c.d_model), "hook_k_input": (b, p, c.n_key_value_heads, c.d_model),
              "hook_v_input": (b, p, c.n_key_value_heads, c.d_model), "hook_attn_in": (b, p, c.n_heads, c.d_model),
              "hook_mlp_in": (b, p, c.d_model), "attn.hook_result": (b, p, c.n_heads, c.d_model)}
    calls = []
    monkeypatch.setattr(Attention, "from_inputs", lambda self, *a, _f=Attention.from_inputs, **k: calls.append(1) or _f(self, *a, **k))
    clean = no_grad(model, **inputs)
    assert calls == []  # off: the plain path, no per-head inputs are made
    for setter, leaves in FLAGS.items():
        names = [f"blocks.1.{leaf}" for leaf in leaves]
        for n in names:
            assert conditional(n) and position_major(n) and n in model.hook_dict
            with pytest.raises(AssertionError, match=setter.removeprefix("set_")):  # TransformerLens's refusal
                model.add_hook(n, lambda t, hook: None)
        getattr(model, setter)(True)
        try:
            _, cache = model.run_with_cache(**inputs, names_filter=names)
            for n, leaf in zip(names, leaves):
                assert cache[n].shape == shapes[leaf], (n, cache[n].shape)
            torch.testing.assert_close(no_grad(model, **inputs), clean, atol=1e-5, rtol=1e-5)  # exact with them on (fp32)
            if leaves[0] in ("hook_q_input", "hook_attn_in"):  # each head reads its own copy: an edit is that head's
                def zero_head(t, hook):
                    t = t.clone()
                    t[:, :, 0] = 0
                    return t

                with torch.no_grad(), model.hooks(fwd_hooks=[(names[0], zero_head)]):
                    _, z = model.run_with_cache(**inputs, names_filter="blocks.1.attn.hook_z")
                _, z0 = model.run_with_cache(**inputs, names_filter="blocks.1.attn.hook_z")
                changed = (z["blocks.1.attn.hook_z"] - z0["blocks.1.attn.hook_z"]).abs().amax((0, 1, 3)) > 0
                assert changed.tolist() == [True] + [False] * (c.n_heads - 1)  # query head 0's output only
        finally:
            getattr(model, setter)(False)
    assert not any(getattr(c, f) for f in ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_attn_result"))
    assert get_act_name("q_input", 1) == "blocks.1.hook_q_input" and get_act_name("mlp_in", 0) == "blocks.0.hook_mlp_in"
    model.set_use_split_qkv_input(True)
    try:  # two ways to give each head its input at once: refused
        with pytest.raises(ValueError, match=r"call set_use_split_qkv_input\(False\) first"):
            model.set_use_attn_in(True)
    finally:
        model.set_use_split_qkv_input(False)


# ---- weights and config ---------------------------------------------------------------------------------------
def checkpoint(name: str):
    """(model, its checkpoint's language-model state dict) for the weight checks."""
    if name == "toy":
        import safetensors.torch

        import hooked_av

        model = hooked_av.load("toy")
        return model, safetensors.torch.load_file(str(hooked_av.toy.weights_dir() / "model.safetensors"))
    if name == "qwen2_5_omni":
        from omni_helpers import tiny_hf_thinker

        from hooked_av import HookedQwen2_5Omni

        hf = tiny_hf_thinker(seed=2)
        return HookedQwen2_5Omni.from_hf(hf), hf.state_dict()
    if name == "qwen3_omni":
        from qwen3_omni_helpers import tiny_hf

        from hooked_av import HookedQwen3Omni

        hf = tiny_hf(seed=2)
        return HookedQwen3Omni.from_hf(hf), hf.state_dict()
    import salmonn_helpers as H

    from hooked_av import HookedVideoSALMONN2

    ref = H.Reference(seed=2)
    sd = ref.salmonn_state_dict()
    return HookedVideoSALMONN2._build_and_load(ref.salmonn_config(), sd.items(), "test", torch.float32, None, {}), sd


def lm_key(sd: dict, suffix: str) -> torch.Tensor:
    """The one language-model tensor whose key ends with `suffix` (towers excluded)."""
    found = [k for k in sd if k.endswith(suffix) and not any(t in k for t in ("audio", "visual", "vision", "qformer", "encoder"))]
    assert len(found) == 1, (suffix, found)
    return sd[found[0]].float()


@pytest.mark.parametrize("name", CASES)
def test_weights_have_transformer_lens_shapes_and_the_checkpoints_values(name):
    from transformer_lens import FactoredMatrix, HookedTransformer, HookedTransformerConfig

    model, sd = checkpoint(name)
    c = model.cfg
    dh, g = c.d_head, c.n_heads // c.n_key_value_heads
    moe = [l for l, b in enumerate(model.blocks) if hasattr(b.mlp, "experts")]
    d_mlp = c.d_mlp if not moe else c.recipe.moe.d_expert
    tl = HookedTransformer(HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=dh, n_key_value_heads=c.n_key_value_heads,
        d_mlp=d_mlp, d_vocab=c.d_vocab, n_ctx=16, act_fn="silu", normalization_type="RMS", gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=dh))
    for attr in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_E", "W_U", "b_U"):
        assert getattr(model, attr).shape == getattr(tl, attr).shape, attr
    for attr in ("_W_K", "_W_V", "_b_K", "_b_V"):
        assert getattr(model.blocks[0].attn, attr).shape == getattr(tl.blocks[0].attn, attr).shape, attr
    assert isinstance(model.QK, FactoredMatrix) and model.QK.shape == tl.QK.shape and model.OV.shape == tl.OV.shape
    for l in range(c.n_layers):
        q, k = lm_key(sd, f"layers.{l}.self_attn.q_proj.weight"), lm_key(sd, f"layers.{l}.self_attn.k_proj.weight")
        v, o = lm_key(sd, f"layers.{l}.self_attn.v_proj.weight"), lm_key(sd, f"layers.{l}.self_attn.o_proj.weight")
        for h in range(c.n_heads):
            rows, kv = slice(h * dh, (h + 1) * dh), slice((h // g) * dh, (h // g + 1) * dh)
            assert torch.equal(model.W_Q[l, h], q[rows].T) and torch.equal(model.W_K[l, h], k[kv].T)
            assert torch.equal(model.W_V[l, h], v[kv].T) and torch.equal(model.W_O[l, h], o[:, rows].T)
        assert torch.equal(model._W_K[l], k.view(c.n_key_value_heads, dh, -1).transpose(1, 2))
        if c.recipe.qkv_bias:
            assert torch.equal(model.b_Q[l].flatten(), lm_key(sd, f"layers.{l}.self_attn.q_proj.bias"))
            assert torch.equal(model._b_K[l].flatten(), lm_key(sd, f"layers.{l}.self_attn.k_proj.bias"))
        qk = model.QK[l, 0].AB
        torch.testing.assert_close(qk, q[:dh].T @ k[:dh], atol=1e-6, rtol=0)
        if l in moe:  # each expert as TransformerLens's gated MLP, from HF's fused tensors
            gate_up, down = lm_key(sd, f"layers.{l}.mlp.experts.gate_up_proj"), lm_key(sd, f"layers.{l}.mlp.experts.down_proj")
            I = gate_up.shape[1] // 2
            for e in (0, gate_up.shape[0] - 1):
                ex = model.blocks[l].mlp.experts[e]
                assert torch.equal(ex.W_gate, gate_up[e, :I].T) and torch.equal(ex.W_in, gate_up[e, I:].T)
                assert torch.equal(ex.W_out, down[e].T) and ex.W_in.shape == (c.d_model, I)
            assert torch.equal(model.blocks[l].mlp.W_router, lm_key(sd, f"layers.{l}.mlp.gate.weight").T)
        else:
            assert torch.equal(model.blocks[l].mlp.W_in, lm_key(sd, f"layers.{l}.mlp.up_proj.weight").T)
            assert torch.equal(model.blocks[l].mlp.W_gate, lm_key(sd, f"layers.{l}.mlp.gate_proj.weight").T)
            assert torch.equal(model.blocks[l].mlp.W_out, lm_key(sd, f"layers.{l}.mlp.down_proj.weight").T)
    if moe:
        with pytest.raises(ValueError, match=r"mixtures of experts.*experts\[e\]\.W_in"):
            model.W_in
    else:
        assert model.W_in.shape == tl.W_in.shape and model.W_gate.shape == tl.W_gate.shape and model.W_out.shape == tl.W_out.shape
    assert torch.equal(model.W_E, lm_key(sd, "embed_tokens.weight"))
    assert torch.equal(model.W_U, sd["lm_head.weight"].float().T)


@pytest.mark.parametrize("name", CASES)
def test_cfg_carries_what_analysis_code_reads_from_the_checkpoint(models, name):
    model = models[name]
    c = model.cfg
    hc = model.hf_config  # SALMONN's is the checkpoint's dict (its LLM's fields at the top)
    text = dict(hc) if isinstance(hc, dict) else hc.text_config.to_dict()
    assert (c.n_layers, c.d_model, c.n_heads, c.n_key_value_heads, c.d_vocab, c.n_ctx) == tuple(text[k] for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "max_position_embeddings"))
    assert c.d_head == (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    assert (c.act_fn, c.normalization_type, c.positional_embedding_type) == (text["hidden_act"], "RMS", "rotary")
    assert c.device == model.device and c.dtype == model.dtype == torch.float32


def test_the_library_builds_no_graph_from_encode_outputs_that_carry_one(models):
    """`model.encode` outside no_grad returns embeddings with a graph (the weights require grad); a sweep over
    them saves nothing for a backward (make bench found 2 tensors saved by `samples`' indexing)."""
    from patching import AnswerProb, activation_patching, samples

    model = models["toy"]
    inputs = {k: v for k, v in media_prompt(model, "toy").items() if k != "text_parts"}
    enc = model.encode(**inputs)
    assert enc["inputs_embeds"].requires_grad
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        s = samples(model, enc, model.token_map(inputs))[0]
        activation_patching(model, enc, enc, AnswerProb([model.to_single_token("red")]), sites=("resid_pre",), layers=[1],
                            tm_clean=model.token_map(inputs), tm_corrupted=model.token_map(inputs), progress=False)
    assert saved == [] and not s.embeds.requires_grad
