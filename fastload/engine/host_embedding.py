"""The frozen input embedding kept in pinned host memory that the GPU reads in place (CUDA only).

A forward reads one row of the (vocabulary x hidden) table per token: 32 MiB of Llama-3 8B's 1 GiB table at 4,096
tokens, once a step (the embedding sits outside the checkpointed layers). Page-locked host memory is addressable from
the GPU under unified virtual addressing, so the table moves there and the rows come over PCIe; the GPU keeps the
gigabyte. The parameter stays a CUDA tensor to torch: `model.device`, generation, the Trainer and every embedding
subclass (Gemma's scaled one) see the GPU and run as before. A plain nn.Embedding looks its rows up with fastload's
Triton gather (whole rows in wide loads: engine/triton/gather.py); subclasses with torch's kernel, slower over PCIe.

Not for a table that lm_head shares (tied: the head reads all of it every step), one that is trained or wrapped by
peft, or a distributed launch (each process would pin its own copy, and collectives would touch it). A table put
back on the GPU later (resize_token_embeddings, a dtype cast) leaves the lever off for it, and the report says so.
"""

from __future__ import annotations

import threading
import types
import weakref

import torch

from fastload._log import logger
from fastload.distributed import current_launch
from fastload.engine.triton.launch import kernel_probe, triton_runs_on
from fastload.errors import FastloadError
from fastload.load.devices import free_memory_bytes, resolve_device_map
from fastload.model_state import is_patched, mark_patched, unmark_patched

LEVER = "host_embedding"
HOST_HEADROOM_BYTES = 2 * 2**30  # left free in host memory beside the table
RESERVE_MIN_BYTES = 64 * 2**20  # smaller tables are pinned when the lever installs: a few milliseconds

_MAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # embedding module -> its host table's address
_DECLINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why the lever last declined


def pinned_bytes(nbytes: int) -> int:
    """What torch's pinned-memory allocator takes for `nbytes`: the next power of two (a 1.09 GB Qwen2.5-7B table
    pins 2 GiB)."""
    return 1 << max(nbytes - 1, 0).bit_length()


class _Reservation:
    """Pinned host bytes allocated on a thread while the weights load: pinning Llama-3 8B's 1 GiB table took the
    load 0.35 s longer when done after it (H100 host, 2026-12-07)."""

    def __init__(self, nbytes: int, device_index: int):
        self.nbytes, self.device_index, self.memory = nbytes, device_index, None
        self.thread = threading.Thread(target=self._pin, name="fastload-pin-embedding", daemon=True)
        self.thread.start()

    def _pin(self) -> None:
        try:
            torch.cuda.set_device(self.device_index)  # a new thread's CUDA calls would otherwise open device 0's
            self.memory = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        except Exception as e:  # noqa: BLE001 - a reservation never breaks a load: the lever pins when it installs
            logger.debug("input embedding: pinned memory not reserved during the load (%s: %s)", type(e).__name__, e)

    def take(self) -> torch.Tensor | None:
        self.thread.join()
        memory, self.memory = self.memory, None
        return memory


_RESERVED: list[_Reservation] = []


def reserve_host_table(config: dict | None, device_map) -> None:
    """Start pinning host memory for the input embedding a load is about to place on a GPU, when its config says
    the table is untied and large (install_host_embedding takes it; drop_host_reservations frees what was not)."""
    text = (config or {}).get("text_config") or config or {}
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    if (not isinstance(vocab, int) or not isinstance(hidden, int) or text.get("tie_word_embeddings") is not False
            or current_launch() is not None or not torch.cuda.is_available()):
        return
    try:
        placed = resolve_device_map(device_map).values()
    except FastloadError:  # the load says what is wrong with it
        return
    indices = {v if isinstance(v, int) else torch.device(v).index or 0 for v in placed
               if isinstance(v, int) or str(v).startswith("cuda")}
    nbytes = vocab * hidden * 2  # the 16-bit table a quantized load keeps
    if len(indices) == 1 and nbytes >= RESERVE_MIN_BYTES and \
            free_memory_bytes("cpu") >= pinned_bytes(nbytes) + HOST_HEADROOM_BYTES:
        _RESERVED.append(_Reservation(nbytes, indices.pop()))


def _reserved_memory(nbytes: int, device_index: int) -> torch.Tensor | None:
    for reservation in list(_RESERVED):
        if reservation.nbytes == nbytes and reservation.device_index == device_index:
            _RESERVED.remove(reservation)
            return reservation.take()
    return None


def _empty_host_cache() -> None:
    """Hand torch's cached, unused pinned blocks back to the system (torch keeps freed ones otherwise); blocks in
    use, and those a pending copy still reads, stay."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # absent from CPU builds
    if empty is not None:
        empty()


def drop_host_reservations() -> None:
    """Free pinned memory reserved for a table the lever did not take (the load failed, or the lever declined)."""
    if not _RESERVED:
        return
    while _RESERVED:
        _RESERVED.pop().take()
    _empty_host_cache()


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
    reserved = sum(pinned_bytes(r.nbytes) for r in _RESERVED if r.nbytes == nbytes)  # pinned for it already
    if free_memory_bytes("cpu") + reserved < pinned_bytes(nbytes) + HOST_HEADROOM_BYTES:
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
    # a forward already set on the instance (accelerate's device hook, another patch) is kept, with torch's lookup
    if (type(embedding).forward is torch.nn.Embedding.forward and "forward" not in embedding.__dict__
            and embedding.max_norm is None):
        embedding.forward = types.MethodType(_gathered_forward, embedding)
    mark_patched(model, embedding, LEVER)
    logger.debug("input embedding: %.2f GiB moved to pinned host memory, read in place by %s",
                 weight.numel() * weight.element_size() / 2**30, weight.device)
    return True


def _gathered_forward(self, input):
    """nn.Embedding's lookup through the wide-load gather, for int64 ids where Triton launches and a frozen table;
    torch's lookup otherwise, and inside a CUDA graph capture (the gather's one-time check synchronizes)."""
    if (self.weight.requires_grad or input.dtype != torch.int64 or not triton_runs_on(input)
            or torch.cuda.is_current_stream_capturing() or not _gather_runs(self.weight)):
        return torch.nn.Embedding.forward(self, input)
    from fastload.engine.triton.gather import gather_rows

    return gather_rows(self.weight, input)


def _gather_runs(table) -> bool:
    """Whether the gather compiles here and reads what torch's lookup reads, tried once on the table's first and last
    rows: a Triton that refuses it leaves torch's lookup, with one warning."""
    from fastload.engine.triton.gather import gather_rows

    def probe():
        ids = torch.tensor([0, table.shape[0] - 1], device=table.device)
        if not torch.equal(gather_rows(table, ids), torch.nn.functional.embedding(ids, table)):
            raise RuntimeError("the gathered rows differ from torch's lookup")

    return kernel_probe(("gather", table.dtype, str(table.device)), probe)


def host_mapped_copy(tensor: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """A copy of a CUDA tensor in pinned host memory, as a tensor on the same CUDA device (torch reads and writes
    it through the GPU's mapping), or None and why not (the pinned memory is then released)."""
    nbytes = tensor.numel() * tensor.element_size()
    reserved = None
    try:
        with torch.cuda.device(tensor.device):  # pinned memory is mapped for the device current when it is allocated
            reserved = _reserved_memory(nbytes, tensor.device.index or 0)
            host = (reserved.view(tensor.dtype).view(tensor.shape) if reserved is not None
                    else torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True))
            host.copy_(tensor)
            raw = torch.as_tensor(_HostArray(host, tensor.device), device=tensor.device)
        if raw.device == tensor.device and raw.data_ptr() == host.data_ptr():
            return raw.view(tensor.dtype).view(tensor.shape), None
        why = f"pinned host memory came back as a copy on {raw.device}"
    except (RuntimeError, TypeError, ValueError) as e:  # pinning refused, no unified addressing, no interface
        why = f"pinned host memory could not be allocated or mapped ({type(e).__name__}: {str(e).splitlines()[0]})"
    logger.debug("input embedding stays on the GPU: %s", why)
    reserved = host = raw = None  # noqa: F841 - released before the cache is emptied
    _empty_host_cache()
    return None, why
