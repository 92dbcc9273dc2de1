"""The selections of the sparse codecs: which entries of gradient + residual are sent.

These are the hot path of AdaComp and Threshold. In eager PyTorch a selection is five or six
passes over the tensor (abs, bin max, add, abs, compare, nonzero), and on the CPU the compare
(a bool-output kernel) and `nonzero` are several times slower than a copy. On the CPU each
selection is therefore one numba-compiled loop that reads the tensor once, bin by bin while
the bin is in cache, and writes the chosen indices directly; on GPUs the torch ops are fast
and run as they are. Both give the same sorted int64 indices (tested against each other).

Compiled on first use and cached on disk (numba's `cache=True`, written atomically, next to this
file or where NUMBA_CACHE_DIR points), so only the first process on a machine pays the ~2 s
compile. They release the GIL, so Horovod's background thread keeps
communicating while a codec runs.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

FLOOR = float(torch.finfo(torch.float32).tiny)   # bounds are floored here: exact zeros are never sent


def reaching_bin_max(residue: torch.Tensor, grad: torch.Tensor, length: int) -> torch.Tensor:
    """AdaComp's rule: indices of the entries with |residue + grad| >= the largest |residue|
    of their bin of `length` entries (the last bin may be shorter). Both flat, fp32 residue."""
    if residue.device.type != "cpu":
        return _reaching_bin_max_torch(residue, grad, length)
    out = np.empty(residue.numel(), dtype=np.int64)
    count = _reaching_bin_max_cpu(residue.numpy(), _fp32_numpy(grad), length, np.float32(FLOOR), out)
    return torch.from_numpy(out[:count].copy())


def at_least(values: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """Threshold's rule: indices of the entries with |values| >= bound (> 0). Flat fp32."""
    if values.device.type != "cpu":
        return (values.abs() >= bound).nonzero().squeeze(1)
    out = np.empty(values.numel(), dtype=np.int64)
    count = _at_least_cpu(values.numpy(), np.float32(bound), out)
    return torch.from_numpy(out[:count].copy())


def _fp32_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).to(torch.float32).numpy()


def _reaching_bin_max_torch(residue: torch.Tensor, grad: torch.Tensor, length: int) -> torch.Tensor:
    """The same rule as torch ops (GPUs, and the reference the CPU kernel is tested against)."""
    numel = residue.numel()
    scratch = residue.new_zeros(-(-numel // length) * length)          # whole bins, zero-padded
    bins = scratch.view(-1, length)
    torch.abs(residue, out=scratch[:numel])
    bin_max = bins.amax(dim=1, keepdim=True).clamp_min_(FLOOR)         # max |G| per bin
    torch.add(residue, grad.reshape(-1).to(residue.dtype), out=scratch[:numel])
    return (bins.abs_() >= bin_max).view(-1).nonzero().squeeze(1)      # |H| >= max |G|


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _reaching_bin_max_cpu(residue: np.ndarray, grad: np.ndarray, length: int, floor: np.float32,
                          out: np.ndarray) -> int:
    count = 0
    for start in range(0, residue.size, length):
        bin_residue, bin_grad = residue[start:start + length], grad[start:start + length]
        bin_max = floor        # (indexing slices from 0 lets LLVM drop the negative-index checks: ~1.6× faster)
        for value in bin_residue:
            bin_max = max(bin_max, abs(value))
        for i in range(bin_residue.size):
            if abs(bin_residue[i] + bin_grad[i]) >= bin_max:
                out[count] = start + i
                count += 1
    return count


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _at_least_cpu(values: np.ndarray, bound: np.float32, out: np.ndarray) -> int:
    count = 0
    for i in range(values.size):
        if abs(values[i]) >= bound:
            out[count] = i
            count += 1
    return count
