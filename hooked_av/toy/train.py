"""Train the toy model on the CPU: `python -m hooked_av.toy.train [--steps N] [--out DIR]`.

The model is HF's own `Qwen2_5OmniThinkerForConditionalGeneration` (SDPA), from random weights, so
the saved folder is a genuine Thinker checkpoint that HF and `HookedQwen2_5Omni` both load. Audio
and video go through the real towers and TMRoPE; the loss is on the answer token only.

Planted structure: after the first 30% of steps, in half the rows of every batch, the last decoder
layer may not read the media tokens (their keys are masked for every text query), so by the last
layer the answer must already have left the media. Discarding the media from the last layer on then
keeps accuracy, which `tests/test_toy.py` checks; nothing else about the information flow is forced.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hooked_av.toy import vocab
from hooked_av.toy.clips import N_MELS, make_clips
from hooked_av.toy.data import collate, draw_samples
from hooked_av.toy.tokenizer import VOCAB_SIZE, build_tokenizer, token_ids

TRAIN_CLIP_SEED, TEST_CLIP_SEED = 0, 1  # held-out clips come from a different seed than training clips


def toy_config(n_layers: int = 4):
    """The Thinker config: text 128 wide, `n_layers` layers (4: the toy; 8: toy-flow), 4/2 heads of 32
    (mrope 4/6/6); towers 64 wide, 2 layers each; the toy tokenizer's special ids."""
    from transformers import Qwen2_5OmniThinkerConfig

    ids = token_ids()
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            max_position_embeddings=2048, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
        ),
        audio_config=dict(
            num_mel_bins=N_MELS, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
            n_window=100, output_dim=128, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=128, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1], in_channels=3,
        ),
        audio_token_index=ids["audio"], image_token_index=ids["image"], video_token_index=ids["video"],
        audio_start_token_id=ids["audio_bos"], audio_end_token_id=ids["audio_eos"], user_token_id=ids["user"],
        position_id_per_seconds=25, seconds_per_chunk=2,
    )
    cfg.vision_start_token_id = ids["vision_bos"]  # read by get_rope_index but not a declared field
    cfg.vision_end_token_id = ids["vision_eos"]
    cfg.pad_token_id = ids["pad"]
    return cfg


def last_layer_media_mask(input_ids, attention_mask, drop_rows, media_ids) -> torch.Tensor:
    """Additive float mask `[batch, 1, pos, pos]`: causal and padding, plus, in `drop_rows`, text
    queries blocked from media keys. Padding queries keep their own key, so no row is empty."""
    media = torch.isin(input_ids, media_ids)
    return planted_mask(attention_mask, drop_rows, ~media[:, :, None] & media[:, None, :])


def planted_mask(attention_mask, drop_rows, blocked) -> torch.Tensor:
    """Additive float mask `[batch, 1, pos, pos]`: causal and padding, plus the pairs `blocked` (bool
    `[batch, query, key]`) in the rows `drop_rows`; every query keeps its own key, so no row is empty."""
    b, s = attention_mask.shape
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None].expand(b, s, s) & attention_mask.bool()[:, None, :]
    allowed = (allowed & ~(drop_rows[:, None, None] & blocked)) | torch.eye(s, dtype=torch.bool)[None]
    mask = torch.zeros(b, 1, s, s)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)


def question_positions(input_ids) -> torch.Tensor:
    """bool `[batch, pos]`: the question's words, between the last media block's `<|audio_eos|>` and
    the prompt's last `<|im_end|>` (so a two-clip prompt's "clip one" / "clip two" are not in it)."""
    ids = token_ids()
    pos = torch.arange(input_ids.shape[1])
    after = torch.where(input_ids == ids["audio_eos"], pos, -1).max(1).values
    before = torch.where(input_ids == ids["im_end"], pos, -1).max(1).values
    return (pos > after[:, None]) & (pos < before[:, None])


def pathway_mask(input_ids, attention_mask, drop_rows, stage: str) -> torch.Tensor:
    """Additive float mask `[batch, 1, pos, pos]` of toy-flow's planted pathway at a layer of `stage`:
    causal and padding, plus, in `drop_rows`: audio and video tokens read their own modality's media only;
    no text query reads the media, except the question's words (`question_positions`) at a "gather"
    layer; the positions after the question (the template and the last) do not read the question's
    words, except at an "answer" layer ("closed": neither). So the media reach the answer only as
    media -> question (gather layers) -> last (answer layers)."""
    return planted_mask(attention_mask, drop_rows, pathway_blocked(input_ids, stage))


STAGES = ("gather", "answer", "closed")  # a pathway layer's stage; the layers not named in pathway_layers are "closed"


def pathway_blocked(input_ids, stage: str) -> torch.Tensor:
    """bool `[batch, query, key]`: the (query, key) pairs toy-flow's plant forbids at a layer of `stage`
    (`pathway_mask`), whatever the causal and padding masks say."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    ids = token_ids()
    s = input_ids.shape[1]
    audio, video = input_ids == ids["audio"], input_ids == ids["video"]
    media, question = audio | video, question_positions(input_ids)
    pos = torch.arange(s)
    after = pos[None] >= torch.where(input_ids == ids["im_end"], pos, -1).max(1).values[:, None]
    blocked = (audio[:, :, None] & video[:, None, :]) | (video[:, :, None] & audio[:, None, :])
    readers = question if stage == "gather" else torch.zeros_like(question)
    blocked |= (~media & ~readers)[:, :, None] & media[:, None, :]
    if stage != "answer":
        blocked |= after[:, :, None] & question[:, None, :]
    return blocked & ~torch.eye(s, dtype=torch.bool)[None]


@torch.no_grad()
def accuracy_by_kind(model, bank, samples, tokenizer, batch_size: int = 64, by: str = "kind") -> dict[str, float]:
    """Held-out accuracy per question kind (`by="kind"`) or per "kind/question" (`by="question"`)
    (HF model, answer = argmax at the last position)."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch_size):
        batch = collate(bank, samples[i : i + batch_size], tokenizer)
        pred = model(**batch.inputs, use_audio_in_video=False).logits[:, -1].argmax(-1)
        for s, ok in zip(batch.samples, (pred == batch.answers).tolist()):
            hits.setdefault(s.kind if by == "kind" else f"{s.kind}/{s.question}", []).append(ok)
    model.train()
    return {k: float(np.mean(v)) for k, v in sorted(hits.items(), key=lambda kv: vocab.KINDS.index(kv[0].split("/")[0]))}


# A batch is either single-clip questions (kinds drawn per sample) or two-clip prompts: mixing both in
# one batch left-pads the single-clip rows by ~35 positions, and with that the visual questions
# stalled near 0.6 for 1,500 steps (they learn in ~200 steps in unpadded batches).
SINGLE_KINDS = ("visual", "auditory", "audiovisual")
TWO_CLIP_BATCHES = 0.4  # the share of two-clip batches: they learn slowest


def train(steps: int, out: Path, seed: int = 0, batch_size: int = 32, lr: float = 2e-3, warmup: int = 100,
          n_clips: int = 4000, drop_p: float = 0.5, plant_from: float = 0.3, eval_every: int = 250, threads: int = 2,
          resume: Path | None = None, n_layers: int = 4, plant: str = "last_layer", audio_from: str | None = None,
          pathway_layers: dict | None = None, init_from: str | None = None, attention_penalty: float = 0.0) -> dict:
    """Train (or continue) a toy for `steps` steps and save it to `out`; returns the train report.
    `plant` (`PLANTS`): "last_layer", the toy's (the last layer's text queries may not read the
    media), or "pathway", toy-flow's (`pathway_mask`: the question's words read the media in the layers
    `pathway_layers["gather"]` only, the positions after the question read the question in `pathway_layers["answer"]`
    only, no other text query reads the media, each media token reads its own modality only); either
    acts in a share `drop_p` of the rows of every batch, after the first
    `plant_from` of the steps. `audio_from`: a shipped toy (`hooked_av.toy.TOYS`) whose trained audio
    tower a fresh model starts from (everything else starts random; see `_copy_audio_tower`). `init_from`: a shipped toy whose every
    weight a fresh model starts from (`_grow_from`: its layers first, the rest as identity copies).
    `attention_penalty` (plant "pathway"): the loss adds this times the attention mass the plain
    (unplanted) rows put on the pairs the plant forbids (`pathway_blocked`; per query, averaged over the
    queries that have such keys, the heads, rows and layers), so the shipped model keeps to the pathway
    with plain causal attention instead of learning a second, direct route in those rows."""
    if plant not in PLANTS:
        raise ValueError(f"plant must be one of {list(PLANTS)}, got {plant!r}")
    if attention_penalty and plant != "pathway":
        raise ValueError(f"attention_penalty applies to plant='pathway' only, got plant={plant!r}")
    if resume is not None and (audio_from or init_from):
        raise ValueError(f"a resumed run keeps its weights: audio_from={audio_from!r} / init_from={init_from!r} start a fresh model only")
    if (plant == "pathway") != (pathway_layers is not None) or any(not 0 <= i < n_layers for v in (pathway_layers or {}).values() for i in v):
        raise ValueError(f"pathway_layers (layers in 0..{n_layers - 1}) go with plant='pathway' and only with it, got {pathway_layers!r}")
    if pathway_layers is not None and (set(pathway_layers) != {"gather", "answer"}
                                       or set(pathway_layers["gather"]) & set(pathway_layers["answer"])):
        raise ValueError(f"pathway_layers names the 'gather' and the 'answer' layers, no layer in both, got {pathway_layers!r}")
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    tokenizer = build_tokenizer()
    train_bank = make_clips(n_clips, seed=TRAIN_CLIP_SEED + 10 * seed)
    test_bank = make_clips(1000, seed=TEST_CLIP_SEED + 10 * seed)
    probe = draw_samples(test_bank, 400, seed=100 + seed)
    print(f"data ready in {time.time() - t0:.0f} s", flush=True)

    cfg = toy_config(n_layers)
    cfg._attn_implementation = "sdpa"
    if resume is None:
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).train()
        if audio_from is not None:
            _copy_audio_tower(model, audio_from)
        if init_from is not None:
            _grow_from(model, init_from)
    else:  # continue from a saved run (its minutes are not counted in this report)
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(resume), attn_implementation="sdpa").train()
    if attention_penalty:  # the penalty reads the attention probabilities: eager attention while training
        model.set_attn_implementation("eager")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    )
    ids = token_ids()
    media_ids = torch.tensor([ids["audio"], ids["video"]])
    planted: dict = {}
    layers = model.model.language_model.layers
    stage_of = []
    for i, layer in enumerate(layers):  # which planted mask each layer takes, if any
        key = next((k for k, v in (pathway_layers or {}).items() if i in v), "closed" if plant == "pathway" else "blind")
        stage_of.append(key)
        if plant == "pathway" or i == len(layers) - 1:
            layer.register_forward_pre_hook(_plant_hook(planted, key), with_kwargs=True)
    rng = np.random.default_rng(seed)
    curve, train_start = [], time.time()
    for step in range(1, steps + 1):
        kinds = ("two_clip",) if rng.random() < TWO_CLIP_BATCHES else SINGLE_KINDS
        batch = collate(train_bank, draw_samples(train_bank, batch_size, seed=int(rng.integers(2**31)), kinds=kinds), tokenizer)
        # planting starts once the features exist: early on it only slows learning them
        drop = torch.from_numpy(rng.random(batch_size) < (drop_p if step > plant_from * steps else 0.0))
        ids_, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        if plant == "pathway":  # each stage's forbidden pairs once a step: the masks and the penalty read them
            blocked = {k: pathway_blocked(ids_, k) for k in set(stage_of)}
            planted.update({k: planted_mask(am, drop, v) for k, v in blocked.items()})
        else:
            planted["blind"] = last_layer_media_mask(ids_, am, drop, media_ids)
        res = model(**batch.inputs, use_audio_in_video=False, output_attentions=bool(attention_penalty))
        loss = F.cross_entropy(res.logits[:, -1].float(), batch.answers)
        forbidden = _forbidden_mass(res.attentions, blocked, stage_of) if attention_penalty else None
        if attention_penalty:
            loss = loss + attention_penalty * forbidden
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            planted.clear()  # evaluate the model as it is shipped: plain causal attention
            acc = accuracy_by_kind(model, test_bank, probe, tokenizer)
            minutes = (time.time() - train_start) / 60
            curve.append({"step": step, "minutes": round(minutes, 2), "loss": round(loss.item(), 4),
                          **({} if forbidden is None else {"forbidden_mass": round(forbidden.item(), 4)}), **acc})
            print(json.dumps(curve[-1]), flush=True)

    final_samples = draw_samples(test_bank, 2000, seed=200 + seed)
    planted.clear()
    final = accuracy_by_kind(model, test_bank, final_samples, tokenizer)
    per_question = accuracy_by_kind(model, test_bank, final_samples, tokenizer, by="question")
    report = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "minutes": round((time.time() - train_start) / 60, 2), "threads": threads, "parameters": n_params,
        "train_clips": n_clips, "audio_from": audio_from, "init_from": init_from, "resumed_from": None if resume is None else str(resume), "held_out_samples": len(final_samples), "held_out_accuracy": final,
        "held_out_accuracy_by_question": per_question,
        "n_layers": n_layers, "plant": plant, "pathway_layers": pathway_layers, "attention_penalty": attention_penalty, "plant_drop_p": drop_p, "plant_from_fraction": plant_from, "two_clip_batch_share": TWO_CLIP_BATCHES, "curve": curve,
    }
    out.mkdir(parents=True, exist_ok=True)
    if attention_penalty:
        model.set_attn_implementation("sdpa")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"final": final, "minutes": report["minutes"]}), flush=True)
    return report


def _toy_state(toy: str) -> dict:
    """The state dict of the shipped toy `toy` (`hooked_av.toy.TOYS`), as HF's Thinker loads it."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from hooked_av.toy import weights_dir

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(weights_dir(toy))).state_dict()


AUDIO_TOWER = "model.audio_tower."  # the state-dict prefix of the Thinker's audio tower


def _copy_audio_tower(model, toy: str) -> None:
    """Overwrite `model`'s audio tower with the shipped toy `toy`'s trained one (same configuration:
    `toy_config` varies the decoder's depth only). The instrument questions took the toy 5,000 steps,
    most of them the audio tower learning its features; starting from them saves that. The vision
    tower is not copied: its features (norm ~200 against ~0.3 for the text embeddings) stayed unread
    by a fresh 8-layer decoder, visual questions at chance for 1,500 steps, while a vision tower
    trained along with the decoder learns colour in a few hundred."""
    source = _toy_state(toy)
    mine = model.state_dict()
    tower = {k: v for k, v in source.items() if k.startswith(AUDIO_TOWER)}
    if not tower or any(k not in mine or mine[k].shape != v.shape for k, v in tower.items()):
        raise ValueError(f"the toy {toy!r}'s audio tower does not fit this model's; train it from scratch (audio_from=None)")
    model.load_state_dict(tower, strict=False)


def _forbidden_mass(attentions, blocked, stage_of) -> torch.Tensor:
    """Attention mass on the pairs `blocked[stage]` (`pathway_blocked`) forbids: per query with such keys,
    averaged over those queries, plus the last (answer) position's own, each averaged over heads, rows and
    layers (`attentions`: one `[batch, head, query, key]` per layer; `stage_of`: each layer's stage). The
    answer position is one query in ~50; averaged with the rest alone, its direct reads of the media stayed
    (a knockout of video -> last still cost -56 %)."""
    total = 0.0
    for probs, st in zip(attentions, stage_of):
        mass = (probs * blocked[st][:, None].to(probs.dtype)).sum(-1)  # [batch, head, query]
        has = blocked[st].any(-1)[:, None].expand_as(mass)
        total = total + mass[has].mean() + mass[:, :, -1].mean()  # the answer position counted on its own too
    return total / len(stage_of)


LAYERS = "model.language_model.layers."  # the state-dict prefix of the Thinker's decoder layers


def _grow_from(model, toy: str) -> None:
    """Start `model` from the shipped toy `toy` (same widths, at least as many decoder layers): every
    weight copied; decoder layer i of the deeper model takes the toy's layer i where the toy has one,
    else the toy's layer i mod its depth with its attention output (`o_proj`) and MLP output
    (`down_proj`) zeroed, so the extra layers add nothing and the grown model computes what the toy
    computes until training moves them."""
    source = _toy_state(toy)
    n_src = 1 + max(int(k[len(LAYERS):].split(".")[0]) for k in source if k.startswith(LAYERS))
    grown = {}
    for k, v in model.state_dict().items():
        if not k.startswith(LAYERS):
            grown[k] = source[k]
            continue
        i, rest = k[len(LAYERS):].split(".", 1)
        w = source[f"{LAYERS}{int(i) % n_src}.{rest}"].clone()
        if int(i) >= n_src and rest.split(".")[-2] in ("o_proj", "down_proj"):
            w.zero_()
        grown[k] = w
    if any(grown[k].shape != v.shape for k, v in model.state_dict().items()):
        raise ValueError(f"the toy {toy!r} does not fit this model's widths; train it from scratch (init_from=None)")
    model.load_state_dict(grown)


def _plant_hook(plant: dict, key: str):
    """Forward pre-hook for a planted decoder layer: swaps in the mask `plant[key]` when there is one."""

    def hook(module, args, kwargs):
        if plant.get(key) is None:
            return None
        return args, {**kwargs, "attention_mask": plant[key]}

    return hook


DEFAULT_SCHEDULE = "2200:2e-3,1500:1e-3,1500:5e-4"  # the shipped toy's stages
PLANTS = ("last_layer", "pathway")
# what each shipped toy was trained with (`--toy NAME`; its weights are `hooked_av.toy.weights_dir(NAME)`)
RECIPES = {
    "toy": dict(n_layers=4, plant="last_layer", schedule=DEFAULT_SCHEDULE, drop_p=0.5, plant_from=0.3),
    "toy-flow": dict(n_layers=8, plant="pathway", pathway_layers={"gather": (1, 2), "answer": (4, 5)}, schedule="1500:1e-3,2000:5e-4",
                     drop_p=0.75, plant_from=0.0, attention_penalty=5.0,
                     init_from="toy"),
}


def main(argv=None) -> None:
    from hooked_av.toy import TOYS, weights_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", default="toy", choices=list(TOYS),
                   help="which shipped toy's recipe (depth, plant, schedule) to train; its weights folder is the default --out")
    p.add_argument("--schedule", default=None,
                   help="comma-separated STEPS:LR stages, each continuing the previous one (fresh warm-up and cosine); "
                        f"default: the toy's ({DEFAULT_SCHEDULE!r} for toy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", type=Path, default=None, help="start the first stage from a saved model")
    a = p.parse_args(argv)
    recipe = dict(RECIPES[a.toy])
    schedule = a.schedule or recipe["schedule"]
    del recipe["schedule"]
    out_dir = a.out or weights_dir(a.toy)
    try:
        stages = [(int(steps), float(lr)) for steps, lr in (part.split(":") for part in schedule.split(","))]
    except ValueError:
        raise SystemExit(f"--schedule must look like {DEFAULT_SCHEDULE!r}, got {schedule!r}") from None
    reports, previous = [], a.resume
    with tempfile.TemporaryDirectory() as tmp:
        for i, (steps, lr) in enumerate(stages):
            out = out_dir if i == len(stages) - 1 else Path(tmp) / f"stage{i}"
            start = recipe if previous is None else {k: v for k, v in recipe.items() if k not in ("audio_from", "init_from")}
            reports.append(train(steps, out, seed=a.seed, lr=lr, threads=a.threads, resume=previous, **start))
            previous = out
    report = {
        "toy": a.toy, "schedule": schedule, "seed": a.seed, "threads": a.threads,
        "steps": sum(r["steps"] for r in reports), "minutes": round(sum(r["minutes"] for r in reports), 2),
        "held_out_samples": reports[-1]["held_out_samples"], "held_out_accuracy": reports[-1]["held_out_accuracy"],
        "held_out_accuracy_by_question": reports[-1]["held_out_accuracy_by_question"],
        "stages": reports,
    }
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"held_out_accuracy": report["held_out_accuracy"], "minutes": report["minutes"]}), flush=True)


if __name__ == "__main__":
    main()
