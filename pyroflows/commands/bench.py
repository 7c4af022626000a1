"""``pyroflows bench``: time pyroflows against Pyro, zuko, nflows and normflows.

The defaults (MAF at D = 8, hidden 256, 5 layers, batch 1024, 5 rounds) finish in well under a
minute; ``benchmarks/flows.py`` runs the full comparison (D = 8 and 64, MAF, IAF and RealNVP).
Set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` before starting the
process for stable timings (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pyroflows.benchmark import FAMILIES, LIBRARIES, MALLOC_ENV, OPS, markdown_table, run_benchmark
from pyroflows.cli import (
    add_common_arguments,
    configure_threads,
    int_flag,
    output_dir,
    output_files,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyroflows bench``.

    Args:
        parser: the subcommand's parser.
    """
    add_common_arguments(parser, threads="1, steadier timings when other jobs share the cores")
    parser.add_argument("--families", nargs="+", default=["maf"], choices=FAMILIES,
                        help="flow families (default: maf)")
    parser.add_argument("--dims", type=int_flag(1), nargs="+", default=[8],
                        help="event dimensions D (default: 8)")
    parser.add_argument("--hidden", type=int_flag(1), default=256,
                        help="width of both hidden layers (default: 256)")
    parser.add_argument("--layers", type=int_flag(1), default=5,
                        help="number of flow layers (default: 5)")
    parser.add_argument("--batch", type=int_flag(1), default=1024,
                        help="batch size (default: 1024)")
    parser.add_argument("--rounds", type=int_flag(1), default=5,
                        help="timed rounds; medians are reported (default: 5)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES),
                        choices=list(LIBRARIES),
                        help="libraries to time (missing peers are skipped)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS,
                        help="operations to time")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows bench``: print a markdown table, write ``bench.json`` and ``bench.md``.

    Args:
        args: the parsed flags.

    Returns:
        the ratios and the paths of the files written.
    """
    if args.device != "cpu":
        raise ValueError(f"--device: the benchmark runs on cpu only, got {args.device!r}")
    threads = configure_threads(args.threads or 1, 0)
    out = output_dir(args.out)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_benchmark(
        families=args.families, dims=args.dims, hidden=args.hidden, layers=args.layers,
        batch=args.batch, rounds=args.rounds, libraries=args.libraries, ops=args.ops,
        seed=args.seed, progress=None if args.quiet or args.json else progress,
    )
    table = markdown_table(report)
    json_path, md_path = output_files(out, "bench", [".json", ".md"], overwrite=args.overwrite)
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(table + "\n")
    if not args.json:
        print(table)
        for name, why in report["skipped"].items():
            print(f"skipped {name}: {why}")
        if any(report["environment"]["malloc_env"][k] != v for k, v in MALLOC_ENV.items()):
            env = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
            print(f"note: set {env} for steadier timings")
    return dict(ratios=report["ratios"], threads=threads, json=str(json_path),
                table=str(md_path))
