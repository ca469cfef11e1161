"""Harvest: the activations of chosen token groups at chosen hook points over a dataset, into an
activation store (`patching.datasets.activations`) that SAE training reads.

    hooked-av harvest --model toy --manifest data/toy/manifest.jsonl --hook blocks.1.hook_resid_post \\
        --groups audio,video --out runs/acts [--limit N] [--max-tokens N] [--shard-tokens 65536]
    torchrun --nproc_per_node 4 --no-python hooked-av harvest ...    # data-parallel, one rank per GPU

Per sample (`harvest_inputs`): media decoded (`model.prepare` on the template's Prompt), the TokenMap,
the towers once (`model.encode`), then the language model up to the last hooked block only
(`stop_at_layer`: no later block, no final norm, no unembedding), the hooked activations kept at the
chosen groups' positions (trailing dims flattened: `[n_tokens, width]`). Per token, the metadata table
says what the token is (`activations.META_COLUMNS`: sample id, manifest row, position, TokenMap group,
clip index, modality, start and end time in seconds, frame, patch row and column, audio chunk), its
input `token_id` (a view decodes text tokens with it) and, at
a hooked block with a router (Qwen3-Omni's sparse layers), `expert_l{l}`: the k experts it chose. Per
sample, the store's sample table (`ActivationStore.samples()`) keeps the media paths, the question and
the answer, so a view can show the media a feature fires on.

What the study runner does, the harvest does the same way (and with its code): the manifest read and
checked in full, the template, options and the output folder refused before the model loads; the
folder resumes (the samples in complete shards are skipped; a run with other settings is refused);
under torchrun rank r takes rows r, r + W, ... and writes its own shards, so the store (their union)
is the same for every W.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from patching.datasets.activations import DTYPES, META_COLUMNS, ActivationStore, StoreWriter, check_claim
from patching.datasets.manifest import Manifest, read_manifest
from patching.datasets.templates import parse_template
from patching.engine import checks

ROUTER = "blocks.{l}.mlp.hook_router_choice"  # Qwen3-Omni's chosen experts, [batch, pos, k], on sparse layers


def harvest(
    model,
    manifest,
    hooks,
    out_dir="runs/harvest",
    *,
    groups=("media",),
    limit: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int = 65536,
    template="default",
    dtype=None,
    device=None,
    progress: bool = True,
) -> Path:
    """Harvest (or resume harvesting) `hooks`' activations at the tokens of `groups` of every sample of
    `manifest` into the store `out_dir` and return it. `model`: a name for `hooked_av.load` ("toy", a
    hub id, a folder) or a loaded model; `hooks`: language-model hook names whose dim 1 is the prompt's
    positions (`blocks.{l}.hook_resid_post`, `hook_embed`, `blocks.{l}.attn.hook_z`, ...); `groups`:
    TokenMap groups or aliases ("audio", "video", "image", "media", "question", "text": every text
    group, ...) as a list or a comma-separated text; `limit`: the first N samples; `max_tokens`: stop
    once that many tokens are harvested (whole samples: the sample that reaches it is kept);
    `shard_tokens`: tokens per shard (what bounds the memory); `dtype` / `device`: the model's (a name
    loads in float32 on the CPU; a loaded model keeps its own, and another value is refused); the store
    keeps the activations in the model's dtype.

        out = harvest(model, manifest, ["blocks.1.hook_resid_post"], tmp / "acts", groups="audio,video", progress=False)
        from patching.datasets.activations import ActivationStore
        ActivationStore(out).metadata()[["id", "group", "item", "t_start", "frame", "patch_row"]]
    """
    hooks, groups = check_hooks(hooks), check_groups(groups)
    for value, name in ((limit, "limit"), (max_tokens, "max_tokens")):
        if value is not None:
            checks.count(value, name, unit=" sample" if name == "limit" else " token")
    checks.count(shard_tokens, "shard_tokens", unit=" token")
    from hooked_av.utils import as_device, as_dtype

    loaded = not isinstance(model, (str, os.PathLike))
    dtype_ = as_dtype(dtype)
    if loaded and dtype_ is not None and dtype_ != model.dtype:
        raise ValueError(f"the model is {model.dtype}, dtype={dtype!r}: a loaded model is harvested as it is; "
                         "leave dtype out or pass the model's")
    dtype_ = model.dtype if loaded else dtype_ or torch.float32
    store_dtype = str(dtype_).removeprefix("torch.")
    if store_dtype not in DTYPES:
        raise ValueError(f"the model is {dtype_}; a store keeps {list(DTYPES)}: load the model in one of them")
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    tpl = parse_template(template)
    rows = manifest.rows[:limit]
    tpl.check(rows)
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = as_device(f"cuda:{local}" if device == "cuda" and world > 1 else device)
    if loaded:
        if device is not None and dev != model.device and not (dev.index is None and dev.type == model.device.type):
            raise ValueError(f"the model is on {model.device}, device={device!r}: a loaded model is harvested where it "
                             "is; leave device out or move the model first")
        dev = model.device
    from patching.apps.study.runner import _process_group, _versions

    name = type(model).__name__ if loaded else str(model)
    settings = dict(model=name, dtype=store_dtype, device_type=dev.type, manifest=manifest.sha256, groups=groups,
                    template=tpl.settings(), versions=_versions())
    out = Path(out_dir)
    done = _claimed(out, dict(hooks=hooks, dtype=store_dtype, shard_tokens=int(shard_tokens), settings=settings))
    beyond = sorted(set(done) - {r.id for r in rows})
    if beyond:  # the store would hold them: a smaller limit cannot take them out
        raise ValueError(f"{out} already holds {len(beyond)} harvested sample(s) beyond this run's first {len(rows)} "
                         f"(e.g. {beyond[0]!r}); a smaller limit cannot remove them: use another --out folder, or a limit "
                         "of at least what the store holds")
    if max_tokens is not None:
        _check_max_tokens(out, rows, done, max_tokens)

    if not loaded:
        from hooked_av import load

        model = load(model, dtype=dtype_, device=dev)
    model.eval()
    check_hook_names(model, hooks)
    group = _process_group(world, dev)
    writer = None
    mine = rows[rank::world]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=sum(r.id in done for r in mine), unit="sample", desc="harvest",
               disable=not progress or rank != 0, dynamic_ncols=True)
    total, empty = 0, []
    for j in range(0, len(rows), world):  # round j: rank r takes row j + r
        row = rows[j + rank] if j + rank < len(rows) else None
        got = None
        if row is not None and row.id not in done:
            inputs = model.prepare(tpl.prompt(row))
            inputs = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            acts, meta = harvest_inputs(model, inputs, hooks, groups)[0]
            meta.insert(0, "row", row.index)
            meta.insert(0, "id", row.id)
            got = acts, meta, _sample_row(row, len(meta))
        keep = row is not None
        if max_tokens is not None:  # every rank learns the round's counts: the cut is where one process stops
            counts = _gather([-1 if row is None else done[row.id] if got is None else len(got[1])], world, dev, group)
            cut = None
            for k, n in enumerate(counts):
                total += max(n, 0)
                if n >= 0 and total >= max_tokens:
                    cut = j + k
                    break
            keep = row is not None and (cut is None or j + rank <= cut)
        if got is not None and keep:
            if writer is None:
                writer = StoreWriter(out, {h: a.shape[1] for h, a in got[0].items()}, shard_tokens, store_dtype,
                                     settings, rank)
            writer.add(*got)
            if not len(got[1]):
                empty.append(row.id)
        if row is not None and keep:
            bar.update(got is not None)
        if max_tokens is not None and cut is not None:
            late = sorted(i for i in done if i not in {r.id for r in rows[:cut + 1]})
            if late:
                raise ValueError(f"{out} holds {len(late)} sample(s) past where max_tokens={max_tokens} stops (e.g. "
                                 f"{late[0]!r}); a smaller max_tokens cannot remove them: use another --out folder")
            break
    if writer is not None:
        writer.close()
    bar.close()
    if empty:
        warnings.warn(f"{len(empty)} sample(s) have no token in groups {groups} (e.g. {empty[0]!r}); they are recorded "
                      "in the sample table with n_tokens 0", stacklevel=2)
    if group:
        torch.distributed.barrier()  # no rank returns before every shard of the store exists
        if group == "created":
            torch.distributed.destroy_process_group()
    return out


def harvest_inputs(model, inputs: dict, hooks, groups=("media",), tm=None) -> list[tuple[dict[str, Tensor], pd.DataFrame]]:
    """One forward of `inputs` (what `model(**inputs)` takes, any batch size): the towers once, the
    language model up to the last hooked block (no later block, no final norm, no unembedding), and per
    batch row `(acts, meta)`: `acts[hook]` `[n, width]` (on the CPU, the model's dtype; trailing dims
    flattened) at the row's `n` positions in `groups`, in position order, and `meta` one row per token:
    the `activations.META_COLUMNS` less `id` and `row` (`pos` counts left padding; `modality` "text" for
    text groups; times in seconds, NaN for text and images; -1 where a field does not apply), `token_id`
    (the input id at the position; -1 for inputs given as embeddings) and `expert_l{l}` (the k chosen experts) at each hooked block with a router.

        acts, meta = harvest_inputs(model, inputs, ["blocks.1.hook_resid_post"], "audio")[0]
        acts["blocks.1.hook_resid_post"].shape, meta[["pos", "group", "t_start", "t_end"]].head(3)
    """
    hooks, groups = check_hooks(hooks), check_groups(groups)
    check_hook_names(model, hooks)
    from patching.engine.sweep import _token_map_of

    tm = _token_map_of(model, inputs, tm)  # checked against the inputs before any tower runs
    mask = tm.mask(groups)  # [batch, pos]
    layers = sorted({layer_of(h) for h in hooks} - {None})
    routers = {l: ROUTER.format(l=l) for l in layers if ROUTER.format(l=l) in model.hook_dict}
    grabbed: dict[str, list[Tensor]] = {h: [] for h in [*hooks, *routers.values()]}

    def grab(t: Tensor, hook) -> None:
        grabbed[hook.name].append(t[mask.to(t.device)].reshape(int(mask.sum()), -1).detach().cpu())

    with torch.no_grad():
        enc = model.encode(**inputs)  # the towers, once
        with model.hooks(fwd_hooks=[(h, grab) for h in grabbed]):
            model(**enc, stop_at_layer=max(layers) + 1 if layers else 0)
    silent = [h for h, got in grabbed.items() if len(got) != 1]
    if silent:
        raise ValueError(f"hook(s) {silent} ran {[len(grabbed[h]) for h in silent]} times in this forward, not once (e.g. "
                         "a block's hook_injection where the model adds no DeepStack feature); harvest hooks that every "
                         "forward reaches once, such as blocks.{l}.hook_resid_post")
    counts = mask.sum(-1).tolist()
    split = {h: got[0].split(counts) for h, got in grabbed.items()}
    ids = inputs.get("input_ids")  # a view decodes text tokens from them (none when the inputs are embeddings)
    out = []
    for r, n in enumerate(counts):
        pos = mask[r].nonzero().flatten()
        names = [_GROUP_NAMES[g] for g in tm.group[r, pos].tolist()]
        meta = pd.DataFrame({
            "pos": pos.numpy(), "group": names, "item": tm.item[r, pos].numpy(),
            "modality": [g if g in _MEDIA else "text" for g in names],
            "t_start": tm.time[r, pos].numpy(), "t_end": tm.time_end[r, pos].numpy(), "frame": tm.frame[r, pos].numpy(),
            **{k: (torch.full((n,), -1) if getattr(tm, k) is None else getattr(tm, k)[r, pos]).numpy()
               for k in ("patch_row", "patch_col")},
            "chunk": tm.chunk[r, pos].numpy(),
            "token_id": (torch.full((n,), -1) if ids is None else ids[r, pos.to(ids.device)].cpu()).numpy(),
            **{f"expert_l{l}": list(split[name][r].tolist()) for l, name in routers.items()},
        })
        out.append(({h: split[h][r] for h in hooks}, meta))
    return out


# ---- checks (before the model loads, then once it exists) -----------------------------------------------------
def check_hooks(hooks) -> list[str]:
    """Hook names as a list, each a language-model hook whose dim 1 is the prompt's positions and that
    a forward stopped after a block reaches (not `ln_final.*`), refused otherwise before any model work."""
    from hooked_av.utils import SITES, position_major

    hooks = [hooks] if isinstance(hooks, str) else list(checks.nonempty(hooks, "hooks"))
    for h in hooks:
        if not isinstance(h, str):
            raise ValueError(f"a hook is a hook name (text), got {h!r}")
        if h.startswith("ln_final."):
            raise ValueError(f"hook {h!r} needs the final norm, which a harvest does not run; harvest the residual it "
                             "normalises, blocks.{last}.hook_resid_post")
        if not position_major(h):
            raise ValueError(f"hook {h!r} is not a language-model hook whose dim 1 is the prompt's positions (attention "
                             "patterns, masks and the towers' hooks are not per token); harvest e.g. hook_embed or "
                             f"{', '.join(sorted(set(SITES.values())))} with {{l}} a block")
    return list(dict.fromkeys(hooks))


def check_groups(groups) -> list[str]:
    """TokenMap group names or aliases, as a list or a comma-separated text; unknown ones refused."""
    from hooked_av.inputs.token_map import group_names

    groups = [g.strip() for g in groups.split(",")] if isinstance(groups, str) else list(checks.nonempty(groups, "groups"))
    if not groups or not all(isinstance(g, str) and g for g in groups):
        raise ValueError(f"groups are TokenMap group names or aliases, e.g. 'audio,video'; got {groups!r}")
    for g in groups:
        group_names(g)  # refuses an unknown name, listing the groups and aliases
    return list(dict.fromkeys(groups))


def check_hook_names(model, hooks) -> None:
    """Every hook exists on `model`; an unknown one is refused naming the harvestable names it has."""
    from hooked_av.utils import position_major

    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        have = sorted({re.sub(r"^blocks\.\d+\.", "blocks.{l}.", n) for n in model.hook_dict
                       if position_major(n) and not n.startswith("ln_final.")})
        n = model.cfg.n_layers
        raise ValueError(f"hook(s) {unknown} do not exist on this model; it has {n} blocks ({{l}} in 0..{n - 1}) and "
                         f"these per-token hooks: {have}")


def layer_of(hook: str) -> int | None:
    from hooked_av.utils import layer_of as lo

    found = lo(hook)
    return found[0] if found else None


# ---- the store's folder ---------------------------------------------------------------------------------------
def _claimed(out: Path, info: dict) -> dict[str, int]:
    """Refuse a folder that cannot take this harvest (a file, a non-empty folder that is no store, a store
    of other settings); return the done samples' token counts `{id: n_tokens}` (none for a new folder)."""
    check_claim(out, info)
    if not (out / "store.json").exists():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):  # .tmp: a rank claiming it now
            raise ValueError(f"{out} is a folder with other files and no store.json; harvest into a new or empty folder")
        return {}
    done = ActivationStore(out).samples(["id", "n_tokens"])
    return dict(zip(done["id"].astype(str), done["n_tokens"].astype(int)))


def _check_max_tokens(out: Path, rows, done: dict, max_tokens: int) -> None:
    """Refuse, before the model loads, a store holding a sample past where `max_tokens` surely stops:
    the done samples before it alone reach the budget."""
    seen = 0
    for r in rows:
        if r.id in done and seen >= max_tokens:
            raise ValueError(f"{out} holds sample {r.id!r}, past where max_tokens={max_tokens} stops; a smaller "
                             "max_tokens cannot remove it: use another --out folder")
        seen += done.get(r.id, 0)


def _sample_row(row, n_tokens: int) -> dict:
    """The sample table's row: what a view needs to show the sample (media paths as read from the
    manifest, made absolute; `items` as JSON text for a multi-clip row; the other columns as JSON)."""
    items = json.dumps([dict(it) for it in row.items]) if row.items else None
    return dict(id=row.id, row=row.index, n_tokens=n_tokens, question=row.question, answer=row.answer_text,
                video=row.video, audio=row.audio, image=row.image, items=items,
                meta=json.dumps(row.meta, default=str))


def _gather(values: list[int], world: int, dev, group) -> list[int]:
    """Every rank's values, in rank order (this rank's alone for one process)."""
    if world == 1 or not group:
        return values
    t = torch.tensor(values, device=dev if dev.type == "cuda" else "cpu")
    out = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t)
    return [v for o in out for v in o.tolist()]


def _names():
    from hooked_av.inputs.token_map import GROUPS, MEDIA

    return list(GROUPS), set(MEDIA)


_GROUP_NAMES, _MEDIA = _names()


# ---- the command ----------------------------------------------------------------------------------------------
def register(sub) -> None:
    """Add `harvest` to the subparsers of `hooked-av` (it sets `func`)."""
    hv = sub.add_parser("harvest", help="harvest activations at token groups over a dataset manifest into an activation "
                                        "store (resumable, torchrun-parallel)")
    hv.add_argument("--model", required=True, help='hub id, local checkpoint folder, or "toy"')
    hv.add_argument("--manifest", required=True, help="JSONL or CSV manifest (see patching.datasets.manifest)")
    hv.add_argument("--hook", action="append", required=True, metavar="HOOK",
                    help="a language-model hook name, e.g. blocks.2.hook_resid_post; repeat for several")
    hv.add_argument("--groups", default="media", help="TokenMap groups or aliases, comma-separated (default media; e.g. "
                                                      "audio,video or media,text)")
    hv.add_argument("--out", required=True, help="the store's folder (running again resumes it)")
    hv.add_argument("--limit", type=int, default=None, help="only the first N samples")
    hv.add_argument("--max-tokens", type=int, default=None, help="stop once N tokens are harvested (whole samples)")
    hv.add_argument("--shard-tokens", type=int, default=65536, help="tokens per shard (bounds the memory; default 65536)")
    hv.add_argument("--template", default="default", help='"default", "mc" or a custom text with {question}')
    hv.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's dtype, kept by the store")
    hv.add_argument("--device", default=None, help='e.g. "cuda" (default: CPU); under torchrun each rank takes cuda:LOCAL_RANK')
    hv.set_defaults(func=harvest_command)


def harvest_command(args) -> None:
    import time

    t0 = time.perf_counter()
    try:
        out = harvest(args.model, args.manifest, args.hook, args.out, groups=args.groups, limit=args.limit,
                      max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, template=args.template,
                      dtype=args.dtype, device=args.device)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the complete shards are kept in {args.out}; run the same command again to resume")
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", 0)) == 0:
        store = ActivationStore(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"store: {out.resolve()}: {store.n_tokens:,} tokens of {len(store.samples(['id'])):,} samples in "
              f"{len(store.shards)} shards, {size / 2**20:,.1f} MiB ({time.perf_counter() - t0:,.1f} s with loading)")
