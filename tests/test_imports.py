"""The house's imports flow one way: no module of the project imports, directly or through others, a module that
imports it back, counting imports inside functions too (a lazy import is still a dependency). And no module of ours
takes the import name of an installed package: the checkout is on sys.path, so ours would answer every library's
import of that name (transformers 5.25 imports Hugging Face's `kernels` package, and found our kernels.py)."""
import ast
import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_imports():
    """{module: {project modules it imports anywhere in its source}} for the top-level .py files."""
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {}
    for name in modules:
        with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = (found & modules) - {name}
    return graph


def find_cycle(graph):
    """One import circle as a list of modules, or None (depth-first search for a back edge)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(project_imports())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_imports_nothing_of_the_project():
    assert project_imports()["model"] == set()


def our_import_names():
    """{import name: file} for what the checkout puts on sys.path: top-level modules and packages, and the test
    modules (pytest puts tests/ on sys.path too)."""
    names = {}
    for folder in (ROOT, os.path.join(ROOT, "tests")):
        for f in os.listdir(folder):
            path = os.path.join(folder, f)
            if f.endswith(".py"):
                names[f[:-3]] = os.path.relpath(path, ROOT)
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                names[f] = os.path.relpath(path, ROOT) + "/"
    return names


def shadowed(ours, provided):
    """Lines naming each of our modules whose import name an installed distribution provides."""
    return [f"{ours[name]} hides the import name {name!r} of the installed {', '.join(sorted(set(provided[name])))}"
            for name in sorted(ours) if name in provided]


def test_shadowed_names_are_found():
    assert shadowed({"kernels": "kernels.py", "model": "model.py"}, {"kernels": ["kernels"], "torch": ["torch"]}) == [
        "kernels.py hides the import name 'kernels' of the installed kernels"]


def test_no_module_of_ours_hides_an_installed_package():
    clashes = shadowed(our_import_names(), importlib.metadata.packages_distributions())
    assert not clashes, "rename these modules:\n" + "\n".join(clashes)
