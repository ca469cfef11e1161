"""Unimodal dominance labelling (the cross-modal-hub paper's sample selection, `kaistmm/crossmodal-hub`
`infer_with_prob.py` --modality av / a / v and `preprocess/step1/output2input_*.py`): run each sample
with both modalities, audio only (black frames) and video only (silence); a sample is video-dominant
when its audio-visual prediction equals the video-only one and differs from the audio-only one,
audio-dominant the reverse, and neither otherwise (both equal, or neither).

The prediction is the greedy answer token at the last prompt position (the hub compares the
generated words; for one-token answers, as the hub's single label letters, they are the same).

    labels = dominance(model, inputs, answers=gold_ids)     # DataFrame, one row per sample
    video_dominant = labels[labels.label == "video"].index  # what causal tracing corrupts with video
"""

from __future__ import annotations

import pandas as pd
import torch

from patching.engine import checks
from patching.engine.corrupt import zero_media
from patching.engine.experiment import Experiment, Report, StudySample

LABELS = ("video", "audio", "neither")


def dominance(model, inputs: dict, answers=None) -> pd.DataFrame:
    """One row per sample: `pred_av`, `pred_audio_only` (frames black), `pred_video_only` (waveform
    silent), `label` ("video", "audio" or "neither", see the module) and, with `answers` (one token id
    or word per sample, or one for all; words as `model.answer_tokens` reads them), `correct_av`. Three forwards of the batch; no sample is dropped.

        labels = dominance(model, inputs, answers=[answer])
        labels[["pred_av", "pred_audio_only", "pred_video_only", "label"]]
    """
    n = checks.batch_of(inputs)
    if answers is not None:
        answers = model.answer_tokens(answers, inputs)  # ids, or words read in each prompt's context
        if len(answers) not in (1, n):
            raise ValueError(f"{len(answers)} answer token ids for {n} samples: pass one per sample (or one for all)")
        checks.token_ids(model, answers.tolist(), "answer token id(s)")
    runs = {"av": inputs, "audio_only": zero_media(model, inputs, "video"), "video_only": zero_media(model, inputs, "audio")}
    preds = {}
    with torch.no_grad():
        for name, x in runs.items():
            preds[name] = model(**x, logits_at="last")[:, -1].argmax(-1).cpu()
    av, a, v = preds["av"], preds["audio_only"], preds["video_only"]
    label = ["video" if av[i] == v[i] and av[i] != a[i] else "audio" if av[i] == a[i] and av[i] != v[i] else "neither"
             for i in range(n)]
    df = pd.DataFrame(dict(sample=range(n), pred_av=av.tolist(), pred_audio_only=a.tolist(),
                           pred_video_only=v.tolist(), label=label)).set_index("sample", drop=False)
    if answers is not None:
        df["correct_av"] = (av == answers.expand(n)).tolist()
    return df


# ---- the record ---------------------------------------------------------------------------------
def label_of(x: StudySample) -> pd.DataFrame:
    """`dominance` of a study's sample (one row), or a row with `label` None and `absent` naming what
    it lacks when the sample has no audio or no video."""
    absent = [m for m in ("audio", "video") if not bool(x.tm.select(m).mask.any())]
    if absent:
        return pd.DataFrame([dict(sample=0, pred_av=None, pred_audio_only=None, pred_video_only=None, label=None,
                                  correct_av=None, absent="|".join(absent))])
    return dominance(x.model, x.inputs, answers=[x.answer]).reset_index(drop=True).assign(absent="")


def label_shares(df: pd.DataFrame) -> pd.DataFrame:
    """Dominance rows as one row per (sample, label) with `share` 1 for the sample's label and 0 for
    the others, so a mean is the share of samples with that label. Samples without a label (no
    audio or no video) are left out."""
    labelled = df[df["label"].notna()]
    return pd.concat([labelled.assign(share=(labelled["label"] == lab).astype(float), label=lab) for lab in LABELS],
                     ignore_index=True)


EXPERIMENT = Experiment(
    "dominance", dominance, by=("label",), value="share", label="share of samples", outcome="binary",
    run=lambda x, opts: label_of(x), cells=("label",), summary_rows=label_shares,
    report=Report("Unimodal dominance: share of samples per label", table="shares"),
    columns=("pred_av", "pred_audio_only", "pred_video_only", "label", "correct_av", "absent", "share"),
)
