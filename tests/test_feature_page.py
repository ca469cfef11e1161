"""The SAE feature page (`patching.apps.features_page`, `patching.datasets.feature_stats`): its numbers equal
a naive pass over every token of the store (encode all, sort, np.histogram, the modality rule written out);
a merged patch's box is where each family's real processor puts that token's pixels (a planted bright patch
in a resized video, in space and time); the page's crop outlines the planted patch's pixels and its audio
snippet holds a planted tone burst at the token's seconds; the page is offline, draws in headless Chromium
with its audio elements, stays within its size bound, and bad input is refused before any work."""

from __future__ import annotations

import base64
import io
import json
import re
import wave as wavelib

import numpy as np
import pandas as pd
import pytest
import torch

from hooked_av.toy.dataset import write_toy_dataset, write_wav
from hooked_av.viz.token_media import audio_snippet, frames_at, patch_box
from patching.apps import features_page as fp
from patching.apps.harvest import harvest
from patching.datasets import feature_stats as fs
from patching.datasets.activations import META_COLUMNS, ActivationStore, StoreWriter

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is the `sae` extra")
torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"
MODS = ("audio", "video", "image", "text")


def random_sae(d_in: int, d_sae: int = 24, arch: str = "standard", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(-1.0, 0.5)  # most features fire on some tokens only
    sae.cfg.metadata.hook_name = HOOK
    return sae


@pytest.fixture(scope="module")
def toy_store(toy_model, tmp_path_factory):
    """4 toy samples (two-clip and one-clip rows), media and question tokens, in shards of <= 70 tokens."""
    d = tmp_path_factory.mktemp("feature_toy")
    manifest = write_toy_dataset(d / "data", n=4, seed=1)
    return ActivationStore(harvest(toy_model, manifest, [HOOK], d / "acts", groups="media,question", shard_tokens=70,
                                   progress=False))


# ---- the numbers against a naive pass -------------------------------------------------------------------------
def naive(sae, store: ActivationStore, n_features: int, top_k: int, bins: int, threshold: float):
    """Every token encoded at once; each statistic written out from its definition."""
    meta = store.metadata()
    with torch.no_grad():
        f = sae.encode(store.activations(HOOK).float()).clamp(min=0).numpy().astype(np.float64)
    mods = meta["modality"].to_numpy()
    n_firing = (f > 0).sum(0)
    mass = {m: f[mods == m].sum(0) for m in MODS}
    groups = []
    for j in range(f.shape[1]):
        if n_firing[j] == 0:
            groups.append("dead")
            continue
        shares = {m: mass[m][j] / f[:, j].sum() for m in MODS}
        best = max(MODS, key=lambda m: shares[m])
        groups.append(best if shares[best] >= threshold else "mixed")
    alive = [j for j in range(f.shape[1]) if n_firing[j] > 0]
    shown = sorted(alive, key=lambda j: (-f[:, j].sum(), j))[:n_features]
    top = {j: [i for i in sorted(range(len(f)), key=lambda i: (-f[i, j], i)) if f[i, j] > 0][:top_k] for j in shown}
    hist = {}
    for j in shown:
        edges = np.linspace(0, f[:, j].max(), bins + 1)
        fire = f[:, j] > 0
        hist[j] = {"all": np.histogram(f[fire, j], edges)[0]} | {m: np.histogram(f[fire & (mods == m), j], edges)[0] for m in MODS}
    return f, n_firing, mass, groups, shown, top, hist


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_stats_equal_a_naive_pass_over_every_token(toy_store, toy_model, arch, monkeypatch):
    monkeypatch.setattr(fs, "CHUNK_ELEMENTS", 24 * 29)  # chunks of 29 tokens: they cross the 70-token shards
    sae = random_sae(toy_model.cfg.d_model, arch=arch)
    assert len(toy_store.shards) >= 3
    got = fs.feature_stats(sae, toy_store, n_features=6, top_k=5, bins=12, threshold=0.6)
    f, n_firing, mass, groups, shown, top, hist = naive(sae, toy_store, 6, 5, 12, 0.6)
    t = got.table
    assert t["n_firing"].tolist() == n_firing.tolist()
    assert np.allclose(t["max"], f.max(0), rtol=1e-6)
    for m in MODS:
        assert np.allclose(t[f"share_{m}"].fillna(0), np.where(n_firing > 0, mass[m] / np.maximum(f.sum(0), 1e-30), 0), atol=1e-6)
    assert t["group"].tolist() == groups
    assert len(set(groups) - {"dead"}) >= 2  # the case tells groups apart
    assert got.features == shown
    meta = toy_store.metadata().reset_index(drop=True)
    for j in shown:
        mine = got.top[got.top["feature"] == j]
        assert mine["token"].tolist() == top[j], j
        assert np.allclose(mine["activation"], f[top[j], j], rtol=1e-6)
        want = meta.iloc[top[j]][list(META_COLUMNS) + ["token_id"]].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[list(META_COLUMNS) + ["token_id"]].reset_index(drop=True), want, check_dtype=False)
        for k, counts in hist[j].items():
            assert got.counts[j][k].tolist() == counts.tolist(), (j, k)
        assert got.counts[j]["all"].sum() == n_firing[j]
    assert got.tokens == {m: int((meta["modality"] == m).sum()) for m in MODS} and got.n_tokens == len(meta)


def test_chosen_features_and_the_hook_the_sae_names(toy_store, toy_model):
    sae = random_sae(toy_model.cfg.d_model)
    got = fs.feature_stats(sae, toy_store, features=[5, 2], top_k=2)
    assert got.features == [5, 2] and got.top["feature"].drop_duplicates().tolist() == [5, 2]
    with pytest.raises(ValueError, match="names the features to show and n_features=3 asks for the largest ones"):
        fs.feature_stats(sae, toy_store, features=[5], n_features=3)
    for bad, message in [([24], r"not feature indices of this SAE \(0..23\)"), ([1, 1], "twice"), ([], "not feature")]:
        with pytest.raises(ValueError, match=message):
            fs.feature_stats(sae, toy_store, features=bad)
    with pytest.raises(ValueError, match=r"threshold must be a mass share in \(0.5, 1\]"):
        fs.feature_stats(sae, toy_store, threshold=0.4)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=r"holds \['blocks.1.hook_resid_post'\], not 'blocks.0.hook_resid_post' \(the SAE's"):
        fs.feature_stats(sae, toy_store)
    with pytest.warns(UserWarning, match="trained at 'blocks.0.hook_resid_post'"):
        fs.feature_stats(sae, toy_store, hook=HOOK, features=[0], top_k=1)
    with pytest.raises(ValueError, match="d_in=32 but blocks.1.hook_resid_post in the store is 128 wide"):
        fs.feature_stats(random_sae(32), toy_store)


# ---- where a merged patch lies, through each family's own processor ----------------------------------------------
H, W, FPS, SECONDS = 90, 150, 10, 4


def write_video(path, frames: np.ndarray, fps: int = FPS):
    """A lossless mp4 (RGB H.264, qp 0) of `frames` `[T, H, W, 3]`, no audio."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream("libx264rgb", rate=fps, options={"qp": "0"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "bgr24"
        for f in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(vs.encode())
    return path


def planted(box=None, start: int = 20, n: int = FPS * SECONDS, h: int = H, w: int = W) -> np.ndarray:
    """Grey frames; `box` (y0, y1, x0, x1) white from frame `start` on."""
    frames = np.full((n, h, w, 3), 40, np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        frames[start:, y0:y1, x0:x1] = 250
    return frames


def family_models():
    import media_helpers
    import omni_helpers
    import qwen3_omni_helpers
    import salmonn_helpers
    from test_salmonn_inputs import salmonn_tokenizer

    from hooked_av import HookedQwen2_5Omni, HookedQwen3Omni, HookedVideoSALMONN2
    from hooked_av.families.qwen2_5_omni.processor import assemble_omni_parts

    torch.manual_seed(0)
    omni = HookedQwen2_5Omni.from_config(omni_helpers.tiny_thinker_config())
    omni.tokenizer = media_helpers.tiny_tokenizer()
    omni.processor_parts = assemble_omni_parts(omni.tokenizer, num_mel_bins=16, chunk_length=30)
    yield "qwen2_5_omni", omni
    qwen3 = HookedQwen3Omni.from_config(qwen3_omni_helpers.tiny_thinker_config())
    qwen3.tokenizer = qwen3_omni_helpers.tiny_tokenizer()
    yield "qwen3_omni", qwen3
    salmonn = HookedVideoSALMONN2.from_config(salmonn_helpers.Reference(seed=0).salmonn_config())
    salmonn.tokenizer = salmonn_tokenizer()
    yield "video_salmonn2", salmonn


def test_a_merged_patch_box_and_time_are_where_each_family_puts_the_token(tmp_path):
    """A 150x90 clip (each family resizes it: to 420x252, 480x288, 140x84) white in merged patch (r, c)'s box
    from 2.0 s on. Per video token, its own pixel rows (the processor's output, rows `(t, h/m, w/m, m, m)`)
    are white exactly when the token is (r, c) and the frame `frames_at` gives for its t_start shows the
    patch white: both the box and the time mapping hold through every family's real processor."""
    checked = {}
    for name, model in family_models():
        dark = write_video(tmp_path / f"{name}_dark.mp4", planted())
        tm = model.token_map(model.prepare("What makes the sound ?", video=str(dark), use_audio_in_video=False))
        pos = tm.positions("video")
        gh, gw = int(tm.patch_row[0, pos].max()) + 1, int(tm.patch_col[0, pos].max()) + 1
        r, c = gh // 2, gw * 2 // 3
        box = patch_box(H, W, r, c, gh, gw)
        clip = write_video(tmp_path / f"{name}.mp4", planted(box))
        inputs = model.prepare("What makes the sound ?", video=str(clip), use_audio_in_video=False)
        tm = model.token_map(inputs)
        pos = tm.positions("video")
        level = inputs["pixel_values_videos"].float().view(len(pos), -1).mean(1)  # one merged token's rows each
        level = (level - level.min()) / (level.max() - level.min())
        frames = frames_at(clip, tm.time[0, pos].tolist())
        expect = torch.tensor([int(tr) == r and int(tc) == c and frame[box[0]:box[1], box[2]:box[3]].mean() > 200
                               for tr, tc, frame in zip(tm.patch_row[0, pos], tm.patch_col[0, pos], frames)])
        assert expect.any() and (~expect).any()
        assert float(level[expect].min()) > 0.95 and float(level[~expect].max()) < 0.05, name
        checked[name] = (gh, gw, int(expect.sum()))
    assert checked == {"qwen2_5_omni": (9, 15, 2), "qwen3_omni": (9, 15, 1), "video_salmonn2": (3, 5, 10)}


def test_patch_box_and_snippet_bounds():
    assert patch_box(90, 150, 1, 3, 3, 5) == (30, 60, 90, 120)
    assert patch_box(100, 100, 2, 0, 3, 3) == (67, 100, 0, 33)  # rounded to the nearest pixel edge
    with pytest.raises(ValueError, match=r"merged patch \(3, 0\) is outside the 3 x 5 merged grid"):
        patch_box(90, 150, 3, 0, 3, 5)
    w = np.arange(3 * 16_000, dtype=np.float32)
    clip, start = audio_snippet(w, 0.02, 0.06, context=0.5)
    assert start == 0 and len(clip) == int(0.56 * 16_000) and clip[0] == 0  # clipped at the audio's start
    clip, start = audio_snippet(w, 2.90, 2.94, context=0.5)
    assert start == pytest.approx(2.40) and clip[-1] == w[-1]  # and at its end
    with pytest.raises(ValueError, match="starts at 3.100 s but the audio lasts 3.000 s"):
        audio_snippet(w, 3.1, 3.14)


# ---- planted media on the page ---------------------------------------------------------------------------------
def identity_sae(d: int = 4):
    """features = ReLU(x): feature j is activation dim j."""
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = "hook_embed"
    return sae


def _meta(rows) -> pd.DataFrame:
    base = dict(item=0, t_start=np.nan, t_end=np.nan, frame=-1, patch_row=-1, patch_col=-1, chunk=-1, token_id=-1)
    return pd.DataFrame([base | r for r in rows])


GRID, PATCH, BURST = (3, 5), (1, 3), (1.20, 1.28)  # a 3x5 merged grid; the planted patch; the tone's seconds


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """Sample "v": a 150x90 clip, 2 grid steps of 3x5 merged tokens (at 0 and 2 s), patch (1, 3) white from
    2 s on; feature 0 fires 5.0 on that token at step 1 and 4.0 on the same patch at step 0. Sample "a": a
    two-clip row whose clip 1 has a 3 s WAV with a 1 kHz burst in 1.20-1.28 s; feature 1 fires 6.0 on the
    audio token of 1.20-1.24 s and 3.0 on the one of 0.00-0.04 s. Feature 2: two text tokens. Feature 3:
    1.0 on four tokens (store order 2, 6, 19 and 32)."""
    d = tmp_path_factory.mktemp("planted")
    box = patch_box(H, W, *PATCH, *GRID)
    video = write_video(d / "v.mp4", planted(box))
    t = np.arange(3 * 16_000) / 16_000
    tone = np.where((t >= BURST[0]) & (t < BURST[1]), 0.8 * np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
    audio = write_wav(d / "burst.wav", tone)
    writer = StoreWriter(d / "acts", {"hook_embed": 4}, shard_tokens=40, settings={"model": "test"})
    rows, acts = [], []
    for step in range(2):
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                rows.append(dict(pos=len(rows), group="video", modality="video", t_start=2.0 * step, t_end=2.0 * step + 2,
                                 frame=step, patch_row=r, patch_col=c))
                tie = 1.0 if len(rows) - 1 in (2, 6, 19) else 0.0
                acts.append([(5.0 if step else 4.0) if (r, c) == PATCH else 0.1, 0, 0, tie])
    writer.add({"hook_embed": torch.tensor(acts)}, _meta(rows).assign(id="v", row=0),
               sample=dict(id="v", row=0, n_tokens=len(rows), question="where is the white square ?", video=str(video)))
    rows, acts = [], []
    for k in range(75):  # 3 s of 0.04 s audio tokens of clip 1, then two text tokens
        rows.append(dict(pos=k, group="audio", modality="audio", item=1, t_start=k * 0.04, t_end=(k + 1) * 0.04))
        acts.append([0, 6.0 if k == 30 else 3.0 if k == 0 else 0.0, 0, 1.0 if k == 2 else 0])
    rows += [dict(pos=80, group="question", modality="text", item=-1, token_id=7),
             dict(pos=81, group="question", modality="text", item=-1, token_id=8)]
    acts += [[0, 0, 0.5, 0], [0, 0, 2.0, 0]]
    items = json.dumps([{"video": str(video), "audio": None}, {"video": None, "audio": str(audio)}])
    writer.add({"hook_embed": torch.tensor(acts)}, _meta(rows).assign(id="a", row=1),
               sample=dict(id="a", row=1, n_tokens=len(rows), question="which clip beeps ?", items=items))
    writer.close()
    return ActivationStore(d / "acts"), box


class Words:
    def decode(self, ids):
        return {7: " which", 8: " beeps"}[ids[0]]


def _section(page: str, f: int) -> str:
    return re.search(rf"<section class=feature id='f{f}'>(.*?)</section>", page, re.S).group(1)


def _cards(section: str) -> list[str]:
    return re.split(r"<div class='card' ", section)[1:]


def test_the_crop_outlines_the_planted_patch_and_the_frame_at_the_token_s_time(planted_store, tmp_path):
    from PIL import Image

    store, box = planted_store
    page = fp.feature_page(identity_sae(), store, tmp_path / "p.html", features=[0], top_k=2, crop_context=1.0,
                           tokenizer=Words()).read_text()
    cards = _cards(_section(page, 0))
    assert [re.search(r"data-activation='([^']+)'", c).group(1) for c in cards] == ["5", "4"]
    for card, white in zip(cards, [True, False]):  # step 1 (2.0 s): the patch is white; step 0 (0.0 s): grey
        inner = json.loads(re.search(r"data-box='([^']+)'", card).group(1))
        jpeg = re.search(r"src='data:image/jpeg;base64,([^']+)'", card).group(1)
        crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg))).convert("L")).astype(int)
        h, w = crop.shape
        # the crop: the patch and one patch around it, clipped to the frame: rows 0..90, columns 60..150
        assert (h, w) == (90, 90)
        top, left, bh, bw = (round(inner[0] * h), round(inner[1] * w), round(inner[2] * h), round(inner[3] * w))
        assert (top, left, bh, bw) == (box[0], box[2] - 60, box[1] - box[0], box[3] - box[2])
        bright = crop > 150
        if white:
            ys, xs = np.nonzero(bright)
            assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (top, top + bh, left, left + bw)  # exactly the box
            assert bright[top:top + bh, left:left + bw].mean() > 0.99
        else:
            assert not bright.any()
        outline = re.search(r"<span class=box style='top:([\d.]+)%;left:([\d.]+)%;height:([\d.]+)%;width:([\d.]+)%'", card)
        assert [float(v) for v in outline.groups()] == pytest.approx([100 * v for v in inner], abs=1e-3)
    assert "frame 1 at 2.00 s, patch (1, 3) of 3x5" in cards[0]


def _wav(card: str) -> tuple[np.ndarray, float, float]:
    m = re.search(r"data-start='([^']+)' data-end='([^']+)' src='data:audio/wav;base64,([^']+)'", card)
    with wavelib.open(io.BytesIO(base64.b64decode(m.group(3)))) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16_000)
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2") / 32767
    return samples, float(m.group(1)), float(m.group(2))


def test_the_audio_snippet_holds_the_planted_burst_at_the_token_s_seconds(planted_store, tmp_path):
    store, _ = planted_store
    out = fp.feature_page(identity_sae(), store, tmp_path / "p.html", features=[1], top_k=2, audio_context=0.5,
                          tokenizer=Words())
    cards = _cards(_section(out.read_text(), 1))
    samples, start, end = _wav(cards[0])  # the token of 1.20-1.24 s, from clip 1's WAV (the row's items)
    assert (start, end) == (pytest.approx(0.70), pytest.approx(1.74)) and len(samples) == round(1.04 * 16_000)
    loud = np.nonzero(np.abs(samples) > 0.1)[0] / 16_000 + start
    assert loud.min() == pytest.approx(BURST[0], abs=1e-3) and loud.max() == pytest.approx(BURST[1], abs=1e-3)
    assert "token 1.20-1.24 s (marked) in 0.70-1.74 s" in cards[0]
    samples, start, end = _wav(cards[1])  # 0.00-0.04 s: clipped at the start, silent
    assert (start, len(samples)) == (0.0, round(0.54 * 16_000)) and np.abs(samples).max() == 0


def test_tied_activations_go_to_the_earlier_tokens_in_store_order(planted_store, monkeypatch):
    store, _ = planted_store
    monkeypatch.setattr(fs, "CHUNK_ELEMENTS", 4 * 5)  # chunks of 5 tokens: the ties arrive in different chunks
    got = fs.feature_stats(identity_sae(), store, features=[3], top_k=3)
    assert got.top["token"].tolist() == [2, 6, 19] and got.top["activation"].tolist() == [1.0] * 3
    assert got.top[["id", "pos"]].values.tolist() == [["v", 2], ["v", 6], ["v", 19]]


def test_text_tokens_show_their_neighbours_with_the_feature_s_activation(planted_store, tmp_path):
    store, _ = planted_store
    page = fp.feature_page(identity_sae(), store, tmp_path / "p.html", features=[2], top_k=2, tokenizer=Words(),
                           text_context=8).read_text()
    cards = _cards(_section(page, 2))
    assert len(cards) == 2
    spans = re.findall(r"<span( class=hit)? title='([\d.]+)'[^>]*>([^<]*)</span>", cards[0])
    assert spans == [("", "0.500", " which"), (" class=hit", "2.000", " beeps")]
    # the window 73..89: audio tokens at 73 and 74, nothing harvested at 75..79
    assert re.search(r"<span class=chip>\[audio x2\]</span><span class=gap>…</span><span title", cards[0])


def test_the_page_is_offline_draws_in_chromium_with_its_audio_and_stays_in_its_bound(toy_store, toy_model, tmp_path):
    from PIL import Image
    from test_views import _chromium

    sae = random_sae(toy_model.cfg.d_model)
    every = fs.feature_stats(sae, toy_store, n_features=24, top_k=5)
    kinds = every.top.groupby("feature")["modality"].agg(set)
    chosen = list(dict.fromkeys([next(f for f in every.features if m in kinds[f]) for m in ("text", "video", "audio")]))
    chosen += [f for f in every.features if f not in chosen][:6 - len(chosen)]  # cards of every kind, 6 features
    out = fp.feature_page(sae, toy_store, tmp_path / "features.html", features=chosen, top_k=5,
                          tokenizer=toy_model.tokenizer)
    text = out.read_text()
    stats = fs.feature_stats(sae, toy_store, features=chosen, top_k=5)
    assert not re.search(r"https?://|<script|<link|@import|url\(", text)  # nothing to fetch
    n_audio = int((stats.top["modality"] == "audio").sum())
    n_video = int((stats.top["modality"] == "video").sum())
    n_text = int((stats.top["modality"] == "text").sum())
    assert n_audio and n_video and n_text  # the case shows every kind of card
    assert text.count("<audio ") == n_audio and text.count("data:image/jpeg") == n_video
    assert text.count("class=hit") == n_text and "<p class=note>" not in text  # the toy's tokenizer decoded them
    hits = re.findall(r"<span class=hit title='[\d.]+'[^>]*>([^<]*)</span>", text)
    words = stats.top.loc[stats.top["modality"] == "text", "token_id"].map(lambda i: toy_model.tokenizer.decode([i]))
    assert hits == words.tolist() and all(hits)
    with pytest.warns(UserWarning, match=r"text tokens show their ids: the store's model \('HookedQwen2_5Omni'\)"):
        bare = fp.feature_page(sae, toy_store, tmp_path / "bare.html", features=chosen[:1], top_k=5).read_text()
    assert "<p class=note>text tokens show their ids" in bare and re.search(r"class=hit [^>]*>&lt;\d+&gt;</span>", bare)
    bound = fp.page_bytes(6, 5, 0.04, 0.5)
    size = out.stat().st_size
    print(f"toy page: {size / 1e3:.0f} kB for 6 features x 5 tokens ({n_audio} audio, {n_video} video, {n_text} text); "
          f"bound {bound / 1e3:.0f} kB")
    assert size <= bound and size < 1_500_000

    done, _ = _chromium(tmp_path, out.as_uri(), "--virtual-time-budget=5000", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("<audio ") == n_audio and done.stdout.count("<section class=\"feature\"") == 6
    # the browser decodes an embedded snippet: its duration (read by a probe page's script) is the snippet's
    first = re.search(r"<audio [^>]*data-start='([^']+)' data-end='([^']+)' src='([^']+)'", text)
    probe = tmp_path / "probe.html"
    probe.write_text(f"<audio id=a preload=auto src='{first.group(3)}'></audio><p id=o>none</p><script>var a = "
                     "document.getElementById('a'); a.onloadedmetadata = () => document.getElementById('o').textContent = "
                     "'duration ' + a.duration; a.onerror = () => document.getElementById('o').textContent = 'error';</script>")
    done, _ = _chromium(tmp_path, probe.as_uri(), "--virtual-time-budget=5000", "--dump-dom")
    seconds = float(re.search(r'<p id="o">duration ([\d.]+)</p>', done.stdout).group(1))
    assert seconds == pytest.approx(float(first.group(2)) - float(first.group(1)), abs=1e-3)
    shot = tmp_path / "page.png"
    done, _ = _chromium(tmp_path, out.as_uri(), "--virtual-time-budget=5000", "--window-size=1280,2400",
                        f"--screenshot={shot}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (pixels.sum(-1) < 600).mean() > 0.03  # text, bars and crops drawn
    orange = (np.abs(pixels - [217, 130, 43]).sum(-1) < 30).sum()  # the audio bars of the histograms and badges
    assert orange > 500


def test_bad_input_is_refused_before_any_work(toy_store, toy_model, tmp_path):
    class NoEncode:
        cfg = random_sae(toy_model.cfg.d_model).cfg

        def encode(self, x):
            raise AssertionError("encoded before the size check")

        def parameters(self):
            return iter([])

    with pytest.raises(ValueError, match=r"200 feature\(s\) x top 50 tokens could write a page of about \d+ MB .* > max_bytes=50 MB"):
        fp.feature_page(NoEncode(), toy_store, tmp_path / "x.html", n_features=200, top_k=50)
    for kwargs, message in [(dict(audio_context=-1), "audio_context must be a finite number >= 0"),
                            (dict(text_context=1.5), "text_context must be a number of positions")]:
        with pytest.raises(ValueError, match=message):
            fp.feature_page(NoEncode(), toy_store, tmp_path / "x.html", **kwargs)
    with pytest.raises(TypeError, match="sae must be a sae_lens.SAE"):
        fp.feature_page(object(), toy_store, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_cli_sae_view_writes_the_page_and_refuses_a_folder_without_an_sae(toy_store, toy_model, tmp_path, capsys):
    from patching.apps.cli import main

    sae = random_sae(toy_model.cfg.d_model)
    sae.save_model(str(tmp_path / "sae"))
    out = tmp_path / "page.html"
    assert main(["sae", "view", "--sae", str(tmp_path / "sae"), "--activations", str(toy_store.folder), "--out", str(out),
                 "--feature", "3", "--feature", "0", "--top", "2", "--model", "toy"]) == 0
    text = out.read_text()
    assert re.findall(r"<section class=feature id='f(\d+)'>", text) == ["3", "0"]
    assert "kB per feature" in capsys.readouterr().out
    assert main(["sae", "view", "--sae", str(tmp_path), "--activations", str(toy_store.folder), "--out", str(out)]) == 2
    assert "is not an SAE folder (no cfg.json)" in capsys.readouterr().err
    assert main(["sae", "view", "--sae", str(tmp_path / "sae"), "--activations", str(toy_store.folder), "--out", str(out),
                 "--features", "3", "--feature", "0"]) == 2
    assert "give one of them" in capsys.readouterr().err
