"""Speed of MAF, IAF, RealNVP and neural spline (NSF coupling and autoregressive) layers in
pyroflows against Pyro, zuko, nflows and normflows.

The full comparison of issues 3 and 14 (D = 8 and 64, hidden 256, 5 layers, batch 1024),
interleaved and shuffled rounds, medians; prints a markdown table and writes ``bench.json`` /
``bench.md`` to ``--out``. Run it as documented in ``benchmarks/README.md``:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/flows.py --out benchmarks/results

Any ``pyroflows bench`` flag can be given to override these defaults.
"""

import sys

from pyroflows.cli import main

FULL = [
    "--families", "maf", "iaf", "realnvp", "nsf", "nsf_ar", "--dims", "8", "64", "--rounds", "9",
]

if __name__ == "__main__":
    sys.exit(main(["bench", *FULL, *sys.argv[1:]]))
