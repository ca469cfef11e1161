"""A tiny video-SALMONN 2+ reference assembled from stock HF classes only, its checkpoint in the
repository's key layout, and hand-built prompts with independently computed position ids.

The reference is `Qwen2_5_VLForConditionalGeneration` + `WhisperEncoder` + `Blip2QFormerModel` +
`q_tokens` + `audio_proj`, glued as the repository's `WhisperEncoder.forward` and `sft_forward` glue
them. Position ids are always passed explicitly (transformers 5.x's stock `get_rope_index` is wrong
for videos with more than one temporal step); they are computed here from the prompt's segments,
not by scanning tokens as `hooked_av` does, so the two implementations check each other.

Token ids are deliberately not the real ones (a 320-word vocabulary). The Whisper chunk keeps its real
3000 frames (1500 positions) with a 16-wide model, so chunking and windowing are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE, VIDEO, VISION_START, VISION_END, AUDIO = 251, 252, 255, 256, 257
N_MELS, FRAMES, TOKENS_PER_CHUNK, WINDOW = 128, 3000, 60, 25
PATCH_DIM = 3 * 2 * 14 * 14
TEXT = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
)
VISION = dict(
    depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3,
)
WHISPER = dict(
    num_mel_bins=N_MELS, d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
    max_source_positions=1500,
)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_act="gelu")


class Reference(nn.Module):
    def __init__(self, seed: int = 0):
        from transformers import (
            Blip2QFormerConfig, Blip2QFormerModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
            WhisperConfig,
        )
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        super().__init__()
        torch.manual_seed(seed)
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vl = Qwen2_5_VLConfig(
            text_config=text, vision_config=VISION, image_token_id=IMAGE, video_token_id=VIDEO,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=False,
        )
        vl._attn_implementation = "eager"
        self.vl = Qwen2_5_VLForConditionalGeneration(vl).eval()
        wc = WhisperConfig(**WHISPER)
        wc._attn_implementation = "eager"
        self.whisper = WhisperEncoder(wc).eval()
        qc = Blip2QFormerConfig(
            **QFORMER, encoder_hidden_size=WHISPER["d_model"], cross_attention_frequency=1, layer_norm_eps=1e-12,
        )
        qc._attn_implementation = "eager"
        self.qformer = Blip2QFormerModel(qc).eval()
        self.q_tokens = nn.Parameter(torch.randn(1, 1, QFORMER["hidden_size"]))
        self.audio_proj = nn.Linear(QFORMER["hidden_size"], TEXT["hidden_size"])
        with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0; make every weight matter
            for name, p in self.named_parameters():
                if "norm" in name.lower() or "ln_q" in name:
                    p.add_(0.1 * torch.randn_like(p))
                elif p.dim() == 1:
                    p.normal_(0, 0.05)

    def salmonn_config(self) -> dict:
        """config.json as the repository writes it: Qwen2.5-VL with flat text fields, plus audio."""
        d = self.vl.config.to_dict()
        text = d.pop("text_config")
        d.update({k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")})
        rope = d.pop("rope_parameters")
        d["rope_theta"], d["rope_scaling"] = rope["rope_theta"], {"type": "mrope", "mrope_section": rope["mrope_section"]}
        d["architectures"] = ["video_SALMONN2_plus"]
        d["audio_token_id"] = AUDIO
        d["audio_config"] = dict(
            WHISPER, encoder_layerdrop=0.0, second_per_window=0.5, second_stride=0.5,
            qformer_config=dict(
                QFORMER, encoder_width=WHISPER["d_model"], cross_attention_freq=1, layer_norm_eps=1e-12,
                query_length=1, add_cross_attention=True, out_hidden_size=TEXT["hidden_size"],
            ),
        )
        return d

    def salmonn_state_dict(self, newer_layout: bool = False) -> dict[str, torch.Tensor]:
        """Weights under the repository's keys (or, with `newer_layout`, HF 5.x's `model.language_model.*`
        / `model.visual.*`), with BertEmbeddings' `position_ids` buffer as the repository saves it."""
        out = {}
        for k, v in self.vl.state_dict().items():
            if not newer_layout:
                k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            out[k] = v
        for k, v in self.whisper.state_dict().items():
            out["audio." + k] = v
        for k, v in self.qformer.state_dict().items():
            k = k.replace("layernorm.", "embeddings.LayerNorm.").replace(".attention.attention.", ".attention.self.")
            k = k.replace(".crossattention.attention.", ".crossattention.self.")
            out["audio.qformer.bert." + k] = v
        out["audio.qformer.bert.embeddings.position_ids"] = torch.arange(512).expand(1, -1)
        out["audio.q_tokens"] = self.q_tokens.data
        out["audio.audio_proj.weight"], out["audio.audio_proj.bias"] = self.audio_proj.weight.data, self.audio_proj.bias.data
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, folder: Path, newer_layout: bool = False, config: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.salmonn_state_dict(newer_layout), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config or self.salmonn_config()))
        return folder

    # ---- the forward, glued as the repository glues it -------------------------------------
    def audio_embeds(self, mel: torch.Tensor, output_attentions: bool = False):
        enc = self.whisper(mel, output_hidden_states=True)
        h = enc.last_hidden_state  # [chunks, 1500, d]
        b, _, c = h.shape
        windows = F.unfold(h.transpose(1, 2).unsqueeze(2), kernel_size=(1, WINDOW), stride=(1, WINDOW))
        windows = windows.view(b, c, WINDOW, -1).permute(0, 3, 2, 1).reshape(-1, WINDOW, c)
        q = self.qformer(
            query_embeds=self.q_tokens.expand(windows.shape[0], -1, -1), encoder_hidden_states=windows,
            encoder_attention_mask=torch.ones(windows.shape[:2], dtype=torch.long), output_attentions=output_attentions,
        )
        return self.audio_proj(q.last_hidden_state).reshape(-1, TEXT["hidden_size"]), enc, q

    def forward(self, inputs: dict, position_ids: torch.Tensor, **kw):
        ids = inputs["input_ids"]
        embeds = self.vl.get_input_embeddings()(ids)
        if "pixel_values_videos" in inputs:
            v = self.vl.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
            embeds = embeds.masked_scatter((ids == VIDEO)[..., None], torch.cat(list(v)).to(embeds.dtype))
        if "input_features" in inputs:
            a = self.audio_embeds(inputs["input_features"])[0]
            embeds = embeds.masked_scatter((ids == AUDIO)[..., None], a.to(embeds.dtype))
        return self.vl(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=position_ids, **kw)


# ---- prompts -----------------------------------------------------------------------------------
def per_step_audio(n_audio: int, t: int, spg: float) -> list[int]:
    """Audio tokens after each temporal step: diff of floor(t * spg * 2), the last takes the rest."""
    idx = (torch.arange(t) * spg * 2).long()
    counts = torch.diff(idx).tolist()
    return counts + [n_audio - sum(counts)]


class Row:
    """One prompt row as segments: ("text", n) and media blocks, each block with its own tokens."""

    def __init__(self, seed: int):
        self.rng = torch.Generator().manual_seed(seed)
        self.segments: list[tuple] = []
        self.mels: list[torch.Tensor] = []
        self.videos: list[tuple[torch.Tensor, tuple[int, int, int]]] = []

    def text(self, n: int):
        self.segments.append(("text", torch.randint(0, 200, (n,), generator=self.rng).tolist()))
        return self

    def _audio(self, chunks: int) -> int:
        self.mels.append(torch.randn(chunks, N_MELS, FRAMES, generator=self.rng))
        return chunks * TOKENS_PER_CHUNK

    def _video(self, t: int, h: int, w: int):
        self.videos.append((torch.randn(t * h * w, PATCH_DIM, generator=self.rng), (t, h, w)))

    def video_with_audio(self, t: int, h: int, w: int, chunks: int, spg: float):
        self._video(t, h, w)
        counts = per_step_audio(self._audio(chunks), t, spg)
        self.segments.append(("av", (t, h // 2, w // 2), counts, spg))
        return self

    def video(self, t: int, h: int, w: int, spg: float = 1.0):
        self._video(t, h, w)
        self.segments.append(("av", (t, h // 2, w // 2), [0] * t, spg))
        return self

    def audio(self, chunks: int):
        self.segments.append(("a", self._audio(chunks)))
        return self

    def tokens(self) -> list[int]:
        out = []
        for seg in self.segments:
            if seg[0] == "text":
                out += seg[1]
            elif seg[0] == "a":
                out += [VISION_START] + [AUDIO] * seg[1] + [VISION_END]
            else:
                (t, h, w), counts = seg[1], seg[2]
                out.append(VISION_START)
                for step in range(t):
                    out += [VIDEO] * (h * w) + [AUDIO] * counts[step]
                out.append(VISION_END)
        return out

    def positions(self, mode: str, spg_given: bool) -> torch.Tensor:
        """`[3, n]`, following the rules of the repository's get_rope_index in `mode`: the branch is
        this row's own (the repository computes each sample alone), and inference ignores the given
        seconds per grid step (the official inference drops it: 1.0 s)."""
        cols: list[list[int]] = []
        nxt = 0

        def text(n):
            nonlocal nxt
            cols.extend([[nxt + i] * 3 for i in range(n)])
            nxt += n

        last_block = max((i for i, s in enumerate(self.segments) if s[0] != "text"), default=-1)
        training_av = mode == "training" and bool(self.mels) and bool(self.videos)
        training_a = mode == "training" and bool(self.mels) and not self.videos
        use_spg = spg_given and mode == "training"
        for i, seg in enumerate(self.segments):
            if seg[0] == "text":
                text(len(seg[1]))
            elif seg[0] == "a":
                text(1)  # <|vision_start|>
                n = seg[1]
                if training_a:
                    block = [[nxt + k, nxt + k, nxt] for k in range(n)]
                    cols.extend(block)
                    nxt = (max(c[0] for c in block) if i == last_block else max(max(c) for c in block)) + 1
                else:  # untouched by the vision branch: audio counts as text
                    text(n)
                text(1)
            else:
                (t, h, w), counts, spg = seg[1], seg[2], seg[3]
                text(1)
                grid = [[int(s * (spg if use_spg else 1.0) * 2) + nxt, r + nxt, c + nxt]
                        for s in range(t) for r in range(h) for c in range(w)]
                if training_av:
                    block, k, g = [], 0, iter(grid)
                    for step in range(t):
                        block += [next(g) for _ in range(h * w)]
                        block += [[nxt + k + j, nxt, nxt + k + j] for j in range(counts[step])]
                        k += counts[step]
                    cols.extend(block)
                    nxt = (max(c[0] for c in block) if i == last_block else max(max(c) for c in block)) + 1
                    text(1)
                else:  # the first t*h*w tokens of the block take the grid, whatever they are
                    cols.extend(grid)
                    nxt = max(max(c) for c in grid) + 1
                    text(sum(counts) + 1)
        return torch.tensor(cols).T


def batch(*rows: Row, mode: str = "inference", spg_given: bool = False, pad_id: int = 0):
    """(inputs for our model, reference position ids `[3, batch, pos]`), left-padded."""
    toks = [r.tokens() for r in rows]
    n = max(len(t) for t in toks)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    has_audio = any(r.mels for r in rows)
    has_video = any(r.videos for r in rows)
    pos = torch.ones(3, len(rows), n, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, toks)):
        ids[i, n - len(t):] = torch.tensor(t)
        mask[i, n - len(t):] = 1
        pos[:, i, n - len(t):] = r.positions(mode, spg_given)
    out: dict = {"input_ids": ids, "attention_mask": mask}
    if has_audio:
        out["input_features"] = torch.cat([m for r in rows for m in r.mels])
    if has_video:
        out["pixel_values_videos"] = torch.cat([p for r in rows for p, _ in r.videos])
        out["video_grid_thw"] = torch.tensor([g for r in rows for _, g in r.videos])
        if spg_given:
            out["video_second_per_grid"] = torch.tensor([s[3] for r in rows for s in r.segments if s[0] == "av"])
    return out, pos
