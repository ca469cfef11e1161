"""The media one token saw, cut from the source file, for a page that shows tokens: a frame crop with the
token's merged patch located, an audio snippet around the token's seconds, both small enough to embed.

Where a merged patch lies in the source frame: a Qwen-style processor resizes the whole frame (no crop,
no padding) to `H' x W'`, multiples of `patch x merge`, and cuts it into a `grid_rows x grid_cols` grid of
merged patches, so merged patch `(r, c)` covers rows `[r H' / grid_rows, (r + 1) H' / grid_rows)` of the
resized frame, which are rows `[r H / grid_rows, (r + 1) H / grid_rows)` of the source frame (`H` its
height; the same for columns): the patch's box follows from the grid alone, whatever the patch size,
merge size and resize were.

    box = patch_box(720, 1280, row=3, col=10, grid_rows=15, grid_cols=26)     # (y0, y1, x0, x1) source px
    crop, inner = frame_crop(frame, box, context=1.0)                       # inner: the box in the crop, 0..1
    wave, start = audio_snippet(waveform, 2.40, 2.44, context=0.5)          # [samples] at 16 kHz, 1.90 s
"""

from __future__ import annotations

import io
import math
import wave as wavelib

import numpy as np

from hooked_av.inputs.media import SAMPLE_RATE


def patch_box(height: int, width: int, row: int, col: int, grid_rows: int, grid_cols: int) -> tuple[int, int, int, int]:
    """`(y0, y1, x0, x1)`: the source pixels (half-open, rounded to the nearest pixel edge) of merged patch
    `(row, col)` of a `grid_rows x grid_cols` merged grid laid over a `height x width` frame (the module
    says why the grid alone fixes it)."""
    if not (0 <= row < grid_rows and 0 <= col < grid_cols):
        raise ValueError(f"merged patch ({row}, {col}) is outside the {grid_rows} x {grid_cols} merged grid")
    if height < grid_rows or width < grid_cols:
        raise ValueError(f"a {height} x {width} px frame cannot hold a {grid_rows} x {grid_cols} merged grid")
    return (round(row * height / grid_rows), round((row + 1) * height / grid_rows),
            round(col * width / grid_cols), round((col + 1) * width / grid_cols))


def frame_crop(frame: np.ndarray, box: tuple[int, int, int, int], context: float = 1.0, max_side: int = 192):
    """`(crop uint8 [h, w, 3], inner)`: the part of `frame` around `box` (`patch_box`'s), widened by `context`
    box heights / widths on each side and clipped to the frame, downscaled (area filter) so that its longer
    side is at most `max_side` px; `inner` = `(top, left, height, width)` of the box inside the crop as
    fractions of the crop's height and width (exact whatever the scaling, for an outline drawn over it)."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3]; got {frame.dtype} {frame.shape}")
    if not (context >= 0 and math.isfinite(context)):
        raise ValueError(f"context must be a number of patch sizes >= 0, got {context!r}")
    y0, y1, x0, x1 = box
    h, w = frame.shape[:2]
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"box {box} is not inside the {h} x {w} frame")
    cy0, cy1 = max(0, math.floor(y0 - context * (y1 - y0))), min(h, math.ceil(y1 + context * (y1 - y0)))
    cx0, cx1 = max(0, math.floor(x0 - context * (x1 - x0))), min(w, math.ceil(x1 + context * (x1 - x0)))
    crop = frame[cy0:cy1, cx0:cx1]
    ch, cw = crop.shape[:2]
    scale = min(1.0, max_side / max(ch, cw))
    if scale < 1:
        crop = np.asarray(Image.fromarray(crop).resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BOX))
    return crop, ((y0 - cy0) / ch, (x0 - cx0) / cw, (y1 - y0) / ch, (x1 - x0) / cw)


def frames_at(path, seconds) -> list[np.ndarray]:
    """uint8 `[H, W, 3]` frames of the video file `path` at `seconds` (from its first frame): frame
    `round(t x rate)` of the decoded frames, as `media.load_video` counts them (the rate is the stream's
    average); decoded in one pass that stops at the last frame asked for. A time past the video's end
    (more than one frame) is refused: the file is not the one the store was harvested from."""
    import av

    from hooked_av.inputs.media import check_media_file

    check_media_file(path, "video")
    seconds = [float(t) for t in seconds]
    if any(not (t >= 0 and math.isfinite(t)) for t in seconds):
        raise ValueError(f"frame times must be seconds >= 0; got {seconds}")
    out: dict[int, np.ndarray] = {}
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate or 0)
        if not rate > 0:
            raise ValueError(f"{str(path)!r} states no frame rate; cannot find the frame at a time")
        want = [round(t * rate) for t in seconds]
        last = None
        for i, f in enumerate(c.decode(stream)):
            if i in want:
                out[i] = f.to_ndarray(format="rgb24")
            last = (i, f)
            if i >= max(want):
                break
    n = last[0] + 1 if last else 0
    late = [t for t, i in zip(seconds, want) if i >= n]
    if late and max(want) > n:
        raise ValueError(f"{str(path)!r} has {n} frames ({n / rate:.2f} s at {rate:g} fps); no frame at {max(late):.2f} s: "
                         "is it the file the store was harvested from?")
    for i in want:  # at most one frame past the end: the last frame
        out.setdefault(i, last[1].to_ndarray(format="rgb24"))
    return [out[i] for i in want]


def audio_snippet(waveform: np.ndarray, t_start: float, t_end: float, context: float = 0.5,
                  sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, float]:
    """`(samples, start)`: the part of `waveform` (float `[n]` at `sample_rate`) from `t_start - context` to
    `t_end + context` seconds, clipped to the audio; `start` is where it begins (seconds). A token that
    starts past the audio's end is refused (the file is not the harvested one)."""
    w = np.asarray(waveform, dtype=np.float32).reshape(-1)
    seconds = len(w) / sample_rate
    if not (0 <= t_start < t_end and math.isfinite(t_end)):
        raise ValueError(f"a token's span must be 0 <= t_start < t_end seconds; got {t_start}..{t_end}")
    if t_start >= seconds:
        raise ValueError(f"the token starts at {t_start:.3f} s but the audio lasts {seconds:.3f} s: is it the file the "
                         "store was harvested from?")
    a = max(0, math.floor((t_start - context) * sample_rate))
    b = min(len(w), math.ceil((t_end + context) * sample_rate))
    return w[a:b], a / sample_rate


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit PCM WAV file of float `samples` in [-1, 1] (clipped), as bytes."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wavelib.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
    """uint8 `[H, W, 3]` as a JPEG file's bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
