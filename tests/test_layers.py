"""The package's floors (docs/design.md section 4.2), checked on the source and in a process
without Triton: the reference imports neither Triton nor the kernel layer, modules only hold
parameters and call `functional`, every autograd Function lives in `ops/`, and no module imports
the package itself from inside a function."""

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


def _imports(path: pathlib.Path):
    """(module imported, inside a function?) for every import of `path`, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg[: len(pkg) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                    if child.module:
                        found.append((name, in_function))
                    else:
                        found.extend((f"{name}.{a.name}", in_function) for a in child.names)
                else:
                    found.append((child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


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
