"""The frozen input embedding kept in pinned host memory that the GPU reads in place (CUDA only).

A forward reads one row of the (vocabulary x hidden) table per token: 32 MiB of Llama-3 8B's 1 GiB table at 4,096
tokens, once a step (the embedding sits outside the checkpointed layers). Page-locked host memory is addressable from
the GPU under unified virtual addressing, so the table moves there and the rows come over PCIe; the GPU keeps the
gigabyte. The parameter stays a CUDA tensor to torch: `model.device`, generation, the Trainer and every embedding
subclass (Gemma's scaled one) see the GPU and run as before, with torch's own lookup: 0.70 ms for Llama-3 8B's
4,096 rows against 0.04 from GPU memory, of a 0.39 s step (H100; a Triton gather in 16-byte loads took 0.87 ms and
was dropped: benchmarks/host_embedding_lookup.py, results 2026-12-08-h100). The table is pinned when the lever
installs, after the load: 0.35 s more for 8B's 1 GiB (H100, 2026-12-07). Pinning it on a thread while the weights
loaded made the load 1.0 s longer instead (the next day, one run each), so that was dropped too.

Not for a table that lm_head shares (tied: the head reads all of it every step), one that is trained or wrapped by
peft, or a distributed launch (each process would pin its own copy, and collectives would touch it). A table put
back on the GPU later (resize_token_embeddings, a dtype cast) leaves the lever off for it, and the report says so.
"""

from __future__ import annotations

import weakref

import torch

from fastload._log import logger
from fastload.distributed import current_launch
from fastload.load.devices import free_memory_bytes
from fastload.model_state import is_patched, mark_patched, unmark_patched

LEVER = "host_embedding"
HOST_HEADROOM_BYTES = 2 * 2**30  # left free in host memory beside the table

_MAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # embedding module -> its host table's address
_DECLINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why the lever last declined


def pinned_bytes(nbytes: int) -> int:
    """What torch's pinned-memory allocator takes for `nbytes`: the next power of two (a 1.09 GB Qwen2.5-7B table
    pins 2 GiB)."""
    return 1 << max(nbytes - 1, 0).bit_length()


def _empty_host_cache() -> None:
    """Hand torch's cached, unused pinned blocks back to the system (torch keeps freed ones otherwise); blocks in
    use, and those a pending copy still reads, stay."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # absent from CPU builds
    if empty is not None:
        empty()


class _HostArray:
    """A CUDA array interface over pinned host memory: what torch wraps as a CUDA tensor without copying; it holds
    the host tensor, and the wrapping tensor holds it."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device
        self.__cuda_array_interface__ = {"shape": (host.numel() * host.element_size(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 3, "stream": None}

    def __del__(self):
        # the last CUDA view is gone, but a kernel queued through it may still read the rows (transformers' resize
        # copies them, then drops the table): the memory returns to torch's allocator only once the GPU is past it
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing runs any more
            pass


def _input_embedding(model):
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # transformers cannot say which module it is
        return None


def host_embedding_blocker(model) -> str | None:
    """Why the model's input embedding stays where it is, or None when it can move to pinned host memory."""
    embedding = _input_embedding(model)
    if embedding is None:
        return f"{type(model).__name__} does not say which module is its input embedding"
    if not isinstance(embedding, torch.nn.Embedding):
        if hasattr(embedding, "base_layer") or hasattr(embedding, "original_module"):
            return "peft wraps the input embedding (LoRA or modules_to_save on it)"
        return f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding"
    weight = embedding.weight
    if weight.requires_grad:
        return "the input embedding is trained"
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight.data_ptr() == weight.data_ptr():
        return "the input embedding is tied to lm_head, which reads all of it every step"
    if not weight.is_cuda:
        return "the input embedding is not on a GPU"
    nbytes = weight.numel() * weight.element_size()
    if weight.untyped_storage().nbytes() > nbytes:
        return ("the table shares its GPU memory with other tensors (small ones are read together at load): moving "
                "it would free none")
    if current_launch() is not None:
        return "a distributed launch: each process would pin its own copy"
    if free_memory_bytes("cpu") < pinned_bytes(nbytes) + HOST_HEADROOM_BYTES:
        return "too little free host memory for the table"
    return None


def host_embedding_active(model) -> bool:
    """Whether the model's input embedding reads its table from pinned host memory now."""
    embedding = _input_embedding(model)
    address = _MAPPED.get(embedding) if embedding is not None else None
    return address is not None and getattr(embedding, "weight", None) is not None \
        and embedding.weight.data_ptr() == address


def declined_reason(model) -> str | None:
    """Why install_host_embedding last left this model's table on the GPU, if it did."""
    return _DECLINED.get(model)


def install_host_embedding(model) -> bool:
    """Move this model's frozen input embedding table to pinned host memory, read in place by the GPU; True when
    the model's table lives there (now or from an earlier call)."""
    embedding = _input_embedding(model)
    if host_embedding_active(model):
        return True
    if embedding is not None and is_patched(model, embedding, LEVER):  # the table went back to the GPU since
        unmark_patched(model, embedding, LEVER)
    why = host_embedding_blocker(model)
    if why is None:
        weight = embedding.weight
        mapped, why = host_mapped_copy(weight.detach())
    if why is not None:
        _DECLINED[model] = why
        return False
    _DECLINED.pop(model, None)
    embedding.weight = torch.nn.Parameter(mapped, requires_grad=False)
    _MAPPED[embedding] = mapped.data_ptr()
    mark_patched(model, embedding, LEVER)
    logger.debug("input embedding: %.2f GiB moved to pinned host memory, read in place by %s",
                 weight.numel() * weight.element_size() / 2**30, weight.device)
    return True


def host_mapped_copy(tensor: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """A copy of a CUDA tensor in pinned host memory, as a tensor on the same CUDA device (torch reads and writes
    it through the GPU's mapping), or None and why not (the pinned memory is then released)."""
    try:
        with torch.cuda.device(tensor.device):  # pinned memory is mapped for the device current when it is allocated
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor)
            raw = torch.as_tensor(_HostArray(host, tensor.device), device=tensor.device)
        if raw.device == tensor.device and raw.data_ptr() == host.data_ptr():
            return raw.view(tensor.dtype).view(tensor.shape), None
        why = f"pinned host memory came back as a copy on {raw.device}"
    except (RuntimeError, TypeError, ValueError) as e:  # pinning refused, no unified addressing, no interface
        why = f"pinned host memory could not be allocated or mapped ({type(e).__name__}: {str(e).splitlines()[0]})"
    logger.debug("input embedding stays on the GPU: %s", why)
    host = raw = None  # noqa: F841 - released before the cache is emptied
    _empty_host_cache()
    return None, why
