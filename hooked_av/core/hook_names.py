"""The one table of the language model's hook names: every reader derives from it.

Each `HookName` is a template (`{l}` the block) with what others need to know about it: its
TransformerLens activation name (`act`, what `get_act_name` takes), the patching library's short site
name (`site`, what `activation_patching(sites=...)` takes), whether its dim 1 is the prompt's positions
(`position_major`: a sweep may run a suffix of the prompt through it), whether it is computed only when
hooked (`conditional`) or only while a TransformerLens flag is on (`flag`, the `cfg` field its
`model.set_<flag>(True)` sets: `use_attn_result`, `use_split_qkv_input`, `use_attn_in`, `use_hook_mlp_in`),
and where an unmodified HF decoder layer exposes it (`hf_stage`, the order in which the nnsight HF backend
reaches it inside a layer; None where HF exposes no module output).

    from hooked_av.core.hook_names import template, position_major
    template("resid_pre").format(l=3)             # "blocks.3.hook_resid_pre"
    position_major("blocks.3.attn.hook_z")        # True

The towers' names (`audio_encoder.*`, `vision_encoder.*`, ...) belong to their encoders and are not here.

An SAE spliced at a hook `h` (`model.add_sae`, `hooked_av.core.sae`) adds the points `h.{SAE_POINTS}`, named
as SAELens's `HookedSAETransformer` names them; they hold `[..., d_in | d_sae]` over the same leading axes
as `h`, so they are position-major where `h` is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class HookName:
    template: str
    act: str | None = None
    site: str | None = None
    position_major: bool = True
    conditional: bool = False
    hf_stage: int | None = None
    note: str = ""
    flag: str | None = None  # the cfg flag that turns the point on (TransformerLens's set_use_*); implies conditional


NAMES: tuple[HookName, ...] = (
    HookName("hook_embed", act="embed", hf_stage=-1, note="merged embeddings [batch, pos, d_model]"),
    HookName("blocks.{l}.hook_resid_pre", act="resid_pre", site="resid_pre", hf_stage=0),
    HookName("blocks.{l}.hook_attn_in", act="attn_in", conditional=True, flag="use_attn_in",
             note="the residual per query head [batch, pos, n_heads, d_model], what its q, k, v read"),
    HookName("blocks.{l}.hook_q_input", act="q_input", conditional=True, flag="use_split_qkv_input",
             note="the residual per query head [batch, pos, n_heads, d_model]"),
    HookName("blocks.{l}.hook_k_input", act="k_input", conditional=True, flag="use_split_qkv_input",
             note="the residual per kv head [batch, pos, n_kv_heads, d_model]"),
    HookName("blocks.{l}.hook_v_input", act="v_input", conditional=True, flag="use_split_qkv_input",
             note="the residual per kv head [batch, pos, n_kv_heads, d_model]"),
    HookName("blocks.{l}.ln1.hook_scale", act="scale", conditional=True),
    HookName("blocks.{l}.ln1.hook_normalized", act="normalized", site="attn_in", hf_stage=1,
             note="what attention reads (the anchors' input_layernorm output): the site 'attn_in'"),
    HookName("blocks.{l}.attn.hook_q", act="q"),
    HookName("blocks.{l}.attn.hook_k", act="k"),
    HookName("blocks.{l}.attn.hook_v", act="v"),
    HookName("blocks.{l}.attn.q_norm.hook_scale", conditional=True, note="Qwen3's QK-norm"),
    HookName("blocks.{l}.attn.q_norm.hook_normalized", note="Qwen3's QK-norm"),
    HookName("blocks.{l}.attn.k_norm.hook_scale", conditional=True, note="Qwen3's QK-norm"),
    HookName("blocks.{l}.attn.k_norm.hook_normalized", note="Qwen3's QK-norm"),
    HookName("blocks.{l}.attn.hook_rot_q", act="rot_q"),
    HookName("blocks.{l}.attn.hook_rot_k", act="rot_k"),
    HookName("blocks.{l}.attn.hook_attn_mask", act="attn_mask", position_major=False, conditional=True, hf_stage=2,
             note="additive mask [batch, 1|heads, q, k]"),
    HookName("blocks.{l}.attn.hook_attn_scores", act="attn_scores", position_major=False, conditional=True),
    HookName("blocks.{l}.attn.hook_pattern", act="pattern", position_major=False, conditional=True),
    HookName("blocks.{l}.attn.hook_z", act="z", site="z"),
    HookName("blocks.{l}.attn.hook_result", act="result", conditional=True, flag="use_attn_result"),
    HookName("blocks.{l}.hook_attn_out", act="attn_out", site="attn_out", hf_stage=3),
    HookName("blocks.{l}.hook_resid_mid", act="resid_mid", site="resid_mid"),
    HookName("blocks.{l}.hook_mlp_in", act="mlp_in", conditional=True, flag="use_hook_mlp_in",
             note="resid_mid as ln2 reads it [batch, pos, d_model]"),
    HookName("blocks.{l}.ln2.hook_scale", conditional=True),
    HookName("blocks.{l}.ln2.hook_normalized"),
    HookName("blocks.{l}.mlp.hook_pre", act="pre"),
    HookName("blocks.{l}.mlp.hook_pre_linear", act="pre_linear"),
    HookName("blocks.{l}.mlp.hook_post", act="post"),
    HookName("blocks.{l}.hook_mlp_out", act="mlp_out", site="mlp_out", hf_stage=4),
    HookName("blocks.{l}.hook_injection", note="DeepStack's addition after the MLP (Qwen3-Omni)"),
    HookName("blocks.{l}.hook_resid_post", act="resid_post", site="resid_post", hf_stage=5),
    HookName("ln_final.hook_scale", conditional=True),
    HookName("ln_final.hook_normalized"),
)

# the points of an SAE spliced at a hook (SAELens's names): "{hook}.hook_sae_acts_post", ...
SAE_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
              "hook_sae_output")
_SAE_POINT = re.compile(r"\.(?:" + "|".join(SAE_POINTS) + r")$")

# short names that name the same hook as another (TransformerLens's aliases, the patching library's "head")
ACT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
               "mlp_pre": "pre", "mlp_post": "post", "mlp_pre_linear": "pre_linear"}
SITE_ALIASES = {"head": "z"}

SITES = {h.site: h.template for h in NAMES if h.site} | {a: t for a, s in SITE_ALIASES.items()
                                                         for h in NAMES if h.site == s for t in [h.template]}


def _pattern(templates) -> re.Pattern:
    return re.compile("|".join(re.escape(t).replace(re.escape("{l}"), r"\d+") for t in templates))


_POSITION_MAJOR = _pattern([h.template for h in NAMES if h.position_major])
# the towers' blocks use the same leaf names for the same conditional points
_CONDITIONAL_LEAVES = frozenset(h.template.rsplit(".", 1)[-1] for h in NAMES if h.conditional)


def position_major(name: str) -> bool:
    """Whether the hook `name` holds `[batch, pos, ...]` over the language model's prompt positions (an SAE
    point `{hook}.hook_sae_*` where its `hook` does)."""
    return bool(_POSITION_MAJOR.fullmatch(_SAE_POINT.sub("", name)))


def sae_site(name: str) -> str | None:
    """The hook an SAE point sits on (`"blocks.1.hook_resid_post.hook_sae_acts_post"` -> `"blocks.1.hook_resid_post"`),
    None for a name that is not an SAE point."""
    m = _SAE_POINT.search(name)
    return name[:m.start()] if m else None


def conditional(name: str) -> bool:
    """Whether the hook `name` runs only when something is hooked there (the exact attention path, RMS
    denominators, masks materialised on demand) or a flag is on (per-head results and inputs, `flag_of`), in
    the language model or a tower."""
    return name.rsplit(".", 1)[-1] in _CONDITIONAL_LEAVES


_FLAGGED = [(_pattern([h.template]), h.flag) for h in NAMES if h.flag]


def flag_of(name: str) -> str | None:
    """The cfg flag (`use_attn_result`, `use_split_qkv_input`, `use_attn_in`, `use_hook_mlp_in`) without which
    the language-model hook `name` never runs, None for a point that needs none."""
    return next((f for p, f in _FLAGGED if p.fullmatch(name)), None)


def template(site: str) -> str:
    """The template of a short site name (`SITES`, e.g. "resid_pre", "attn_in", "head")."""
    if site not in SITES:
        raise KeyError(f"{site!r} is not a site name; site names: {sorted(SITES)}")
    return SITES[site]


def layer_of(name: str) -> tuple[int, ...]:
    """`(l,)` for a hook name in block l (`blocks.{l}.`...), `()` for one outside the blocks."""
    parts = name.split(".")
    return (int(parts[1]),) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else ()


def hf_stages() -> dict[str, int]:
    """`{"hook_resid_pre": 0, "ln1.hook_normalized": 1, ...}`: the in-layer names an unmodified HF
    decoder layer exposes, in the order a forward reaches them."""
    return {h.template.removeprefix("blocks.{l}."): h.hf_stage for h in NAMES
            if h.hf_stage is not None and h.hf_stage >= 0}


# a tower's own points outside its blocks (`{tower}.hook_{name}`, "deepstack" with its index as the layer)
TOWER_POINTS = ("out", "patch_embed", "pos_embed", "conv_out", "pooled", "deepstack", "windows", "query_in")
MEDIA_POINTS = ("audio_embeds", "image_embeds", "video_embeds")


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None, *, tower: str | None = None) -> str:
    """The full hook name of a TransformerLens activation name, as `transformer_lens.utils.get_act_name`
    gives it (3.x; gone from 4.x's top level): `get_act_name("resid_pre", 3)` -> "blocks.3.hook_resid_pre",
    `get_act_name("normalized", 2, "ln2")`, `get_act_name("pattern", 0)`, aliases ("attn", "key", ...),
    the conditional inputs ("q_input", "attn_in", "mlp_in"), a full name passes through; the towers' outputs
    as the language model receives them: "audio_embeds", "image_embeds", "video_embeds". `tower` (the
    tower's module name: "audio_encoder", "vision_encoder", "audio_qformer") names a tower's point the same
    way: its blocks' (`get_act_name("pattern", 1, tower="vision_encoder")`), its norms outside the blocks
    (`get_act_name("normalized", layer_type="ln_post", tower="audio_encoder")`) and its own points
    ("out", "patch_embed", "conv_out", "deepstack" with its index, ... `TOWER_POINTS`). Names are built, not
    looked up: check them against `model.hook_dict`.

        get_act_name("z", 5)                                  # "blocks.5.attn.hook_z"
        get_act_name("resid_post", 0, tower="audio_encoder")  # "audio_encoder.blocks.0.hook_resid_post"
    """
    if "." in name or name.startswith("hook_"):
        return name
    if tower is not None:
        return _tower_act_name(name, layer, layer_type, tower)
    name = ACT_ALIASES.get(name, name)
    if name in MEDIA_POINTS:
        return f"hook_{name}"
    if name in ("scale", "normalized"):
        where = layer_type or ("ln_final" if layer is None else "ln1")
        if where in ("ln_final", "final"):
            return f"ln_final.hook_{name}"
        if where not in ("ln1", "ln2"):
            raise ValueError(f"layer_type {layer_type!r}: a norm is 'ln1', 'ln2' or 'ln_final'")
        if layer is None:
            raise ValueError(f"get_act_name({name!r}, layer_type={where!r}) needs a layer")
        return f"blocks.{layer}.{where}.hook_{name}"
    found = [h for h in NAMES if h.act == name]
    if not found:
        known = sorted({h.act for h in NAMES if h.act} | set(ACT_ALIASES) | set(MEDIA_POINTS))
        raise ValueError(f"{name!r} is not an activation name; known: {known}")
    t = found[0].template
    if "{l}" in t:
        if layer is None:
            raise ValueError(f"get_act_name({name!r}) needs a layer: {t}")
        return t.format(l=layer)
    return t


def _tower_act_name(name: str, layer: int | None, layer_type: str | None, tower: str) -> str:
    prefix = tower.strip(".")
    if not prefix or prefix.startswith("blocks"):
        raise ValueError(f"tower {tower!r}: name the tower's module (e.g. 'audio_encoder', 'vision_encoder')")
    name = ACT_ALIASES.get(name, name)
    if name in TOWER_POINTS:
        return f"{prefix}.hook_{name}" + ("" if layer is None else f".{layer}")
    if name in ("scale", "normalized") and layer is None:
        if layer_type is None:
            raise ValueError(f"get_act_name({name!r}, tower={tower!r}) needs a layer or the norm's name (layer_type, "
                             "e.g. 'ln_post')")
        return f"{prefix}.{layer_type}.hook_{name}"
    inner = get_act_name(name, layer, layer_type)
    if not inner.startswith("blocks."):
        raise ValueError(f"{name!r} is not a point of a tower's blocks; a tower's own points: {list(TOWER_POINTS)}")
    return f"{prefix}.{inner}"
