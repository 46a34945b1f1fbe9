"""Summarise an Nsight Compute run: per kernel, its headline numbers and where its warps stall.

Why: the CSV exports of ``ncu --page details`` and ``--page source --print-source sass`` (what
``run_all_on_gpu.sh`` step ``ncu`` writes) are megabytes; what a kernel decision needs is a few
lines per kernel: duration, registers, occupancy, issue rate, DRAM throughput, the stall reasons
over all warp samples, and the SASS lines that collect most samples (with their top reasons).

    python benchmarks/ncu_stalls.py DETAILS.csv SASS.csv [--top 8]
"""
from __future__ import annotations

import argparse
import collections
import csv
import re

HEADLINE = ("Duration", "Registers Per Thread", "Grid Size", "Achieved Occupancy", "Issued Warp Per Scheduler",
            "No Eligible", "Eligible Warps Per Scheduler", "DRAM Throughput", "Compute (SM) Throughput")


def headlines(details_csv: str) -> list[tuple[str, str]]:
    """(kernel, "metric value unit, ...") per profiled launch, in launch order."""
    rows = list(csv.reader(open(details_csv, newline="")))
    col = {name: i for i, name in enumerate(rows[0])}
    launches: dict[str, tuple[str, dict]] = {}
    for row in rows[1:]:
        name = row[col["Metric Name"]]
        if name in HEADLINE:
            kernel, metrics = launches.setdefault(row[col["ID"]], (row[col["Kernel Name"]], {}))
            metrics.setdefault(name, f"{row[col['Metric Value']]} {row[col['Metric Unit']]}".strip())
    return [(kernel, ", ".join(f"{m} {metrics[m]}" for m in HEADLINE if m in metrics))
            for kernel, metrics in launches.values()]


def base_name(kernel: str) -> str:
    """``void at::native::elementwise_kernel<(int)128, ...>`` -> ``elementwise_kernel``: the two
    pages demangle template kernels differently."""
    return re.sub(r"<.*", "", kernel).split("::")[-1].split()[-1]


def stall_tables(sass_csv: str) -> list[tuple[str, list[list[str]]]]:
    """(kernel, per-SASS-line table with its header row first), in page order. The page may
    list a launch more than once (seen for PyTorch's templated kernels)."""
    tables: list[tuple[str, list[str]]] = []
    for line in open(sass_csv, newline="").read().splitlines():
        if line.startswith('"Kernel Name"'):
            tables.append((next(csv.reader([line]))[1], []))
        elif tables:
            tables[-1][1].append(line)
    return [(kernel, list(csv.reader(lines))) for kernel, lines in tables]


def matched(launches: list[tuple[str, str]], tables: list[tuple[str, list[list[str]]]]):
    """Each launch with the next table of the same kernel, in order."""
    i = 0
    for kernel, line in launches:
        while i < len(tables) and base_name(tables[i][0]) != base_name(kernel):
            i += 1
        yield kernel, line, (tables[i][1] if i < len(tables) else None)
        i += 1


def summarise(table: list[list[str]], top: int) -> list[str]:
    header = table[0]
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def count(row, name):
        value = row[col[name]]
        return int(value) if value.isdigit() else 0

    totals = collections.Counter()
    for row in table[1:]:
        for reason in reasons:
            totals[reason] += count(row, reason)
    samples = sum(count(row, "# Samples") for row in table[1:]) or 1
    out = [f"  {samples} warp samples: " + ", ".join(f"{r[6:]} {n / samples:.0%}" for r, n in totals.most_common(8))]
    for row in sorted(table[1:], key=lambda r: -count(r, "# Samples"))[:top]:
        why = sorted(((count(row, r), r[6:]) for r in reasons), reverse=True)[:2]
        out.append(f"    {count(row, '# Samples'):6d}  {row[col['Source']].strip()[:64]:64s} "
                   + ", ".join(f"{name} {n}" for n, name in why if n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("details")
    parser.add_argument("sass")
    parser.add_argument("--top", type=int, default=8, help="SASS lines per kernel")
    args = parser.parse_args()
    for kernel, line, table in matched(headlines(args.details), stall_tables(args.sass)):
        print(f"{kernel[:90]}\n  {line}")
        if table:
            print("\n".join(summarise(table, args.top)))


if __name__ == "__main__":
    main()
