"""Throughput of the procedural generators (images per second), one row per configuration.

    python benchmarks/data_generation.py [--n 1000] [--repeats 3]

Prints the best of `repeats` runs; generation is single-threaded numpy, so the table measures
one core. Nothing here is asserted in tests (the guide keeps timings out of the test suite).
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

from study import data


def best_seconds(build, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = {name: (lambda name=name: data.make_shapes(args.n, 0, name)) for name in data.SHAPES_CONFIGS}
    cases["synth_voc_64 cooccur"] = lambda: data.make_shapes(args.n, 0, "synth_voc_64", cooccur=(3, 2, 0.8))
    cases["crosses (28 px)"] = lambda: data.make_crosses(args.n, 0)
    rows = []
    for name, build in cases.items():
        seconds = best_seconds(build, args.repeats)
        rows.append({"generator": name, "images": args.n, "seconds": round(seconds, 3),
                     "images/s": round(args.n / seconds)})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
