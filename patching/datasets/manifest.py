"""A study's data: a manifest of samples (JSONL or CSV), read and validated in full before any model
is loaded.

One sample per line (JSONL: one object; CSV: a header row, lists as JSON text):

    {"id": "vgg-001", "video": "clips/001.mp4", "question": "What makes the sound?",
     "options": ["dog", "car", "piano"], "answer": "B", "task": "vggsound", "split": "test"}
    {"id": "two-7", "items": [{"video": "a.mp4", "label": "Clip 1: "}, {"video": "b.mp4"}],
     "question": "Which clip has the dog?", "answer": "Clip 1"}

- `id` (unique), `question`, `answer`; media as `video` / `audio` / `image` (one item) or `items` (a list
  of `{video, audio, image, label}`, interleaved in that order); paths relative to the manifest's folder.
- `options` (optional, at least two): then `answer` is an option's letter (`"B"`), its 0-based index
  (`1`, or `"1"` in a CSV) or its text.
- Every other column (task, dataset, split, ...) is metadata, carried through to every result row;
  `n_options` (a whole number >= 2) gives the chance level of a sample without `options`.

`read_manifest` checks every row and every media file (the file exists; a video's first frame
decodes; an audio column's file has an audio stream; an image opens) and raises one `ManifestError`
that lists every problem with its row, id and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MEDIA = ("video", "audio", "image")
ITEM_KEYS = MEDIA + ("label",)
CORE = ("id", "question", "answer", "options", "items") + MEDIA
# columns the study writes itself: metadata under these names would be overwritten in the results
RESERVED = ("sample_correct", "correct", "prediction", "answer_text", "answer_token", "p_answer", "rule", "sample", "chance")


class ManifestError(ValueError):
    """Every problem of a manifest at once: `problems` is a list of (row, id, column, message), row
    1-based in data order (0 for the file itself).

        try:
            read_manifest(tmp / "missing.jsonl")
        except ManifestError as e:
            print(e.problems)  # [(row, id, column, message), ...]
    """

    def __init__(self, path, problems: list[tuple[int, str | None, str | None, str]]):
        self.path, self.problems = str(path), problems
        lines = [f"  row {r}" + (f" (id {i!r})" if i is not None else "") + (f", column {c!r}" if c else "") + f": {m}"
                 for r, i, c, m in problems]
        super().__init__(f"manifest {self.path}: {len(problems)} problem(s); fix them and run again:\n" + "\n".join(lines))


@dataclass(frozen=True)
class Row:
    """One validated sample. `index`: 0-based position in the manifest; media paths absolute;
    `items`: tuple of dicts with keys video/audio/image/label (None / "" when absent);
    `answer_index`: into `options` when given; `answer_text`: the option's text or the answer."""

    index: int
    id: str
    question: str
    answer: str
    answer_text: str
    options: tuple[str, ...] | None = None
    answer_index: int | None = None
    video: str | None = None
    audio: str | None = None
    image: str | None = None
    items: tuple = ()
    meta: dict = field(default_factory=dict)

    @property
    def letter(self) -> str | None:
        """The answer's option letter (A, B, ...), when the sample has options."""
        return None if self.answer_index is None else chr(65 + self.answer_index)


@dataclass
class Manifest:
    path: Path
    rows: list[Row]
    meta_columns: list[str]
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)


def read_manifest(path, check_files: bool = True) -> Manifest:
    """Read and validate `path` (.jsonl / .csv). Raises `ManifestError` listing every problem;
    `check_files=False` skips opening the media (their existence is still checked).

        m = read_manifest(manifest)  # every row and media file checked
        [(r.id, r.question, r.answer) for r in m.rows]
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [(0, None, None, "the manifest file does not exist")])
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ManifestError(path, [(0, None, None, f"unknown manifest format {path.suffix!r}; write JSONL (.jsonl) or CSV (.csv)")])
    data = path.read_bytes()
    problems: list = []
    raw = _read_jsonl(data, problems) if path.suffix.lower() == ".jsonl" else _read_csv(data, problems)
    if not raw and not problems:
        problems.append((0, None, None, "the manifest holds no samples"))
    checked: dict = {}  # path -> problem or None, so a clip shared by many rows is opened once
    rows, seen, meta_cols = [], {}, []
    for n, rec in raw:
        before = len(problems)
        row = _row(n, rec, path.parent, problems, checked, check_files)
        if row is None or len(problems) > before:
            continue
        if row.id in seen:
            problems.append((n, row.id, "id", f"duplicate id: row {seen[row.id]} has the same id; ids must be unique"))
            continue
        seen[row.id] = n
        rows.append(row)
        meta_cols += [k for k in row.meta if k not in meta_cols]
    if problems:
        raise ManifestError(path, problems)
    rows = [Row(**{**r.__dict__, "index": i}) for i, r in enumerate(rows)]
    return Manifest(path, rows, meta_cols, hashlib.sha256(data).hexdigest())


def _read_jsonl(data: bytes, problems) -> list[tuple[int, dict]]:
    out, n = [], 0
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        n += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((n, None, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            problems.append((n, None, None, f"a line must be a JSON object, got {type(rec).__name__}"))
            continue
        out.append((n, rec))
    return out


def _read_csv(data: bytes, problems) -> list[tuple[int, dict]]:
    import io

    out = []
    for n, rec in enumerate(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")), start=1):
        rec = {k: v for k, v in rec.items() if k is not None and v not in (None, "")}
        for key in ("options", "items"):  # lists are JSON text in a CSV cell
            if key in rec:
                try:
                    rec[key] = json.loads(rec[key])
                except json.JSONDecodeError:
                    problems.append((n, rec.get("id"), key, f"a list in a CSV cell must be JSON text, e.g. [\"a\", \"b\"]; got {rec[key]!r}"))
                    rec.pop(key)
        out.append((n, rec))
    return out


def _text(rec, key, n, rid, problems) -> str | None:
    v = rec.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and key == "id":  # 7 and "7" name the same row; 1.5 is refused
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        problems.append((n, rid, key, "missing or empty" if v in (None, "") else f"must be text, got {v!r}"))
        return None
    return v


def _row(n, rec, folder: Path, problems, checked, check_files) -> Row | None:
    rid = rec.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    _text(rec, "id", n, rid, problems)
    question = _text(rec, "question", n, rid, problems)
    options = rec.get("options")
    if options is not None and (not isinstance(options, list) or len(options) < 2
                                or not all(isinstance(o, str) and o.strip() for o in options)):
        problems.append((n, rid, "options", f"must be a list of at least two non-empty texts, got {options!r}"))
        options = None
    answer, index = _answer(rec.get("answer"), options, n, rid, problems)
    media = {k: _media(rec.get(k), k, n, rid, folder, problems, checked, check_files) for k in MEDIA if rec.get(k) is not None}
    items = _items(rec.get("items"), n, rid, folder, problems, checked, check_files)
    if media and items:
        problems.append((n, rid, "items", "give media either as video/audio/image (one item) or as items, not both"))
    elif not media and items is None:
        problems.append((n, rid, None, "no media: give video, audio, image or items"))
    if rid is None or question is None or answer is None:
        return None
    meta = {k: v for k, v in rec.items() if k not in CORE}
    for k in meta:
        if k in RESERVED:
            problems.append((n, rid, k, f"{k!r} is a column the study writes itself; rename this metadata column"))
    if "n_options" in meta:  # the chance level 1 / n_options of a sample without options (a CSV cell is text)
        v = meta["n_options"]
        try:
            whole = float(v) == int(float(v)) and int(float(v)) >= 2 and not isinstance(v, bool)
        except (TypeError, ValueError):
            whole = False
        if not whole:
            problems.append((n, rid, "n_options", f"must be a whole number of answer options >= 2, got {v!r}"))
    return Row(index=n - 1, id=rid, question=question, answer=str(rec["answer"]), answer_text=answer,
               options=tuple(options) if options else None, answer_index=index, items=tuple(items or ()),
               meta=meta, **media)


def _answer(a, options, n, rid, problems) -> tuple[str | None, int | None]:
    if a is None or (isinstance(a, str) and not a.strip()):
        problems.append((n, rid, "answer", "missing or empty"))
        return None, None
    if not options:
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            problems.append((n, rid, "answer", f"must be text, got {a!r}"))
            return None, None
        return str(a), None
    if isinstance(a, str) and a.strip() in options:
        return a.strip(), options.index(a.strip())
    if isinstance(a, str) and len(a.strip()) == 1 and a.strip().isalpha():
        i = ord(a.strip().upper()) - 65
    elif isinstance(a, int) and not isinstance(a, bool) or isinstance(a, str) and a.strip().isdigit():
        i = int(a)
    else:
        problems.append((n, rid, "answer", f"{a!r} is neither an option's text, its letter nor its 0-based index"))
        return None, None
    if not 0 <= i < len(options):
        last = chr(64 + len(options))
        problems.append((n, rid, "answer", f"{a!r} is out of range for {len(options)} options (letters A-{last}, indices 0-{len(options) - 1})"))
        return None, None
    return options[i], i


def _items(items, n, rid, folder, problems, checked, check_files) -> list[dict] | None:
    if items is None:
        return None
    if not isinstance(items, list) or not items:
        problems.append((n, rid, "items", f"must be a non-empty list of {{video, audio, image, label}}, got {items!r}"))
        return None
    out = []
    for j, it in enumerate(items):
        col = f"items[{j}]"
        if not isinstance(it, dict) or set(it) - set(ITEM_KEYS) or not any(it.get(k) for k in MEDIA):
            problems.append((n, rid, col, f"an item is an object with video, audio and/or image (and an optional label); got {it!r}"))
            continue
        label = it.get("label") or ""
        if not isinstance(label, str):
            problems.append((n, rid, f"{col}.label", f"must be text, got {label!r}"))
        out.append({k: _media(it.get(k), k, n, rid, folder, problems, checked, check_files, f"{col}.{k}") if it.get(k) else None
                    for k in MEDIA} | {"label": label if isinstance(label, str) else ""})
    return out


def _media(value, kind, n, rid, folder: Path, problems, checked, check_files, column=None) -> str | None:
    column = column or kind
    if not isinstance(value, str) or not value.strip():
        problems.append((n, rid, column, f"a media path must be text, got {value!r}"))
        return None
    path = Path(value) if os.path.isabs(value) else folder / value
    key = (str(path), kind)
    if key not in checked:
        checked[key] = _media_problem(path, kind, check_files)
    if checked[key]:
        problems.append((n, rid, column, checked[key]))
    return str(path)


def _media_problem(path: Path, kind: str, check_files: bool) -> str | None:
    """Why the file cannot serve as `kind`, or None: it exists, and (when `check_files`) a video's
    first frame decodes, an audio file has an audio stream, an image opens."""
    if not path.is_file():
        return f"file {str(path)!r} does not exist (paths are relative to the manifest's folder)"
    if not check_files:
        return None
    try:
        if kind == "image":
            from hooked_av.inputs.media import load_image

            load_image(path)
        else:
            from hooked_av.inputs.media import check_media_file

            check_media_file(path, kind)
    except (ValueError, OSError) as e:
        return " ".join(str(e).split())
    return None
