"""Object hallucination of generated captions, with and without guidance (the cross-modal-hub
paper's evaluation of its guided decoding, counted as CHAIR: Rohrbach et al. 2018,
`LisaAnne/Hallucination` `utils/chair.py`).

A caption mentions an object when one of the object's words or phrases occurs in it; a mention is
hallucinated when its object is not among the clip's labels. Over a set of captions:

    CHAIR_i = hallucinated mentions / all mentions      (every mention counts, repeats included)
    CHAIR_s = captions with a hallucinated mention / all captions

    matcher = ObjectMatcher({"dog": ["dog", "puppy"], "fire truck": ["fire truck", "fire engine"]})
    # or CHAIR's own MSCOCO reading: patching.datasets.coco_objects.CocoObjects()
    res = hallucination(model, inputs, objects=[["dog"], ["piano", "man"]], make_hooks=guide,
                        scale=AdaptiveScale.from_sinks(find_sinks(model, inputs)), matcher=matcher,
                        eos_token_id=im_end)
    res.settings["rates"]     # {"plain": {"chair_s": ..., "chair_i": ...}, "guided": {...}}

The hub asks "Describe what you see and hear in a single sentence." (its driver replaces questions
that start with "Is " by it) and decodes greedily; its clips carry `objects` labels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.experiment import Experiment
from patching.engine.results import Result
from patching.methods.guidance import guided_generate

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
CONDITIONS = ("plain", "guided")


def words(text: str) -> list[str]:
    """Lowercased words of `text` (letters and digits, an apostrophe's suffix kept)."""
    return WORD.findall(text.lower())


class ObjectMatcher:
    """The objects a caption names, in order, one per mention: `synonyms` maps each object to the
    words or phrases that name it (the object's own name always does; a list of names is objects
    without synonyms). A caption is read word by word, the longest phrase first (CHAIR's two-word
    objects, "fire truck" before "truck"); no stemming: give plural forms as synonyms."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]] | Iterable[str]):
        items = synonyms.items() if isinstance(synonyms, Mapping) else ((s, ()) for s in synonyms)
        self.surface: dict[tuple[str, ...], str] = {}
        for obj, forms in items:
            for form in (obj, *([forms] if isinstance(forms, str) else forms)):
                key = tuple(words(form))
                if not key:
                    raise ValueError(f"object {obj!r}: the name {form!r} holds no word")
                if self.surface.get(key, obj) != obj:
                    raise ValueError(f"{form!r} names both {self.surface[key]!r} and {obj!r}; give each name to one object")
                self.surface[key] = obj
        if not self.surface:
            raise ValueError("the matcher has no objects; give at least one object name")
        self.longest = max(len(k) for k in self.surface)

    @property
    def objects(self) -> list[str]:
        return sorted(set(self.surface.values()))

    def canonical(self, name: str) -> str | None:
        """The object `name` (a label, in any of its forms) stands for, or None when unknown."""
        return self.surface.get(tuple(words(name)))

    def __call__(self, caption: str) -> list[str]:
        w, out, i = words(caption), [], 0
        while i < len(w):
            for n in range(min(self.longest, len(w) - i), 0, -1):
                obj = self.surface.get(tuple(w[i : i + n]))
                if obj is not None:
                    out.append(obj)
                    i += n
                    break
            else:
                i += 1
        return out


def chair(captions: Sequence[str], labels: Sequence[Iterable[str]], matcher: Callable | ObjectMatcher) -> pd.DataFrame:
    """One row per caption: `caption`, `objects` (its labels as objects), `mentioned` (every mention),
    `hallucinated` (mentions of objects outside the labels), `n_mentions`, `n_hallucinated`,
    `hallucinated_caption`, and `unknown_labels` (labels the matcher does not know: they can never be
    mentioned, so check them). `matcher`: an `ObjectMatcher`, CHAIR's own reading
    (`patching.datasets.coco_objects.CocoObjects`: MSCOCO synonyms, singular forms, two-word names), or
    any `caption -> [object]` (labels then compared as given, or through its `canonical(label)`)."""
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} captions but {len(labels)} label lists: give one list of objects per caption")
    rows = []
    for cap, labs in zip(captions, labels):
        if isinstance(labs, str):
            raise ValueError(f"labels {labs!r} is one string; give each caption a list of object names")
        labs = list(labs)
        known = {n: matcher.canonical(n) if hasattr(matcher, "canonical") else n for n in labs}
        objects = {o for o in known.values() if o is not None}
        mentioned = list(matcher(cap))
        bad = [m for m in mentioned if m not in objects]
        rows.append(dict(caption=cap, objects=sorted(objects), mentioned=mentioned, hallucinated=bad,
                         n_mentions=len(mentioned), n_hallucinated=len(bad), hallucinated_caption=bool(bad),
                         unknown_labels=[n for n, o in known.items() if o is None]))
    return pd.DataFrame(rows, columns=["caption", "objects", "mentioned", "hallucinated", "n_mentions",
                                       "n_hallucinated", "hallucinated_caption", "unknown_labels"])


def rates(df: pd.DataFrame, by: str | None = "condition") -> dict:
    """CHAIR_s and CHAIR_i of `chair` rows (per value of `by`, or of all rows with `by=None`), with
    the counts they come from. CHAIR_i is NaN where no caption mentions an object."""

    def one(part):
        mentions, bad = int(part.n_mentions.sum()), int(part.n_hallucinated.sum())
        return dict(chair_s=float(part.hallucinated_caption.mean()), chair_i=bad / mentions if mentions else math.nan,
                    captions=len(part), mentions=mentions, hallucinated_mentions=bad)

    if not len(df):
        raise ValueError("no captions to rate")
    return one(df) if by is None else {str(k): one(part) for k, part in df.groupby(by, sort=False)}


def captions(model, tokens: torch.Tensor, eos_token_id: int | None) -> list[str]:
    """Decoded rows of `tokens` `[batch, n]`, each cut after its first `eos_token_id`."""
    out = []
    for row in tokens.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        out.append(model.tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def hallucination(
    model,
    inputs: dict,
    objects: Sequence[Iterable[str]],
    make_hooks: Callable,
    scale,
    matcher: Callable | ObjectMatcher,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    ids: Sequence | None = None,
    tm=None,
) -> Result:
    """Caption every prompt of `inputs` greedily without guidance ("plain") and with it ("guided":
    `guided_generate(make_hooks, scale)`), and count object hallucinations against `objects` (one
    list of labels per prompt). Rows: `sample`, `id`, `condition`, then `chair`'s columns;
    `settings["rates"]`: CHAIR_s and CHAIR_i per condition. `eos_token_id` ends a caption (the
    chat's end-of-turn token); without it every caption is `max_new_tokens` long.

        from patching.methods.hallucination import ObjectMatcher
        guide = lambda tm: steer(tm, "last", "audio", alpha=0.5, layers=[3])
        res = hallucination(model, inputs, [["do"]], guide, 1.0, ObjectMatcher(["do", "re", "sol", "la"]), max_new_tokens=2)
        res.settings["rates"]  # {"plain": {"chair_s": ..., "chair_i": ...}, "guided": {...}}
    """
    n = checks.batch_of(inputs)
    objects = list(objects)
    if len(objects) != n:
        raise ValueError(f"{len(objects)} label lists for {n} prompts: give one list of objects per prompt")
    ids = list(range(n)) if ids is None else list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} prompts: give one id per prompt")
    if not callable(matcher):
        raise ValueError(f"matcher must be an ObjectMatcher or a function caption -> [object], got {matcher!r}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer to decode captions with; load it with its tokenizer files")
    tm = model.token_map(inputs) if tm is None else tm
    frames = []
    for cond, s in zip(CONDITIONS, (0.0, scale)):
        tokens = guided_generate(model, inputs, make_hooks, s, max_new_tokens, eos_token_id, tm=tm)
        df = chair(captions(model, tokens, eos_token_id), objects, matcher)
        df.insert(0, "condition", cond)
        df.insert(0, "id", ids)
        df.insert(0, "sample", range(n))
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    settings = dict(rates=rates(df), max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, scale=repr(scale),
                    objects=getattr(matcher, "objects", None))
    return Result("hallucination", df, settings)


def hallucination_study(
    model,
    manifest,
    guide: Callable,
    matcher: Callable | ObjectMatcher,
    column: str = "objects",
    template="default",
    limit: int | None = None,
    **kwargs,
) -> Result:
    """`hallucination` over a study manifest (`patching.datasets.manifest`), one prompt per row:
    `model.prepare(template's prompt)`, then `guide(model, inputs) -> (make_hooks, scale)` (sinks are
    found per clip, as the hub does), the labels from the metadata column `column` (a list of object
    names; JSON text in a CSV). Rows carry the manifest's `id`; `kwargs` go to `hallucination`."""
    from patching.datasets.manifest import Manifest, read_manifest
    from patching.datasets.templates import parse_template

    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    rows = manifest.rows[: checks.count(limit, "limit", unit=" sample") if limit is not None else None]
    missing = [r.id for r in rows if not isinstance(r.meta.get(column), (list, tuple))]
    if missing:
        raise ValueError(f"manifest rows {missing} have no list of object names in column {column!r}; add them "
                         f"(JSONL: a list; CSV: JSON text) or name the column with column=")
    tpl = parse_template(template)
    tpl.check(rows)
    frames = []
    for r in rows:
        inputs = model.prepare(tpl.prompt(r))
        make_hooks, scale = guide(model, inputs)
        res = hallucination(model, inputs, [r.meta[column]], make_hooks, scale, matcher, ids=[r.id], **kwargs)
        frames.append(res.df.assign(sample=r.index))
    df = pd.concat(frames, ignore_index=True)
    settings = {**res.settings, "rates": rates(df), "manifest": manifest.sha256, "column": column}
    return Result("hallucination", df, settings)


# ---- the record ---------------------------------------------------------------------------------
EXPERIMENT = Experiment("hallucination", hallucination, by=("condition",), value="hallucinated_caption",
                        label="share of hallucinated captions")
