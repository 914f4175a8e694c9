"""The layout of search/ and trainables/: no import cycle, one concept per file (none over 800
lines), and the classes Ray pickles into a run directory load from both their public and their
old paths (:mod:`search.pickled`; ``test_pickled`` checks real run dirs)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import yaml

from search.space import SearchSpace
from search.spec import Choice, FloatRange, IntRange, SearchSpec, parse_spec

ROOT = Path(__file__).parents[2]
PACKAGES = ("search", "trainables")
MNIST_SPACE = ROOT / "spaces" / "mnist.yaml"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _lazy_faces() -> dict[str, dict[str, str]]:
    """Each folder face's ``_PUBLIC`` map (name -> the module that defines it)."""
    faces = {}
    for name, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                    and any(isinstance(t, ast.Name) and t.id == "_PUBLIC" for t in node.targets)):
                faces[name] = {ast.literal_eval(k): ast.literal_eval(v)
                               for k, v in zip(node.value.keys, node.value.values, strict=True)}
    return faces


FACES = _lazy_faces()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(nodes: list[ast.stmt], known: set[str], me: str, *, deferred: bool) -> set[str]:
    """Modules of ``known`` that these statements import: top-level ones only, or (``deferred``)
    also those inside function bodies, which run later. ``if TYPE_CHECKING:`` never runs."""
    out: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` imports the submodule (its parent package is imported
            # first, as for every import: implicit parents are not edges here); ``from pkg
            # import name`` imports the package (its face) itself
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out.update(subs & known)
            if subs - known:
                out.add(node.module)
                # a lazy face imports on first use the module that defines the name
                face = FACES.get(node.module, {})
                out.update(face[a.name] for a in node.names if a.name in face)
        elif deferred or not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                        | ast.ClassDef):
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))
    return {m for m in out if m in known and m != me}


def _top_level_imports(path: Path, known: set[str], me: str) -> set[str]:
    """What importing ``path`` imports (top-level statements, their if/try bodies)."""
    return _imports(ast.parse(path.read_text(encoding="utf-8")).body, known, me, deferred=False)


def _all_imports(path: Path, known: set[str], me: str) -> set[str]:
    """Also the imports deferred into functions: a cycle there is still a cycle of design."""
    return _imports(ast.parse(path.read_text(encoding="utf-8")).body, known, me, deferred=True)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d):], d])
            elif d not in state:
                visit(d, path)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_no_import_cycle_in_search_or_trainables():
    mods = _modules()
    graph = {m: _top_level_imports(p, set(mods), m) for m, p in mods.items()}
    cycles = _cycles(graph)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
    # reading a spec never reaches the space (no network is built while YAML is read)
    reach, todo = set(), ["search.spec"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    assert not {m for m in reach if m.startswith("search.space")}


def test_no_import_cycle_even_through_imports_deferred_into_functions():
    """A function-level import that closes a loop is a cycle of design that the top-level check
    cannot see (the driver imported the tuner, which imported the driver's outcome type)."""
    mods = _modules()
    graph = {m: _all_imports(p, set(mods), m) for m, p in mods.items()}
    cycles = _cycles(graph)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_dims_is_a_leaf():
    mods = _modules()
    leaf = "search.spec.dims"
    assert _top_level_imports(mods[leaf], set(mods), leaf) <= {"search.pickled"}


def test_no_file_over_800_lines():
    """Files are cut by concept, not by a line cap; one past ~800 lines holds two concepts."""
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > 800} == {}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_name():
    """``from m import _x`` or ``m._x`` across modules: the two are one concept (one file) or
    ``_x`` is public. A module private to one other (``trainables._trace``) names no ``_x`` it
    lends."""
    mods = _modules()
    found = []
    for me, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = {}  # local name -> project module it is
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        bound[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif node.module in mods and node.module != me and _private(a.name):
                        found.append(f"{me}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname and a.name in mods})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and _private(node.attr)):
                found.append(f"{me}: {bound[node.value.id]}.{node.attr}")
    assert found == []


def test_no_type_checking_import_hides_a_cycle():
    """``if TYPE_CHECKING: from b import X`` in a module that ``b`` imports (directly or not,
    faces resolved) is a cycle the runtime check cannot see: the type belongs lower down."""
    mods = _modules()
    graph = {m: _all_imports(p, set(mods), m) for m, p in mods.items()}
    hidden = []
    for me, path in mods.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not _is_type_checking(node):
                continue
            for target in _imports(node.body, set(mods), me, deferred=True):
                seen, todo = set(), [target]
                while todo:
                    m = todo.pop()
                    if m not in seen:
                        seen.add(m)
                        todo.extend(graph[m])
                if me in seen:
                    hidden.append(f"{me} -> (TYPE_CHECKING) {target} -> ... -> {me}")
    assert hidden == []


def _space() -> SearchSpace:
    data = yaml.safe_load(MNIST_SPACE.read_text())
    spec = parse_spec(data, source=str(MNIST_SPACE))
    return SearchSpace(spec, input_shape=(1, 28, 28), num_classes=10)


def test_spec_and_space_pickle_round_trip():
    space = _space()
    spec = space.spec
    dims = [v for v in vars(spec.space).values() if isinstance(v, (Choice, IntRange, FloatRange))]
    assert dims, "the space searches something"
    clone = pickle.loads(pickle.dumps(space))
    assert isinstance(clone, SearchSpace) and clone.spec == spec
    assert clone.input_shape == space.input_shape and clone.initial == space.initial
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert pickle.loads(pickle.dumps(dims)) == dims


def test_pickles_naming_the_old_module_paths_still_load():
    """Run dirs written before the folders pickled ``search.searchspace.SearchSpace``,
    ``search.spec_model.<class>`` and ``search.dims.<class>``: rewrite a new pickle's public
    paths to those and load it (the alias table of :mod:`search.pickled`)."""
    space = _space()
    blob = pickle.dumps(space, protocol=2)  # protocol 2: "c<module>\n<name>\n" in plain bytes
    renames = {b"csearch.space\nSearchSpace\n": b"csearch.searchspace\nSearchSpace\n",
               b"csearch.spec\nSearchSpec\n": b"csearch.spec_model\nSearchSpec\n",
               b"csearch.spec\nIntRange\n": b"csearch.dims\nIntRange\n"}
    old = blob
    for new_path, old_path in renames.items():
        assert new_path in old, new_path  # pinned to the folder's public path
        old = old.replace(new_path, old_path)
    clone = pickle.loads(old)
    assert type(clone) is SearchSpace and clone.spec == space.spec
    assert type(clone.spec) is SearchSpec


def test_every_name_a_lazy_face_lists_is_what_it_names():
    """Each folder face's ``_PUBLIC`` name resolves to the object its module defines, never
    to a submodule of the same name (``search.space.dry_run`` the module once shadowed
    ``dry_run`` the function: the module is ``preview`` now)."""
    import importlib
    import types

    wrong = []
    for face, names in FACES.items():
        package = importlib.import_module(face)
        for name, module in names.items():
            got = getattr(package, name)
            if isinstance(got, types.ModuleType) or got is not getattr(
                    importlib.import_module(module), name):
                wrong.append(f"{face}.{name}")
    assert wrong == []
