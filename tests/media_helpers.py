"""Small media written by the tests themselves (PyAV/numpy), and an offline tokenizer over the tiny
Omni test ids (tests/omni_helpers.py) that names its multimodal tokens as the HF processor expects."""

from __future__ import annotations

import numpy as np

from omni_helpers import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START, IMAGE, USER, VIDEO, VISION_BOS, VISION_EOS

# Qwen2.5-Omni's chat template (as in transformers' own processor tests)
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["system", "assistant", "\n", " ", "What", "makes", "the", "sound", "?", ":", "Clip", "1", "2", ".", "You",
         "are", "a", "helpful", "Which", "clip", "has", "dog", "Qwen", ",", "A", "B", "cat", "[UNK]"]
SPECIALS = {"<|AUDIO|>": AUDIO, "<|IMAGE|>": IMAGE, "<|VIDEO|>": VIDEO, "<|audio_bos|>": AUDIO_BOS, "<|audio_eos|>": AUDIO_EOS,
            "<|vision_bos|>": VISION_BOS, "<|vision_eos|>": VISION_EOS, "<|im_start|>": IM_START, "<|im_end|>": IM_END,
            "<|endoftext|>": 303}


def tiny_tokenizer():
    """A word-level fast tokenizer whose ids are the tiny config's (`user` is USER, `<|AUDIO|>` AUDIO...)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"user": USER} | SPECIALS
    used = set(vocab.values())
    vocab |= {f"<unused{i}>": i for i in range(320) if i not in used}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    names = dict(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>", vision_bos_token="<|vision_bos|>",
                 vision_eos_token="<|vision_eos|>", audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", extra_special_tokens=names)


def moving_frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """`[n, h, w, 3]` uint8: a coloured square moving across a changing background."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, h, w, 3), np.uint8)
    colour = rng.integers(60, 255, 3)
    for i in range(n):
        frames[i] = (i * 7) % 255
        x = (i * 3) % (w - 12)
        frames[i, 10:22, x : x + 12] = colour
    return frames


def sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_mp4(path, seconds: float = 3.0, fps: int = 10, with_audio: bool = True, audio_rate: int = 16000, seed: int = 0):
    """An H.264 mp4 with moving frames and (optionally) a 440 Hz AAC track."""
    import av

    frames = moving_frames(int(seconds * fps), seed=seed)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        as_ = c.add_stream("aac", rate=audio_rate, layout="mono") if with_audio else None
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if as_ is not None:
            wave = sine(seconds, audio_rate)
            step = 1024
            for i in range(0, len(wave), step):
                fr = av.AudioFrame.from_ndarray(wave[None, i : i + step].copy(), format="fltp", layout="mono")
                fr.sample_rate, fr.pts = audio_rate, i
                for pkt in as_.encode(fr):
                    c.mux(pkt)
            for pkt in as_.encode():
                c.mux(pkt)
    return path


def write_wav(path, seconds: float = 1.5, rate: int = 22050, freq: float = 440.0):
    import av

    wave = (sine(seconds, rate, freq) * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=rate, layout="mono")
        fr = av.AudioFrame.from_ndarray(wave[None], format="s16", layout="mono")
        fr.sample_rate = rate
        for pkt in s.encode(fr):
            c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path
