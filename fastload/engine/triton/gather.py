"""Rows of an embedding table gathered in wide loads: the host_embedding lever's lookup.

torch's embedding kernel copies one element per thread, which reaches host-resident rows over PCIe in 64-byte
requests: 9 ms of a 0.4 s Llama-3 8B step (4,096 rows of 8 KiB, H100, 2026-12-07). One program per row in 16-byte
loads asks for whole rows at once.
"""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import launch

BLOCK = 1024  # elements a loop step (4 warps: 8 per thread, 16 bytes of bf16)


def _kernels():
    from fastload.engine.triton import gather_kernels

    return gather_kernels


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for a frozen (rows x width) table; ids outside the table fail the step, as torch's lookup does
    (a device-side assertion, checked without waiting for the GPU)."""
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=ids.device)
    if flat.numel():
        low, high = torch.aminmax(flat)
        torch._assert_async((low >= 0) & (high < table.shape[0]), "embedding: a token id outside the vocabulary")
        launch(_kernels().gather_rows, (flat.numel(),), table, flat, out, table.shape[0], table.shape[1],
               BLOCK=BLOCK, num_warps=4)
    return out.view(*ids.shape, table.shape[1])
