# The one version source: pyproject.toml reads it (setuptools `dynamic`, statically, without
# importing the package) and `iapt_kernels.__version__` re-exports it.
__version__ = "0.1.0"
