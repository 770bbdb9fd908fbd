"""The house's imports flow one way: no module of the project imports, directly or through others, a module that
imports it back, counting imports inside functions too (a lazy import is still a dependency)."""
import ast
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
