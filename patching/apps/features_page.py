"""See an SAE's features with the media they fire on: one self-contained, offline HTML page per SAE, a
section (anchor `#f{feature}`) per shown feature.

    hooked-av sae view --sae runs/sae --activations runs/acts --out runs/features.html [--features 24] [--top 8]

The page: the store and the SAE in numbers; every feature's modality group (the modality holding at least
`threshold` of its activation mass, else "mixed"; "dead" if it never fires) with counts over all features
and the density of firing frequencies; a table per group of the shown features (firing frequency, max,
mean where it fires, mass shares); per shown feature, the histogram of its firing activations stacked by
modality and its top-k tokens across the store, each with what it saw: a video or image token's frame
crop with its merged patch outlined (`token_media.patch_box`: the merged grid read off the store), an
audio token's snippet (a 16 kHz mono WAV, `audio_context` seconds either side) with the token's span
marked, a text token's neighbours in the store with the feature's activation on each. The numbers are
`feature_stats`'s (patching/datasets/feature_stats.py); media are cut from the files the store's sample
table names. Nothing is fetched when the page opens (no script, no link, no font).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from patching.apps.features_html import CROP_SIDE, feature_section, page_html, wave_svg
from patching.datasets.activations import ActivationStore
from patching.datasets.feature_stats import N_FEATURES, FeatureStats, feature_stats, resolve_hook

MAX_BYTES = 50_000_000
_B64 = 4 / 3


def feature_page(sae, store, out="features.html", *, hook: str | None = None, features=None, n_features: int | None = None,
                 top_k: int = 8, bins: int = 30, threshold: float = 0.8, audio_context: float = 0.5,
                 crop_context: float = 1.0, text_context: int = 8, tokenizer=None, max_bytes: int = MAX_BYTES,
                 progress: bool = False) -> Path:
    """Write the feature page of `sae` (a `sae_lens.SAE`) over `store` (an `ActivationStore` or its folder,
    harvested at the SAE's hook) to `out` and return its path. `features` / `n_features` / `top_k` /
    `bins` / `threshold` / `hook`: as `feature_stats`; `audio_context`: seconds of audio either side of an
    audio token; `crop_context`: merged patches of frame either side of a video / image token's patch;
    `text_context`: positions either side of a text token; `tokenizer`: decodes text tokens (default: the
    store's model's, where the store names a loadable one); `max_bytes`: the page's size bound, checked
    before any work (a page holds about `top_k` x 45 kB per audio feature at 0.5 s of context).

        out = harvest(model, manifest, ["blocks.1.hook_resid_post"], tmp / "acts", groups="media", progress=False)
        from sae_lens import StandardSAE, StandardSAEConfig
        sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=16))
        feature_page(sae, out, tmp / "features.html", hook="blocks.1.hook_resid_post", n_features=4, top_k=3)
    """
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    hook = resolve_hook(sae, store, hook)
    for value, name in ((audio_context, "audio_context"), (crop_context, "crop_context")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(text_context, bool) or not isinstance(text_context, int) or text_context < 0:
        raise ValueError(f"text_context must be a number of positions >= 0, got {text_context!r}")
    shown = (n_features or N_FEATURES) if features is None else np.atleast_1d(features).size
    bound = page_bytes(shown, top_k, _longest_audio_token(store), audio_context)
    if bound > max_bytes:
        raise ValueError(f"{shown} feature(s) x top {top_k} tokens could write a page of about {bound / 1e6:.0f} MB (audio "
                         f"snippets of {audio_context:g} s context, 16 kHz 16-bit) > max_bytes={max_bytes / 1e6:.0f} MB; "
                         "show fewer features or tokens, a shorter audio_context, or raise max_bytes")
    stats = feature_stats(sae, store, hook, features=features, n_features=n_features, top_k=top_k, bins=bins,
                          threshold=threshold, progress=progress)
    media = _Media(store, sae, stats, audio_context, crop_context, text_context, tokenizer)
    sections = {f: feature_section(stats, f, media) for f in stats.features}
    sizes = [len(s.encode()) for s in sections.values()]
    page = page_html(sae, store, stats, sections, sizes, media)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def page_bytes(n_features: int, top_k: int, audio_span: float, audio_context: float) -> int:
    """An upper bound on the page's bytes: every token an audio snippet (the largest medium: 32,000 bytes a
    second, base64) of its longest span plus context, a card's markup, a histogram per feature, 200 kB of
    summary."""
    snippet = (audio_span + 2 * audio_context) * 32_000 + 44
    return int(200_000 + n_features * (6_000 + top_k * (snippet * _B64 + 3_000)))


def _longest_audio_token(store: ActivationStore) -> float:
    span = 0.0
    for s in store.shards:
        m = pd.read_parquet(s.with_suffix(".parquet"), columns=["modality", "t_start", "t_end"])
        a = m[m["modality"] == "audio"]
        if len(a):
            span = max(span, float((a["t_end"] - a["t_start"]).max()))
    return span


# ---- the media of each top token --------------------------------------------------------------------------------
class _Media:
    """Cuts every top token's media, each source file decoded once: `html(row)` -> the card's media block."""

    def __init__(self, store, sae, stats: FeatureStats, audio_context, crop_context, text_context, tokenizer):
        self.store, self.stats = store, stats
        self.audio_context, self.crop_context, self.text_context = audio_context, crop_context, text_context
        self.samples = {str(r["id"]): r for r in store.samples().to_dict("records")}
        self._shards: dict[int, pd.DataFrame] = {}
        self.notes: list[str] = []
        top = stats.top
        self.tokenizer = tokenizer
        self.frames, self.audio, self.text = {}, {}, {}
        if not len(top):
            return
        if tokenizer is None and (top["modality"] == "text").any():
            self.tokenizer = _store_tokenizer(store)
            if self.tokenizer is None:
                self.notes.append(f"text tokens show their ids: the store's model ({store.settings.get('model')!r}) names "
                                  "no tokenizer this page could load; pass tokenizer= (CLI: --model NAME)")
                warnings.warn(self.notes[-1], stacklevel=3)
        if (top["modality"] == "text").any() and "token_id" not in top.columns:
            self.notes.append("this store has no token ids (harvested before they were recorded): text tokens show "
                              "their positions only; harvest again to see their text")
        self.frames = self._frames(top)
        self.audio = self._audio(top)
        self.text = self._text(top, sae)

    def shard(self, k: int) -> pd.DataFrame:
        """Shard k's token metadata (the last 4 read are kept)."""
        if k not in self._shards:
            if len(self._shards) >= 4:
                self._shards.pop(next(iter(self._shards)))
            self._shards[k] = pd.read_parquet(self.store.shards[k].with_suffix(".parquet"))
        return self._shards[k]

    def source(self, row, kind: str):
        """The file a token's `kind` came from: the row's clip `item` in `items`, else the sample's own;
        audio from the video's track where no separate audio file was given."""
        s = self.samples.get(str(row["id"]))
        if s is None:
            return None
        items = s.get("items")
        entry = json.loads(items)[int(row["item"])] if isinstance(items, str) and int(row["item"]) >= 0 else s
        pick = (lambda k: entry.get(k) if isinstance(entry.get(k), str) else None)
        return pick(kind) or (pick("video") if kind == "audio" else None)

    def _frames(self, top):
        from hooked_av.inputs.media import load_image
        from hooked_av.viz.token_media import (
            frame_crop,
            frames_at,
            jpeg_bytes,
            patch_box,
        )

        out, wanted = {}, defaultdict(list)
        for i, row in top[top["modality"].isin(["video", "image"])].iterrows():
            path = self.source(row, row["modality"])
            if path is None:
                out[i] = "<p class=miss>no media file recorded for this token</p>"
                continue
            wanted[(path, row["modality"])].append(i)
        for (path, kind), rows in sorted(wanted.items()):
            times = [float(top.at[i, "t_start"]) for i in rows]
            frames = frames_at(path, times) if kind == "video" else [load_image(path)] * len(rows)
            for i, frame in zip(rows, frames):
                row = top.loc[i]
                gh, gw = self._grid(row)
                if gh is None:
                    crop, inner = frame_crop(frame, (0, frame.shape[0], 0, frame.shape[1]), 0, CROP_SIDE), None
                else:
                    box = patch_box(frame.shape[0], frame.shape[1], int(row["patch_row"]), int(row["patch_col"]), gh, gw)
                    crop, inner = frame_crop(frame, box, self.crop_context, CROP_SIDE)
                src = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(crop)).decode()
                outline = "" if inner is None else (
                    f"<span class=box style='top:{100 * inner[0]:.3f}%;left:{100 * inner[1]:.3f}%;"
                    f"height:{100 * inner[2]:.3f}%;width:{100 * inner[3]:.3f}%'></span>")
                where = (f"frame {int(row['frame'])} at {float(row['t_start']):.2f} s, " if kind == "video" else "") + (
                    f"patch ({int(row['patch_row'])}, {int(row['patch_col'])}) of {gh}x{gw}" if gh else "no patch grid")
                out[i] = (f"<div class=crop data-box='{json.dumps(inner)}'><img alt='{kind} crop' src='{src}'>{outline}"
                          f"</div><div class=where>{html.escape(where)}</div>")
        return out

    def _grid(self, row):
        """The merged grid of the token's clip: (max patch_row + 1, max patch_col + 1) over its tokens in the
        store (a sample's tokens share one shard, and a group is harvested whole); None when unknown."""
        m = self.shard(int(row["shard"]))
        m = m[(m["id"] == row["id"]) & (m["item"] == row["item"]) & (m["modality"] == row["modality"])]
        if int(row["patch_row"]) < 0 or not len(m):
            return None, None
        return int(m["patch_row"].max()) + 1, int(m["patch_col"].max()) + 1

    def _audio(self, top):
        from hooked_av.inputs.media import load_audio
        from hooked_av.viz.token_media import audio_snippet, wav_bytes

        out, by_path = {}, defaultdict(list)
        for i, row in top[top["modality"] == "audio"].iterrows():
            path = self.source(row, "audio")
            if path is None:
                out[i] = "<p class=miss>no audio file recorded for this token</p>"
            else:
                by_path[path].append(i)
        for path, rows in sorted(by_path.items()):
            wave = load_audio(path).waveform
            for i in rows:
                t0, t1 = float(top.at[i, "t_start"]), float(top.at[i, "t_end"])
                clip, start = audio_snippet(wave, t0, t1, self.audio_context)
                src = "data:audio/wav;base64," + base64.b64encode(wav_bytes(clip)).decode()
                end = start + len(clip) / 16_000
                out[i] = (f"{wave_svg(clip, start, t0, t1)}<audio controls preload='metadata' data-start='{start:.4f}' "
                          f"data-end='{end:.4f}' src='{src}'></audio><div class=where>token {t0:.2f}-{t1:.2f} s "
                          f"(marked) in {start:.2f}-{end:.2f} s</div>")
        return out

    def _text(self, top, sae):
        import torch

        rows = top[top["modality"] == "text"]
        if not len(rows):
            return {}
        windows = {}
        for i, row in rows.iterrows():
            m = self.shard(int(row["shard"]))
            windows[i] = m[(m["id"] == row["id"]) & (m["pos"].between(row["pos"] - self.text_context,
                                                                    row["pos"] + self.text_context))].assign(shard=row["shard"])
        ctx = pd.concat(windows.values())
        ctx = ctx.assign(index=ctx.index.to_numpy())  # the row in its shard (the parquet's own index)
        acts = self.store.activations(self.stats.hook, ctx)
        p = next(iter(sae.parameters()), None)
        with torch.no_grad():
            feats = sae.encode(acts.to(device=p.device, dtype=p.dtype) if p is not None else acts.float()).float().cpu()
        out, at = {}, 0
        for i, row in rows.iterrows():
            w = windows[i]
            f = int(row["feature"])
            vals = feats[at:at + len(w), f].numpy()
            at += len(w)
            out[i] = self._context_html(w, vals, int(row["pos"]), float(self.stats.table.at[f, "max"]))
        return out

    def _context_html(self, w: pd.DataFrame, vals: np.ndarray, pos: int, peak: float) -> str:
        parts, prev, run = [], None, None
        for (_, r), v in zip(w.iterrows(), vals):
            if prev is not None and r["pos"] != prev + 1:
                parts.append("<span class=gap>…</span>")
            prev = r["pos"]
            if r["modality"] != "text":
                if run and run[0] == r["modality"] and parts and parts[-1].startswith("<span class=chip"):
                    run[1] += 1
                    parts[-1] = f"<span class=chip>[{run[0]} x{run[1]}]</span>"
                else:
                    run = [r["modality"], 1]
                    parts.append(f"<span class=chip>[{run[0]} x1]</span>")
                continue
            run = None
            word = self._word(r)
            alpha = 0.0 if peak <= 0 else min(1.0, max(0.0, float(v)) / peak)
            cls = " class=hit" if r["pos"] == pos else ""
            parts.append(f"<span{cls} title='{float(v):.3f}' style='background:rgba(217,130,43,{alpha:.2f})'>"
                         f"{html.escape(word)}</span>")
        return f"<p class=ctx>{''.join(parts)}</p>"

    def _word(self, r) -> str:
        tid = r.get("token_id")
        if tid is None or (isinstance(tid, float) and math.isnan(tid)) or int(tid) < 0:
            return f"#{int(r['pos'])}"
        if self.tokenizer is None:
            return f"<{int(tid)}>"
        return self.tokenizer.decode([int(tid)]).replace("\n", "\u23ce")

    def html(self, i) -> str:
        return self.frames.get(i) or self.audio.get(i) or self.text.get(i) or ""


def _store_tokenizer(store: ActivationStore):
    """The tokenizer of the model the store was harvested with, where its settings name one this machine
    holds (a shipped toy, a checkpoint folder, a hub id): a loaded model is stored under its class name only."""
    name = store.settings.get("model")
    from hooked_av.registry import inspect
    from hooked_av.toy import TOYS

    if not isinstance(name, str) or not (name in TOYS or os.path.isdir(name) or name.count("/") == 1):
        return None

    try:
        return inspect(name)[1]
    except (OSError, ValueError) as e:
        warnings.warn(f"could not load the tokenizer of {name!r} ({e})", stacklevel=4)
        return None


# ---- the command ------------------------------------------------------------------------------------------------
def register(sae_sub) -> None:
    """Add `view` to the subparsers of `hooked-av sae` (it sets `func`)."""
    v = sae_sub.add_parser("view", help="an offline HTML page of an SAE's features with the media they fire on")
    v.add_argument("--sae", required=True, help="an SAE folder in SAELens's format (cfg.json + sae_weights.safetensors)")
    v.add_argument("--activations", required=True, help="the activation store (hooked-av harvest --out) at the SAE's hook")
    v.add_argument("--out", required=True, help="the page to write (FILE.html)")
    v.add_argument("--features", type=int, default=None, metavar="N",
                   help=f"show the N features of largest activation mass (default {N_FEATURES})")
    v.add_argument("--feature", type=int, action="append", metavar="F", help="show feature F (repeat; instead of --features)")
    v.add_argument("--top", type=int, default=8, help="top-activating tokens per feature (default 8)")
    v.add_argument("--hook", default=None, help="the store's hook (default: the SAE's cfg.metadata.hook_name)")
    v.add_argument("--bins", type=int, default=30, help="histogram bins (default 30)")
    v.add_argument("--threshold", type=float, default=0.8, help="mass share naming a feature's modality (default 0.8)")
    v.add_argument("--audio-context", type=float, default=0.5, help="seconds of audio either side of a token (default 0.5)")
    v.add_argument("--model", default=None, help='whose tokenizer decodes text tokens ("toy", a folder, a hub id; default: '
                                                 "the store's model)")
    v.add_argument("--device", default="cpu", help="where the SAE runs (default cpu)")
    v.add_argument("--max-mb", type=float, default=MAX_BYTES / 1e6, help="refuse a page larger than this (default 50)")
    v.set_defaults(func=view_command)


def view_command(args) -> None:
    from sae_lens import SAE

    sae_dir = Path(args.sae)
    if not (sae_dir / "cfg.json").is_file():
        raise ValueError(f"{sae_dir} is not an SAE folder (no cfg.json); give a folder saved by SAELens (sae.save_model)")
    store = ActivationStore(args.activations)  # a bad folder is refused before the SAE loads
    sae = SAE.load_from_disk(str(sae_dir), device=args.device)
    tokenizer = None
    if args.model is not None:
        from hooked_av.registry import inspect

        tokenizer = inspect(args.model)[1]
    out = feature_page(sae, store, args.out, hook=args.hook, features=args.feature, n_features=args.features,
                       top_k=args.top, bins=args.bins, threshold=args.threshold, audio_context=args.audio_context,
                       tokenizer=tokenizer, max_bytes=int(args.max_mb * 1e6), progress=True)
    size = out.stat().st_size
    n = len(args.feature) if args.feature else args.features or N_FEATURES
    print(f"page: {out.resolve()} ({size / 1e6:.2f} MB for up to {n} features, {size / max(n, 1) / 1e3:.0f} kB per feature)")
