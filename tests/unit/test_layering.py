"""The import rules of docs/DESIGN.md, checked by parsing every module's imports with `ast`.

Every import counts, at module level or inside a function (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("trainer", "cluster", "tools")
IO_MODULES = ("trainer.runtime", "trainer.data", "trainer.targets.shards", "trainer.targets.reader",
              "trainer.targets.writer", "trainer.fileio", "trainer.distill", "trainer.evaluation", "trainer.jobs",
              "trainer.layout", "torch.distributed", "deepspeed")
CLUSTER_MAY_IMPORT = ("trainer.config", "trainer.layout", "trainer.errors", "trainer.fileio", "trainer.runlock")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as a.b when a.b is a module, else a)."""
    pkg = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            for a in node.names:
                sub = REPO / Path(*f"{base}.{a.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.add(f"{base}.{a.name}")
    return out


GRAPH = {module_name(p): imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _under(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(rule) -> list[str]:
    return [f"{mod} imports {dep}" for mod, deps in sorted(GRAPH.items()) for dep in sorted(deps) if rule(mod, dep)]


def test_the_graph_is_not_empty():
    """A guard for the guards: the parser finds the modules and their edges."""
    assert "trainer.jobs.distill" in GRAPH and "trainer.distill.batches" in GRAPH["trainer.jobs.distill"]
    assert "cluster.pipeline" in GRAPH and "trainer.layout" in GRAPH["cluster.pipeline"]


def test_only_the_engine_imports_deepspeed():
    assert violations(lambda m, d: _under(d, "deepspeed") and m != "trainer.runtime.engine") == []


def test_nothing_imports_the_jobs():
    """Entry points are wiring; library code, cluster and tools (benchmarks included) never import them."""
    assert violations(lambda m, d: _under(d, "trainer.jobs") and not _under(m, "trainer.jobs")) == []


@pytest.mark.parametrize("package,io_allowed", [("trainer.method", ()), ("trainer.model", ("trainer.fileio",))])
def test_method_and_model_do_no_io_and_need_no_process_group(package, io_allowed):
    """model/ may use fileio (standard library only) for the MDLM export's atomic folder swap."""
    assert violations(lambda m, d: _under(m, package) and _under(d, IO_MODULES) and not _under(d, io_allowed)) == []


@pytest.mark.parametrize("package,allowed", [
    ("trainer.method", ("trainer.config", "trainer.errors", "trainer.method")),
    ("trainer.model", ("trainer.config", "trainer.errors", "trainer.fileio", "trainer.model")),
])
def test_method_and_model_import_only_what_their_docstrings_say(package, allowed):
    """trainer/method/__init__.py and trainer/model/__init__.py state these allow-lists (a package's
    bare name, as in ``from trainer.method import codecs``, is not an import of its other modules)."""
    assert violations(lambda m, d: _under(m, package) and _under(d, "trainer") and not _under(d, allowed)
                      and d != "trainer") == []


@pytest.mark.parametrize("package,forbidden", [
    ("trainer.data", ("trainer.runtime", "trainer.jobs")),
    ("trainer.evaluation", ("trainer.runtime.engine", "trainer.jobs")),
    ("trainer.targets", ("trainer.runtime.engine", "trainer.jobs")),
    ("trainer.distill", ("trainer.jobs",)),
])
def test_packages_keep_their_docstrings_rule(package, forbidden):
    """Each package's __init__ docstring says what it never imports."""
    assert violations(lambda m, d: _under(m, package) and _under(d, forbidden)) == []


def test_cluster_imports_only_config_layout_errors_and_fileio_of_trainer():
    """How jobs reach machines knows nothing of models: jobs run trainer code as child processes."""
    assert violations(lambda m, d: _under(m, "cluster") and _under(d, "trainer")
                      and not _under(d, CLUSTER_MAY_IMPORT)) == []


def test_layout_errors_and_fileio_are_standard_library_only():
    """cluster/ imports them: they must not pull in torch or the rest of trainer."""
    for mod in ("trainer.layout", "trainer.errors", "trainer.fileio"):
        third_party = {d for d in GRAPH[mod] if d.split(".")[0] in ("torch", "numpy", "omegaconf", "deepspeed")}
        inside = {d for d in GRAPH[mod] if _under(d, "trainer") and not _under(d, ("trainer.errors",))}
        assert not third_party and not inside, (mod, third_party, inside)


def test_the_run_lock_pulls_in_no_torch():
    """cluster/ and tools/submit.py take the run folder's lock: standard library, filelock and the
    three standard-library modules of trainer only."""
    deps = GRAPH["trainer.runlock"]
    third_party = {d for d in deps if d.split(".")[0] in ("torch", "numpy", "omegaconf", "deepspeed")}
    inside = {d for d in deps
              if _under(d, "trainer") and not _under(d, ("trainer.errors", "trainer.fileio", "trainer.layout"))}
    assert not third_party and not inside, (third_party, inside)


def test_tools_never_import_the_jobs():
    assert violations(lambda m, d: _under(m, "tools") and _under(d, "trainer.jobs")) == []


def test_trainer_imports_neither_cluster_nor_tools():
    assert violations(lambda m, d: _under(m, "trainer") and _under(d, ("cluster", "tools"))) == []


def test_no_import_circle():
    """Between modules of trainer, cluster and tools (a package's __init__ counts as its own module)."""
    graph = {m: {d for d in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def package_of(module: str) -> str:
    """The package a module belongs to for the package-level rules: its sub-package of trainer,
    cluster or tools (trainer.method.codecs.topk -> trainer.method), or the module itself when it
    sits at the top (trainer.config, cluster.pipeline)."""
    parts = module.split(".")
    if len(parts) >= 2 and (REPO / parts[0] / parts[1] / "__init__.py").is_file():
        return ".".join(parts[:2])
    return module


def package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each strongly connected set of packages with more than one member (two packages that import
    each other, directly or around a ring), as "a <-> b <-> c"."""
    edges: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        here = package_of(mod)
        edges.setdefault(here, set())
        for d in deps:
            if d in graph and package_of(d) != here:
                edges[here].add(package_of(d))
    reach = {p: set() for p in edges}
    for start in edges:  # small graph: a walk from every package
        todo = list(edges[start])
        while todo:
            nxt = todo.pop()
            if nxt not in reach[start]:
                reach[start].add(nxt)
                todo.extend(edges.get(nxt, ()))
    groups = {frozenset({p, *(q for q in reach[p] if p in reach.get(q, ()))}) for p in edges}
    return sorted(" <-> ".join(sorted(g)) for g in groups if len(g) > 1)


def test_no_package_imports_a_package_that_imports_it_back():
    """Modules may form no circle, and neither may packages: trainer.method once imported
    trainer.targets.codecs while trainer.targets imported trainer.method.sdtt, two packages leaning on
    each other without any module-level circle. Every arrow between packages points one way."""
    assert package_cycles(GRAPH) == []


def test_the_rules_catch_a_violation(monkeypatch):
    """The checks are not vacuous: a library module importing a job, or method doing I/O, is reported."""
    monkeypatch.setitem(GRAPH, "trainer.method.bad", {"trainer.jobs.common", "trainer.fileio"})
    assert violations(lambda m, d: _under(d, "trainer.jobs") and not _under(m, "trainer.jobs")) == [
        "trainer.method.bad imports trainer.jobs.common"]
    assert violations(lambda m, d: _under(m, "trainer.method") and _under(d, IO_MODULES)) == [
        "trainer.method.bad imports trainer.fileio", "trainer.method.bad imports trainer.jobs.common"]
    monkeypatch.setitem(GRAPH, "trainer.method.bad", {"trainer.targets.shards"})  # targets imports method
    assert package_cycles(GRAPH) == ["trainer.method <-> trainer.targets"]


# --------------------------------------------------------------------------------------------------
# Tests import no other test (docs/DESIGN.md): shared builders live in tests/helpers/, fixtures in
# tests/conftest.py (which pytest loads; nobody imports it).
# --------------------------------------------------------------------------------------------------
TEST_GRAPH = {module_name(p): imports(p) for p in sorted((REPO / "tests").rglob("*.py"))}


def imports_of_other_tests(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a tests module other than tests.helpers (or its modules); the bare package
    ``tests`` (as in ``from tests import helpers``) is not an import of its other modules."""
    return [f"{mod} imports {dep}" for mod, deps in sorted(graph.items()) for dep in sorted(deps)
            if _under(dep, "tests") and dep != "tests" and not _under(dep, "tests.helpers")]


def test_tests_import_only_the_helpers():
    assert "tests.helpers" in TEST_GRAPH["tests.unit.test_mdlm_export"]  # the parser sees tests' imports
    assert imports_of_other_tests(TEST_GRAPH) == []


def test_the_tests_rule_catches_a_test_importing_a_test():
    graph = {"tests.unit.test_a": {"tests.unit.test_b", "tests.conftest", "tests.helpers", "tests.helpers.slurm",
                                   "tests"}}
    assert imports_of_other_tests(graph) == ["tests.unit.test_a imports tests.conftest",
                                            "tests.unit.test_a imports tests.unit.test_b"]
