"""The tenant sweep of the benchmark report (benchmarks/tenants.py): one record per (tenants, mode,
implementation), written as CSV, markdown and a plot."""

import csv
import os

from benchmarks.tenants import tenant_sweep, write_sweep


def test_tenant_sweep_records_and_outputs(tmp_path):
    calls = []

    def timer(fn):  # runs the case once: the sweep's wiring, not its timings, is under test
        fn()
        calls.append(1)
        return float(len(calls))

    records = tenant_sweep("cpu", tenants=(1, 3), shape=(3, 8, 32, 16, 4), timer=timer)
    impls = {r["impl"] for r in records}
    assert "reference loop" in impls
    assert {(r["tenants"], r["mode"]) for r in records} == {
        (t, m) for t in (1, 3) for m in ("fwd", "fwd+bwd")
    }
    for r in records:
        loop = next(
            q
            for q in records
            if q["impl"] == "reference loop" and q["tenants"] == r["tenants"] and q["mode"] == r["mode"]
        )
        assert r["x_loop"] == loop["ms"] / r["ms"]
    paths = write_sweep(str(tmp_path), records, header="test")
    assert [os.path.basename(p) for p in paths] == ["tenants.csv", "tenants.md", "tenants.png"]
    with open(paths[0]) as f:
        assert len(list(csv.DictReader(f))) == len(records)
    assert os.path.getsize(paths[2]) > 0
