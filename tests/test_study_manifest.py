"""Study manifests: every row and every media file is checked up front, and all problems
come in one error with row, id and column; answers are normalised against the options."""

import json

import pytest
import torch
from media_helpers import write_mp4, write_wav

from patching.datasets.manifest import ManifestError, read_manifest
from patching.datasets.templates import MC_INSTRUCTION, parse_template

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("manifest_media")
    write_mp4(d / "av.mp4", seconds=1.0, fps=4)
    write_mp4(d / "silent.mp4", seconds=1.0, fps=4, with_audio=False)
    write_wav(d / "tone.wav")
    (d / "broken.mp4").write_bytes(b"this is not a video")
    return d


def _jsonl(d, rows, name="m.jsonl"):
    p = d / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_every_problem_is_listed_at_once_with_row_id_and_column(media):
    rows = [
        {"id": "ok", "video": "av.mp4", "question": "What?", "answer": "dog"},
        {"id": "gone", "video": "missing.mp4", "question": "What?", "answer": "dog"},
        {"id": "ok", "audio": "tone.wav", "question": "What?", "answer": "dog"},             # duplicate id
        {"id": "noq", "video": "av.mp4", "answer": "dog"},                                    # no question
        {"id": "letter", "video": "av.mp4", "question": "Q", "options": ["a", "b"], "answer": "C"},
        {"id": "opts", "video": "av.mp4", "question": "Q", "options": "a,b", "answer": "a"},
        {"id": "nomedia", "question": "Q", "answer": "a"},
        {"id": "both", "video": "av.mp4", "items": [{"video": "av.mp4"}], "question": "Q", "answer": "a"},
        "{not json",
        {"id": "broken", "video": "broken.mp4", "question": "Q", "answer": "a"},
        {"id": "noaudio", "audio": "silent.mp4", "question": "Q", "answer": "a"},
        {"id": "item", "items": [{"video": "av.mp4"}, {"sound": "tone.wav"}], "question": "Q", "answer": "a"},
        {"id": "reserved", "video": "av.mp4", "question": "Q", "answer": "a", "sample_correct": True},
    ]
    with pytest.raises(ManifestError) as e:
        read_manifest(_jsonl(media, rows))
    got = {(r, i, c) for r, i, c, _ in e.value.problems}
    assert got == {
        (2, "gone", "video"), (3, "ok", "id"), (4, "noq", "question"), (5, "letter", "answer"),
        (6, "opts", "options"), (7, "nomedia", None), (8, "both", "items"), (9, None, None),
        (10, "broken", "video"), (11, "noaudio", "audio"), (12, "item", "items[1]"), (13, "reserved", "sample_correct"),
    }
    msg = str(e.value)
    assert "12 problem(s)" in msg and "row 3 (id 'ok'), column 'id': duplicate id: row 1" in msg
    assert "missing.mp4' does not exist" in msg and "has no audio stream" in msg and "cannot read media file" in msg
    assert "out of range for 2 options (letters A-B" in msg


def test_a_shared_clip_is_opened_once_and_paths_are_relative_to_the_manifest(media, monkeypatch):
    import patching.datasets.manifest as m

    opened = []
    real = m._media_problem
    monkeypatch.setattr(m, "_media_problem", lambda p, k, c: opened.append((p.name, k)) or real(p, k, c))
    rows = [{"id": i, "video": "av.mp4", "question": "Q", "answer": "a"} for i in range(5)]
    man = read_manifest(_jsonl(media, rows))
    assert opened == [("av.mp4", "video")]
    assert [r.id for r in man.rows] == ["0", "1", "2", "3", "4"] and man.rows[0].video == str(media / "av.mp4")


def test_answers_by_letter_index_or_text_and_csv_lists(media):
    p = media / "m.csv"
    p.write_text(
        "id,video,question,options,answer,task\n"
        'a,av.mp4,Q,"[""dog"", ""car"", ""piano""]",B,vgg\n'
        'b,av.mp4,Q,"[""dog"", ""car"", ""piano""]",2,vgg\n'
        'c,av.mp4,Q,"[""dog"", ""car"", ""piano""]",dog,vgg\n'
        "d,av.mp4,Q,,free text,other\n"
    )
    man = read_manifest(p)
    assert [(r.answer_index, r.answer_text, r.letter) for r in man.rows] == [
        (1, "car", "B"), (2, "piano", "C"), (0, "dog", "A"), (None, "free text", None)]
    assert man.meta_columns == ["task"] and man.rows[3].meta == {"task": "other"}


def test_the_chance_level_comes_from_the_options_or_n_options(media):
    from patching.apps.study.runner import chance

    man = read_manifest(_jsonl(media, [{"id": "a", "video": "av.mp4", "question": "Q", "options": ["dog", "car", "cat"], "answer": "A"},
                                       {"id": "b", "video": "av.mp4", "question": "Q", "answer": "dog", "n_options": 4},
                                       {"id": "c", "video": "av.mp4", "question": "Q", "answer": "dog"}]))
    got = [chance(r) for r in man.rows]
    assert got[:2] == pytest.approx([1 / 3, 1 / 4]) and got[2] != got[2]  # NaN: nothing says how many answers there are
    with pytest.raises(ManifestError, match=r"column 'n_options': must be a whole number of answer options >= 2, got 1.5"):
        read_manifest(_jsonl(media, [{"id": "a", "video": "av.mp4", "question": "Q", "answer": "dog", "n_options": 1.5}]))


def test_templates_letter_the_options_and_add_the_instruction(media):
    man = read_manifest(_jsonl(media, [{"id": "a", "video": "av.mp4", "question": "What sounds?", "options": ["dog", "car"], "answer": "A"},
                                       {"id": "b", "video": "av.mp4", "question": "What sounds?", "answer": "dog"}]))
    mc = parse_template("mc")
    prompt = mc.prompt(man.rows[0])
    assert prompt.text() == f"What sounds?\nA. dog\nB. car\n{MC_INSTRUCTION}"
    assert [g for g, _ in prompt.parts()] == ["question", "options", "instruction"]  # own TokenMap groups
    assert parse_template("default").prompt(man.rows[1]).parts() == [("question", "What sounds?")]
    with pytest.raises(ValueError, match=r"'mc' template needs options; 1 sample\(s\) have none \(ids \['b'\]\)"):
        mc.check(man.rows)
    custom = parse_template("Listen. {question} Options: {options}")
    assert custom.prompt(man.rows[0]).text() == "Listen. What sounds? Options: A. dog\nB. car"
    with pytest.raises(ValueError, match=r"must contain \{question\}"):
        parse_template("no field")
    with pytest.raises(ValueError, match=r"a field other than"):
        parse_template("{question} {answer}")


def test_a_non_integer_number_as_id_is_refused_not_dropped(media):
    # {"id": 1.5} used to give a manifest without that row and no error
    rows = [{"id": 1.5, "audio": "tone.wav", "question": "What?", "answer": "dog"},
            {"id": 2, "audio": "tone.wav", "question": "What?", "answer": "dog"}]
    with pytest.raises(ManifestError, match=r"column 'id': must be text, got 1.5"):
        read_manifest(_jsonl(media, rows))
    assert [r.id for r in read_manifest(_jsonl(media, rows[1:])).rows] == ["2"]


def _problems(path):
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    return e.value.problems, str(e.value)


def test_csv_rows_with_more_or_fewer_fields_than_the_header_are_refused(media):
    # an unquoted comma in the question cut it and moved the rest into the answer, without a word
    p = media / "fields.csv"
    p.write_text("id,video,question,answer\n"
                 "a,av.mp4,What, really?,dog\n"
                 'b,av.mp4,"What, really?",dog\n'
                 "c,av.mp4,What\n")
    got, msg = _problems(p)
    assert [(r, i) for r, i, _, _ in got] == [(1, "a"), (3, "c")]
    assert "row 1 (id 'a'): 5 fields, but the header has 4; the extra value(s) ['dog'] would shift" in msg
    assert "quote a value that holds a comma" in msg and "row 3 (id 'c'): 3 fields, but the header has 4" in msg
    p.write_text('id,video,question,answer\nb,av.mp4,"What, really?",dog\n')
    assert read_manifest(p).rows[0].question == "What, really?"


@pytest.mark.parametrize("header, column, message", [
    ("id,video,question,answer,answer", "answer", r"names column 'answer' twice \(columns 4 and 5\)"),
    ("id,video,question,answer,task,task", "task", r"names column 'task' twice"),
    ("id,video, question,answer", " question", r"header name ' question' has surrounding spaces"),
    ("id,video,,question,answer", None, r"header column 3 has no name"),
])
def test_a_csv_header_that_would_lose_or_misname_a_column_is_refused(media, header, column, message):
    p = media / "header.csv"
    p.write_text(header + "\n" + ",".join(["r1", "av.mp4", "Q", "dog", "x", "y"][: header.count(",") + 1]) + "\n")
    got, msg = _problems(p)
    assert [(r, c) for r, _, c, _ in got] == [(0, column)]
    assert __import__("re").search(message, msg)


def test_a_byte_order_mark_is_read_in_csv_and_jsonl_and_other_encodings_are_named(media):
    p = media / "bom.csv"
    p.write_bytes("\ufeffid,video,question,answer\nr1,av.mp4,Q,dog\n".encode("utf-8"))
    assert [r.id for r in read_manifest(p).rows] == ["r1"]
    p = media / "bom.jsonl"
    p.write_bytes(("\ufeff" + json.dumps({"id": "r1", "video": "av.mp4", "question": "Q", "answer": "dog"}) + "\n").encode())
    assert [r.id for r in read_manifest(p).rows] == ["r1"]
    p = media / "latin.csv"
    p.write_bytes("id,video,question,answer\nr1,av.mp4,Qu'est-ce que c'est, très?,dog\n".encode("latin-1"))
    got, msg = _problems(p)
    assert got[0][:3] == (0, None, None) and "not UTF-8 text" in msg


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_ids_of_spaces_or_differing_only_by_surrounding_spaces_are_refused(media, suffix):
    rows = [{"id": "a", "video": "av.mp4", "question": "Q", "answer": "dog"},
            {"id": "   ", "video": "av.mp4", "question": "Q", "answer": "dog"},
            {"id": " a", "video": "av.mp4", "question": "Q", "answer": "dog"},
            {"id": "b ", "video": "av.mp4", "question": "Q", "answer": "dog"}]
    if suffix == "jsonl":
        p = _jsonl(media, rows, "spaces.jsonl")
    else:
        p = media / "spaces.csv"
        p.write_text("id,video,question,answer\n" + "".join(f'"{r["id"]}",av.mp4,Q,dog\n' for r in rows))
    got, msg = _problems(p)
    assert [(r, i, c) for r, i, c, _ in got] == [(2, "   ", "id"), (3, " a", "id")]
    assert "column 'id': only spaces" in msg
    assert "ids ' a' and 'a' (row 1) differ only by surrounding spaces" in msg


def test_a_metadata_column_of_mixed_types_is_refused_at_the_manifest(media):
    # 1 in one row and "test" in another failed only at the merge, after every sample had run
    base = {"video": "av.mp4", "question": "Q", "answer": "dog"}
    rows = [{"id": "a", **base, "split": 1, "flag": True, "tags": ["x"], "w": 1, "note": None},
            {"id": "b", **base, "split": "test", "flag": 1, "tags": [2], "w": 2.5},
            {"id": "c", **base, "split": 2, "tags": ["y", 3], "note": "fine"}]
    got, msg = _problems(_jsonl(media, rows, "mixed.jsonl"))
    assert sorted((r, c) for r, _, c, _ in got) == [(2, "flag"), (2, "split"), (2, "tags"), (3, "tags")]
    assert "row 2 (id 'b'), column 'split': 'test' is text, but row 1 has 1 (number)" in msg
    assert "column 'flag': 1 is number, but row 1 has True (true/false)" in msg
    ok = [{"id": "a", **base, "w": 1, "tags": ["x"], "note": None}, {"id": "b", **base, "w": 2.5, "tags": [], "note": "n"}]
    assert read_manifest(_jsonl(media, ok, "ok.jsonl")).meta_columns == ["w", "tags", "note"]


@pytest.mark.parametrize("options, answer, readings", [
    (["2", "3", "1"], "1", "as index option B ('3'), as text option C ('1')"),
    (["B", "A"], "A", "as letter option A ('B'), as text option B ('A')"),
    (["b", "c", "a"], "a", "as letter option A ('b'), as text option C ('a')"),
    (["2", "3", "1"], 1, "as index option B ('3'), as text option C ('1')"),  # a JSON number too
    (["C", "1", "A"], "1", "as index option B ('1')"),  # agree: not ambiguous
])
def test_an_answer_whose_letter_index_and_text_readings_disagree_is_refused(media, options, answer, readings):
    row = {"id": "r", "video": "av.mp4", "question": "Q", "options": options, "answer": answer}
    if readings.count("option") == 1:
        assert read_manifest(_jsonl(media, [row], "amb.jsonl")).rows[0].answer_index == 1
        return
    got, msg = _problems(_jsonl(media, [row], "amb.jsonl"))
    assert [(r, c) for r, _, c, _ in got] == [(1, "answer")]
    assert f"reads {readings}; say which with an answer_is column" in msg
    # an explicit reading settles it, in JSONL and CSV
    for how in ("letter", "index", "text"):
        want = {"letter": ord(str(answer).upper()) - 65 if str(answer).isalpha() else None,
                "index": int(answer) if str(answer).isdigit() else None, "text": options.index(str(answer))}[how]
        if want is None:
            got, msg = _problems(_jsonl(media, [{**row, "answer_is": how}], "amb.jsonl"))
            assert f"read as '{how}' (answer_is) names no option" in msg
            continue
        r = read_manifest(_jsonl(media, [{**row, "answer_is": how}], "amb.jsonl")).rows[0]
        assert (r.answer_index, r.answer_text, "answer_is" in r.meta) == (want, options[want], False)
        p = media / "amb.csv"
        p.write_text("id,video,question,options,answer,answer_is\n"
                     f"r,av.mp4,Q,\"{json.dumps(options).replace(chr(34), chr(34) * 2)}\",{answer},{how}\n")
        assert read_manifest(p).rows[0].answer_index == want


def test_answer_is_is_checked(media):
    base = {"id": "r", "video": "av.mp4", "question": "Q", "answer": "A"}
    got, msg = _problems(_jsonl(media, [{**base, "options": ["x", "y"], "answer_is": "position"}], "ai.jsonl"))
    assert "'position' is not a reading of the answer; use one of ['letter', 'index', 'text']" in msg
    got, msg = _problems(_jsonl(media, [{**base, "answer_is": "letter"}], "ai.jsonl"))
    assert "answer_is='letter' applies to rows with options" in msg


def test_a_jsonl_key_given_twice_is_refused(media):
    # json keeps the last of a repeated key, as the CSV header did: the first question was lost
    p = media / "twice.jsonl"
    p.write_text('{"id": "a", "video": "av.mp4", "question": "What?", "answer": "dog", "question": "Which?"}\n'
                 '{"id": "b", "video": "av.mp4", "question": "Q", "answer": "dog", "items": [{"video": "av.mp4", "video": "x"}]}\n')
    got, msg = _problems(p)
    assert [(r, i, c) for r, i, c, _ in got] == [(1, "a", "question"), (2, "b", "video")]
    assert "the key 'question' is given twice in this object; one value would be lost" in msg


def test_options_that_repeat_a_text_are_refused_and_text_is_read_without_case(media):
    base = {"id": "r", "video": "av.mp4", "question": "Q"}
    got, msg = _problems(_jsonl(media, [{**base, "options": ["dog", "cat", " Dog"], "answer": "dog"}], "dup.jsonl"))
    assert [(r, c) for r, _, c, _ in got] == [(1, "options")]
    assert "options A ('dog') and C (' Dog') are the same text (ignoring case and spaces)" in msg
    r = read_manifest(_jsonl(media, [{**base, "options": ["Dog", "cat", "piano"], "answer": "dog"}], "case.jsonl")).rows[0]
    assert (r.answer_index, r.answer_text) == (0, "Dog")
    # "A" reads as letter A ('b') and, without case, as the text of option B ('a'): refused
    got, msg = _problems(_jsonl(media, [{**base, "options": ["b", "a"], "answer": "A"}], "case2.jsonl"))
    assert "reads as letter option A ('b'), as text option B ('a')" in msg
