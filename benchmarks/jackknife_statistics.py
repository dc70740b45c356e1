"""Notebook 01's leave-one-image-out jackknifes: one by one against the shortcuts `analyse` uses.

    .venv/bin/python benchmarks/jackknife_statistics.py              # 200 images, as 01 at quick
    .venv/bin/python benchmarks/jackknife_statistics.py --images 50

Scores shaped like 01's (`--images` images of 10 classes, 10 methods, scores rounded to 3 decimals so
that ties occur, a few missing). Two statistics, each per method (class dependence) or once (α):

* class dependence: ε² of the method minus ε² of Random, its jackknife t interval;
  one by one = `metrics.jackknife_ci` re-ranking every leave-one-out sample,
  shortcut = `class_effect_leave_one_out` + `metrics.jackknife_interval`;
* Krippendorff's α (ordinal, ranks within images, missing omitted), its jackknife t interval;
  one by one = `jackknife_ci(krippendorff_alpha)` on the scores, shortcut = the same on ranks computed once.

Prints wall seconds (best of `--repeats`; numpy and scipy only, no model), the speed-up, and whether the
two give the same intervals to the bit (they must). Before 88da7ca notebook 01 also jackknifed 2,000
image × label rows instead of its 200 images (1,800 of them empty): the one-by-one column is the
corrected loop, so the notebook's own gain was larger (about 60 s → 0.5 s for class dependence).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from study import metrics
from study.experiments import tomsett2020 as t


def _best(function, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = np.arange(args.images) % 10
    scores = np.round(labels[:, None] * 0.1 + rng.normal(size=(args.images, 10)), 3)
    scores[rng.random(scores.shape) < 0.01] = np.nan
    random = scores[:, 0]

    def classes_one_by_one():
        return [metrics.jackknife_ci(lambda d: t.class_effect(d[:, 0], d[:, 2]) - t.class_effect(d[:, 1], d[:, 2]),
                                     np.column_stack([scores[:, m], random, labels])) for m in range(1, 10)]

    def classes_shortcut():
        random_out = t.class_effect_leave_one_out(random, labels)
        return [metrics.jackknife_interval(t.class_effect(scores[:, m], labels) - t.class_effect(random, labels),
                                           t.class_effect_leave_one_out(scores[:, m], labels) - random_out)
                for m in range(1, 10)]

    def alpha_one_by_one():
        return metrics.jackknife_ci(lambda m: metrics.krippendorff_alpha(m, missing="omit"), scores)

    def alpha_shortcut():
        ranks = metrics.rank_within_images(scores, missing="omit")
        return metrics.jackknife_ci(lambda r: metrics.krippendorff_alpha(r, ranking="none", missing="omit"), ranks)

    print(f"{args.images} images, 10 classes, 10 methods; best of {args.repeats}")
    print(f"{'statistic':<34} {'one by one (s)':>15} {'shortcut (s)':>13} {'speed-up':>9}  same bits")
    for name, slow, fast in (("class dependence (9 methods)", classes_one_by_one, classes_shortcut),
                             ("Krippendorff's α", alpha_one_by_one, alpha_shortcut)):
        slow_s, slow_result = _best(slow, args.repeats)
        fast_s, fast_result = _best(fast, args.repeats)
        print(f"{name:<34} {slow_s:>15.3f} {fast_s:>13.3f} {slow_s / fast_s:>8.1f}×  {slow_result == fast_result}")


if __name__ == "__main__":
    main()
