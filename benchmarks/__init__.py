"""The project's benchmarks, kept out of the installed package (the wheel holds the kernels). Run from
the repository root, after ``pip install --no-build-isolation -e ".[bench]"`` (``".[real]"`` for the
real task):

    python -m benchmarks                    # the benchmark report (cli.py, docs/design.md section 7)
    python -m benchmarks.real_task          # IAPT vs LoRA vs prompt tuning on SmolLM2-135M and BBC News
    python -m benchmarks.real_task_study    # the same over seeds and a learning-rate sweep (issue 20)
    python -m benchmarks.multi_tenant_cpu   # the C++ multi-tenant generator's acceptance timing
    python -m benchmarks.vllm_serving       # IAPT vs LoRA served by vLLM (.venv-vllm)
    python -m pytest benchmarks --benchmark-only   # the report's cases as a pytest-benchmark suite
    python benchmarks/static_report.py --arch 80 90  # ahead-of-time compile of every kernel config

The modules: the report's cases (``cases``, shared with ``test_bench.py``), timers (``timing``), the GPU
cost model (``cost``), the serving comparison (``e2e``), the tenant sweep (``tenants``), the writers
(``report``), and the real-task run (``real_task``) with its model and data (``real_task_data``: BBC News
and Rotten Tomatoes), its outputs (``real_task_report``) and its multi-seed study (``real_task_study``). Importing the package imports none of them, so a light user (the GPU
check's timing step needs ``cases`` alone) pulls in no plotting or progress-bar dependency.
"""
