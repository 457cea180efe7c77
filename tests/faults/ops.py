"""What the fault cases do inside their forked child, through fastload's public surface only (FastModel, resolve,
register, registry, data, errors, Store and the `fastload` command)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

from forkserver import describe, resize_tmpfs, set_readonly  # noqa: F401  (re-exported for the cases' code)

TINY_LORA = {"r": 16, "lora_alpha": 16}


def load(name, **options):
    from fastload import FastModel

    options.setdefault("engine", False)
    return FastModel.from_pretrained(str(name), **options)


def attempt(fn, *args, **kwargs) -> dict:
    """Run fn; {"ok": True, "value": ...} or the exception the user would see, described."""
    try:
        value = fn(*args, **kwargs)
        if isinstance(value, dict) and "ok" in value and ("message" in value or "code" in value):
            return value  # cli_ok's answer: already what the user saw
        plain = isinstance(value, (str, int, float, bool, type(None)))
        return {"ok": True, "value": value if plain else repr(value)[:200]}
    except BaseException as e:  # noqa: BLE001 - what escapes is what the case checks
        return {"ok": False, **describe(e)}


def cli(*argv) -> dict:
    """`fastload ARGV...` in this process: its exit code and what it printed (an exception escaping main is kept)."""
    from fastload.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code, escaped = main([str(a) for a in argv]), None
        except BaseException as e:  # noqa: BLE001
            code, escaped = None, describe(e)
    return {"code": code, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-6000:], "escaped": escaped}


def tree(root) -> dict[str, str]:
    """sha256 of every file below root: equal before and after means nothing was touched."""
    root = Path(root)
    found = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                found[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return found


def listing(root) -> list[str]:
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def adapter_weights(directory) -> str:
    """A digest of an adapter folder's weights: which save a folder holds."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def perturb_lora(model, seed: int) -> None:
    """Give the adapter distinct weights, so two saves can be told apart."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def free_space(path, size: int = 512 * 1024 * 1024) -> None:
    resize_tmpfs(str(path), size)


def used_bytes(root) -> int:
    st = os.statvfs(str(root))
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shrink_to(root, margin: int) -> None:
    """Leave only `margin` bytes free on the tmpfs at root: the next write of more runs into a real ENOSPC."""
    resize_tmpfs(str(root), used_bytes(root) + margin)


def temp_leftovers(*roots) -> list[str]:
    from faultkit import temp_leftovers as leftovers

    return leftovers(*[Path(r) for r in roots])


def fault_then_retry(action, fix, *roots) -> dict:
    """The faulty attempt, what it left behind, then the same action after the fault is gone (no manual clean-up)."""
    first = attempt(action)
    left = temp_leftovers(*roots)
    fix()
    second = attempt(action)
    return {"first": first, "leftovers": left, "second": second, "after": temp_leftovers(*roots)}


def save_adapter_of(model_dir, out, seed: int = 2, **load_options):
    from fastload import FastModel

    model, tok = load(model_dir, store=False, **load_options)
    perturb_lora(model, seed)
    return lambda: str(FastModel.save_adapter(model, out, tokenizer=tok))


def save_merged_of(model_dir, out, seed: int = 2, **options):
    from fastload import FastModel

    model, tok = load(model_dir, store=False)
    perturb_lora(model, seed)
    return lambda: str(FastModel.save_merged(model, out, tokenizer=tok, **options))


def cli_ok(*argv) -> dict:
    """cli() as an attempt: a non-zero exit is an error the user saw (its stderr), an escape is a raw one."""
    r = cli(*argv)
    if r["escaped"]:
        return {"ok": False, **r["escaped"], "code": None}
    if r["code"] == 0:
        return {"ok": True, "code": 0, "stderr": r["stderr"][-1500:]}
    return {"ok": False, "fastload": r["code"] in (1, 2), "type": f"exit {r['code']}", "message": r["stderr"][-3000:],
            "code": r["code"]}
