"""Benchmarking, one home: the `iapt-bench` report (`cli`, docs/design.md section 7), its cases
(`cases`, shared with the pytest-benchmark suite under `benchmarks/`), timers (`timing`), the GPU cost
model (`cost`), the serving comparison (`e2e`), the tenant sweep (`tenants`), the C++ multi-tenant
acceptance timing (`multi_tenant_cpu`) and the real-task run (`real_task`, `iapt-real-task`).
"""

from __future__ import annotations

from .cases import (
    MODES,
    Case,
    configure_compile,
    default_cases,
    generator_cases,
    kernel_backends,
    multi_tenant_available,
    multi_tenant_cases,
    rational_cases,
)
from .cli import configure_malloc, main, run
from .report import format_table
from .timing import machine_description, run_cases, time_cpu, time_cuda

_configure_malloc = configure_malloc  # the name benchmark scripts used before it was public

__all__ = [
    "MODES",
    "Case",
    "configure_compile",
    "default_cases",
    "rational_cases",
    "generator_cases",
    "multi_tenant_cases",
    "multi_tenant_available",
    "kernel_backends",
    "run_cases",
    "time_cpu",
    "time_cuda",
    "format_table",
    "machine_description",
    "main",
    "run",
    "configure_malloc",
]
