"""`TokenMap`: what every position of a batch of prompts is (group, media item, frame, time, chunk), so
experiments name token sets (`"audio"`, `"video[1]"`, `"item[0]"`, `"question"`, `"last"`) instead of indices.

Pure data (tensors and strings): `patching/` uses it without importing any model. The builders that
read a model's token layout live beside the prompt builders (`hooked_av/families/<family>/token_map.py`).

    tm = model.token_map(inputs)
    tm.mask("audio")                               # [batch, pos] bool, never padding
    tm.positions("video", item=1, row=0)           # LongTensor of positions in row 0
    tm.select("audio", time=(2.0, 4.0)) | tm.select("question")
    print(tm.describe())                           # one line per contiguous segment
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

GROUPS = ("padding", "system", "template", "question", "audio", "video", "image", "last", "generated",
          "options", "instruction", "label", "answer")
MEDIA = ("audio", "video", "image")
_CODE = {g: i for i, g in enumerate(GROUPS)}
# the parts of the user's text that `prepare` records (`inputs["text_parts"]`, `[batch, pos]`): code i > 0
# is the group TEXT_PARTS[i]; 0 leaves the chat structure's group (`hooked_av.inputs.chat.text_groups`)
TEXT_PARTS = (None, "question", "options", "instruction", "label", "template", "answer")
_ALIASES = {"media": MEDIA, "all": tuple(g for g in GROUPS if g != "padding"),
            "user": ("question", "options", "instruction", "label"),
            "text": tuple(g for g in GROUPS if g not in MEDIA and g != "padding")}
_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\[\s*(\d+)\s*\])?\s*$")
ITEM = "item"  # `item[i]`: every media token of clip i
# the order in which a clip (`hooked_av.inputs.prompt.Item`) shows its media: image, video, audio
_MEDIA_RANK = {"image": 0, "video": 1, "audio": 2}
# the letter `TokenMap.labels` gives each text group
_TEXT_LETTER = {"padding": "P", "system": "S", "template": "T", "question": "Q", "last": "L", "generated": "G",
                "options": "O", "instruction": "R", "label": "C", "answer": "A"}  # R: the rule to answer by; C: a clip's label


class _Text(str):
    """A string that shows as itself in a notebook (no quotes, real newlines)."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Selection:
    """A set of positions: `mask` `[batch, pos]` bool and a label for messages. Compose with `|`
    (union), `&` (intersection) and `-` (difference)."""

    mask: Tensor
    label: str

    def __or__(self, other: "Selection") -> "Selection":
        return Selection(self.mask | other.mask, f"{self.label} | {other.label}")

    def __and__(self, other: "Selection") -> "Selection":
        return Selection(self.mask & other.mask, f"({self.label}) & ({other.label})")

    def __sub__(self, other: "Selection") -> "Selection":
        return Selection(self.mask & ~other.mask, f"({self.label}) - ({other.label})")

    def count(self) -> Tensor:
        """Selected positions per row, `[batch]`."""
        return self.mask.sum(-1)


@dataclass(frozen=True)
class TokenMap:
    """Per position of a `[batch, pos]` prompt batch (all tensors `[batch, pos]`, on the CPU):

    - `group`: index into `GROUPS` (padding, system, template, question, audio, video, image, last,
      generated, options, instruction, label, answer). `template` holds chat-template and media bos/eos
      tokens; `last` is the final prompt position of each row. The user's text: on inputs from
      `model.prepare` (which record it as `inputs["text_parts"]`), `question` is the question only,
      `options` the lettered options, `instruction` the instruction after them, `label` the text
      naming each clip (`Item.label`), and text the template adds between items is `template`; on
      inputs without that record all user text is `question`. `"user"` selects all four;
      `"text"` every group but the media and padding (`group_names`). `answer`: the
      answer `prepare(..., answer=)` appended after the generation prompt (what a loss scores).
    - `item`: the clip (media item) of a media token within its row, counted by clip, not per
      modality: in a row whose first clip is video only and whose second is video with audio,
      `audio[1]` is the second clip's audio and `audio[0]` is empty; `item[i]` is every media token
      of clip i; -1 elsewhere. `prepare` records each media token's item (`inputs["media_items"]`) and the
      builders number by it; on inputs without that record they tell clips apart from the ids
      (`clip_numbers`).
    - `frame`: temporal grid index of video/image tokens (and, for video-SALMONN, of the grid step an
      audio token follows); -1 elsewhere.
    - `time`, `time_end`: seconds from the start of the item that the token covers, `[time, time_end)`,
      as the model's own position ids place it; NaN for text and images.
    - `chunk`: audio-in-video chunk index (Qwen2.5-Omni interleaves 2 s chunks); -1 elsewhere.
    - `position_mode`: the position-id mode the times follow, where a model has several
      (video-SALMONN 2+: "inference" or "training"); None where there is one (Qwen2.5-Omni's TMRoPE).
    - `patch_row`, `patch_col`: for video/image tokens, the (row, column) of the token's merged patch
      in its frame's merged grid (`[H / merge, W / merge]`, `TokenMapBuilder.set_patches`); -1 elsewhere
      and where the builder did not know the grid; None on maps made without a builder.
    """

    group: Tensor
    item: Tensor
    frame: Tensor
    time: Tensor
    time_end: Tensor
    chunk: Tensor
    position_mode: str | None = None
    patch_row: Tensor | None = None
    patch_col: Tensor | None = None

    def __post_init__(self):
        shape = self.group.shape
        for name in ("item", "frame", "time", "time_end", "chunk", "patch_row", "patch_col"):
            if getattr(self, name) is not None and getattr(self, name).shape != shape:
                raise ValueError(f"TokenMap.{name} has shape {tuple(getattr(self, name).shape)}, group has {tuple(shape)}")

    # ---- shape --------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.group.shape[0]

    @property
    def seq_len(self) -> int:
        return self.group.shape[1]

    @property
    def padding(self) -> Tensor:
        """`[batch, pos]` bool, True on padding."""
        return self.group == _CODE["padding"]

    def names(self, row: int = 0) -> list[str]:
        """The group name of every position of `row`."""
        return [GROUPS[g] for g in self.group[row].tolist()]

    # ---- selection ----------------------------------------------------------------------
    def select(
        self,
        spec: "str | Selection | list | tuple",
        *,
        item: int | None = None,
        time: tuple[float, float] | None = None,
        frame: int | tuple[int, int] | None = None,
        chunk: int | None = None,
    ) -> Selection:
        """Positions of a group spec: a name (`"audio"`, `"question"`, `"media"`, `"all"`), a name
        with an item (`"video[1]"`: clip 1's video), `"item[i]"` (all media of clip i), a union string
        (`"audio|video"`), a list of those, a `Selection` or a bool mask `[pos]` / `[batch, pos]` of this
        map's positions. Filters: `item`; `time=(a, b)` keeps media tokens whose span `[time, time_end)`
        overlaps `[a, b)` seconds; `frame` (one index or an inclusive range); `chunk`. Padding is
        never selected unless asked for by name."""
        if isinstance(spec, Selection):
            sel = Selection(self._fit_mask(spec.mask, f"Selection {spec.label!r}"), spec.label)
        elif isinstance(spec, Tensor):
            if spec.dtype != torch.bool:
                raise ValueError(f"a {spec.dtype} tensor is not a token set; pass a bool mask [pos] or [batch, pos] "
                                 "(e.g. tm.mask('audio')), a group name or a Selection")
            mask = self._fit_mask(spec, "a bool mask")
            sel = Selection(mask, f"mask[{int(mask.sum())} positions]")
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("an empty list selects nothing; name at least one group")
            parts = [self.select(s) for s in spec]
            sel = parts[0]
            for p in parts[1:]:
                sel = sel | p
        elif isinstance(spec, str):
            sel = self._parse(spec)
        else:
            raise TypeError(f"a token set is a group name ('audio', 'video[1]', 'audio|video'), a list of them, a "
                            f"Selection or a bool mask [pos] / [batch, pos]; got {type(spec).__name__} {spec!r}")
        mask, label = sel.mask, sel.label
        if item is not None:
            mask, label = mask & (self.item == item), f"{label} item={item}"
        if time is not None:
            a, b = time
            mask, label = mask & (self.time < b) & (self.time_end > a), f"{label} time=[{a:g}, {b:g})"
        if frame is not None:
            lo, hi = (frame, frame) if isinstance(frame, int) else frame
            mask, label = mask & (self.frame >= lo) & (self.frame <= hi), f"{label} frame={frame}"
        if chunk is not None:
            mask, label = mask & (self.chunk == chunk), f"{label} chunk={chunk}"
        return Selection(mask, label)

    def _fit_mask(self, mask: Tensor, what: str) -> Tensor:
        """`mask` (`[pos]`, `[1, pos]` or `[batch, pos]`) as `[batch, pos]` on the CPU, or a clear error."""
        mask = mask.cpu()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.dim() != 2 or mask.shape[1] != self.seq_len or mask.shape[0] not in (1, self.batch):
            raise ValueError(f"{what} of shape {tuple(mask.shape)} does not fit this TokenMap of [{self.batch}, "
                             f"{self.seq_len}] positions; build it from the same inputs ([pos] or [batch, pos])")
        return mask.expand(self.batch, -1)

    def _parse(self, spec: str) -> Selection:
        if "|" in spec:
            return self.select([s for s in spec.split("|")])
        m = _SPEC.match(spec)
        if not m:
            raise ValueError(f"cannot read the token spec {spec!r}; write a group name, optionally with an item: 'video[1]'")
        name, item = m.group(1), m.group(2)
        if name == ITEM:
            if item is None:
                raise ValueError(f"{spec!r} needs a clip index: 'item[0]' is every media token of the row's first clip")
            name = "media"
        names = group_names(name)
        mask = torch.zeros_like(self.group, dtype=torch.bool)
        for n in names:
            mask |= self.group == _CODE[n]
        if item is not None:
            if not set(names) <= set(MEDIA):
                raise ValueError(f"{spec!r}: only media groups {list(MEDIA)} have items")
            mask &= self.item == int(item)
        return Selection(mask, spec.strip())

    def mask(self, spec, *, nonempty: bool = False, device=None, **filters) -> Tensor:
        """`[batch, pos]` bool mask of `select(spec, **filters)`. With `nonempty=True`, raise if any
        row selects nothing (an experiment that needs the group in every row)."""
        sel = self.select(spec, **filters)
        if nonempty:
            for row in range(self.batch):
                self._require(sel, row)
        return sel.mask if device is None else sel.mask.to(device)

    def positions(self, spec, row: int = 0, *, nonempty: bool = True, **filters) -> Tensor:
        """Positions (LongTensor, ascending) that `select(spec, **filters)` picks in `row`; raises if
        there are none unless `nonempty=False`."""
        if not -self.batch <= row < self.batch:
            raise IndexError(f"row {row} does not exist; the batch has {self.batch} rows")
        sel = self.select(spec, **filters)
        if nonempty:
            self._require(sel, row)
        return sel.mask[row].nonzero().flatten()

    def count(self, spec, **filters) -> Tensor:
        """Selected positions per row, `[batch]`."""
        return self.select(spec, **filters).count()

    def _require(self, sel: Selection, row: int) -> None:
        if bool(sel.mask[row].any()):
            return
        have = ", ".join(f"{g} {n}" for g, n in self._group_counts(row) if g != "padding")
        raise ValueError(
            f"{sel.label!r} selects no position in row {row} (row {row} holds: {have}); check that the "
            "prompt of this row has it, or pass nonempty=False where an empty set is acceptable"
        )

    def _group_counts(self, row: int) -> list[tuple[str, int]]:
        counts = torch.bincount(self.group[row].long(), minlength=len(GROUPS)).tolist()
        return [(g, n) for g, n in zip(GROUPS, counts) if n]

    # ---- growth -------------------------------------------------------------------------
    def extend(self, n: int) -> "TokenMap":
        """A map for the same batch with `n` generated tokens appended to every row (group
        `generated`), as `model.generate` appends them after left-padded prompts."""
        if n < 0:
            raise ValueError(f"extend(n) needs n >= 0, got {n}")
        b = self.batch

        def cat(t: Tensor, fill) -> Tensor:
            return torch.cat([t, torch.full((b, n), fill, dtype=t.dtype)], dim=1)

        nan = float("nan")
        return replace(
            self, group=cat(self.group, _CODE["generated"]), item=cat(self.item, -1), frame=cat(self.frame, -1),
            time=cat(self.time, nan), time_end=cat(self.time_end, nan), chunk=cat(self.chunk, -1),
            patch_row=None if self.patch_row is None else cat(self.patch_row, -1),
            patch_col=None if self.patch_col is None else cat(self.patch_col, -1),
        )

    # ---- views --------------------------------------------------------------------------
    def segments(self, row: int = 0) -> list[dict]:
        """Contiguous runs of equal (group, item, chunk) in `row`: dicts with group, item, chunk,
        start, stop (positions, half-open), count, first/last frame, time span in seconds."""
        g, it, ch = self.group[row].tolist(), self.item[row].tolist(), self.chunk[row].tolist()
        out, start = [], 0
        for i in range(1, len(g) + 1):
            if i == len(g) or (g[i], it[i], ch[i]) != (g[start], it[start], ch[start]):
                fr = self.frame[row, start:i]
                t0, t1 = self.time[row, start:i], self.time_end[row, start:i]
                timed = ~torch.isnan(t0)
                out.append(dict(
                    group=GROUPS[g[start]], item=it[start], chunk=ch[start], start=start, stop=i, count=i - start,
                    frames=(int(fr.min()), int(fr.max())) if bool((fr >= 0).any()) else None,
                    time=(float(t0[timed].min()), float(t1[timed].max())) if bool(timed.any()) else None,
                ))
                start = i
        return out

    def describe(self, row: int | None = None) -> str:
        """One line per contiguous segment: row, position range, group[item], chunk, token count,
        frames, time span; a header line names the position mode when the map has one. Returns the
        text (it displays as is in a notebook)."""
        rows = range(self.batch) if row is None else [row]
        lines = [] if self.position_mode is None else [f"position_mode={self.position_mode}"]
        for r in rows:
            for s in self.segments(r):
                name = s["group"] + (f"[{s['item']}]" if s["item"] >= 0 else "")
                if s["chunk"] >= 0:
                    name += f" chunk {s['chunk']}"
                line = f"row {r} [{s['start']:>5}, {s['stop']:>5})  {name:<20} {s['count']:>6} tok"
                if s["frames"]:
                    line += f"  frames {s['frames'][0]}-{s['frames'][1]}"
                if s["time"]:
                    line += f"  {s['time'][0]:.2f}-{s['time'][1]:.2f} s"
                lines.append(line)
        return _Text("\n".join(lines))

    def labels(self, row: int = 0, tokens: "list[str] | None" = None, *, ids=None, tokenizer=None) -> list[str]:
        """One short label per position of `row` (`seq_len` strings): media say modality, item, time
        and patch (`A0 0.12s`: clip 0's audio token starting at 0.12 s; `V1 t3 (2,5)`: clip 1's video,
        temporal grid step 3, merged patch row 2 column 5; `I0 (1,0)`: an image patch); text is its
        group's letter (S system, T template, Q question, L last, G generated, P padding) and the token
        text, from `tokens` (one string per position) or `ids` (`[pos]` or `[batch, pos]`) decoded
        one by one with `tokenizer`; without either, `#position` (`Q #12`). The patch is left out
        where the map carries no patch grid (`patch_row` None)."""
        if not -self.batch <= row < self.batch:
            raise IndexError(f"row {row} does not exist; the batch has {self.batch} rows")
        if tokens is None and (ids is None) != (tokenizer is None):
            raise ValueError("labels(ids=..., tokenizer=...) needs both: the ids of the prompt and the tokenizer that decodes them")
        if tokens is None and ids is not None:
            ids = torch.as_tensor(ids)
            ids = ids[row] if ids.dim() == 2 else ids
            tokens = [tokenizer.decode([int(i)]) for i in ids.tolist()]
        if tokens is not None and len(tokens) != self.seq_len:
            raise ValueError(f"{len(tokens)} token strings for {self.seq_len} positions; pass one string per position of the row")
        g, it, fr = self.group[row].tolist(), self.item[row].tolist(), self.frame[row].tolist()
        t = self.time[row].tolist()
        pr = None if self.patch_row is None else self.patch_row[row].tolist()
        pc = None if self.patch_col is None else self.patch_col[row].tolist()
        out = []
        for p in range(self.seq_len):
            name = GROUPS[g[p]]
            if name in MEDIA:
                label = f"{name[0].upper()}{it[p]}"
                if name == "audio":
                    label += f" {t[p]:.2f}s"
                elif name == "video":
                    label += f" t{fr[p]}"
                if name != "audio" and pr is not None and pr[p] >= 0:
                    label += f" ({pr[p]},{pc[p]})"
            else:
                text = f"#{p}" if tokens is None else (tokens[p].strip() or repr(tokens[p]).strip("'\""))
                label = f"{_TEXT_LETTER[name]} {text}"
            out.append(label)
        return out

    def to_df(self):
        """A tidy pandas DataFrame, one row per (batch row, position)."""
        import pandas as pd

        b, s = self.group.shape
        return pd.DataFrame({
            "row": torch.arange(b).repeat_interleave(s).numpy(), "pos": torch.arange(s).repeat(b).numpy(),
            "group": [GROUPS[g] for g in self.group.flatten().tolist()], "item": self.item.flatten().numpy(),
            "frame": self.frame.flatten().numpy(), "time": self.time.flatten().numpy(),
            "time_end": self.time_end.flatten().numpy(), "chunk": self.chunk.flatten().numpy(),
            **{k: getattr(self, k).flatten().numpy() for k in ("patch_row", "patch_col") if getattr(self, k) is not None},
        })

    def __repr__(self) -> str:
        counts = "; ".join(
            f"row {r}: " + ", ".join(f"{g} {n}" for g, n in self._group_counts(r)) for r in range(min(self.batch, 4))
        )
        mode = "" if self.position_mode is None else f", position_mode={self.position_mode}"
        return f"TokenMap(batch={self.batch}, pos={self.seq_len}{mode}; {counts})"


def group_names(name: str) -> tuple[str, ...]:
    """The groups a group name or alias stands for (`"media"` -> audio, video, image; `"text"` -> every
    group but the media and padding); an unknown name is refused, naming the groups and aliases.

        group_names("text")   # ('system', 'template', 'question', 'last', 'generated', 'options', ...)
    """
    names = _ALIASES.get(name, (name,))
    unknown = [n for n in names if n not in _CODE]
    if unknown:
        raise ValueError(f"unknown token group {name!r}; groups: {list(GROUPS)} (aliases: {list(_ALIASES)})")
    return names


def clip_numbers(runs: list[tuple[int, int, list[str]]], items: list[int] | None = None,
                 codes: list[int] | None = None) -> list[int]:
    """The clip index of each media run of one row (`runs` from `media_runs`, in order).

    `items`: the row's `inputs["media_items"]` (`prepare`'s record of the prompt's item of every media token,
    indexed as `runs` index the row), where the inputs carry it: each run is the item it records, so a
    video-only clip followed by an audio-only clip is two clips. Without it, from the ids: a clip shows its
    media in the order image, video, audio (as `prepare` lays out an `Item`; an audio-in-video run is one
    clip), so a run starts a new clip when it holds a modality that does not come after every modality of
    the current clip, or when `codes` (the row's `text_parts`) put a clip label or the text a template adds
    after an item between it and the run before. Other text between runs does not split a clip (a prompt
    "video, question, audio" is one clip, as a processor lays out a clip whose audio is not interleaved), so
    from ids alone a video-only clip followed by an audio-only clip reads as one clip."""
    if items is not None:
        out = []
        for i, j, _ in runs:
            got = set(items[i:j])
            if len(got) != 1 or min(got) < 0 or (out and min(got) < out[-1]):
                raise ValueError(
                    f"inputs['media_items'] gives the media block at row positions {i}..{j - 1} the item(s) "
                    f"{sorted(got)}{f' after item {out[-1]}' if out else ''}; it records prepare's item (0, 1, ...) of "
                    "every media token in prompt order: pass it with the input_ids it was made with, or drop it")
            out.append(got.pop())
        return out
    splits = {TEXT_PARTS.index("label"), TEXT_PARTS.index("template")}
    out, clip, ranks, end = [], -1, None, 0
    for i, j, kinds in runs:
        rank = [_MEDIA_RANK[k] for k in set(kinds)]
        named = codes is not None and any(c in splits for c in codes[end:i])
        if ranks is None or named or min(rank) <= max(ranks):
            clip, ranks = clip + 1, []
        ranks += rank
        out.append(clip)
        end = j
    return out


def check_media_items(media_items, input_ids: Tensor) -> Tensor | None:
    """`inputs["media_items"]` (`prepare`'s item of each media token, -1 elsewhere, `[batch, pos]` like
    `input_ids`) on the CPU, or None when the inputs carry no record; a record that does not fit the ids
    is an error."""
    rec = _record(media_items, input_ids, "media_items", "prepare's item of each media token",
                  "clips are then told apart from the ids, see clip_numbers")
    if rec is None:
        return None
    if rec.is_floating_point() or (rec.numel() and int(rec.min()) < -1):
        raise ValueError("inputs['media_items'] holds item indices (0, 1, ...) and -1 off the media; got other values")
    return rec


def _record(value, input_ids: Tensor, name: str, records: str, without: str) -> Tensor | None:
    """A per-position record of `prepare`'s (`inputs[name]`) on the CPU, None when absent; refused unless it has
    `input_ids`' shape."""
    if value is None:
        return None
    rec = torch.as_tensor(value).cpu()
    if rec.shape != input_ids.shape:
        raise ValueError(
            f"inputs['{name}'] has shape {tuple(rec.shape)} but input_ids {tuple(input_ids.shape)}: it records "
            f"{records}; slice or pad it together with input_ids, or drop it ({without})")
    return rec


def check_text_parts(text_parts, input_ids: Tensor) -> Tensor | None:
    """`inputs["text_parts"]` (codes into `TEXT_PARTS`, `[batch, pos]` like `input_ids`) on the CPU,
    or None when the inputs carry no record; a record that does not fit the ids is an error."""
    codes = _record(text_parts, input_ids, "text_parts", "prepare's text parts per position",
                    "all user text is then 'question'")
    if codes is None:
        return None
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < len(TEXT_PARTS)):
        raise ValueError(f"inputs['text_parts'] holds codes outside 0..{len(TEXT_PARTS) - 1} (TEXT_PARTS: {TEXT_PARTS})")
    return codes


def with_text_parts(groups: list[str], codes: list[int] | None) -> list[str]:
    """One row's text groups (`hooked_av.inputs.chat.text_groups`) with `prepare`'s record applied:
    a position of code c > 0 becomes `TEXT_PARTS[c]`, the others keep their group."""
    if codes is None:
        return groups
    return [TEXT_PARTS[c] if c else g for g, c in zip(groups, codes)]


def media_runs(toks: list[int], media: dict[int, str]):
    """Maximal runs of consecutive media placeholders in a row's ids: `(start, end, kinds)` with
    `kinds` the media name of every token in `toks[start:end]` (`media` maps id -> name)."""
    i = 0
    while i < len(toks):
        if toks[i] not in media:
            i += 1
            continue
        j = i
        while j < len(toks) and toks[j] in media:
            j += 1
        yield i, j, [media[t] for t in toks[i:j]]
        i = j


class TokenMapBuilder:
    """Fills a TokenMap row by row; the model-specific builders call `set` on position ranges."""

    def __init__(self, batch: int, seq: int):
        self.group = torch.full((batch, seq), _CODE["padding"], dtype=torch.long)
        self.item = torch.full((batch, seq), -1, dtype=torch.long)
        self.frame = torch.full((batch, seq), -1, dtype=torch.long)
        self.time = torch.full((batch, seq), float("nan"))
        self.time_end = torch.full((batch, seq), float("nan"))
        self.chunk = torch.full((batch, seq), -1, dtype=torch.long)
        self.patch_row = torch.full((batch, seq), -1, dtype=torch.long)
        self.patch_col = torch.full((batch, seq), -1, dtype=torch.long)

    def set_patches(self, row: int, pos, rows: int, cols: int) -> None:
        """The merged-patch (row, column) of the video/image tokens at positions `pos` of `row`: whole
        frames of `rows x cols` tokens each, in the processor's order (Qwen2-VL's image processor,
        `image_processing_qwen2_vl.py`, lays a frame's merged patches out row-major)."""
        k = torch.arange(len(pos)) % (rows * cols)
        self.patch_row[row, pos] = k // cols
        self.patch_col[row, pos] = k % cols

    def set(self, row: int, pos, group: str, item=None, frame=None, time=None, time_end=None, chunk=None) -> None:
        self.group[row, pos] = _CODE[group]
        for name, value in (("item", item), ("frame", frame), ("time", time), ("time_end", time_end), ("chunk", chunk)):
            if value is not None:
                getattr(self, name)[row, pos] = torch.as_tensor(value, dtype=getattr(self, name).dtype)

    def build(self, position_mode: str | None = None) -> TokenMap:
        return TokenMap(self.group, self.item, self.frame, self.time, self.time_end, self.chunk, position_mode,
                        self.patch_row, self.patch_col)


def fill_audio(out: TokenMapBuilder, row: int, where, item: int, index: int, audio_counts, seconds_per_token: float,
               chunk=None) -> None:
    """Label audio clip `index`'s placeholders at `where` (tokens of `seconds_per_token` each), after checking
    that its features make exactly that many tokens."""
    n = len(where)
    if audio_counts is None or index >= len(audio_counts):
        raise ValueError(f"row {row} has audio placeholders but no audio features are left for them")
    if n != audio_counts[index]:
        raise ValueError(f"row {row}: the audio of clip {item} has {n} placeholders but its features make {audio_counts[index]} tokens")
    k = torch.arange(n, dtype=torch.float)
    out.set(row, where, "audio", item=item, time=k * seconds_per_token, time_end=(k + 1) * seconds_per_token, chunk=chunk)


def fill_grid(out: TokenMapBuilder, row: int, where, kind: str, item: int, index: int, grids: dict, merge: int):
    """Check image/video `index`'s placeholders at `where` against its `grids[kind]` entry and store each
    token's merged patch. An image is labelled here (returns None); for a video, returns the temporal grid
    step of each token (`[n]`) for the family to time."""
    n, grid = len(where), grids[kind]
    if grid is None or index >= len(grid):
        raise ValueError(f"row {row} has {kind} placeholders but no {kind}_grid_thw entry is left for them")
    t, h, w = (int(x) for x in grid[index].tolist())
    per_frame = (h // merge) * (w // merge)
    if n != t * per_frame:
        raise ValueError(f"row {row}: the {kind} of clip {item} has {n} placeholders but its grid {[t, h, w]} makes {t * per_frame}")
    frame = torch.arange(t).repeat_interleave(per_frame)
    out.set_patches(row, where, h // merge, w // merge)
    if kind == "image":
        out.set(row, where, "image", item=item, frame=frame)
        return None
    return frame


def row_records(media_items: Tensor | None, text_parts: Tensor | None, row: int, pos) -> tuple:
    """`(items, codes)` of `clip_numbers` for batch row `row` at its positions `pos`: the row's
    `media_items` and `text_parts` records (None where the inputs carry none)."""
    return tuple(None if t is None else t[row, pos].tolist() for t in (media_items, text_parts))
