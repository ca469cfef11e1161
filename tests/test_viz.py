"""The reduced attention views and the HTML report."""

import torch
from omni_helpers import IM_END, IM_START, USER, geometries, tiny_hf_thinker

from hooked_av import HookedQwen2_5Omni
from hooked_av.inputs.chat import ChatTokens
from hooked_av.viz import Report, group_attention_mass, plot_attention_mass

CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})


def test_group_attention_mass_equals_the_mass_computed_from_cached_patterns():
    model = HookedQwen2_5Omni.from_hf(tiny_hf_thinker(seed=5))
    inputs, _ = geometries()["audio_and_video_blocks"]
    tm = model.token_map(inputs, chat=CHAT)
    df = group_attention_mass(model, inputs, tm, per_head=True)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("attn.hook_pattern") and n.startswith("blocks."))
    audio, last = tm.mask("audio")[0], tm.mask("last")[0]
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [heads, q, k]
        expected = p[:, last][:, :, audio].sum(-1).mean(-1)  # per head
        got = df[(df.layer == layer) & (df.dst == "last") & (df.src == "audio")].sort_values("head").mass.to_numpy()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), expected, atol=1e-6)
    # the groups cover every key of this prompt, so a query group's mass over them sums to one
    assert set(df.src) == {"template", "audio", "video", "question", "last"}
    total = df[(df.layer == 0) & (df["head"] == 0) & (df.dst == "question")].mass.sum()
    assert abs(total - 1) < 1e-5
    assert [b.attn.last_path for b in model.blocks] == ["exact"] * model.cfg.n_layers  # patterns were looked at


def test_report_is_one_self_contained_html_file(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 0, 1, 1], "dst": ["last", "last", "last", "last"], "src": ["audio", "video"] * 2, "mass": [0.1, 0.2, 0.3, 0.4]})
    path = Report("demo").heading("mass").table(df).figure(plot_attention_mass(df)).pre("a <b> c").save(tmp_path / "r" / "report.html")
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 1
    assert "a &lt;b&gt; c" in text and "<script" not in text and "http" not in text
