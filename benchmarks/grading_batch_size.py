"""Notebook 02's grading of one trained model at several evaluation batch sizes: seconds, page faults, scores.

    python benchmarks/grading_batch_size.py [--batch-sizes 256,64,32] [--threads 2]

`vandersmissen2024.grade_model` computes every map of the `quick` evaluation images (24 at 64 px) and
scores each with every metric; `settings["batch_size"]` is how many perturbed copies go through the
model at once (Ins/Del curves, Drop, RISE). The models are the `quick` profile's seed-0 VGG-like and
ResNet-like, trained here (or taken from the cache folder). For each batch size: wall seconds per
model, the minor page faults and system seconds of the process meanwhile (large batches map fresh
memory from the kernel on every forward pass), and the largest difference of any score from the
first batch size's (0 means the same numbers). Run it on an idle machine. Nothing is asserted in tests.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd
import torch

from study.experiments import vandersmissen2024 as V


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="256,64,32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prepared, runs = V.setup("quick", 0, "synth_objects_64", device="cpu")
    evaluation = V.evaluation_set(prepared, prepared["settings"]["n_images"])
    rows, reference = [], {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        settings = {**prepared["settings"], "batch_size": batch_size}
        for arch, run in runs.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            frame, _, _ = V.grade_model(run["model"], evaluation, settings, 0, "raster", 0.1, prepared["mean"],
                                        prepared["std"], torch.device("cpu"))
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            scores = frame.drop(columns=["map", "image", "correct", "family"]).to_numpy(np.float64)
            reference.setdefault(arch, scores)
            rows.append({"arch": arch, "batch_size": batch_size, "seconds": round(seconds, 1),
                         "system_s": round(after.ru_stime - before.ru_stime, 1),
                         "page_faults_k": (after.ru_minflt - before.ru_minflt) // 1000,
                         "max_score_diff": float(np.nanmax(np.abs(scores - reference[arch])))})
    table = pd.DataFrame(rows)
    first = table.groupby("arch")["seconds"].transform("first")
    table["speed_up"] = (first / table["seconds"]).round(2)
    print(f"threads={args.threads}")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
