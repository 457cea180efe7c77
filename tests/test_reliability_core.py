"""What issue 19's fixes promise, checked without forking: the hub probe ends in time naming the endpoint, a full
disk is recognised however a library reports it, names too long for the file system are refused before it is asked,
non-UTF-8 data is located to its byte, and cutting a huge record before templating keeps the tokens identical."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fastload.atomic import disk_full_error
from fastload.data import first_non_utf8_byte, tokenize_conversation
from fastload.errors import ModelNotFound
from fastload.sources.hub import probe_hub
from fastload.sources.resolve import resolve
from tiny import make_tokenizer


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub online for this test (the suite runs offline); only 127.0.0.1 is ever contacted."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def stalled_hub(online):
    """A local server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    for conn, _ in held:
        conn.close()
    server.close()


def test_a_stalled_hub_is_a_model_not_found_naming_it_within_the_timeout(stalled_hub):
    started = time.monotonic()
    with pytest.raises(ModelNotFound, match="did not answer within 1 s") as e:
        probe_hub("org/model", None, None, timeout=1, endpoint=stalled_hub)
    assert time.monotonic() - started < 5
    assert stalled_hub in str(e.value)


def test_a_refused_connection_says_the_hub_could_not_be_reached(online):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    with pytest.raises(ModelNotFound, match="could not be reached: ConnectError"):
        probe_hub("org/model", None, None, timeout=1, endpoint=endpoint)


class SafetensorLikeError(Exception):
    """safetensors raises its own type, not OSError, with the OS error only in its message."""


@pytest.mark.parametrize("error", [SafetensorLikeError("Error while serializing: I/O error: No space left on device "
                                                       "(os error 28)"), OSError(28, "No space left on device")])
def test_a_full_disk_is_recognised_however_it_is_reported(error, tmp_path):
    assert disk_full_error(error, tmp_path).errno == 28


def test_a_write_failure_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path):
    assert disk_full_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10 vs 8"),
                           tmp_path) is None


@pytest.mark.parametrize("name", ["a" * 5000, "org/" + "x" * 300, "m" * 10000])
def test_names_too_long_for_the_file_system_are_refused_naming_them(name):
    with pytest.raises(ModelNotFound, match=name[-4:] * 2):
        resolve(name)


def test_the_first_non_utf8_byte_is_found_across_chunks(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(b"x" * 9 + "é".encode() + b"y" * 5 + b"\xff" + b"z")
    assert first_non_utf8_byte(f, chunk=10) == 16  # "é" straddles the first chunk's end and is valid


def test_a_huge_answer_is_cut_before_templating_without_changing_the_tokens():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 20000}]
    cut = tokenize_conversation(tok, messages, max_seq_length=64)
    whole = tokenize_conversation(tok, messages, max_seq_length=None)
    assert cut["input_ids"] == whole["input_ids"][:64] and cut["labels"] == whole["labels"][:64]


def test_an_empty_unmarked_temporary_folder_of_a_dead_writer_is_cleaned_and_user_files_stay(tmp_path):
    """A writer SIGKILLed between creating its temporary folder and marking it: the next write removes the empty
    folder; a folder of the same name shape holding anything stays (it cannot be proven ours)."""
    from fastload.atomic import clean_leftovers

    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no process has it
    empty = tmp_path / f".entry.tmp-{dead}-0123abcd"
    kept = tmp_path / f".notes.tmp-{dead}-0123abce"
    empty.mkdir()
    kept.mkdir()
    (kept / "mine.txt").write_text("a user's file")
    assert clean_leftovers(tmp_path) == [empty]
    assert (kept / "mine.txt").is_file()
