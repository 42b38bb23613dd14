"""The package's floors (docs/design.md section 4.2), checked on the source and in a process
without Triton: the reference imports neither Triton nor the kernel layer, modules only hold
parameters and call `functional`, every autograd Function lives in `ops/`, no module imports
the package itself from inside a function, the integrations import one way (section 9), and no
import cycle joins the package's modules. Every import counts, those inside functions too."""

import ast
import pathlib
import subprocess
import sys
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "iapt_kernels"

BLOCK_TRITON = textwrap.dedent("""
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, NoTriton())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TRITON + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )


def test_reference_imports_and_runs_without_triton():
    out = _run("""
        import torch
        import iapt_kernels.reference as ref
        from iapt_kernels import TenantGroups, rational_init, available_backends

        assert "triton" not in available_backends()
        h, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
        p = ref.PromptGenerator(8, 4)(h, mask)
        mt = ref.MultiTenantPromptGenerator(2, 8, 4)
        q = mt(h, mask, groups=TenantGroups.build(torch.tensor([0, -1, 1]), 2))
        assert p.shape == q.shape == (3, 4, 8)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "triton"
                        or m.startswith(("iapt_kernels.ops", "iapt_kernels.modules", "iapt_kernels.library")))
        assert not loaded, loaded
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_kernel_layer_says_what_is_missing_without_triton():
    """Without Triton the kernel layer still imports (CPU tensors run C++, tests/test_library.py);
    asking for the Triton backend is the error that names it."""
    out = _run("""
        import torch
        import iapt_kernels
        num, den = iapt_kernels.rational_init("gelu")
        try:
            iapt_kernels.rational(torch.randn(4), num, den, backend="triton")
        except RuntimeError as exc:
            print("RuntimeError", exc)
    """)
    assert out.returncode == 0 and "RuntimeError" in out.stdout and "triton" in out.stdout, out.stderr


def _module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent, modules=MODULES):
    """(module imported, inside a function?) for every import of `path`, relative ones resolved.

    ``from X import y`` names ``X.y`` when that is a module of the package, else ``X``."""
    name = _module_name(path, root)
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - child.level + 1]) if child.level else ""
                source = ".".join(p for p in (base, child.module) if p)
                for a in child.names:
                    sub = f"{source}.{a.name}"
                    found.append((sub if sub in modules else source, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _lazy_imports() -> set[str]:
    """The modules the package `__init__` imports by name (`import_module`, for its kernel-layer
    names): the values of its `_KERNEL_LAYER` table."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    tables = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "_KERNEL_LAYER" for t in node.targets)
    ]
    uses_import_module = any(
        isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_module"
        for node in ast.walk(tree)
    )
    assert tables or not uses_import_module, "__init__ imports by name without a _KERNEL_LAYER table to read"
    return {f"iapt_kernels.{m}" for table in tables for m in ast.literal_eval(table).values()}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside a function."""
    graph = {mod: {m for m, _ in _imports(f) if m in MODULES and m != mod} for mod, f in MODULES.items()}
    graph["iapt_kernels"] |= _lazy_imports()
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that returns to its start, or None."""
    done, path, on_path = set(), [], set()

    def visit(mod):
        path.append(mod)
        on_path.add(mod)
        for dep in sorted(graph[mod]):
            if dep in on_path:
                return path[path.index(dep) :] + [dep]
            if dep not in done:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        on_path.discard(mod)
        done.add(mod)
        return None

    for mod in sorted(graph):
        if mod not in done:
            found = visit(mod)
            if found:
                return found
    return None


def _files(sub: str):
    return sorted((PACKAGE / sub).rglob("*.py")) if (PACKAGE / sub).is_dir() else [PACKAGE / f"{sub}.py"]


def test_floors():
    kernel_layer = (
        "iapt_kernels.ops",
        "iapt_kernels.modules",
        "iapt_kernels.library",
        "iapt_kernels.functional",
        "iapt_kernels.integrations",
        "triton",
    )
    for sub in ("reference", "tenants", "fits", "_validate"):
        for f in _files(sub):
            bad = [m for m, _ in _imports(f) if m.startswith(kernel_layer)]
            assert not bad, f"{f.name} imports the kernel layer: {bad}"
    for f in _files("modules"):
        bad = [
            m for m, _ in _imports(f) if m.startswith(("iapt_kernels.ops", "iapt_kernels.library", "triton"))
        ]
        assert not bad, f"modules/{f.name} reaches past functional: {bad}"


def test_no_function_local_self_imports():
    for f in sorted(PACKAGE.rglob("*.py")):
        bad = [m for m, local in _imports(f) if local and m == "iapt_kernels"]
        assert not bad, f"{f.relative_to(PACKAGE)} imports iapt_kernels inside a function"


def test_imports_resolve_to_package_modules():
    # The graph below is only as good as the resolution: every import of the package must name one
    # of its modules (a rename that leaves an import behind would drop an edge silently).
    for f in MODULES.values():
        bad = [m for m, _ in _imports(f) if m.split(".")[0] == "iapt_kernels" and m not in MODULES]
        assert not bad, f"{f.relative_to(PACKAGE)} imports {bad}, which are not modules of the package"


def test_no_import_cycle():
    """The package's modules import one another one way only, counting imports inside functions: a
    cycle hidden by a function-local import is still a cycle (each side needs the other)."""
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each integrations module imports only those before it: the configuration and the adapter files know
# no model, the model knows no collator or serving plugin (docs/design.md section 9).
INTEGRATION_FLOORS = ("slots", "config", "hooks", "io", "collator", "model", "vllm")


def test_integrations_import_one_way():
    prefix = "iapt_kernels.integrations."
    graph = _import_graph()
    inside = sorted(m for m in graph if m.startswith(prefix))
    level = {m: m[len(prefix) :].split(".")[0] for m in inside}
    unplaced = sorted({name for name in level.values() if name not in INTEGRATION_FLOORS})
    assert not unplaced, f"integrations modules {unplaced} are not placed in INTEGRATION_FLOORS"
    floor = {m: INTEGRATION_FLOORS.index(name) for m, name in level.items()}
    for mod in inside:
        above = sorted(m for m in graph[mod] if m in floor and floor[m] > floor[mod])
        assert not above, f"{mod} imports {above}, above it in INTEGRATION_FLOORS"


def test_imports_inside_functions_are_resolved(tmp_path):
    pkg = tmp_path / "iapt_kernels" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text(
        "import torch\nfrom . import b\n\n\ndef f():\n    from ..c import x\n    from . import d\n"
    )
    mods = {"iapt_kernels.sub.b", "iapt_kernels.c", "iapt_kernels.sub.d"}
    assert _imports(pkg / "a.py", tmp_path, mods) == [
        ("torch", False),
        ("iapt_kernels.sub.b", False),
        ("iapt_kernels.c", True),
        ("iapt_kernels.sub.d", True),
    ]


def test_cycle_finder():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_autograd_functions_live_in_ops():
    for f in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b).endswith("autograd.Function") for b in node.bases
            ):
                assert f.parent.name == "ops", (
                    f"{node.name} ({f.relative_to(PACKAGE)}) is an autograd Function outside ops/"
                )
