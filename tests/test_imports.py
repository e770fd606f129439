"""The package's import graph (tests/import_graph.py: function-level imports count, `if
TYPE_CHECKING:` ones do not): no import cycles and no `from data2vec.x import _private` from
another module.

The training engine (`data2vec.training`) sits above the model, data and loading layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.import_graph import ImportGraph, build, describe

SRC = Path(__file__).resolve().parents[1] / "src"
ENGINE = ("data2vec.train", "data2vec.training", "data2vec.joint", "data2vec.extract", "data2vec.probe")
DATA_LAYER = ("data2vec.data", "data2vec.masking")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _report(graph: ImportGraph, cycles: list[list[str]], private: list[str]) -> str:
    lines = [describe(graph, cycles)] if cycles else []
    lines += [f"private import: {p}" for p in private]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build(SRC, "data2vec")


def test_no_cycles_or_private_imports(graph: ImportGraph) -> None:
    cycles = graph.cycles()
    assert not cycles and not graph.private, "\n" + _report(graph, cycles, graph.private)


def test_engine_sits_above_the_loaders(graph: ImportGraph) -> None:
    """The training engine imports the model, data and loading layers; none of those import it."""
    e = graph.edges
    below = [m for m in e if _within(m, ("data2vec.data", "data2vec.masking", "data2vec.model", "data2vec.pretrained"))]
    leaks = sorted(f"{m} -> {t}" for m in below for t in e[m] if _within(t, ENGINE[:2]))
    assert not leaks, leaks


def test_data_layer_edges(graph: ImportGraph) -> None:
    """The registry imports the modality pipelines; they take the batch types from data.batch."""
    e = graph.edges
    assert {"data2vec.data.audio", "data2vec.data.text", "data2vec.data.image_pipeline"} <= e["data2vec.data.pipeline"]
    for m in ("data2vec.data.audio", "data2vec.data.text", "data2vec.data.image_pipeline"):
        assert "data2vec.data.batch" in e[m] and "data2vec.data.pipeline" not in e[m]
    assert not any(_within(m, ENGINE) or m.startswith("data2vec.finetune") for m in e["data2vec.data.eval_inputs"])


# ----------------------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def test_checker_finds_cycles_and_private_imports(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\n",
            "pkg/a.py": "from pkg.b import B\nA = 1\n",
            # a function-level import of a submodule by its package: b -> a, so a <-> b
            "pkg/b.py": "B = 2\n\ndef f():\n    from pkg import a\n    return a\n",
            "pkg/c.py": "from pkg.a import _hidden, __doc__\nfrom pkg.c import _mine\n",
            # typing-only imports do not count: no d <-> e cycle
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import E\n",
            "pkg/e.py": "import pkg.d\nE = 3\n",
            # a package and its own module: no cycle through the package they are in
            "pkg/sub/__init__.py": "from pkg.sub.x import X\n",
            "pkg/sub/x.py": "from pkg.sub import y\nfrom ..a import _rel\nX = 4\n",
            "pkg/sub/y.py": "",
            "pkg/f.py": "import pkg.sub.y\n",
            "pkg/g.py": "import pkg.h\n",
            "pkg/h.py": "def f():\n    import pkg.g\n",
        },
    )
    graph = build(tmp_path, "pkg")
    assert graph.cycles() == [["pkg.a", "pkg.b"], ["pkg.g", "pkg.h"]]
    assert graph.private == [
        "pkg.c: from pkg.a import _hidden (line 1)",
        "pkg.sub.x: from pkg.a import _rel (line 2)",
    ]
    assert graph.edges["pkg.f"] == {"pkg.sub", "pkg.sub.y"}  # the package's __init__ runs first
    assert graph.edges["pkg.sub.x"] == {"pkg.sub.y", "pkg.a"}
    assert "pkg" not in graph.edges["pkg.a"] and graph.edges["pkg.d"] == set()
    report = describe(graph, graph.cycles())
    assert "pkg.a -> pkg.b -> pkg.a" in report and "pkg.g -> pkg.h -> pkg.g" in report
