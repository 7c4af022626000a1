"""The benchmark harness runs and reports well-formed results (no timing is asserted)."""

import json

import pytest

from pyroflows.benchmark import markdown_table, run_benchmark
from pyroflows.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def test_harness_reports_every_library_and_ratio():
    report = run_benchmark(
        families=("maf", "iaf", "realnvp"),
        dims=(3,),
        hidden=8,
        layers=2,
        batch=16,
        rounds=2,
        warmup=0,
    )
    libs = {r["library"] for r in report["results"]}
    assert "pyroflows" in libs and "pyro" in libs
    for r in report["results"]:
        assert r["rounds"] == 2 and 0 < r["min_ms"] <= r["median_ms"]
    ratios = {(r["family"], r["op"]): r for r in report["ratios"]}
    assert set(ratios) == {
        (f, op)
        for f in ("maf", "iaf", "realnvp")
        for op in ("log_prob", "sample", "train_step", "floor")
    }
    assert ratios["maf", "log_prob"]["vs_floor"] > 0 and ratios["maf", "floor"]["vs_floor"] is None
    assert ratios["maf", "sample"]["fastest_peer"] in libs - {"pyroflows"}
    table = markdown_table(report)
    assert table.count("\n") == 2 + len(report["ratios"]) - 1 and "pyroflows / floor" in table


def test_bench_command(tmp_path, capsys):
    argv = [
        "bench",
        "--dims",
        "2",
        "--hidden",
        "4",
        "--layers",
        "1",
        "--batch",
        "8",
        "--rounds",
        "1",
        "--libraries",
        "pyroflows",
        "pyro",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert metrics["ratios"] == report["ratios"] and (tmp_path / "bench.md").read_text().startswith(
        "| family"
    )


def test_spline_families_against_every_installed_peer():
    report = run_benchmark(
        families=("nsf", "nsf_ar"), dims=(3,), hidden=8, layers=2, batch=16, rounds=1, warmup=0
    )
    libs = {r["library"] for r in report["results"]}
    assert {"pyroflows", "pyro"} <= libs and all(
        k.startswith("normflows") for k in report["skipped"] if "nsf" in k
    )
    ops = {(r["family"], r["op"]) for r in report["ratios"]}
    assert ops == {
        (f, op) for f in ("nsf", "nsf_ar") for op in ("log_prob", "sample", "train_step", "floor")
    }


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(families=("glow",)), "families"),
        (dict(dims=(1,)), "dims"),
        (dict(rounds=0), "rounds"),
        (dict(libraries=("pyro",)), "must include pyroflows"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_benchmark(**kwargs)
