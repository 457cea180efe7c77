"""fastload's import graph, read from its source with ast (nothing is imported), and the two rules the layout keeps:
no import cycle hides inside a function, and nothing imports upward in the pipeline (tests/test_layout.py)."""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fastload"

# The pipeline, first to last: a module may import from its own layer and the layers before it, never from a later
# one. A name covers the module and everything under it; the longest name that matches a module places it.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the ground every stage stands on
    ("fastload", "fastload._log", "fastload._lazy", "fastload.errors", "fastload.settings", "fastload.atomic",
     "fastload.structure", "fastload.model_state", "fastload.data", "fastload.shared_setting", "fastload.layer_rules"),
    ("fastload.sources",),
    # torchrun launches: the ranks share the store entry rank 0 writes while loading
    ("fastload.load", "fastload.distributed"),
    # the engine's levers act on the training step (offloaded checkpointing builds on train.checkpointing)
    ("fastload.train", "fastload.engine"),
    ("fastload.save", "fastload.export"),
    # the faces a user calls, and the shims that keep the flat layout's names
    ("fastload.facade", "fastload.backends", "fastload.compat", "fastload.cli", "fastload.bench", "fastload.registry",
     "fastload.chat_templates"),
)


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `importer` (a module) imports `target` (a module) on `line`."""

    importer: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "inside a function" if self.in_function else "at its top"
        return f"{self.importer}:{self.line} imports {self.target} {where}"


def module_name(path: Path, package_dir: Path) -> str:
    """`fastload/engine/__init__.py` -> fastload.engine, `fastload/engine/apply.py` -> fastload.engine.apply."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parents(module: str) -> list[str]:
    """The packages Python initialises before `module`, outermost first."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


class _Collector(ast.NodeVisitor):
    """The package's imports of one module; code under `if TYPE_CHECKING:` never runs and is left out."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.module, self.is_package, self.modules = module, is_package, modules
        self.root = module.split(".")[0]
        self.depth, self.found = 0, []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If):
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import):
        self._add(node, [alias.name for alias in node.names])

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = self._absolute(node)
        if base is not None:
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name` runs pkg
            self._add(node, [f"{base}.{a.name}" if f"{base}.{a.name}" in self.modules else base for a in node.names])

    def _absolute(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        base = package[:len(package) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def _add(self, node, targets: list[str]):
        for target in targets:
            edge = Import(self.module, target, node.lineno, self.depth > 0)
            if target in self.modules and edge not in self.found:  # `from m import a, b`: one edge
                self.found.append(edge)


def modules_of(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The names of every module of the package, sorted."""
    return sorted(module_name(p, package_dir) for p in package_dir.rglob("*.py"))


def read_imports(package_dir: Path = PACKAGE_DIR) -> list[Import]:
    """Every import of one of the package's modules by another, in the order of the files and lines."""
    paths = sorted(package_dir.rglob("*.py"))
    modules = set(modules_of(package_dir))
    found = []
    for path in paths:
        collector = _Collector(module_name(path, package_dir), path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(), str(path)))
        found += collector.found
    return found


class ImportGraph:
    """What importing a module runs: its top-level imports, and the packages above each module imported."""

    def __init__(self, imports: list[Import]):
        self.imports = imports
        self.top: dict[str, set[str]] = {}
        for edge in imports:
            self.top.setdefault(edge.importer, set())
            if not edge.in_function:
                self.top[edge.importer].add(edge.target)

    def _next(self, module: str) -> list[str]:
        return sorted(self.top.get(module, set())) + [p for p in parents(module) if p in self.top]

    def path(self, start: str, goal: str, *, through: str | None = None) -> list[str] | None:
        """The chain of modules by which importing `start` runs `goal` (None: it never does). With `through`,
        `goal` counts only where a module names it in an import, and `through` itself is not entered."""
        came_from, queue = {start: None}, deque([start])
        while queue:
            module = queue.popleft()
            for nxt in self._next(module):
                if nxt == goal and (through is None or nxt in self.top.get(module, ())):
                    chain = [goal, module]
                    while came_from[chain[-1]] is not None:
                        chain.append(came_from[chain[-1]])
                    return chain[::-1]
                if nxt not in came_from and nxt != through:
                    came_from[nxt] = module
                    queue.append(nxt)
        return None

    def hidden_cycles(self) -> list[str]:
        """Each import inside a function of a module that the imported module runs again at its top: a cycle the
        function-level import only hides. A package importing its own submodule inside a function (PEP 562 lazy
        loading) is fine, since Python always initialises the package before its submodule, unless the submodule's
        imports name the package itself (`from pkg import name`)."""
        found = []
        for edge in self.imports:
            a, b = edge.importer, edge.target
            if not edge.in_function or b == a or b in self.top.get(a, ()):
                continue
            own_child = b.startswith(a + ".")
            chain = self.path(b, a, through=a) if own_child else self.path(b, a)
            if chain is not None:
                found.append(f"{edge}; {b} runs {a} again at import: {' -> '.join(chain)}")
        return found


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of the layer the longest matching name places `module` in (None: no name matches)."""
    matches = [(len(name), i) for i, names in enumerate(layers) for name in names
               if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def unplaced(modules: list[str], layers=LAYERS) -> list[str]:
    """The modules only the package's own name places (a new subpackage or top-level module): each needs a layer."""
    roots = {m.split(".")[0] for m in modules}
    below_root = tuple(tuple(name for name in names if name not in roots) for names in layers)
    return [m for m in modules if m not in roots and layer_of(m, below_root) is None]


def upward_imports(imports: list[Import], layers=LAYERS) -> list[str]:
    """Each import of a module from a later layer of the pipeline than the importer's."""
    found = []
    for edge in imports:
        here, there = layer_of(edge.importer, layers), layer_of(edge.target, layers)
        if here is not None and there is not None and there > here:
            found.append(f"{edge}: {edge.target} is later in the pipeline (layer {there} > {here})")
    return found


if __name__ == "__main__":  # `python tests/import_graph.py`: the same analysis as tests/test_layout.py, printed
    edges = read_imports()
    for title, lines in (("hidden cycles", ImportGraph(edges).hidden_cycles()),
                         ("upward imports", upward_imports(edges)),
                         ("modules without a layer", unplaced(modules_of()))):
        print(*lines, f"{len(lines)} {title}", sep="\n")
