"""`hooked-av flow`: the demo's knockout analysis on any supported model and one clip.

    hooked-av flow --model Qwen/Qwen2.5-Omni-7B --video clip.mp4 --question "What instrument?" --answer Piano

Checks the media, the question and the answer first, then loads the model (Qwen2.5-Omni or
video-SALMONN 2+, chosen from its config.json; "toy" for the embedded one), builds the inputs with
`model.prepare`, runs the six-edge knockout sweep on the answer's first token and writes a report
with the plot, the token layout and the attention mass. An answer the model does not predict (top
token, p >= MIN_P) is warned about in the output and the report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from hooked_av import registry
from hooked_av.utils import as_device, as_dtype
from hooked_av.viz import Report, group_attention_mass, plot_attention_mass
from patching.methods.knockout import knockout

MIN_P = 1e-3  # p(answer) on the clean run below this: the knockout would follow an answer the model does not give


def check_media(video: str | None, audio: str | None) -> None:
    """Each media file exists, holds the stream it is given as, and its first frame decodes: cheap
    checks, made before a model is loaded."""
    from hooked_av.inputs.media import check_media_file

    if video is None and audio is None:
        raise ValueError("give --video and/or --audio: the flow analysis follows the media to the answer")
    for path, kind in ((video, "video"), (audio, "audio")):
        if path is not None:
            check_media_file(path, kind)


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of `text` the tokenizer can only spell with its unknown token (none for byte-level BPE)."""
    unk = tokenizer.unk_token_id
    return [] if unk is None else [w for w in text.split() if unk in tokenizer.encode(w, add_special_tokens=False)]


def answer_id(tokenizer, question: str, answer: str) -> int:
    """The answer's first token id, after checking that the tokenizer can spell question and answer."""
    unknown = unknown_words(tokenizer, question)
    if unknown:
        raise ValueError(f"the question has words the model's tokenizer does not know: {unknown}; rephrase it in its vocabulary")
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing; give the answer's text")
    if ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"the answer {answer!r} starts with a word the model's tokenizer does not know (its first token is "
            f"{tokenizer.unk_token}): the knockout would score that unknown token; give an answer in the model's vocabulary"
        )
    return ids[0]


def run_flow(model_name: str, video: str | None, question: str, answer: str, audio: str | None = None,
             window: int | None = None, out_dir: str | Path = "runs/flow", dtype: str = "float32",
             device: str | None = None) -> Path:
    """Everything a user can get wrong (text, window, dtype, device, media, folder, tokenizer) is
    checked before the model is loaded. `window`: the knockout window in layers (None:
    `knockout.default_window` of the model's depth, the anchors' 9 from 18 layers on)."""
    t0 = time.perf_counter()
    if not question.strip():
        raise ValueError("the question is empty")
    if not answer.strip():
        raise ValueError("the answer is empty")
    if window is not None and window < 1:
        raise ValueError(f"the knockout window must be at least 1 layer; got {window}")
    as_dtype(dtype)
    as_device(device)
    check_media(video, audio)
    folder = registry.folder(model_name)
    _, tokenizer = registry.inspect(model_name)  # an unsupported checkpoint is refused before loading
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json); copy them from the original checkpoint")
    target = answer_id(tokenizer, question, answer)

    model = registry.load(model_name, dtype, device)
    inputs = model.prepare(question, video=video, audio=audio)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tm = model.token_map(inputs)
    with torch.no_grad():
        probs = model(**inputs, logits_at="last")[0, -1].float().softmax(-1)
    top, p_answer = int(probs.argmax()), float(probs[target])
    predicted = model.tokenizer.decode([top])
    warning = None
    if top != target or p_answer < MIN_P:
        warning = (
            f"the model does not predict the answer {answer!r}: p = {p_answer:.2g} and its top prediction is "
            f"{predicted!r} (p = {float(probs[top]):.2g}); the knockout follows p({answer!r}), an answer the model does not give"
        )
        print(f"warning: {warning}", file=sys.stderr)
    res = knockout(model, inputs, [target], window=window, tm=tm, progress=True)
    mass = group_attention_mass(model, inputs, tm)

    out_dir = Path(out_dir)
    report = Report(f"information flow: {model_name}")
    if warning:
        report.text(f"Warning: {warning}.")
    report.text(f"question {question!r}; answer {answer!r} (first token id {target}); the model's first "
                f"token: {predicted!r}; p(answer) = {p_answer:.3f}; knockout window {res.settings['window']} "
                f"({res.settings['window_rule']}); "
                f"{time.perf_counter() - t0:.0f} s.")
    # one sample: its curve whether or not the model gives the answer (the warning above says so)
    fig = res.plot(correct_only=False, samples=False)
    ax = fig.axes[0]
    ax.set_title(f"{ax.get_title().splitlines()[0]}\none clip: its own values (n=1: no mean, no interval)", fontsize="small")
    report.heading("Attention knockout").figure(fig)
    report.text("Table: the values the figure draws, for this one clip (no mean, no interval): per edge and window "
                "centre, p(answer) plain and knocked out and their relative change (%), and the same for the model's own "
                "top token (rel_change_pred).")
    report.table(res.df[["edge", "layer", "window_start", "window_end", "p_orig", "p_blocked", "rel_change", "pred",
                         "rel_change_pred", "correct_blocked"]])
    report.heading("Token layout").pre(tm.describe())
    report.heading("Attention mass between token groups").figure(plot_attention_mass(mass))
    path = report.save(out_dir / "report.html")
    res.save(out_dir / "knockout.csv")
    print(res.df.groupby("edge").rel_change.min().round(1).to_string())
    print(f"report: {path.resolve()}")
    return path
