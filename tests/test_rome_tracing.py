"""ROME's causal tracing (`kmeng01/rome` `experiments/causal_trace.py`) as `causal_tracing(preset="rome")`:
noise of 3 x the embedding std measured over the whole dataset (`collect_embedding_std`), each token's
block output restored at one layer (`trace_important_states`), attention and MLP outputs over 10
centred layers (`trace_important_window`), p(answer) averaged over the noise draws, a token x layer
heatmap. The reference below is that loop, one forward per cell, written from ROME's code."""

import pytest
import torch

from hooked_av import toy
from patching.methods.causal_tracing import causal_tracing, heatmap

N_NOISE, SEED = 2, 0
TOKENS = "each:question|last"  # ROME's token_range, kept short: every position of the heatmap costs a sweep
SITES = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


@pytest.fixture(scope="module")
def traced():
    model = toy.load()
    inputs = toy.make_batch(2, seed=3, tokenizer=model.tokenizer, kinds=("visual",)).inputs
    # ROME corrupts the subject: here the question's words (the toy shrugs off noise on its video tokens)
    res = causal_tracing(model, inputs, corrupt="question", preset="rome", tokens=TOKENS, n_noise=N_NOISE, seed=SEED,
                         batch_size=16, progress=False)  # small chunks: each row's patch hook spans the chunk
    return model, inputs, res


def _rows(model, inputs):
    """Per sample: embeddings, position ids and the question's mask, without the left padding."""
    enc, tm = model.encode(**inputs), model.token_map(inputs)
    out = []
    for i in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][i].bool()
        out.append((enc["inputs_embeds"][i:i + 1, keep], enc["position_ids"][:, i:i + 1, keep], tm.mask("question")[i][keep]))
    return out


def test_rome_preset_equals_romes_loop(traced):
    model, inputs, res = traced
    rows = _rows(model, inputs)
    L = model.cfg.n_layers
    # collect_embedding_std: the std of every corrupted embedding of the dataset, pooled; noise "s3" = 3x
    std = 3 * torch.cat([e[0, v].flatten() for e, _, v in rows]).std().item()
    assert abs(res.settings["noise_std"] - std) < 1e-6
    per_sample = [3 * e[0, v].std().item() for e, _, v in rows]
    assert min(abs(s - std) for s in per_sample) > 1e-5  # the earlier per-sample std: another (here close) level
    df = res.df
    for i, (embeds, pos, subject) in enumerate(rows):
        n = embeds.shape[1]
        n_traced = int(model.token_map(inputs).mask("question|last")[i].sum())
        assert len(df[df["sample"] == i]) == n_traced * L * 3  # every traced token x every layer x 3 sites
        with torch.no_grad():
            answer = int(model(inputs_embeds=embeds, position_ids=pos)[0, -1].argmax())
            _, clean = model.run_with_cache(inputs_embeds=embeds, position_ids=pos)

        def noisy(k):
            g = torch.Generator().manual_seed(SEED + k)
            noise = torch.randn(embeds.shape[1:], generator=g) * std * subject[:, None]
            return [("hook_embed", lambda x, hook: x + noise)]

        def p(hooks):  # trace_with_patch: softmax at the last position, mean over the corrupted rows
            with torch.no_grad():
                return sum(float(model.run_with_hooks(inputs_embeds=embeds, position_ids=pos, fwd_hooks=noisy(k) + hooks)
                                 [0, -1].softmax(-1)[answer]) for k in range(N_NOISE)) / N_NOISE

        low = p([])
        for t in (int(subject.nonzero()[0]), n - 1):  # a subject token and the last
            for layer in range(L):
                for site, hook in SITES.items():
                    layers = [layer] if site == "resid_post" else range(max(0, layer - 5), min(L, layer + 5))

                    def put(x, hook, t=t):
                        x = x.clone()
                        x[:, t] = clean[hook.name][:, t]
                        return x

                    expect = p([(f"blocks.{l}.{hook}", put) for l in layers])
                    row = df[(df["sample"] == i) & (df.pos == t) & (df.layer == layer) & (df.site == site)].iloc[0]
                    assert abs(row.p_restored - expect) < 1e-5 and abs(row.p_corrupt - low) < 1e-5
                    assert abs(row.indirect_effect - (expect - low)) < 1e-5
    grid = heatmap(res, "resid_post", sample=1)
    assert grid.shape == (int(model.token_map(inputs).mask("question|last")[1].sum()), L)
    print("p_corrupt", df.groupby("sample").p_corrupt.first().round(3).tolist(),
          "max p_restored resid_post", grid.max().round(3).tolist())


def test_rome_and_the_earlier_default_differ(traced):
    """The earlier default restored the residual entering a layer (`resid`), ROME the block's output."""
    model, inputs, res = traced
    old = causal_tracing(model, inputs, corrupt="question", tokens=TOKENS, restore=("resid",), n_noise=N_NOISE, batch_size=16,
                         seed=SEED, progress=False)
    assert old.df.site.unique().tolist() == ["resid"] and (old.df.window_start == old.df.window_end).all()
    gap = (heatmap(old, "resid", 0) - heatmap(res, "resid_post", 0)).abs().to_numpy().max()
    assert gap > 0.5
    with pytest.raises(ValueError, match=r"this trace restored token sets"):
        heatmap(causal_tracing(model, inputs, corrupt="question", n_noise=1, centres=[0], progress=False), "resid")
