"""Tensors read through a reader's staging buffers (fastload.load.pinned_reads) are the file's tensors, bit for bit,
whatever the chunk size; a load that fails part-way leaves no reader thread behind."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastload.load import fast_4bit
from fastload.load.pinned_reads import Staging, data_start, runs_of, span_of
from fastload.sources.checkpoint_files import read_safetensors_header


@pytest.fixture
def mixed_file(tmp_path):
    """One safetensors file with every common dtype, odd sizes, an empty tensor and a scalar."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(37, 129, generator=g).to(torch.bfloat16),
        "f32": torch.randn(1000, generator=g),
        "f16": torch.randn(3, 5, 7, generator=g).half(),
        "u8": torch.randint(0, 256, (4099,), generator=g, dtype=torch.uint8),
        "i64": torch.randint(-9, 9, (11,), generator=g),
        "bool": torch.rand(13, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path


def staged_reads(path, device, chunk_bytes, small):
    """Every tensor of `path` read through one Staging, in runs of neighbours (runs_of): name -> (tensor, event)."""
    header = read_safetensors_header(path)
    start = data_start(path)
    spans = {name: span_of(meta, start) for name, meta in header.items() if name != "__metadata__"}
    names = sorted(spans, key=lambda n: spans[n].start)
    staging = Staging(torch.device(device), chunk_bytes=chunk_bytes)
    fd = os.open(path, os.O_RDONLY)
    read = {}
    try:
        for run in runs_of(names, spans, small=small, most=max(chunk_bytes, 64)):
            tensors, arrived = staging.read(fd, [spans[n] for n in run])
            read.update({name: (tensor, arrived) for name, tensor in zip(run, tensors)})
    finally:
        staging.finish()
        os.close(fd)
    return read


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("small", [0, 100, 1 << 20])
def test_a_staged_read_is_the_tensor_safetensors_reads(mixed_file, chunk_bytes, small):
    read = staged_reads(mixed_file, "cpu", chunk_bytes, small)
    with safe_open(str(mixed_file), framework="pt") as reference:
        assert set(read) == set(reference.keys())
        for name, (tensor, arrived) in read.items():
            expected = reference.get_tensor(name)
            assert arrived is None
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
            assert torch.equal(tensor, expected), name


def test_tensors_not_aligned_for_their_dtype_in_the_file_are_read_right(tmp_path):
    """fastload's own store files keep the state dict's order, so a 4-byte tensor can follow a 13-byte one."""
    from fastload.load.background_store import write_safetensors

    tensors = {"state": torch.arange(13, dtype=torch.uint8), "absmax": torch.linspace(0, 1, 5),
               "map": torch.arange(3, dtype=torch.bfloat16), "nested": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "unaligned.safetensors"
    write_safetensors(path, tensors)
    read = staged_reads(path, "cpu", chunk_bytes=1 << 20, small=1 << 20)
    assert all(torch.equal(read[name][0], t) for name, t in tensors.items())


def test_small_neighbours_are_read_together_and_large_tensors_alone(mixed_file):
    header = read_safetensors_header(mixed_file)
    spans = {n: span_of(m, 0) for n, m in header.items() if n != "__metadata__"}
    names = sorted(spans, key=lambda n: spans[n].start)
    runs = list(runs_of(names, spans, small=100, most=1 << 20))
    assert [n for run in runs for n in run] == names  # every tensor once, in file order
    for run in runs:
        sizes = [spans[n].end - spans[n].start for n in run]
        assert len(run) == 1 or max(sizes) <= 100, run
    assert max(len(run) for run in runs) > 1  # the file has small neighbours: they share a read


def test_a_read_past_the_end_of_a_truncated_file_says_so(mixed_file):
    header = read_safetensors_header(mixed_file)
    span = span_of(header["f32"], data_start(mixed_file))
    os.truncate(mixed_file, span.start + 10)
    fd = os.open(mixed_file, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ended .* bytes before the tensor"):
            Staging(torch.device("cpu"), chunk_bytes=64).read(fd, [span])
    finally:
        os.close(fd)


def test_a_load_that_fails_part_way_leaves_no_reader_behind(tiny_llama, monkeypatch):
    """The readers stop at their next tensor instead of waiting for ever on the full queue (holding the file and,
    on a GPU, their pinned buffers)."""
    from fastload import FastModel

    calls = []

    def failing_place(*args, **kwargs):
        calls.append(args[1])
        raise RuntimeError("placing failed")

    monkeypatch.setattr(fast_4bit, "READ_AHEAD", 1)
    monkeypatch.setattr(fast_4bit, "place", failing_place)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    with pytest.raises(Exception):  # noqa: B017 - whichever error the facade wraps it in
        FastModel.from_pretrained(tiny_llama, lora=None, engine=False, gradient_checkpointing=False)
    assert calls, "the direct load was not taken"
    readers = [t for t in threading.enumerate() if t.name.startswith("fastload-read-")]
    assert not readers, f"reader threads still alive after the load failed: {readers}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
@pytest.mark.parametrize("chunk_bytes", [7, 4096])
def test_a_staged_read_onto_the_gpu_is_the_tensor_safetensors_reads(mixed_file, chunk_bytes):
    read = staged_reads(mixed_file, "cuda", chunk_bytes, small=100)
    with safe_open(str(mixed_file), framework="pt", device="cuda") as reference:
        for name, (tensor, arrived) in read.items():
            torch.cuda.current_stream().wait_event(arrived)
            assert tensor.is_cuda and torch.equal(tensor, reference.get_tensor(name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
def test_without_pinned_memory_the_direct_load_reads_through_safetensors(tiny_llama, monkeypatch, caplog):
    """A container whose locked-memory limit refuses pinned buffers still loads, the same model, and says why."""
    import logging

    from fastload import FastModel

    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    options = dict(lora=None, engine=False, gradient_checkpointing=False, store=False)
    staged = FastModel.from_pretrained(tiny_llama, **options)[0]

    def refused(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (page-locked host memory)")

    monkeypatch.setattr(fast_4bit, "Staging", refused)
    fast_4bit._say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="fastload"):
        fallback = FastModel.from_pretrained(tiny_llama, **options)[0]
    assert any("pinned host buffers could not be had" in r.getMessage() for r in caplog.records)
    expected, got = staged.state_dict(), fallback.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(t, got[n]) for n, t in expected.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
def test_a_load_under_the_users_stream_gets_memory_of_that_stream(mixed_file):
    """A user who loads inside `torch.cuda.stream(s)` frees the tensors after kernels on s: the allocator reuses
    their memory safely only if it was allocated on s, not on the reader thread's default stream."""
    import queue

    where, spans = fast_4bit.read_headers([mixed_file])
    side = torch.cuda.Stream()
    out, stop = queue.Queue(), threading.Event()
    with torch.cuda.stream(side):
        threads = fast_4bit.stream_tensors(where, spans, torch.device("cuda"), out, stop)
    for t in threads:
        t.join(30)
    segments = torch.cuda.memory_snapshot()
    with safe_open(str(mixed_file), framework="pt", device="cpu") as reference:
        while not out.empty():
            name, tensor, arrived = out.get()
            assert name is not None, tensor
            if tensor.numel() == 0 or not tensor.is_cuda:
                continue
            [segment] = [sg for sg in segments if sg["address"] <= tensor.data_ptr() < sg["address"] + sg["total_size"]]
            assert segment["stream"] == side.cuda_stream, name
            if arrived is not None:
                side.wait_event(arrived)
            with torch.cuda.stream(side):
                assert torch.equal(tensor.cpu(), reference.get_tensor(name)), name


def test_many_shards_are_read_by_at_most_readers_threads(tmp_path, monkeypatch):
    """Every thread holds its own pinned buffers on a GPU: a 30-shard checkpoint must not start 30 of them."""
    import queue

    files = []
    for i in range(7):
        path = tmp_path / f"shard-{i}.safetensors"
        save_file({f"t{i}.{j}": torch.full((64,), float(i * 10 + j)) for j in range(3)}, str(path))
        files.append(path)
    where, spans = fast_4bit.read_headers(files)
    monkeypatch.setattr(fast_4bit, "READERS", 3)
    out, stop = queue.Queue(), threading.Event()
    threads = fast_4bit.stream_tensors(where, spans, torch.device("cpu"), out, stop)
    assert len(threads) == 3
    for t in threads:
        t.join(30)
    got = {}
    while not out.empty():
        name, tensor, _ = out.get()
        assert name is not None, tensor
        got[name] = tensor
    assert got.keys() == where.keys()
    assert all(torch.equal(got[f"t{i}.{j}"], torch.full((64,), float(i * 10 + j))) for i in range(7) for j in range(3))


def test_readers_take_short_turns_in_file_order(tmp_path):
    """A layer's experts stored one tensor per expert wait on the device until the last one arrives: readers each on
    their own eighth of the file held one such layer each (eight layers of bf16 experts at once on a 16-core host).
    The turns are short and in file order, so the readers work side by side."""
    path = tmp_path / "experts.safetensors"
    save_file({f"layers.{layer}.experts.{e}.w": torch.zeros(256, 1024, dtype=torch.bfloat16)  # 512 KiB each
               for layer in range(4) for e in range(16)}, str(path))
    where, spans = fast_4bit.read_headers([path])
    chunks = fast_4bit.reader_chunks(where, spans, readers=8)
    in_file_order = sorted(where, key=lambda n: spans[n].start)
    assert [n for _, names in chunks for n in names] == in_file_order
    biggest = max(sum(spans[n].end - spans[n].start for n in names) for _, names in chunks)
    assert biggest <= fast_4bit.TURN_BYTES < 32 * 512 * 1024  # a turn is a fraction of one layer's 8 MiB


def test_a_reader_holds_one_shard_open_however_many_it_reads(tmp_path):
    """Turns come in file order: a reader closes a shard when it moves to the next, so a checkpoint of a hundred
    shards does not hold eight hundred descriptors (past many hosts' limit of 1024) until the load ends."""
    import os

    paths = []
    for i in range(20):
        path = tmp_path / f"shard-{i}.safetensors"
        save_file({f"t{i}": torch.full((64,), float(i))}, str(path))
        paths.append(path)

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    files = fast_4bit.OpenFile(torch.device("cpu"))
    before = open_descriptors()
    counts = []
    for i, path in enumerate(paths):
        mapped, _, fd = files.get(path, staged=True)
        assert fd is not None and torch.equal(mapped.get_tensor(f"t{i}"), torch.full((64,), float(i)))
        counts.append(open_descriptors() - before)
    files.close()
    assert max(counts) <= 1 and open_descriptors() == before
