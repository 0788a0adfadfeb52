"""Model size and compute: parameters and multiply-accumulates (torch's FLOP counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one: without this, a PVT's
# attention would be free on CPU and the figures would depend on the device.
_CUSTOM_FLOPS = {
    op: _sdpa_flops
    for op in [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)]
    if op is not None
}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass on a 1 x 3 x S x S input.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls and
    attention, the CPU attention kernel included; elementwise ops are free), MACs =
    FLOPs / 2. The model runs in eval mode
    under no_grad; its training mode is restored afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
