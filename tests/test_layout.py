"""The layout reads as the pipeline (sources -> load -> train -> save/export, the faces on top): nothing imports
upward, and no import cycle hides inside a function. Read from the source with ast; nothing is imported."""

from __future__ import annotations

import textwrap

from import_graph import ImportGraph, modules_of, read_imports, unplaced, upward_imports


def test_no_import_cycle_hides_inside_a_function():
    cycles = ImportGraph(read_imports()).hidden_cycles()
    assert not cycles, "\n".join(cycles)


def test_nothing_imports_upward():
    upward = upward_imports(read_imports())
    assert not upward, "\n".join(upward)


def test_every_module_has_a_place_in_the_pipeline():
    missing = unplaced(modules_of())
    assert not missing, f"add these to tests/import_graph.py LAYERS: {missing}"


def _package(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return read_imports(tmp_path / "pkg")


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """pkg.a imports pkg.b in a function because pkg.b's package, pkg, imports pkg.a at its top."""
    imports = _package(tmp_path, {"__init__.py": "from pkg.a import f\n", "a.py": "def f():\n    import pkg.b\n",
                                  "b.py": ""})
    cycles = ImportGraph(imports).hidden_cycles()
    assert len(cycles) == 1 and cycles[0].startswith("pkg.a:2 imports pkg.b inside a function"), cycles
    assert cycles[0].endswith("pkg.b -> pkg -> pkg.a")


def test_a_package_loading_its_own_submodule_lazily_is_no_cycle(tmp_path):
    """PEP 562: pkg's __getattr__ imports pkg.c, which Python runs after pkg; only pkg.d, which takes a name from
    pkg itself at its top, makes a cycle."""
    imports = _package(tmp_path, {
        "__init__.py": "X = 1\ndef __getattr__(name):\n    from pkg import c\n    from pkg.d import g\n",
        "c.py": "import pkg.e\n", "d.py": "from pkg import X\ndef g():\n    pass\n", "e.py": ""})
    cycles = ImportGraph(imports).hidden_cycles()
    assert [c.split(";")[0] for c in cycles] == ["pkg:4 imports pkg.d inside a function"], cycles


def test_an_import_from_a_later_layer_is_named(tmp_path):
    imports = _package(tmp_path, {"__init__.py": "", "load.py": "def f():\n    from pkg.train import g\n",
                                  "train.py": "from pkg.load import f\ndef g():\n    pass\n", "new.py": ""})
    layers = (("pkg",), ("pkg.load",), ("pkg.train",))
    assert upward_imports(imports, layers) == [
        "pkg.load:2 imports pkg.train inside a function: pkg.train is later in the pipeline (layer 2 > 1)"]
    assert unplaced(modules_of(tmp_path / "pkg"), layers) == ["pkg.new"]
