"""The layers point one way: main.py and bench/ on top, then gpt2_cupy, then gpt2_numpy.

gpt2_numpy (the tutorial) never imports its GPU twin or its benchmarks, and no module imports
itself back through a chain of imports.
"""
import ast
import re
import subprocess
import sys

from conftest import ROOT

PACKAGES = ["gpt2_numpy", "gpt2_cupy", "bench"]
# Who may import whom. main.py is the CLI; bench/ measures both backends.
ALLOWED = {"main": {"bench", "gpt2_cupy", "gpt2_numpy"}, "bench": {"gpt2_cupy", "gpt2_numpy"},
           "gpt2_cupy": {"gpt2_numpy"}, "gpt2_numpy": set()}


def modules_imported_by(code: str) -> set:
    """The modules a fresh Python has loaded after running `code` (from the repository root)."""
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(*sorted(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def upper_layers(modules) -> list:
    return sorted(m for m in modules if m.split(".")[0] in ("gpt2_cupy", "bench", "main"))


def test_importing_gpt2_numpy_loads_neither_gpt2_cupy_nor_bench():
    assert upper_layers(modules_imported_by("import gpt2_numpy")) == []
    # The check sees a violation: importing bench alongside is caught.
    assert "bench" in upper_layers(modules_imported_by("import gpt2_numpy, bench"))


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """module -> the project's modules it imports anywhere in its source (at the top or inside
    a function), read from the source with ast: {"gpt2_numpy.load": {"gpt2_numpy.model", ...}}."""
    files = [ROOT / "main.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    names = {module_name(p): p for p in files}
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in names and t != name}
        graph[name] = edges
    return graph


def layer(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict):
    """One cycle of the directed graph as a list of nodes, or None."""
    state = {}  # node -> "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_imports_point_down_the_layers_only():
    graph = import_graph()
    assert {"gpt2_numpy.decoding", "gpt2_cupy.graphs", "bench.replay", "main"} <= set(graph)
    wrong = sorted((a, b) for a, targets in graph.items() for b in targets
                   if layer(a) != layer(b) and layer(b) not in ALLOWED[layer(a)])
    assert wrong == []
    assert "gpt2_numpy.decoding" in graph["bench.replay"]  # the graph does see real imports


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert find_cycle(graph) is None, find_cycle(graph)
    layers = {layer(a): set() for a in graph}
    for a, targets in graph.items():
        layers[layer(a)] |= {layer(b) for b in targets if layer(b) != layer(a)}
    assert find_cycle(layers) is None
    # The search finds a cycle where there is one.
    assert find_cycle({**graph, "gpt2_numpy.errors": {"gpt2_numpy.load"}}) is not None


def reachable(graph: dict, roots) -> set:
    seen, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_library_ships_only_what_it_uses():
    """Every module of gpt2_numpy is reached from the package (its __init__ and api.py, which
    __init__ loads on first use), from main.py or from a command of its own (a __main__, run by
    python -m): a module only tests or bench/ use lives there."""
    graph = import_graph()
    commands = [m for m in graph if m.endswith(".__main__")]
    assert "gpt2_numpy.medusa.__main__" in commands
    used = reachable(graph, ["gpt2_numpy", "gpt2_numpy.api", "main", *commands])
    library = {m for m in graph if layer(m) == "gpt2_numpy"}
    assert sorted(library - used) == []
    # The search sees an unused module: one that nothing imports.
    assert "gpt2_numpy.unused" not in reachable({**graph, "gpt2_numpy.unused": set()},
                                                ["gpt2_numpy", "gpt2_numpy.api", "main"])


def test_the_tutorials_decoders_know_nothing_of_adaptive_K():
    """decoding.py (the papers' loop) reaches neither adaptive.py nor anything that imports it:
    adaptive K is a layer on top of the round."""
    graph = import_graph()
    assert "gpt2_numpy.decoding" in graph["gpt2_numpy.adaptive"]  # the layer above sees it
    assert "gpt2_numpy.adaptive" not in reachable(graph, ["gpt2_numpy.decoding"])


# --- the lessons: each file on the reading path knows nothing of the ones after it ----------------

# The reading path, in order, and what each later lesson is called in code and prose.
LESSONS = ["gpt2_numpy.model", "gpt2_numpy.sampling", "gpt2_numpy.decoding"]
LATER = {"gpt2_numpy.tree", "gpt2_numpy.products", "gpt2_numpy.adaptive", "gpt2_numpy.drafters",
         "gpt2_numpy.medusa", "gpt2_numpy.medusa.heads"}
LATER_WORDS = re.compile(r"tree|products\b|planned|adaptive|polic(y|ies)|medusa|n-?gram|"
                         r"parents|sibling|accept_one_of|without_replacement|look.?back",
                         re.IGNORECASE)


def later_words(source: str) -> list:
    return sorted({m.group(0).lower() for m in LATER_WORDS.finditer(source)})


def test_the_first_three_lessons_name_and_import_no_later_one():
    """model.py, sampling.py and decoding.py import no later lesson, directly or through
    another module, and never name one: no tree, products plan, adaptive K or policy, n-gram or
    Medusa drafting, in code or in prose."""
    graph = import_graph()
    for lesson in LESSONS:
        assert reachable(graph, [lesson]) & LATER == set(), lesson
        source = (ROOT / (lesson.replace(".", "/") + ".py")).read_text()
        assert later_words(source) == [], lesson
    # The checks see what they look for: the tree lesson names itself, and imports decoding.
    assert "tree" in later_words((ROOT / "gpt2_numpy" / "tree.py").read_text())
    assert "gpt2_numpy.decoding" in reachable(graph, ["gpt2_numpy.tree"])


def test_the_lessons_are_short():
    """The first three lessons fit in 450 lines together (docstrings included), adaptive.py in
    300: a learner reads each in one sitting."""
    def lines(module):
        return len((ROOT / (module.replace(".", "/") + ".py")).read_text().splitlines())

    assert sum(lines(m) for m in LESSONS) <= 450, {m: lines(m) for m in LESSONS}
    assert lines("gpt2_numpy.adaptive") <= 300


def test_the_readmes_reading_order_gives_each_files_length():
    """README.md's reading order says how long each lesson is: what it says is what the file
    holds (a file that grew, or shrank, is named)."""
    readme = (ROOT / "README.md").read_text()
    claims = re.findall(r"\*\*`([\w/]+\.py)`\*\* \((\d+) lines\)", readme)
    claims += [(f"gpt2_numpy/medusa/{name}", n)
               for name, n in re.findall(r"`(\w+\.py)` (\d+)(?:,| lines)", readme)]
    assert len(claims) >= 9
    wrong = {path: (int(n), len((ROOT / path).read_text().splitlines())) for path, n in claims
             if int(n) != len((ROOT / path).read_text().splitlines())}
    assert wrong == {}
