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
