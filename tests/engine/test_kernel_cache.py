"""The kernel cache under FASTLOAD_HOME: keyed by GPU and versions, corrupt files ignored, the user's Triton
folder kept, the autotune choices replaced whole (fastload/engine/kernel_cache.py)."""

import json
import logging

from fastload.engine import kernel_cache as kc

H200 = ("NVIDIA H200", (9, 0), "3.4.0", "2.8.0+cu128", "0.1.0")


def test_key_changes_with_gpu_and_each_version_and_is_a_file_name():
    key = kc.cache_key(*H200)
    assert key == "nvidia_h200-sm90-triton3.4.0-torch2.8.0+cu128-fastload0.1.0"
    others = [kc.cache_key("NVIDIA A100-SXM4-80GB", *H200[1:]), kc.cache_key(H200[0], (8, 0), *H200[2:]),
              kc.cache_key(*H200[:2], "3.5.0", *H200[3:]), kc.cache_key(*H200[:3], "2.9.0", H200[4]),
              kc.cache_key(*H200[:4], "0.2.0"), kc.cache_key(*H200[:2], None, *H200[3:])]
    assert len({key, *others}) == len(others) + 1
    assert all("/" not in k and " " not in k for k in others)


def test_choices_survive_a_new_process_reading_the_folder(tmp_path):
    kc.AutotuneChoices(tmp_path, "lora").remember((4096, 4096, 16), {"BM": 32, "BN": 128, "num_warps": 4})
    again = kc.AutotuneChoices(tmp_path, "lora")
    assert again.get((4096, 4096, 16)) == {"BM": 32, "BN": 128, "num_warps": 4}
    assert again.get((4096, 14336, 16)) is None
    assert kc.AutotuneChoices(tmp_path, "other").get((4096, 4096, 16)) is None


def test_corrupt_or_stale_choices_are_ignored_then_replaced(tmp_path, caplog):
    for text in ("{not json", json.dumps({"format": 999, "choices": {}}), json.dumps([1, 2]), "\udcff"):
        (tmp_path / kc.CHOICES_FILE).write_text(text, errors="surrogateescape")
        with caplog.at_level(logging.DEBUG, logger="fastload"):
            choices = kc.AutotuneChoices(tmp_path, "lora")
            assert choices.get((1, 2)) is None
        assert "ignored" in caplog.text
        choices.remember((1, 2), {"BM": 16})
        assert kc.AutotuneChoices(tmp_path, "lora").get((1, 2)) == {"BM": 16}


def test_a_truncated_or_emptied_choices_file_is_ignored_with_a_log_line(tmp_path, caplog):
    """A process killed by something other than fastload's own atomic write (a full disk, a copied home): the cut
    file reads as no choices, the kernels are timed again, and the next remember() writes a whole file."""
    kc.write_choices(tmp_path, {"lora:4096,4096,16": {"BM": 32, "BN": 128, "num_warps": 4}})
    whole = (tmp_path / kc.CHOICES_FILE).read_bytes()
    for cut in (whole[: len(whole) // 2], whole[:1], b""):
        (tmp_path / kc.CHOICES_FILE).write_bytes(cut)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="fastload"):
            assert kc.read_choices(tmp_path) == {}
            assert kc.AutotuneChoices(tmp_path, "lora").get((4096, 4096, 16)) is None
        assert any("ignored" in r.getMessage() and kc.CHOICES_FILE in r.getMessage() for r in caplog.records)
    kc.AutotuneChoices(tmp_path, "lora").remember((4096, 4096, 16), {"BM": 64})
    assert kc.read_choices(tmp_path) == {"lora:4096,4096,16": {"BM": 64}}


def test_entries_of_the_wrong_kind_are_dropped_and_the_rest_kept(tmp_path):
    """One bad entry (a hand edit, an older format's value) costs only its own shape's timing."""
    (tmp_path / kc.CHOICES_FILE).write_text(json.dumps(
        {"format": kc.FORMAT, "choices": {"lora:1": {"BM": 16}, "lora:2": 5, "lora:3": None, "lora:4": [16]}}))
    choices = kc.AutotuneChoices(tmp_path, "lora")
    assert choices.get((1,)) == {"BM": 16}
    assert [choices.get((n,)) for n in (2, 3, 4)] == [None, None, None]


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_nothing(tmp_path):
    kept = kc.AutotuneChoices(tmp_path, "lora")
    kept.remember((1,), {"BM": 16})
    before = (tmp_path / kc.CHOICES_FILE).read_bytes()
    kc.write_choices(tmp_path, {"lora:2": {"BM": object()}})  # fails half-way through writing the JSON
    assert (tmp_path / kc.CHOICES_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [kc.CHOICES_FILE]


def test_two_writers_merge_rather_than_drop_each_other(tmp_path):
    first, second = kc.AutotuneChoices(tmp_path, "lora"), kc.AutotuneChoices(tmp_path, "lora")
    first.get((0,)), second.get((0,))  # both read the (empty) file before either writes
    first.remember((1,), {"BM": 16})
    second.remember((2,), {"BM": 32})
    fresh = kc.AutotuneChoices(tmp_path, "lora")
    assert fresh.get((1,)) == {"BM": 16} and fresh.get((2,)) == {"BM": 32}


def test_triton_cache_goes_under_fastload_home_unless_the_user_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv(kc.TRITON_ENV, raising=False)
    assert kc.point_triton_cache(tmp_path / "k")
    assert kc.os.environ[kc.TRITON_ENV] == str(tmp_path / "k" / "triton")
    monkeypatch.setenv(kc.TRITON_ENV, "/the/users/own")
    assert not kc.point_triton_cache(tmp_path / "k2")
    assert kc.os.environ[kc.TRITON_ENV] == "/the/users/own"


def test_an_unwritable_home_is_not_fatal(tmp_path, monkeypatch):
    monkeypatch.delenv(kc.TRITON_ENV, raising=False)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder would go")
    assert not kc.point_triton_cache(blocked / "k")
    assert kc.TRITON_ENV not in kc.os.environ
    choices = kc.AutotuneChoices(blocked / "k", "lora")
    choices.remember((1,), {"BM": 16})  # not kept on disk, still known in this process
    assert choices.get((1,)) == {"BM": 16}


def test_kernel_folder_lives_under_fastload_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLOAD_HOME", str(tmp_path))
    assert kc.home() == tmp_path
