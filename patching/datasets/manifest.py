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
  (`1`, or `"1"` in a CSV) or its text (ignoring case and surrounding spaces; options must be distinct so
  read). Where those readings name different options (options `["2", "3", "1"]` and answer `"1"`: the
  text is option 2, the index option 1; options `["B", "A"]` and answer `"A"`) the row is refused unless
  its `answer_is` column says which reading is meant: `"letter"`, `"index"` or `"text"` (only with
  options).
- Every other column (task, dataset, split, ...) is metadata, carried through to every result row: one
  type per column (text, number, true/false, list or object; missing or null anywhere), no name that a
  study writes itself (`RESERVED`; the study also refuses the result columns of the experiments it runs).
  `n_options` (a whole number >= 2) gives the chance level of a sample without `options`.
- `id`: unique; not only spaces; two ids may not differ only by surrounding spaces.
- CSV: UTF-8 (a byte-order mark is read), a header of distinct, non-empty names without surrounding
  spaces, and every row with as many fields as the header (quote a value that holds a comma). JSONL:
  UTF-8, one object per line, no key given twice in an object.

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
CORE = ("id", "question", "answer", "answer_is", "options", "items") + MEDIA
ANSWER_READINGS = ("letter", "index", "text")
# columns the study writes itself: metadata under these names would be overwritten in the results
RESERVED = ("sample_correct", "correct", "prediction", "answer_text", "answer_token", "p_answer", "rule", "sample",
            "chance", "model")  # `Study.frame` adds the model's name


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
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the first column's name
    except UnicodeDecodeError as e:
        raise ManifestError(path, [(0, None, None, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                                                   "save the manifest as UTF-8")]) from None
    raw = _read_jsonl(text, problems) if path.suffix.lower() == ".jsonl" else _read_csv(text, problems)
    if not raw and not problems:
        problems.append((0, None, None, "the manifest holds no samples"))
    checked: dict = {}  # path -> problem or None, so a clip shared by many rows is opened once
    rows, seen, stripped, meta_cols = [], {}, {}, []
    for n, rec in raw:
        before = len(problems)
        row = _row(n, rec, path.parent, problems, checked, check_files)
        if row is None or len(problems) > before:
            continue
        if row.id in seen:
            problems.append((n, row.id, "id", f"duplicate id: row {seen[row.id]} has the same id; ids must be unique"))
            continue
        if row.id.strip() in stripped:
            m, other = stripped[row.id.strip()]
            problems.append((n, row.id, "id", f"ids {row.id!r} and {other!r} (row {m}) differ only by surrounding spaces; "
                                              "make them distinct, or remove the spaces if they name one sample"))
            continue
        seen[row.id], stripped[row.id.strip()] = n, (n, row.id)
        rows.append((n, row))
        meta_cols += [k for k in row.meta if k not in meta_cols]
    _check_meta_types(rows, meta_cols, problems)
    rows = [r for _, r in rows]
    if problems:
        raise ManifestError(path, problems)
    rows = [Row(**{**r.__dict__, "index": i}) for i, r in enumerate(rows)]
    return Manifest(path, rows, meta_cols, hashlib.sha256(data).hexdigest())


def _kind(v) -> str:
    """The type of a metadata value as a results table stores it."""
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "text"
    return "list" if isinstance(v, list) else "object" if isinstance(v, dict) else type(v).__name__


def _check_meta_types(rows: list, meta_cols: list, problems) -> None:
    """One type per metadata column (missing / null anywhere): the results table holds one per column, and
    a column of 1 in one row and "test" in another would fail only when the study merges its results."""
    for col in meta_cols:
        kinds: dict[str, list] = {}
        for n, r in rows:
            v = r.meta.get(col)
            if v is not None:
                kinds.setdefault(_kind(v), []).append((n, r.id, v))
        if len(kinds) > 1:
            first = next(iter(kinds))
            for kind, where in list(kinds.items())[1:]:
                for n, rid, v in where[:5]:
                    problems.append((n, rid, col, f"{v!r} is {kind}, but row {kinds[first][0][0]} has {kinds[first][0][2]!r} "
                                                  f"({first}); a metadata column holds one type: write all its values "
                                                  "as one (e.g. each as text, in quotes)"))
        elif kinds and next(iter(kinds)) in ("list", "object"):  # the elements must share types too
            _check_nested(col, next(iter(kinds.values())), problems)


def _check_nested(col: str, values: list, problems) -> None:
    """Lists / objects a results table can hold as one column (pyarrow's rule: [1, 2] and ["a"] cannot)."""
    import pyarrow as pa

    for k, (n, rid, v) in enumerate(values):
        try:
            pa.array([values[0][2], v] if k else [v])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            where = "its elements mix types" if not k else f"it does not match row {values[0][0]}'s {values[0][2]!r}"
            problems.append((n, rid, col, f"{v!r}: {where} ({str(e).split(chr(10))[0]}); a metadata column holds one "
                                          "type: write its lists (objects) with elements of one type"))


def _no_duplicate_keys(pairs: list, twice: list) -> dict:
    keys = [k for k, _ in pairs]
    twice += [k for i, k in enumerate(keys) if k in keys[:i]]
    return dict(pairs)


def _read_jsonl(text: str, problems) -> list[tuple[int, dict]]:
    out, n = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        n += 1
        twice: list = []
        try:
            rec = json.loads(line, object_pairs_hook=lambda pairs: _no_duplicate_keys(pairs, twice))
        except json.JSONDecodeError as e:
            problems.append((n, None, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            problems.append((n, None, None, f"a line must be a JSON object, got {type(rec).__name__}"))
            continue
        if twice:  # json keeps the last of a key given twice: one of the values would be lost
            rid = rec.get("id") if isinstance(rec.get("id"), str) else None
            problems += [(n, rid, k, f"the key {k!r} is given twice in this object; one value would be lost: "
                                     "keep one") for k in dict.fromkeys(twice)]
            continue
        out.append((n, rec))
    return out


def _read_csv(text: str, problems) -> list[tuple[int, dict]]:
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    bad = False
    for j, name in enumerate(header):
        if not name.strip():
            problems.append((0, None, None, f"header column {j + 1} has no name; name every column (or remove a "
                                            "trailing comma from the header)"))
            bad = True
        elif name != name.strip():
            problems.append((0, None, name, f"the header name {name!r} has surrounding spaces; write it as "
                                            f"{name.strip()!r} (a CSV header is read as written)"))
            bad = True
        elif name in header[:j]:
            problems.append((0, None, name, f"the header names column {name!r} twice (columns {header.index(name) + 1} "
                                            f"and {j + 1}); one of them would be lost: rename or remove one"))
            bad = True
    if bad:
        return []
    out, n = [], 0
    for fields in reader:
        if not fields:  # a blank line
            continue
        n += 1
        if len(fields) != len(header):
            rid = fields[header.index("id")] if "id" in header and header.index("id") < len(fields) else None
            extra = (f"; the extra value(s) {fields[len(header):][:3]} would shift into the wrong columns: quote a value "
                     f"that holds a comma (\"a, b\")" if len(fields) > len(header) else
                     ": a field is missing; give every column (an empty one as nothing between two commas)")
            problems.append((n, rid, None, f"{len(fields)} fields, but the header has {len(header)}{extra}"))
            continue
        rec = {k: v for k, v in zip(header, fields) if v != ""}
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
        why = ("missing or empty" if v in (None, "") else "only spaces" if isinstance(v, str)
               else f"must be text, got {v!r}")
        problems.append((n, rid, key, why))
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
    if options is not None:
        folded = [o.strip().casefold() for o in options]
        same = [(i, j) for j in range(len(folded)) for i in range(j) if folded[i] == folded[j]]
        if same:
            i, j = same[0]
            problems.append((n, rid, "options", f"options {chr(65 + i)} ({options[i]!r}) and {chr(65 + j)} ({options[j]!r}) "
                                                "are the same text (ignoring case and spaces): an answer naming it could "
                                                "mean either; make the options distinct"))
            options = None
    answer, index = _answer(rec.get("answer"), options, n, rid, problems, rec.get("answer_is"))
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


def _readings(a, options) -> dict[str, int]:
    """Which option `a` names when read as each of `ANSWER_READINGS` (only the readings that apply and are
    in range)."""
    out = {}
    if isinstance(a, str) and len(a.strip()) == 1 and a.strip().isalpha() and 0 <= ord(a.strip().upper()) - 65 < len(options):
        out["letter"] = ord(a.strip().upper()) - 65
    if (isinstance(a, int) and not isinstance(a, bool) or isinstance(a, str) and a.strip().isdigit()) and 0 <= int(a) < len(options):
        out["index"] = int(a)
    text = a.strip() if isinstance(a, str) else str(a) if isinstance(a, int) and not isinstance(a, bool) else None
    texts = [i for i, o in enumerate(options) if text is not None and o.strip().casefold() == text.casefold()]
    if texts:  # options are distinct ignoring case and spaces (checked), so one at most
        out["text"] = texts[0]
    return out


def _answer(a, options, n, rid, problems, answer_is=None) -> tuple[str | None, int | None]:
    if a is None or (isinstance(a, str) and not a.strip()):
        problems.append((n, rid, "answer", "missing or empty"))
        return None, None
    if answer_is is not None and answer_is not in ANSWER_READINGS:
        problems.append((n, rid, "answer_is", f"{answer_is!r} is not a reading of the answer; use one of {list(ANSWER_READINGS)}"))
        return None, None
    if not options:
        if answer_is is not None:
            problems.append((n, rid, "answer_is", f"answer_is={answer_is!r} applies to rows with options; this row has "
                                                  "none: drop it"))
            return None, None
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            problems.append((n, rid, "answer", f"must be text, got {a!r}"))
            return None, None
        return str(a), None
    readings = _readings(a, options)
    if answer_is is not None:
        if answer_is not in readings:
            problems.append((n, rid, "answer", f"{a!r} read as {answer_is!r} (answer_is) names no option of {options} "
                                               f"(letters A-{chr(64 + len(options))}, indices 0-{len(options) - 1})"))
            return None, None
        readings = {answer_is: readings[answer_is]}
    if len(set(readings.values())) > 1:
        said = ", ".join(f"as {k} option {chr(65 + i)} ({options[i]!r})" for k, i in readings.items())
        problems.append((n, rid, "answer", f"{a!r} reads {said}; say which with an answer_is column "
                                           f"({' / '.join(repr(k) for k in readings)})"))
        return None, None
    if readings:
        i = next(iter(readings.values()))
        return options[i], i
    letter = isinstance(a, str) and len(a.strip()) == 1 and a.strip().isalpha()
    if letter or isinstance(a, int) and not isinstance(a, bool) or isinstance(a, str) and a.strip().isdigit():  # out of range
        last = chr(64 + len(options))
        problems.append((n, rid, "answer", f"{a!r} is out of range for {len(options)} options (letters A-{last}, indices 0-{len(options) - 1})"))
    else:
        problems.append((n, rid, "answer", f"{a!r} is neither an option's text, its letter nor its 0-based index"))
    return None, None


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
