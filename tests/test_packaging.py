"""Install behaviour a new user meets first (issue 15, item 10): setup.py fails loudly when the
extension cannot be built, compiles without debug info in parallel. What the wheel holds (issue 22):
the kernels alone, requiring torch and Triton alone; the kernels and the training demo need neither
numpy nor tqdm."""

import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_setup(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_setup_without_torch_fails_loudly():
    hide_torch = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    r = _run_setup(hide_torch, IAPT_NO_EXTENSION="0")
    assert r.returncode != 0
    assert "cannot import torch" in r.stderr and "--no-build-isolation" in r.stderr
    assert "IAPT_NO_EXTENSION=1" in r.stderr
    ok = _run_setup(hide_torch, IAPT_NO_EXTENSION="1")  # opting out on purpose installs
    assert ok.returncode == 0, ok.stderr
    assert "skipping the C++ extension" in ok.stderr


@pytest.mark.slow  # a whole tool run: the slow tier
def test_setup_compiles_with_ninja_without_debug_info():
    pytest.importorskip("torch.utils.cpp_extension")
    pytest.importorskip("ninja", reason="the test command installs ninja; without it the build is serial")
    code = (
        "import setuptools, runpy; from setuptools.dist import Distribution; seen = {}; "
        "setuptools.setup = lambda **kw: seen.update(kw); "
        "runpy.run_path('setup.py', run_name='__main__'); ext = seen['ext_modules'][0]; "
        "cls = seen['cmdclass']['build_ext']; "
        "print(ext.extra_compile_args, cls.__mro__[1].__name__, cls(Distribution()).use_ninja)"
    )
    r = _run_setup(code, IAPT_NO_EXTENSION="0")
    assert r.returncode == 0, r.stderr
    assert "'-g0'" in r.stdout and "'-O3'" in r.stdout
    assert r.stdout.split()[-2:] == ["BuildExtension", "True"], r.stdout


def test_wheel_holds_the_kernels_and_requires_torch_and_triton_alone(tmp_path):
    """`pip wheel .`: nothing but `iapt_kernels` and its metadata, no benchmark, real-task or test
    module, no console script, and the only unconditional requirements are torch and Triton."""
    src = tmp_path / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for folder in ("iapt_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=skip)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "IAPT_NO_EXTENSION": "1"},  # the C++ build adds one file, not what is tested
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = tmp_path.glob("iapt_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"iapt_kernels", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "iapt_kernels/__init__.py" in names and "iapt_kernels/train.py" in names
    assert not [n for n in names if "bench" in n or "real_task" in n], names
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    required = [req for req in meta.get_all("Requires-Dist") if "extra ==" not in req]
    assert sorted(re.match(r"[A-Za-z0-9_.-]+", req).group() for req in required) == ["torch", "triton"], (
        required
    )
    assert "platform_system" in next(req for req in required if req.startswith("triton")), required
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    if entry_points:
        assert "console_scripts" not in zipfile.ZipFile(wheel).read(entry_points[0]).decode()


def test_the_package_imports_neither_numpy_nor_tqdm():
    """The core dependencies are torch and Triton: no module of the package (the kernels, the
    integrations, the training demo) imports numpy or tqdm, and with both blocked the package imports
    and a generator runs its kernels."""
    offenders = []
    for path in sorted(Path(ROOT, "iapt_kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in ("numpy", "tqdm")
            ]
    assert not offenders, f"not dependencies of the package (torch and Triton are): {offenders}"
    kernels = (
        "import sys; sys.modules['numpy'] = None; sys.modules['tqdm'] = None\n"
        "import torch, iapt_kernels as ik\n"
        "g = ik.PromptGenerator(16, 4, 8)\n"
        "h, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)\n"
        "print(tuple(g(h, mask).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", kernels], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "(2, 8, 16)"
