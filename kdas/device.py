"""Where tensors run, and how (autocast dtype, CUDA math settings)."""

from __future__ import annotations

import contextlib

import torch


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as a torch device string."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16; None (full precision) off CUDA. Even a CPU with
    AVX512-BF16 trains slower in bf16: on this project's 2-core machine (one thread), a
    lite0 epoch at 224 px ran at 6.7 images/s with this function trying CPU bf16, against
    10.1 in fp32; the bf16 backward took 78% of the step."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_for_training(device: torch.device) -> None:
    """CUDA: let cuDNN pick the fastest convolution for each input shape (fixed per scale
    in training) and run what stays in fp32 (the losses, an fp32 run) on TF32 tensor cores."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
