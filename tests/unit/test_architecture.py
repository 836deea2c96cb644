"""The layering of ``tasks/``, ``models/`` and ``flows/``, read from the source with ``ast`` (nothing is imported).

The project import graph has one node per module and one edge per ``import`` statement anywhere in
a file (module level, inside functions, under ``if TYPE_CHECKING``), ``from pkg import module``
counting as an import of the module. The rules it must satisfy:

- no import cycles;
- ``tasks.core`` is neutral: it reaches no kind package, no ``tasks.registry``, no ``tasks.stages``;
- ``models`` is plain PyTorch: no Prefect, no MLflow, no ``tasks``;
- the served path (the predictors and ``tasks.core.packaging``) reaches no Prefect, no pydantic-settings,
  no pipeline settings, stages or registry, and no MLflow outside ``packaging`` itself;
- Prefect appears only in ``tasks/stages.py`` and ``flows/``; MLflow only in ``tasks/core/tracking.py``
  and ``tasks/core/packaging.py`` (so never in ``flows``); ``tasks`` and ``models`` never import ``flows``;
- ``recipe.task`` is read only where a task name is turned into a kind (``registry.kind_of``).

Also: ``tasks.core.store.code_fingerprint`` (the code part of every stage's cache key) covers the
same transitive closure, so editing a shared helper invalidates exactly the stages that use it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "models", "flows")
KIND_PACKAGES = ("tasks.text", "tasks.vision", "tasks.tokens", "tasks.multi")
PREDICTORS = ("tasks.text.predict", "tasks.vision.predict", "tasks.tokens.predict", "tasks.multi.predict",
              "tasks.core.packaging")


# ---------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Import:
    """One imported name as written: the dotted target, where, and whether inside a function."""

    module: str  # importing module
    target: str  # dotted name imported (a module, or `pkg.name` for `from pkg import name`)
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def discover(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module under the packages, namespace packages (no ``__init__.py``) included."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(path, root)] = path
    return modules


def _imports_of(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(name, alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base:
                found.append(Import(name, base, node.lineno, in_function))
            found.extend(Import(name, f"{base}.{alias.name}".lstrip("."), node.lineno, in_function)
                         for alias in node.names if alias.name != "*")
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


class Graph:
    """Import graph of the project: project edges resolved to modules, other imports kept as written."""

    def __init__(self, root: Path, packages: Iterable[str] = PACKAGES):
        self.root = root
        self.packages = tuple(packages)
        self.paths = discover(root, self.packages)
        self.imports = {name: _imports_of(name, path) for name, path in self.paths.items()}
        self.edges: dict[str, set[str]] = {name: set() for name in self.paths}
        self.external: dict[str, set[str]] = {name: set() for name in self.paths}  # dotted names, not ours
        for name, imports in self.imports.items():
            for imp in imports:
                if imp.target.split(".")[0] in self.packages:
                    if imp.target in self.paths:
                        self.edges[name].add(imp.target)
                    # else: `from module import function` names no module (its module is its own edge)
                else:
                    self.external[name].add(imp.target)

    def ancestors(self, name: str) -> list[str]:
        """Parent packages Python runs before ``name`` (the ones that exist as modules)."""
        parts = name.split(".")
        return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self.paths]

    def closure(self, start: str, parents: bool = True) -> dict[str, list[str]]:
        """Every project module importing ``start`` executes, with one import chain leading to it.

        With ``parents``, parent packages count (``import a.b`` runs ``a/__init__.py``), as in a real import.
        """
        chains = {start: [start]}
        todo = [start]
        while todo:
            name = todo.pop(0)
            for nxt in sorted(self.edges[name] | (set(self.ancestors(name)) if parents else set())):
                if nxt not in chains:
                    chains[nxt] = chains[name] + [nxt]
                    todo.append(nxt)
        return chains

    def external_closure(self, start: str) -> dict[str, tuple[str, str]]:
        """Non-project dotted names imported anywhere in ``start``'s closure -> (importer, chain)."""
        out: dict[str, tuple[str, str]] = {}
        for name, chain in self.closure(start).items():
            for target in self.external[name]:
                out.setdefault(target, (name, " -> ".join(chain)))
        return out

    def cycles(self) -> list[list[str]]:
        """One concrete cycle per strongly connected component with a cycle (Tarjan, then a path in it)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components: list[list[str]] = []
        counter = 0

        def strongconnect(v: str) -> None:
            nonlocal counter
            index[v] = low[v] = counter
            counter += 1
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    strongconnect(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in self.edges[v]:
                    components.append(sorted(component))

        for v in sorted(self.edges):
            if v not in index:
                strongconnect(v)
        return [self._cycle_in(set(c)) for c in components]

    def _cycle_in(self, component: set[str]) -> list[str]:
        start = min(component)
        # BFS inside the component back to start
        paths = {start: [start]}
        todo = [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(self.edges[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    todo.append(w)
        raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _where(graph: Graph, imp: Import) -> str:
    path = graph.paths[imp.module].relative_to(graph.root)
    return f"{path}:{imp.line}{' (in a function)' if imp.in_function else ''} imports {imp.target}"


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph(ROOT)


# ---------------------------------------------------------------------------------------------- the checker itself


def test_checker_sees_cycles_function_imports_and_relative_imports(tmp_path: Path) -> None:
    """The checks below can fail: on a fake tree the graph finds a cycle closed by a function-level import."""
    pkg = tmp_path / "tasks"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from tasks.core import b\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "core" / "c.py").write_text("import tasks.core.a\nimport mlflow.pyfunc\n")
    (pkg / "core" / "d.py").write_text("from tasks.core.c import something\n")
    g = Graph(tmp_path, ("tasks",))
    assert g.edges["tasks.core.b"] == {"tasks.core.c"}
    assert any(i.in_function and i.target == "tasks.core.c" for i in g.imports["tasks.core.b"])
    assert g.edges["tasks.core.d"] == {"tasks.core.c"}  # `from module import name` -> the module
    assert g.cycles() == [["tasks.core.a", "tasks.core.b", "tasks.core.c", "tasks.core.a"]]
    assert set(g.closure("tasks.core.d")) == {"tasks", "tasks.core.a", "tasks.core.b", "tasks.core.c", "tasks.core.d"}
    assert "mlflow.pyfunc" in g.external_closure("tasks.core.a")


def test_graph_is_the_real_one(graph: Graph) -> None:
    """Guards against a vacuous graph: known edges of every kind are found."""
    assert len(graph.paths) > 50
    assert {"tasks.registry", "tasks.deploy", "tasks.register"} <= graph.edges["tasks.stages"]
    assert "tasks.core.cleaning" in graph.edges["tasks.vision.clean"]
    assert "tasks.core.tracking" in graph.edges["tasks.deploy"]  # `from tasks.core import tracking`
    # a function-level import: packaging.log_model imports `models` and `tasks` for their code paths
    assert any(i.in_function and i.target == "models" for i in graph.imports["tasks.core.packaging"])
    assert "prefect" in graph.external["tasks.stages"]
    assert "mlflow" in graph.external["tasks.core.tracking"]


# ---------------------------------------------------------------------------------------------- the rules


def test_no_import_cycles(graph: Graph) -> None:
    cycles = graph.cycles()
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_reaches_no_kind_registry_or_stages(graph: Graph) -> None:
    core = [m for m in graph.paths if _under(m, ["tasks.core"])]
    assert len(core) >= 15
    forbidden = (*KIND_PACKAGES, "tasks.registry", "tasks.stages")
    bad = [" -> ".join(chain) for m in core for reached, chain in graph.closure(m).items() if _under(reached, forbidden)]
    assert not bad, "tasks.core reaches kind/pipeline modules:\n" + "\n".join(sorted(set(bad)))


def test_models_import_no_prefect_mlflow_or_tasks(graph: Graph) -> None:
    models = [m for m in graph.paths if _under(m, ["models"])]
    assert len(models) >= 4
    bad = []
    for m in models:
        bad += [" -> ".join(c) for reached, c in graph.closure(m).items() if _under(reached, ["tasks", "flows"])]
        bad += [f"{chain} imports {t}" for t, (_, chain) in graph.external_closure(m).items()
                if _under(t, ["prefect", "mlflow"])]
    assert not bad, "models/ must stay plain PyTorch:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_served_path_is_inference_only(graph: Graph, predictor: str) -> None:
    """What a served model imports: no Prefect, no pydantic-settings, no pipeline settings/stages/registry."""
    assert predictor in graph.paths
    closure = graph.closure(predictor)
    bad = [" -> ".join(chain) for reached, chain in closure.items()
           if _under(reached, ["tasks.core.settings", "tasks.stages", "tasks.registry", "flows"])]
    for target, (importer, chain) in graph.external_closure(predictor).items():
        if _under(target, ["prefect", "pydantic_settings"]):
            bad.append(f"{chain} imports {target}")
        if _under(target, ["mlflow"]) and importer != "tasks.core.packaging":
            bad.append(f"{chain} imports {target} (MLflow only in tasks.core.packaging)")
    assert not bad, f"{predictor} pulls pipeline-only code into the served model:\n" + "\n".join(sorted(bad))


def test_text_predictor_closure_is_what_we_expect(graph: Graph) -> None:
    """The closure the rule above checks is not trivially small (it reaches the cleaning code and models)."""
    closure = graph.closure("tasks.text.predict")
    assert {"models.multitask", "models.encoders", "tasks.text.clean", "tasks.core.cleaning"} <= set(closure)


def test_prefect_only_in_stages_and_flows(graph: Graph) -> None:
    bad = [_where(graph, i) for m, imports in graph.imports.items() for i in imports
           if _under(i.target, ["prefect"]) and not (m == "tasks.stages" or _under(m, ["flows"]))]
    assert not bad, "Prefect outside tasks/stages.py and flows/:\n" + "\n".join(bad)


def test_flows_never_import_mlflow(graph: Graph) -> None:
    bad = [_where(graph, i) for m, imports in graph.imports.items() if _under(m, ["flows"]) for i in imports
           if _under(i.target, ["mlflow"])]
    assert not bad, "flows/ must go through tasks.core.tracking:\n" + "\n".join(bad)


def test_mlflow_only_in_tracking_and_packaging(graph: Graph) -> None:
    allowed = {"tasks.core.tracking", "tasks.core.packaging"}
    bad = [_where(graph, i) for m, imports in graph.imports.items() if m not in allowed for i in imports
           if _under(i.target, ["mlflow"])]
    assert not bad, "MLflow outside tasks/core/tracking.py and tasks/core/packaging.py:\n" + "\n".join(bad)


def test_tasks_and_models_never_import_flows(graph: Graph) -> None:
    bad = [_where(graph, i) for m, imports in graph.imports.items() if _under(m, ["tasks", "models"])
           for i in imports if _under(i.target, ["flows"])]
    assert not bad, "\n".join(bad)


def _recipe_task_reads(graph: Graph) -> set[tuple[str, str, int]]:
    """(file, enclosing function, line) of every ``recipe.task`` attribute access."""
    found = set()
    for name, path in graph.paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def visit(node: ast.AST, function: str) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function = node.name
            if (isinstance(node, ast.Attribute) and node.attr == "task" and isinstance(node.value, ast.Name)
                    and node.value.id == "recipe"):
                found.add((str(path.relative_to(graph.root)), function, node.lineno))
            for child in ast.iter_child_nodes(node):
                visit(child, function)

        visit(tree, "<module>")
    return found


def test_recipe_task_is_read_only_by_the_registry(graph: Graph) -> None:
    """``recipe.task`` is read only in ``registry.kind_of`` (task -> kind).

    Everything else asks the kind (``Kind.task``: the bundle's ``bundle.json``, the version's
    ``nightshift.task`` tag, the pyfunc metadata) or a bundle for the task it records.
    """
    reads = _recipe_task_reads(graph)
    assert {(f, fn) for f, fn, _ in reads} == {("tasks/registry.py", "kind_of")}, (
        "recipe.task read at: " + ", ".join(f"{f}:{line} in {fn}()" for f, fn, line in sorted(reads)))


def test_recipe_task_finder_finds_reads(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "x.py").write_text(
        "def f(recipe, other):\n    return recipe.task, other.task, recipe.name\nT = recipe.task\n")
    g = Graph(tmp_path, ("tasks",))
    assert _recipe_task_reads(g) == {("tasks/x.py", "f", 2), ("tasks/x.py", "<module>", 3)}


# ---------------------------------------------------------------------------------------------- code fingerprint


@pytest.fixture
def fingerprints():
    """``code_fingerprint`` with its cache cleared before and after (the test edits what it reads)."""
    from tasks.core import store

    store.code_fingerprint.cache_clear()
    yield store
    store.code_fingerprint.cache_clear()


def _edited(store, monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    real = store._module_source

    def source(name: str) -> str | None:
        text = real(name)
        return text + "\n# an edit\nEDITED = True\n" if name == module and text is not None else text

    monkeypatch.setattr(store, "_module_source", source)
    store.code_fingerprint.cache_clear()


def test_fingerprint_follows_transitive_imports(graph: Graph, fingerprints, monkeypatch) -> None:
    """Editing tasks.core.sources (read by text.clean only through text.ingest) changes text.clean's code hash."""
    helper, dependent, unrelated = "tasks.core.sources", "tasks.text.clean", "tasks.text.evaluate"
    assert helper not in graph.edges[dependent] and helper in graph.closure(dependent)  # two hops away
    assert helper not in graph.closure(unrelated)
    before = {m: fingerprints.code_fingerprint(m) for m in (dependent, unrelated, helper)}
    _edited(fingerprints, monkeypatch, helper)
    after = {m: fingerprints.code_fingerprint(m) for m in (dependent, unrelated, helper)}
    assert after[helper] != before[helper]
    assert after[dependent] != before[dependent]
    assert after[unrelated] == before[unrelated]


@pytest.mark.parametrize("stage", ["tasks.vision.clean", "tasks.text.clean"])
def test_clean_stages_cover_the_shared_cleaning_helpers(fingerprints, monkeypatch, stage: str) -> None:
    before = fingerprints.code_fingerprint(stage)
    _edited(fingerprints, monkeypatch, "tasks.core.cleaning")
    assert fingerprints.code_fingerprint(stage) != before, f"{stage}'s cache key ignores tasks.core.cleaning"


def test_fingerprint_reads_exactly_the_import_closure(graph: Graph, fingerprints, monkeypatch) -> None:
    """For every stage-bearing module, code_fingerprint reads its whole tasks/models closure and nothing else."""
    read: list[str] = []
    real = fingerprints._module_source

    def recording(name: str) -> str | None:
        read.append(name)
        return real(name)

    monkeypatch.setattr(fingerprints, "_module_source", recording)
    mismatched = {}
    for module in sorted(m for m in graph.paths if _under(m, ["tasks"])):
        read.clear()
        fingerprints.code_fingerprint.cache_clear()
        fingerprints.code_fingerprint(module)
        # what the statements name (implicitly run parent packages are empty or docstrings only)
        expected = {m for m in graph.closure(module, parents=False) if _under(m, ["tasks", "models"])}
        got = {m for m in read if m in graph.paths}
        if got != expected:
            mismatched[module] = {"missed": sorted(expected - got), "extra": sorted(got - expected)}
    assert not mismatched, mismatched
