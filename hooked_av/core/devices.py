"""Devices and dtypes as a user names them, checked: the one home of `as_device` / `as_dtype`, below both
`checkpoint` (loading) and `placement` (device maps), so neither imports the other for them."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}


def as_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from one or its name ("bfloat16", "bf16", "torch.bfloat16"); None
    (keep the checkpoint's) stays None.

        as_dtype("bf16")  # torch.bfloat16
    """
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"dtype {dtype!r} is not a floating dtype to load weights in; pass a torch dtype such as torch.bfloat16 "
        f"or one of the names {sorted(DTYPES)}"
    )


def as_device(device) -> torch.device:
    """`device` (None: the CPU) as a `torch.device` that exists on this machine.

        as_device(None)  # device(type='cpu')
    """
    try:
        d = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device ({e}); use e.g. 'cpu', 'cuda', 'cuda:0' or 'mps'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine; use device='cpu'")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available on this machine; use device='cpu'")
    return d
