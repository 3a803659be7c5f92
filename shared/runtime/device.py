"""The device a stage runs on (:func:`resolve_device`) and its numeric precision: which autocast
dtype it runs in, whether a GradScaler guards it, and how that is said to the user (one rule for
train, evaluate, refine and the benches).

Autocast computes matrix products and convolutions in the 16-bit dtype and keeps reductions,
norms, softmax and losses in float32 (torch's autocast op lists). boxrefine's own code adds two
rules: what leaves a model (mask logits, IoU predictions, refined boxes, box deltas) is float32,
and box maths and losses run outside autocast, in float32.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

from boxrefine.shared.errors import DeviceError

# Why these settings are slow on a CPU: docs/architecture.md, "Precision", has the figures.
CPU_FLOAT16_NOTE = ("float16 on a CPU has no fast kernels (measured 9-30x slower than float32); "
                    "use bfloat16 on a CPU, float16 on a GPU")
NO_NATIVE_BF16_NOTE = ("this CPU has no native bfloat16 (AVX512-BF16/AMX), where bfloat16 autocast measured "
                       "~10x slower")


class Precision(NamedTuple):
    """``dtype``: the autocast dtype, None = float32 without autocast; ``scaler``: a GradScaler guards
    the float16 gradients; ``why``: one line for the log; ``requested``: whether the config asked for
    AMP (so a float32 run can say that AMP could not run rather than that it was off)."""

    dtype: torch.dtype | None
    scaler: bool
    why: str
    requested: bool = False

    @property
    def label(self) -> str:
        """What ran, for tables and reports: never "AMP" for a float32 run."""
        if self.dtype is not None:
            return f"{dtype_name(self.dtype)} autocast" + (" + GradScaler" if self.scaler else "")
        return "float32 (no AMP on this CPU)" if self.requested else "float32 (AMP off)"


def dtype_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available, else cpu. ``auto`` and a bare ``cuda`` are the rank's own GPU under
    torchrun (``cuda:$LOCAL_RANK``); ``cuda:N`` is GPU N wherever it runs."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    rank_gpu = name == "cuda" and "LOCAL_RANK" in os.environ
    dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if rank_gpu else name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"model.device is {name!r} but CUDA is not available on this machine")
    return dev


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 autocast is emulated and much slower on CPU (measured on
    an AVX2-only CPU: the HQ decoder 10x slower, the refiner 7x slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers moved: assume no
        return False


def amp_setting(amp: str | bool, amp_dtype: str, device: torch.device) -> Precision:
    """Resolve ``train.amp`` / ``train.amp_dtype`` for ``device``.

    auto: on for CUDA (bf16 where supported, else fp16), off on CPU. true: also on CPU as bf16
    autocast, but only where the CPU has native bf16, unless amp_dtype names a dtype explicitly.
    false: float32 everywhere. float16 always trains with a GradScaler (CUDA or CPU)."""
    on = (device.type == "cuda") if amp == "auto" else bool(amp)
    requested = amp is True
    if not on:
        return Precision(None, False, "amp off", requested)
    if device.type == "cuda":
        if amp_dtype == "float16" or (amp_dtype == "auto" and not torch.cuda.is_bf16_supported()):
            return Precision(torch.float16, True, "CUDA float16 autocast + GradScaler", requested)
        return Precision(torch.bfloat16, False, "CUDA bfloat16 autocast", requested)
    if amp_dtype == "float16":
        return Precision(torch.float16, True, f"CPU float16 autocast + GradScaler (as asked; {CPU_FLOAT16_NOTE})",
                         requested)
    if amp_dtype == "bfloat16":
        slow = "" if cpu_has_native_bf16() else f" (as asked; {NO_NATIVE_BF16_NOTE})"
        return Precision(torch.bfloat16, False, f"CPU bfloat16 autocast{slow}", requested)
    if cpu_has_native_bf16():
        return Precision(torch.bfloat16, False, "CPU bfloat16 autocast", requested)
    return Precision(None, False, f"amp requested, but {NO_NATIVE_BF16_NOTE}: running float32 "
                     "(set train.amp_dtype: bfloat16 to force it)", requested)


def inference_precision(amp: str | bool, amp_dtype: str, device: torch.device) -> Precision:
    """Evaluate's and refine's precision: training's rule (:func:`amp_setting`) without the GradScaler
    (nothing is trained)."""
    p = amp_setting(amp, amp_dtype, device)
    return p._replace(scaler=False, why=p.why.replace(" + GradScaler", ""))


def encoder_precision_note(precision: str, device: torch.device) -> str | None:
    """A warning for an ``extract.encoder_precision`` that runs slowly on ``device``, else None."""
    if device.type != "cpu":
        return None
    if precision == "float16":
        return f"extract.encoder_precision float16: {CPU_FLOAT16_NOTE}"
    if precision == "bfloat16" and not cpu_has_native_bf16():
        return f"extract.encoder_precision bfloat16: {NO_NATIVE_BF16_NOTE}"
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype`` on ``device``'s type; nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
