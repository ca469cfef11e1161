"""`hooked-av flow` end to end: a checkpoint folder written by save_pretrained (with a tokenizer), a
clip written by the test, the knockout report out."""

import pandas as pd
import pytest
import torch
from media_helpers import tiny_tokenizer, write_mp4
from omni_helpers import tiny_hf_thinker

from patching.apps.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tiny_hf_thinker(seed=6).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_flow_writes_a_knockout_report_for_a_checkpoint_folder_and_a_clip(folder, tmp_path, capsys):
    clip = write_mp4(tmp_path / "clip.mp4", seconds=2.0, fps=10)
    out = tmp_path / "out"
    assert main(["flow", "--model", str(folder), "--video", str(clip), "--question", "What makes the sound?",
                 "--answer", "dog", "--window", "1", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "video[0]" in html
    df = pd.read_csv(out / "knockout.csv")
    assert sorted(df.edge.unique()) == sorted(["audio->question", "video->question", "audio->last", "video->last",
                                               "question->last", "last->last"])
    assert sorted(df.layer.unique()) == [0, 1, 2]
    assert torch.isfinite(torch.tensor(df.rel_change.to_numpy())).all()
    assert "report:" in capsys.readouterr().out


def test_flow_refuses_an_unknown_family_and_an_empty_question_with_one_error_line(folder, tmp_path, capsys):
    assert main(["flow", "--model", str(folder), "--question", " ", "--answer", "dog"]) == 2
    assert capsys.readouterr().err == "error: the question is empty\n"
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    clip = write_mp4(tmp_path / "c.mp4", seconds=1.0)  # media are checked before the model's family
    assert main(["flow", "--model", str(other), "--video", str(clip), "--question", "What?", "--answer", "dog"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a supported family (Qwen2.5-Omni" in err and err.count("\n") == 1


def test_flow_picks_video_salmonn_from_its_config(tmp_path):
    import salmonn_helpers as H
    from test_salmonn_inputs import salmonn_tokenizer

    folder = H.Reference(seed=0).save(tmp_path / "salmonn")
    salmonn_tokenizer().save_pretrained(folder)
    clip = write_mp4(tmp_path / "clip.mp4", seconds=2.0, fps=10)
    out = tmp_path / "out"
    assert main(["flow", "--model", str(folder), "--video", str(clip), "--question", "What makes the sound?",
                 "--answer", "dog", "--window", "1", "--out", str(out)]) == 0
    df = pd.read_csv(out / "knockout.csv")
    assert len(df.edge.unique()) == 6 and df.layer.nunique() == H.Reference(seed=0).salmonn_config()["num_hidden_layers"]
    assert "position_mode=inference" in (out / "report.html").read_text()
