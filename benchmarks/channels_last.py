"""Channels-last memory format for training on the CPU: milliseconds per step, and how far it moves the weights.

    python benchmarks/channels_last.py [--steps 30] [--threads 1]

For each case, a step in the default (contiguous, NCHW) format and with the model and the images in
`torch.channels_last` (NHWC, oneDNN's preferred layout): the time per optimizer step and, after
`--drift-steps` steps from the same start, the largest absolute difference between the two runs'
weights (the same arithmetic in another summation order: like another machine's).

Cases: the plain cross-entropy steps of 04 / 03 / 05 as in `training_throughput.py` (Adam; 05's is
stage 1, binary cross-entropy), and two of 03's masker steps (`masking.train_masker`, the `quick`
schedule of rows S3 and S6: three classifier passes per step, S6 also updates the classifier),
which is where notebook 03 spends its training time. Masker inputs are random 64 px images and an
untrained classifier: the time of a step does not depend on the values.

Time on an idle machine, at `--threads 1` (what the notebooks' training workers use). Ratios above 1
mean channels-last is faster. Nothing here is asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import pandas as pd
import torch

from study import masking
from study.experiments import phang2020

_spec = importlib.util.spec_from_file_location("training_throughput", Path(__file__).with_name("training_throughput.py"))
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)


def _formatted(model: torch.nn.Module, images: torch.Tensor, channels_last: bool):
    if not channels_last:
        return model, images
    return model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)


def plain_steps(key: str, steps: int, channels_last: bool) -> torch.nn.Module:
    case = throughput.CASES[key]
    tensors = throughput.make_data(case, steps * case["batch"])
    model, images = _formatted(throughput.build(case, 0).train(), tensors["image"], channels_last)
    labels, batch = tensors["label"], case["batch"]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        loss = throughput.train.classification_loss(model(images[rows]), labels[rows])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model


def masker_steps(row: str, steps: int, channels_last: bool) -> torch.nn.Module:
    s = phang2020.experiment_settings("quick")
    spec = phang2020.row_spec(row, s, steps=steps)
    torch.manual_seed(0)
    classifier = masking.PartsClassifier(10, tuple(s["widths"]), stem_stride=s["stem_stride"])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(max(4 * spec.batch_size, 64), 3, 64, 64, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    classifier, images = _formatted(classifier, images, channels_last)
    return masking.train_masker(classifier, images, labels, spec, seed=0, device="cpu").masker


CASES = {**{f"{key} plain step": (lambda steps, cl, key=key: plain_steps(key, steps, cl)) for key in ("04", "03", "05")},
         "03 masker step, S3 (FIX)": lambda steps, cl: masker_steps("S3", steps, cl),
         "03 masker step, S6 (CA)": lambda steps, cl: masker_steps("S6", steps, cl)}


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--drift-steps", type=int, default=5, help="steps before the weights are compared")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.steps < 1 or args.drift_steps < 1 or args.threads < 1:
        parser.error("--steps, --drift-steps and --threads must be positive")
    torch.set_num_threads(args.threads)
    rows = []
    for name, run in CASES.items():
        run(2, False), run(2, True)  # warm-ups
        seconds = {}
        for cl in (False, True):
            start = time.perf_counter()
            run(args.steps, cl)
            seconds[cl] = (time.perf_counter() - start) / args.steps
        drift = max_weight_difference(run(args.drift_steps, False), run(args.drift_steps, True))
        rows.append({"case": name, "contiguous ms/step": round(1000 * seconds[False], 1),
                     "channels-last ms/step": round(1000 * seconds[True], 1),
                     "speed-up": round(seconds[False] / seconds[True], 2),
                     f"max |Δweight| after {args.drift_steps} steps": f"{drift:.1e}"})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {args.steps} steps per measurement")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
