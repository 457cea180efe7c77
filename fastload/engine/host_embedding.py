"""The frozen input embedding kept in pinned host memory that the GPU reads in place (CUDA only).

A forward reads one row of the (vocabulary x hidden) table per token: 32 MiB of Llama-3 8B's 1 GiB table at 4,096
tokens, once a step (the embedding sits outside the checkpointed layers). Page-locked host memory is addressable from
the GPU under unified virtual addressing, so the table moves there and the rows come over PCIe; the GPU keeps the
gigabyte. The parameter stays a CUDA tensor to torch: `model.device`, generation, the Trainer and every embedding
subclass (Gemma's scaled one) see the GPU and run as before. A plain nn.Embedding looks its rows up with fastload's
Triton gather (whole rows in wide loads: engine/triton/gather.py); subclasses with torch's kernel, slower over PCIe.

Not for a table that lm_head shares (tied: the head reads all of it every step), one that is trained, or a
distributed launch (each process would pin its own copy, and collectives would touch it).
"""

from __future__ import annotations

import types

import torch

from fastload._log import logger
from fastload.distributed import current_launch
from fastload.engine.triton.launch import triton_runs_on
from fastload.load.devices import free_memory_bytes
from fastload.model_state import is_patched, mark_patched

LEVER = "host_embedding"
HOST_HEADROOM_BYTES = 2 * 2**30  # left free in host memory beside the table


class _HostArray:
    """A CUDA array interface over pinned host memory: what torch wraps as a CUDA tensor without copying; it holds
    the host tensor, and the wrapping tensor holds it."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 3, "stream": None}


def host_embedding_blocker(model) -> str | None:
    """Why the model's input embedding stays where it is, or None when it can move to pinned host memory."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        return (f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding (peft adapts it: LoRA or "
                "modules_to_save on it)")
    weight = embedding.weight
    if weight.requires_grad:
        return "the input embedding is trained"
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight.data_ptr() == weight.data_ptr():
        return "the input embedding is tied to lm_head, which reads all of it every step"
    if not weight.is_cuda:
        return "the input embedding is not on a GPU"
    if weight.untyped_storage().nbytes() > weight.numel() * weight.element_size():
        return ("the table shares its GPU memory with other tensors (small ones are read together at load): moving "
                "it would free none")
    if current_launch() is not None:
        return "a distributed launch: each process would pin its own copy"
    if free_memory_bytes("cpu") < weight.numel() * weight.element_size() + HOST_HEADROOM_BYTES:
        return "too little free host memory for the table"
    return None


def install_host_embedding(model) -> bool:
    """Move this model's frozen input embedding table to pinned host memory, read in place by the GPU; True when
    the model's table lives there (now or from an earlier call)."""
    embedding = model.get_input_embeddings()
    if is_patched(model, embedding, LEVER):
        return True
    if host_embedding_blocker(model) is not None:
        return False
    weight = embedding.weight
    mapped = host_mapped_copy(weight.detach())
    if mapped is None:
        return False
    embedding.weight = torch.nn.Parameter(mapped, requires_grad=False)
    if type(embedding).forward is torch.nn.Embedding.forward and embedding.max_norm is None:
        embedding.forward = types.MethodType(_gathered_forward, embedding)
    mark_patched(model, embedding, LEVER)
    logger.debug("input embedding: %.2f GiB moved to pinned host memory, read in place by %s",
                 weight.numel() * weight.element_size() / 2**30, weight.device)
    return True


def _gathered_forward(self, input):
    """nn.Embedding's lookup through the wide-load gather, while the table stays frozen and the ids sit where
    Triton launches."""
    if self.weight.requires_grad or not triton_runs_on(input):
        return torch.nn.Embedding.forward(self, input)
    from fastload.engine.triton.gather import gather_rows

    return gather_rows(self.weight, input)


def host_mapped_copy(tensor: torch.Tensor) -> torch.Tensor | None:
    """A copy of a CUDA tensor in pinned host memory, as a tensor on the same CUDA device (torch reads and writes
    it through the GPU's mapping); None where this torch and driver do not give one."""
    with torch.cuda.device(tensor.device):  # pinned memory is mapped for the device current when it is allocated
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor)
        try:
            raw = torch.as_tensor(_HostArray(host), device=tensor.device)
        except (RuntimeError, TypeError, ValueError) as e:  # no unified addressing, or no such interface in torch
            logger.debug("input embedding stays on the GPU: pinned memory not addressable from %s (%s)",
                         tensor.device, e)
            return None
    if raw.device != tensor.device or raw.data_ptr() != host.data_ptr():  # copied, or mapped for another GPU
        logger.debug("input embedding stays on the GPU: pinned memory came back as a copy or on %s", raw.device)
        return None
    return raw.view(tensor.dtype).view(tensor.shape)
