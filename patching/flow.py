"""`hooked-av flow`: the demo's knockout analysis on any supported model and one clip.

    hooked-av flow --model Qwen/Qwen2.5-Omni-7B --video clip.mp4 --question "What instrument?" --answer Piano

Loads the model (Qwen2.5-Omni or video-SALMONN 2+, chosen from its config.json; "toy" for the
embedded one), builds the inputs with `model.prepare`, runs the six-edge knockout sweep on the
answer's first token and writes a report with the plot, the token layout and the attention mass.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hooked_av.viz import Report, group_attention_mass, plot_attention_mass
from patching.knockout import knockout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_any(name_or_path: str, dtype: torch.dtype = torch.float32, device=None):
    """A supported model from a hub id, a local folder or "toy", by its configuration's family."""
    from hooked_av import HookedQwen2_5Omni, HookedVideoSALMONN2
    from hooked_av.models import checkpoint

    if name_or_path == "toy":
        return HookedQwen2_5Omni.from_pretrained("toy", dtype=dtype, device=device)
    config = checkpoint.read_config(checkpoint.resolve(name_or_path))
    if str(config.get("model_type", "")).startswith("qwen2_5_omni"):
        return HookedQwen2_5Omni.from_pretrained(name_or_path, dtype=dtype, device=device)
    if "qformer_config" in (config.get("audio_config") or {}):
        return HookedVideoSALMONN2.from_pretrained(name_or_path, dtype=dtype, device=device)
    raise ValueError(
        f"{name_or_path}: model_type {config.get('model_type')!r} is neither Qwen2.5-Omni nor video-SALMONN 2+ "
        "(an audio_config with a qformer_config)"
    )


def answer_token(model, answer: str) -> int:
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer attached; load it from a folder that holds one")
    ids = model.tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    return ids[0]


def run_flow(model_name: str, video: str | None, question: str, answer: str, audio: str | None = None,
             window: int = 9, out_dir: str | Path = "runs/flow", dtype: str = "float32", device: str | None = None) -> Path:
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not question.strip():
        raise ValueError("the question is empty")
    model = load_any(model_name, DTYPES[dtype], device)
    inputs = model.prepare(question, video=video, audio=audio)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    tm = model.token_map(inputs)
    target = answer_token(model, answer)
    with torch.no_grad():
        logits = model(**inputs)[0, -1]
    predicted = model.tokenizer.decode([int(logits.argmax())])
    window = min(window, model.cfg.n_layers)
    res = knockout(model, inputs, [target], window=window, tm=tm, progress=True)
    mass = group_attention_mass(model, inputs, tm)

    out_dir = Path(out_dir)
    report = Report(f"information flow: {model_name}")
    report.text(f"question {question!r}; answer {answer!r} (first token id {target}); the model's first "
                f"token: {predicted!r}; p(answer) = {float(logits.float().softmax(-1)[target]):.3f}; "
                f"knockout window {window}; {time.perf_counter() - t0:.0f} s.")
    report.heading("Attention knockout").figure(res.plot().figure).table(res.df)
    report.heading("Token layout").pre(tm.describe())
    report.heading("Attention mass between token groups").figure(plot_attention_mass(mass))
    path = report.save(out_dir / "report.html")
    res.save(out_dir / "knockout.csv")
    print(res.df.groupby("edge").rel_change.min().round(1).to_string())
    print(f"report: {path.resolve()}")
    return path
