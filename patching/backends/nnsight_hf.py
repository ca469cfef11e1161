"""The patching library on a stock HF model through nnsight: the same `TokenMap`s and `Intervention`s,
no reimplementation. The path for a model hooked_av does not reimplement (a new family, a fine-tune
with changed code) and, through nnsight, for remote execution.

    be = NNsightHF(hf_model)                     # eager or sdpa attention
    tm = be.token_map(inputs, tokenizer)         # groups from the config's media placeholder ids
    logits, cache = be.run(inputs, block_attention(tm, "audio", "last", range(4, 13)),
                           read=["blocks.3.hook_resid_post"])

Our hook names map to the HF decoder (found with `get_decoder()`, its `.layers`, and
`get_output_embeddings()`), read and set inside one nnsight trace:

    hook_embed, blocks.{l}.hook_resid_pre    input hidden states of decoder layer l (0 for hook_embed)
    blocks.{l}.ln1.hook_normalized           output of layer l's `input_layernorm`
    blocks.{l}.attn.hook_attn_mask           the `attention_mask` that layer l's `self_attn` receives,
                                             as our additive `[batch, 1, q, k]` float mask (a per-layer copy)
    blocks.{l}.hook_attn_out                 `self_attn` output (first element)
    blocks.{l}.hook_mlp_out                  `mlp` output
    blocks.{l}.hook_resid_post               output of decoder layer l (before any DeepStack addition
                                             the model makes between layers: resid_pre of l+1 is read
                                             at layer l+1's input)

Attention edits act on the mask before the softmax, so the model must run "eager" or "sdpa" attention
(both take a float mask); where sdpa passes no mask (causal, nothing padded) or a bool one, the layer
gets the equivalent additive mask. There is no `hook_resid_mid`, `hook_pattern` or per-head site: HF
exposes no module output for them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from hooked_av.inputs.chat import ChatTokens, text_groups
from hooked_av.inputs.token_map import (
    MEDIA,
    TokenMap,
    TokenMapBuilder,
    check_media_items,
    check_text_parts,
    clip_numbers,
    media_runs,
    row_records,
    with_text_parts,
)
from hooked_av.interop.nnsight import require_nnsight
from hooked_av.utils import additive, hf_stages, open_mask
from patching.engine.intervention import Intervention

ATTENTION = ("eager", "sdpa")
# execution order of the sites inside one decoder layer; the trace requests them in this order
STAGES = hf_stages()
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MEDIA_ID = re.compile(rf"^({'|'.join(MEDIA)})_token_(?:id|index)$")
_MEDIA_EDGE = re.compile(r"^(?:(?:audio|image|video|vision)_(?:start|end|bos|eos)|boi|eoi|boa|eoa)_token_(?:id|index)$")


def _config_ids(config, pattern: re.Pattern) -> dict[str, int]:
    """`name -> id` of the integer fields of `config` (and its `thinker_config`) whose name matches."""
    out = {}
    for cfg in (config, getattr(config, "thinker_config", None)):
        if cfg is None:
            continue
        for name in dir(cfg):
            if pattern.match(name):
                value = getattr(cfg, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    out.setdefault(name, value)
    return out


def hf_token_map(inputs: dict, config, tokenizer=None, chat: ChatTokens | None = None) -> TokenMap:
    """The TokenMap of an HF multimodal model's processor outputs from its config alone: media runs
    from the config's `{audio,image,video}_token_{id,index}` fields, items numbered by clip as our
    models' maps number them (`clip_numbers`: an audio-in-video block is one clip), media start/end
    ids (`*_start/_end/_bos/_eos_token_id`, `boi/eoi`) and the tokenizer's special tokens as template
    (without a tokenizer, a media start/end id the config does not name reads as text), text from the ChatML structure of
    `chat` or `tokenizer` (ChatML only; without either all text is "question") and `prepare`'s
    `text_parts` and `media_items` records where the inputs carry them (question, options, instruction, label;
    the prompt's item of each media token), `last` the final real
    position. Frames, times and chunks are not known here (-1 / NaN)."""
    media = {v: _MEDIA_ID.match(k).group(1) for k, v in _config_ids(config, _MEDIA_ID).items()}
    if not media:
        raise ValueError(f"{type(config).__name__} has no audio/image/video_token_id (or _index) field; "
                         "this builder needs the media placeholder ids in the config")
    edges = set(_config_ids(config, _MEDIA_EDGE).values())
    if tokenizer is not None:  # its special tokens (media bos/eos the config may not name) are template too
        edges |= set(tokenizer.all_special_ids) - set(media)
        chat = chat or ChatTokens.from_tokenizer(tokenizer)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"attention_mask must be the processor's 2D [batch, pos] mask, got shape {tuple(mask.shape)}")
    parts = check_text_parts(inputs.get("text_parts"), ids)
    record = check_media_items(inputs.get("media_items"), ids)
    b = TokenMapBuilder(*ids.shape)
    for row in range(ids.shape[0]):
        real = torch.arange(ids.shape[1]) if mask is None else mask[row].cpu().bool().nonzero().flatten()
        toks = ids[row, real].tolist()
        groups = with_text_parts(text_groups(toks, chat), None if parts is None else parts[row, real].tolist())
        for i, g in enumerate(groups):
            b.set(row, int(real[i]), "template" if toks[i] in edges else g)
        runs = list(media_runs(toks, media))
        for (start, end, kinds), clip in zip(runs, clip_numbers(runs, *row_records(record, parts, row, real))):
            for kind in dict.fromkeys(kinds):
                pos = [int(real[start + j]) for j, k in enumerate(kinds) if k == kind]
                b.set(row, pos, kind, item=clip)
        if len(real):
            b.set(row, int(real[-1]), "last")
    return b.build()


class _Hook:
    """What an intervention's `fn(tensor, hook)` reads of its hook: the name."""

    def __init__(self, name: str):
        self.name = name


class NNsightHF:
    """A stock HF causal (multimodal) LM wrapped in nnsight, run with our hook names.

    `cfg` has `n_layers`, `n_heads`, `d_model`, `d_vocab` of the text decoder, so `Intervention.check`
    and `patching.engine.checks` work on it as on our models."""

    def __init__(self, hf_model):
        nnsight = require_nnsight()
        self.hf = hf_model
        decoder = hf_model.get_decoder()
        impl = getattr(decoder.config, "_attn_implementation", None)
        if impl not in ATTENTION:
            raise ValueError(f"{type(hf_model).__name__} runs {impl!r} attention, which does not take an additive "
                             f"float mask; load it with attn_implementation='sdpa' or 'eager'")
        self.layers = decoder.layers
        text = decoder.config
        self.cfg = type("cfg", (), dict(
            n_layers=len(self.layers), n_heads=text.num_attention_heads, d_model=text.hidden_size,
            d_vocab=hf_model.get_output_embeddings().weight.shape[0]))()
        self.envoy = nnsight.NNsight(hf_model)
        paths = {m: n for n, m in hf_model.named_modules()}
        self._layer_paths = [paths[layer] for layer in self.layers]
        self._head_path = paths[hf_model.get_output_embeddings()]
        self.hook_dict = {"hook_embed": None} | {
            f"blocks.{l}.{site}": None for l in range(self.cfg.n_layers) for site in STAGES
            if site != "ln1.hook_normalized" or hasattr(self.layers[l], "input_layernorm")}

    # ---- names ------------------------------------------------------------------------------
    def check_hook_name(self, name) -> None:
        if callable(name) and not isinstance(name, str):
            if not any(name(n) for n in self.hook_dict):
                raise KeyError(f"the filter function {getattr(name, '__name__', name)!r} matches no site of this backend")
            return
        if name not in self.hook_dict:
            raise KeyError(f"{name!r} is not a site of the nnsight HF backend; it reads and sets hook_embed and "
                           f"blocks.{{0..{self.cfg.n_layers - 1}}}.{{{', '.join(STAGES)}}}")

    def _names(self, name) -> list[str]:
        self.check_hook_name(name)
        return [n for n in self.hook_dict if name(n)] if callable(name) and not isinstance(name, str) else [name]

    @staticmethod
    def _order(name: str) -> tuple[int, int]:
        if name == "hook_embed":
            return (0, -1)
        m = _NAME.match(name)
        return (int(m.group(1)), STAGES[m.group(2)])

    def token_map(self, inputs: dict, tokenizer=None, chat: ChatTokens | None = None) -> TokenMap:
        """`hf_token_map` of the wrapped model's config."""
        return hf_token_map(inputs, self.hf.config, tokenizer, chat)

    # ---- one traced forward -----------------------------------------------------------------
    def run(self, inputs: dict, intervention: Intervention | None = None, read=(), logits: str = "last",
            **forward_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the HF model on processor outputs `inputs` under `intervention` (an `Intervention` or `(hook_name,
        fn)` pairs, applied in execution order; parts on the same site in the order given) and return `(logits, cache)`:
        logits `[batch, vocab]` at the last position (`logits="last"`) or `[batch, pos, vocab]`
        ("all"); `cache[name]` the value at each site in `read` after the intervention's edits there."""
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        if isinstance(intervention, Intervention):  # layers, heads, rows and names, before anything runs
            intervention.check(self, batch=int(inputs["input_ids"].shape[0]))
        elif intervention is not None:  # (name, fn) pairs, as model.run_with_hooks takes them
            pairs = list(intervention) if isinstance(intervention, (list, tuple)) else None
            if pairs is None or not all(isinstance(p, tuple) and len(p) == 2 and (isinstance(p[0], str) or callable(p[0]))
                                        and callable(p[1]) for p in pairs):
                raise TypeError(f"intervention must be an Intervention or a list of (hook_name, fn) pairs; got "
                                f"{type(intervention).__name__} {intervention!r:.80}")
            for name, _ in pairs:
                self.check_hook_name(name)
        pairs = list(intervention or ())
        read = [read] if isinstance(read, str) else list(read)
        sites: dict[str, list] = {}
        for name, fn in pairs:
            for n in self._names(name):
                sites.setdefault(n, []).append(fn)
        for n in read:
            self.check_hook_name(n)
            sites.setdefault(n, [])
        order = sorted(sites, key=self._order)
        saved: dict[str, Tensor] = {}
        env = self.envoy
        model_inputs = {k: v for k, v in inputs.items() if k not in ("text_parts", "media_items")}  # prepare's records
        with env.trace(**model_inputs, use_cache=False, **forward_kwargs):
            for name in order:
                self._visit(env, name, sites[name], name in read, saved)
            out = env.get(self._head_path).output
            out = (out[:, -1] if logits == "last" else out).save()
        return out, {n: saved[n] for n in read}

    def _visit(self, env, name: str, fns: list, keep: bool, saved: dict) -> None:
        """Inside the trace: read the site, apply `fns`, write it back if edited, save it if `keep`."""
        l, stage = self._order(name)
        layer = env.get(self._layer_paths[l])
        if stage <= 0:  # hook_embed, resid_pre: the layer's input hidden states
            get, put = (lambda: layer.input), (lambda v: setattr(layer, "input", v))
        elif stage == 1:
            get, put = (lambda: layer.input_layernorm.output), (lambda v: setattr(layer.input_layernorm, "output", v))
        elif stage == 2:
            get, put = self._mask_site(layer.self_attn)
        elif stage == 3:
            get, put = _first(layer.self_attn)
        elif stage == 4:
            get, put = _first(layer.mlp)
        else:
            get, put = _first(layer)
        value = get()
        edited = stage == 2  # the mask is always written back: the layer must see our per-layer copy
        for fn in fns:
            new = fn(value, _Hook(name))
            if new is not None:
                value, edited = new, True
        if edited:
            put(value)
        if keep:
            saved[name] = value.save()

    @staticmethod
    def _mask_site(attn):
        """The attention mask `self_attn` receives as our additive `[batch, 1, q, k]` float mask (a copy),
        and a writer that passes it on in its place."""
        args, kwargs = attn.inputs
        if "attention_mask" not in kwargs:
            raise ValueError("this model's self_attn takes no attention_mask keyword; the backend cannot edit its mask")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        m, (b, q) = kwargs["attention_mask"], hidden.shape[:2]
        if m is None:  # sdpa's "causal, nothing padded"
            m = open_mask(b, q, q, True, hidden.dtype, hidden.device)
        elif m.dtype == torch.bool:  # sdpa's allowed-mask
            m = additive(m, hidden.dtype)
        else:
            m = m.clone()  # HF shares one mask across layers: an in-place edit must stay in this layer

        def put(v):
            attn.inputs = (args, {**kwargs, "attention_mask": v})

        return (lambda: m), put


def _first(envoy):
    """Reader and writer of a module's output tensor, or of the first element of a tuple output."""
    def get():
        out = envoy.output
        return out[0] if isinstance(out, tuple) else out

    def put(v):
        out = envoy.output
        envoy.output = (v, *out[1:]) if isinstance(out, tuple) else v

    return get, put
