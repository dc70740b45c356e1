"""How much of notebook 03's seed-set variation comes from its one pretrained classifier?

    python benchmarks/phang_classifier_variance.py [--classifiers 0,1,2,3,4] [--cache DIR]

Not a timing: a variance diagnostic for the robustness section of the README. Every interval of 03
used to be taken over masker seeds that shared one classifier, trained once from the notebook's seed
(03 now gives replicate r its own classifier r; this script keeps the old design on purpose). Here the
data stay those of seed 0, and only the classifier is retrained, once per replicate of
`--classifiers` (0 is the notebook's own); on each classifier, five S2 (masked-out only) and five S3 (masked-in and
-out) maskers are trained at the `quick` schedule, as in the notebook. Per classifier the table gives
the mean LE of S2 and S3 and the cascading-randomisation similarities of the S3 maskers, each with
its 95% t interval over the five maskers, as 03's findings compute them. If the classifiers' means
differ by more than those intervals, the intervals leave out the classifier's variation.

Classifier k is `P.train_classifier(..., replicate=k)`: the same data, its own seed for the initial
weights and the batch order. Everything is trained in a cache folder of its own (`--cache`, default a
new temporary folder), so that every number comes from this machine's arithmetic, never from models
another machine left in the project's cache. About 75 s per classifier on one thread of a 2-core CPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from study import config
from study.experiments import phang2020 as P
from study.findings import mean_interval


def one_classifier(d: dict, s: dict, replicate: int) -> dict:
    started = time.perf_counter()
    clf = P.train_classifier(d, s, "cpu", replicate=replicate)
    # all five maskers on this one classifier (the notebook gives replicate r classifier r)
    runs, grid = P.train_grid([clf] * 5, d, s, {"fix": s["tv_grid"][0], "ca": s["tv_grid"][0]}, "cpu")
    per_seed = P.per_seed_table(grid)
    row = {"classifier": replicate, "test accuracy": round(clf["test_accuracy"], 3)}
    for name in ("S2", "S3"):
        mean, low, high = mean_interval(per_seed.loc[per_seed["row"] == name, "LE"])
        row[f"{name} LE"] = f"{mean:.1f} [{low:.1f}, {high:.1f}]"
    # the similarities and their intervals over maskers exactly as 03's finding computes them
    row["S3 cascading randomisation"] = P._claim_randomisation(
        P.randomisation_checks(runs, d, s, row="S3"))["uncertainty"]
    row["seconds"] = round(time.perf_counter() - started)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifiers", default="0,1,2,3,4", help="classifier replicates, comma-separated")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: a new temporary one)")
    args = parser.parse_args()
    replicates = [int(x) for x in args.classifiers.split(",")]
    config.CACHE_DIR = args.cache or Path(tempfile.mkdtemp(prefix="phang-classifier-variance-"))
    s = P.experiment_settings("quick", rows={"S2": 5, "S3": 5})
    P.setup(s)
    config.seed_everything(0)
    d = P.load_data(s, 0)
    rows = []
    for replicate in replicates:
        rows.append(one_classifier(d, s, replicate))
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    print(f"\ndata of seed 0, cache {config.CACHE_DIR}; 95% t intervals over 5 maskers per classifier")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
