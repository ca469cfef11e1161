"""Attention views: token labels of both families, the offline circuitsvis page and its size
budget, the long-input views' numbers and sizes on a 4,000-token / 28-head case, and a real headless
Chromium drawing them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omni_helpers import IM_END, IM_START, USER, Builder, batch, tiny_thinker_config

from hooked_av import HookedQwen2_5Omni
from hooked_av.families.video_salmonn2.layout import salmonn_block_ids
from hooked_av.families.video_salmonn2.token_map import salmonn_token_map
from hooked_av.inputs.chat import ChatTokens
from hooked_av.inputs.token_map import TokenMapBuilder
from hooked_av.viz.circuitsvis_views import page_bytes
from hooked_av.viz import (
    QueryAttention, Report, attention_heads, attention_pattern, frame_image, plot_attention_on_audio,
    plot_attention_on_frame, plot_attention_over_time, plot_group_mass_heads, query_attention, time_bins,
)

torch.set_num_threads(1)
CHAT = ChatTokens(IM_START, IM_END, None, {"user": (USER,)})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedQwen2_5Omni.from_config(tiny_thinker_config()).eval()


@pytest.fixture(scope="module")
def omni_inputs():
    """One row: text, a 2-step video of 4x6 patches (2x3 merged), text, 17 mel frames of audio, a 4x4 image."""
    return batch(Builder(0).video(2, 4, 6, spg=0.5).text(2).audio(17).image(4, 4).end(2))


def _video_labels(item, steps, rows, cols):
    return [f"V{item} t{t} ({r},{c})" for t in range(steps) for r in range(rows) for c in range(cols)]


def test_labels_of_a_hand_built_qwen_omni_row(model, omni_inputs):
    tm = model.token_map(omni_inputs, chat=CHAT)
    labels = tm.labels(0)
    assert len(labels) == tm.seq_len
    assert labels[:5] == ["T #0", "T #1", "Q #2", "Q #3", "Q #4"]  # <|im_start|> user, then 3 question tokens
    assert [labels[p] for p in tm.positions("video").tolist()] == _video_labels(0, 2, 2, 3)
    # video then text then audio is one clip (text does not split a clip); audio token k starts at k * 0.04 s
    audio = [labels[p] for p in tm.positions("audio").tolist()]
    assert audio == [f"A0 {k * 0.04:.2f}s" for k in range(len(audio))] and audio[3] == "A0 0.12s"
    assert [labels[p] for p in tm.positions("image").tolist()] == ["I1 (0,0)", "I1 (0,1)", "I1 (1,0)", "I1 (1,1)"]
    assert labels[-1] == f"L #{tm.seq_len - 1}"
    # token strings, one per position, replace the #position; a whitespace-only token shows escaped
    words = [f"w{p}" for p in range(tm.seq_len)]
    words[2] = "\n"
    named = tm.labels(0, words)
    assert named[1] == "T w1" and named[2] == "Q \\n" and named[-1] == f"L w{tm.seq_len - 1}"
    with pytest.raises(ValueError, match="one string per position"):
        tm.labels(0, words[:-1])
    with pytest.raises(ValueError, match="needs both"):
        tm.labels(0, ids=omni_inputs["input_ids"])


def test_labels_decode_with_a_tokenizer():
    class Tok:
        def decode(self, ids):
            return {7: " which", 8: " dog"}.get(ids[0], "?")

    b = TokenMapBuilder(1, 3)
    b.set(0, [0, 1], "question")
    b.set(0, 2, "last")
    assert b.build().labels(0, ids=torch.tensor([[7, 8, 9]]), tokenizer=Tok()) == ["Q which", "Q dog", "L ?"]


def test_labels_of_hand_built_video_salmonn_ids():
    ids = SimpleNamespace(audio=90, image=91, video=92, vision_start=93, vision_end=94)
    chat = ChatTokens(80, 81, None, {"system": (82,), "user": (83,)})
    block = salmonn_block_ids(ids, (3, 4, 6), second_per_grid=1.5, n_audio=8)  # 3 steps of 2x3 merged patches
    row = [80, 83, 5, 6] + block + [7, 81]
    tm = salmonn_token_map(torch.tensor([row]), None, ids, chat, video_grid_thw=torch.tensor([[3, 4, 6]]), second_per_grid=[1.5])
    labels = tm.labels(0)
    assert [labels[p] for p in tm.positions("video").tolist()] == _video_labels(0, 3, 2, 3)
    assert [labels[p] for p in tm.positions("audio").tolist()] == [f"A0 {k * 0.5:.2f}s" for k in range(8)]
    assert labels[:4] == ["T #0", "T #1", "Q #2", "Q #3"] and labels[-1] == f"L #{len(row) - 1}"


def test_patch_labels_and_frame_image_follow_the_processors_patch_order(model):
    """Each merged 28x28 block of a frame gets its own colour; the toy's `patchify` (checked exactly against
    HF's Qwen2-VL processor in test_toy) makes the pixel rows. The colour of merged token k's pixels must
    be the colour of the block its label names, and frame_image must give the frame back."""
    from hooked_av.toy.clips import patchify

    gh, gw = 2, 3  # merged blocks per frame
    colours = np.array([[40 * r + 10 * c + 20, 200 - 30 * c, 60 + 50 * r] for r in range(gh) for c in range(gw)], dtype=np.uint8)
    frames = np.zeros((2, 28 * gh, 28 * gw, 3), dtype=np.uint8)
    for r in range(gh):
        for c in range(gw):
            frames[:, 28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)] = colours[r * gw + c]
    inputs = batch(Builder(3).video(1, 2 * gh, 2 * gw).end())
    inputs["pixel_values_videos"] = patchify(frames[None].astype(np.float32))[0]
    tm = model.token_map(inputs, chat=CHAT)
    image = frame_image(model, inputs, item=0, frame=0, tm=tm)
    assert image.shape == frames.shape[1:] and int(np.abs(image.astype(int) - frames[0]).max()) <= 1
    labels = tm.labels(0)
    for k, p in enumerate(tm.positions("video").tolist()):
        r, c = map(int, re.fullmatch(r"V0 t0 \((\d+),(\d+)\)", labels[p]).groups())
        block = image[28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)]
        assert np.abs(block.astype(int) - colours[k]).max() <= 1, (k, labels[p])


def _props(page_html: str) -> dict:
    """The props circuitsvis's render call received (the JSON after the element name)."""
    m = re.search(r"CircuitsVis\.render\(\s*\"[^\"]+\",\s*CircuitsVis\.\w+,\s*(\{.*\})\s*\)\s*</script>", page_html, re.S)
    return json.loads(m.group(1))


def test_circuitsvis_page_is_offline_and_shows_the_patterns(model, omni_inputs, tmp_path):
    pytest.importorskip("circuitsvis", reason="circuitsvis is in the viz extra")
    tm = model.token_map(omni_inputs, chat=CHAT)
    q, k = tm.positions(["question", "last"]), tm.positions("video", frame=1)
    page = attention_heads(model, omni_inputs, 1, queries=["question", "last"], keys=tm.select("video", frame=1), tm=tm)
    text = page.save(tmp_path / "heads.html").read_text()
    assert "CircuitsVis.render" in text and len(text) > 1_000_000  # circuitsvis's bundle is inlined
    assert not re.search(r"<script[^>]*\bsrc\s*=", text) and "unpkg.com" not in text
    props = _props(text)
    pos = torch.unique(torch.cat([q, k]))
    assert props["tokens"] == [tm.labels(0)[p].replace(" ", "\u00b7") for p in pos.tolist()]
    with torch.no_grad():
        _, cache = model.run_with_cache(**omni_inputs, names_filter="blocks.1.attn.hook_pattern")
    ref = cache["blocks.1.attn.hook_pattern"][0]  # [heads, q, k]
    got = torch.tensor(props["attention"], dtype=torch.float64)  # [heads, n, n] over pos
    expected = torch.zeros_like(got)
    iq, ik = torch.isin(pos, q).nonzero().flatten(), torch.isin(pos, k).nonzero().flatten()
    expected[:, iq[:, None], ik[None, :]] = ref[:, q][:, :, k].double()
    assert (got - expected).abs().max() < 6e-5  # written with 4 decimals
    assert props["maxValue"] == pytest.approx(float(got.max()))
    assert len(text) <= page_bytes(len(pos), model.cfg.n_heads)  # the budget's estimate is an upper bound
    with torch.no_grad():
        _, cache = model.run_with_cache(**omni_inputs, names_filter="blocks.2.attn.hook_pattern")
    last = int(tm.positions("last"))
    one = _props(attention_pattern(model, omni_inputs, 2, head=3, queries="last", tm=tm).page())
    assert one["attention"] == [[round(float(cache["blocks.2.attn.hook_pattern"][0, 3, last, last]), 4)]]


def test_circuitsvis_refuses_past_the_size_budget_before_any_work():
    pytest.importorskip("circuitsvis", reason="circuitsvis is in the viz extra")
    tm = _long_map()

    class NoForward:
        cfg = SimpleNamespace(n_layers=28, n_heads=28)

        def attention_rows(self, *a, **k):
            raise AssertionError("the budget must be checked before reading attention")

    with pytest.raises(ValueError, match=r"28 head\(s\) x 3998 x 3998 positions would write a page of about 3582 MB") as e:
        attention_heads(NoForward(), {}, 3, tm=tm)
    assert "group_attention_mass" in str(e.value) and "plot_attention_over_time" in str(e.value)
    with pytest.raises(ValueError, match="max_bytes=5 MB"):
        attention_pattern(NoForward(), {}, 3, head=0, queries="video", tm=tm)


# ---- long inputs ---------------------------------------------------------------------------------
AUDIO_TOKENS, FRAMES, GH, GW = 1500, 8, 15, 20  # 60 s of audio at 0.04 s; 8 steps of 15 x 20 merged patches


def _long_map():
    """A 4,000-token Qwen2.5-Omni-like row: 38 text tokens, 8 video steps of 300 patches (2 s each), 1,500
    audio tokens (60 s), a 59-token question, the last token."""
    b = TokenMapBuilder(1, 4000)
    b.set(0, range(0, 2), "padding")
    b.set(0, range(2, 40), "system")
    v = torch.arange(40, 40 + FRAMES * GH * GW)
    step = torch.arange(FRAMES).repeat_interleave(GH * GW)
    b.set(0, v, "video", item=0, frame=step, time=step * 2.0, time_end=step * 2.0 + 2)
    b.set_patches(0, v.tolist(), GH, GW)
    a = torch.arange(int(v[-1]) + 1, int(v[-1]) + 1 + AUDIO_TOKENS)
    k = torch.arange(AUDIO_TOKENS, dtype=torch.float)
    b.set(0, a, "audio", item=0, time=k * 0.04, time_end=(k + 1) * 0.04)
    b.set(0, range(int(a[-1]) + 1, 3999), "question")
    b.set(0, 3999, "last")
    return b.build()


def _long_attention(tm, layers=28, heads=28):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(layers, heads, tm.seq_len, generator=g) * 2
    logits[..., tm.padding[0]] = -torch.inf
    return QueryAttention(torch.softmax(logits, -1), list(range(layers)), list(range(heads)), "last", tm)


def _long_report(tm, qa) -> Report:
    import pandas as pd

    groups = ["system", "video", "audio", "question", "last"]
    rng = np.random.default_rng(0)
    mass = [dict(layer=l, head=h, dst=d, src=s, mass=float(rng.random())) for l in range(28) for h in range(28) for d in groups for s in groups]
    wave = np.sin(np.arange(60 * 16000) / 16000 * 2 * np.pi * 3).astype(np.float32)
    frame = rng.integers(0, 255, (28 * GH, 28 * GW, 3), dtype=np.uint8)
    return (Report("4,000 tokens, 28 heads")
            .figure(plot_group_mass_heads(pd.DataFrame(mass), dst=["last", "question"]))
            .figure(plot_attention_over_time(qa))
            .figure(plot_attention_on_frame(qa, frame=3, image=frame))
            .figure(plot_attention_on_audio(qa, waveform=wave)))


def test_time_bins_sum_the_query_attention_per_frame_second_and_group():
    tm = _long_map()
    qa = _long_attention(tm)
    df = time_bins(qa)
    w = qa.weights.mean(1)  # [layers, keys]
    # every non-padding key is in exactly one bin: the bins of a layer sum to 1
    assert np.allclose(df.groupby("layer").mass.sum().to_numpy(), 1.0, atol=1e-5)
    video = df[(df.group == "video") & (df.layer == 5)].sort_values("bin")
    assert video.bin.tolist() == list(range(FRAMES)) and video.start.tolist() == [2.0 * t for t in range(FRAMES)]
    assert np.allclose(video.mass.to_numpy(), [float(w[5, tm.positions("video", frame=t)].sum()) for t in range(FRAMES)], atol=1e-6)
    audio = df[(df.group == "audio") & (df.layer == 5)].sort_values("bin")
    assert len(audio) == 60 and (audio.n_tokens == 25).all() and audio.end.max() == pytest.approx(60.0)
    assert float(audio.mass.iloc[7]) == pytest.approx(float(w[5, tm.positions("audio", time=(7.0, 7.99))].sum()), abs=1e-6)
    assert np.allclose(time_bins(qa, heads=[4]).query("group == 'last'").mass.to_numpy(), qa.weights[:, 4, 3999].numpy())


@pytest.fixture(scope="module")
def long_report(tmp_path_factory):
    tm = _long_map()
    return _long_report(tm, _long_attention(tm)).save(tmp_path_factory.mktemp("views") / "long.html")


def test_long_views_of_4000_tokens_and_28_heads_stay_under_5_mb(long_report):
    size = long_report.stat().st_size
    print(f"4,000-token / 28-head report: {size / 1e6:.2f} MB")
    assert 100_000 < size < 5_000_000


def test_query_attention_equals_the_cached_pattern(model, omni_inputs):
    qa = query_attention(model, omni_inputs, "question", layers=[0, 2], heads=[1, 3])
    with torch.no_grad():
        _, cache = model.run_with_cache(**omni_inputs, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    q = qa.tm.positions("question")
    for i, layer in enumerate([0, 2]):
        ref = cache[f"blocks.{layer}.attn.hook_pattern"][0][[1, 3]][:, q].mean(1)  # mean over the question's rows
        assert torch.allclose(qa.weights[i], ref, atol=1e-6)
    assert qa.n_queries == len(q)


# ---- a real browser ------------------------------------------------------------------------------
def _chromium(tmp_path, url: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium (Debian) to render the views in a real browser")
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args, url]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


def test_views_draw_in_headless_chromium(model, omni_inputs, long_report, tmp_path):
    pytest.importorskip("circuitsvis", reason="circuitsvis is in the viz extra")
    from PIL import Image

    page = attention_heads(model, omni_inputs, 1).save(tmp_path / "heads.html")
    done, seconds = _chromium(tmp_path, page.as_uri(), "--virtual-time-budget=5000", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    # AttentionHeads draws one canvas per head thumbnail and one for the enlarged head, after its script ran
    assert done.stdout.count("<canvas") == model.cfg.n_heads + 1, done.stdout[:2000]
    print(f"circuitsvis page drawn in {seconds:.1f} s")

    shot = tmp_path / "long.png"
    done, seconds = _chromium(tmp_path, long_report.as_uri(), "--virtual-time-budget=5000", "--window-size=1200,3000",
                              f"--screenshot={shot}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    drawn = (pixels < 200).mean()  # dark pixels: the figures' heatmaps, frames and text
    print(f"4,000-token report drawn in {seconds:.1f} s, {drawn:.0%} of the screenshot dark")
    assert drawn > 0.05  # drawing time is printed, not asserted: a timed assertion fails on a busy machine
