"""Programmatic dependent launch (PDL) for the small kernels of the decode path, on Hopper and newer.

A kernel launched with PDL may start while the kernel before it on the stream is still finishing: its
programs get scheduled early and block in `gdc_wait()` until the previous kernel has completed and its
writes are visible. That hides part of the launch latency between back-to-back small kernels
(RoPE + K/V write -> decode split -> decode merge), which at decode batch 1 is most of their cost.

Rules every kernel launched this way follows, so no ordering is lost:
- `gdc_wait()` comes before any load or store of global memory;
- `gdc_launch_dependents()` is only called after `gdc_wait()`, so a dependent never starts before
  every earlier kernel has completed.

Set RADIXFLEET_PDL=0 to launch every kernel the ordinary way.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """True where launches on `device` should use PDL: a CUDA GPU of compute capability >= 9.0, not
    Triton's interpreter, and not switched off with RADIXFLEET_PDL=0."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("RADIXFLEET_PDL", "1") == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())
