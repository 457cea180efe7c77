"""Checkpoint tensors read onto a GPU through pinned host buffers, each reader on its own CUDA stream.

safetensors' `safe_open(device="cuda")` maps the file and copies each tensor from pageable memory: one page fault per
4 KiB of the mapping, then a blocking copy through the driver's staging buffers, all on the one default stream that
every reader thread and the quantization share (4.8 GB/s on an H200 host; each reader waits for the others' copies).
Here a reader `pread`s a tensor's bytes, chunk by chunk, into two pinned buffers of its own (no page faults, the GIL
released) and copies each chunk to the device asynchronously on its own stream while it reads the next one. The
consumer waits on the tensor's event on its own stream, never on the host. The bytes are the file's, so the tensor
is the one safe_open gives, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK_BYTES = 16 << 20  # one pinned buffer; a reader holds two (8 readers: 256 MiB pinned while a load runs)
SMALL_BYTES = 1 << 20  # tensors up to this size are read together with their neighbours (runs_of)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes are: absolute offsets in its file, and what they hold."""

    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def data_start(file: Path) -> int:
    """The offset of a safetensors file's first tensor byte (its 8-byte length and its header before it)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def span_of(meta: dict, start: int) -> Span | None:
    """The Span of one header entry in a file whose data begins at `start`; None for a dtype read elsewhere."""
    dtype = DTYPES.get(meta["dtype"])
    if dtype is None:
        return None
    begin, end = meta["data_offsets"]
    return Span(start + begin, start + end, dtype, tuple(meta["shape"]))


class Staging:
    """One reader's two host buffers (pinned for a GPU) and its stream: one chunk is read into a buffer while the
    other buffer's copy to the device runs."""

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
        self.device = device
        on_gpu = device.type == "cuda"
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
        self.copied = [None, None]  # per buffer: the event its last copy recorded (reused only once it has run)
        self.stream = torch.cuda.Stream(device) if on_gpu else None
        self.turn = 0

    def read(self, fd: int, spans: list[Span]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """The tensors at `spans` (neighbours in the open file `fd`: one read for all, see runs_of) on the device,
        and the event after which they are there (None on the CPU, where they are there on return)."""
        first, size = spans[0].start, spans[-1].end - spans[0].start
        dest = torch.empty(size, dtype=torch.uint8, device=self.device)
        # a tensor whose bytes are not aligned for its dtype in dest gets its own (aligned) memory, allocated here,
        # on the consumer's stream like dest, before the wait below
        aligned = [None if (dest.data_ptr() + s.start - first) % s.dtype.itemsize == 0
                   else torch.empty(s.end - s.start, dtype=torch.uint8, device=self.device) for s in spans]
        if self.stream is not None:
            # dest's memory may still be read by kernels queued on the stream that freed it (the current one)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            # and is written on this stream: freed before the consumer waited for it (a view dropped, an error),
            # the allocator must not hand it out again until these copies have run
            for memory in [dest, *(own for own in aligned if own is not None)]:
                memory.record_stream(self.stream)
        done = 0
        while done < size:
            n = min(size - done, self.buffers[0].numel())
            buffer = self._free_buffer()[:n]
            _pread_exactly(fd, buffer, first + done)
            with self._on_stream():
                dest[done:done + n].copy_(buffer, non_blocking=self.stream is not None)
                if self.stream is not None:
                    self.copied[self.turn] = torch.cuda.Event()
                    self.copied[self.turn].record(self.stream)
            done += n
        with self._on_stream():
            tensors = []
            for s, own in zip(spans, aligned):
                raw = dest[s.start - first:s.end - first]
                if own is not None:
                    raw = own.copy_(raw)
                tensors.append(raw.view(s.dtype).reshape(s.shape))
            arrived = None
            if self.stream is not None:
                arrived = torch.cuda.Event()
                arrived.record(self.stream)
        return tensors, arrived

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _free_buffer(self) -> torch.Tensor:
        self.turn = 1 - self.turn
        pending = self.copied[self.turn]
        if pending is not None:
            pending.synchronize()  # its previous chunk is still on its way to the device
        return self.buffers[self.turn]

    def finish(self) -> None:
        """Wait until every copy this reader queued has run (its buffers may then be freed or reused)."""
        if self.stream is not None:
            self.stream.synchronize()


def runs_of(names: list[str], spans: dict[str, Span], small: int = SMALL_BYTES, most: int = CHUNK_BYTES):
    """`names` (in file order) as runs read together: each small tensor joins its small neighbours that follow it
    in the file without a gap (a stored 4-bit weight's absmax, quantization map and nested statistics are six of
    them), so a thousand tiny tensors are not a thousand reads, copies and events."""
    run: list[str] = []
    for name in names:
        span = spans[name]
        size = span.end - span.start
        if run and (size > small or span.start != spans[run[-1]].end or span.end - spans[run[0]].start > most):
            yield run
            run = []
        run.append(name)
        if size > small:
            yield run
            run = []
    if run:
        yield run


def _pread_exactly(fd: int, buffer: torch.Tensor, offset: int) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"the file ended {len(view) - got} bytes before the tensor did (truncated while read?)")
        got += n
