"""Training throughput: milliseconds per optimizer step per run, three ways, per model and device.

    python benchmarks/training_throughput.py [--steps 20] [--runs 3 8 24] [--cases 04 03 05]
                                             [--devices cpu cuda] [--threads N]

(a) `plain`: a plain PyTorch per-run loop (data as tensors on the device, Adam, the same loss);
(b) `fit`: `train.fit` fed by `data.make_loader` (per-item Dataset + collate), as notebooks
    01–04 call it (until 2026-12-05 `fit` also read `loss.item()` on every step);
(c) `engine`: `train.fit` fed by a `train.TensorLoader` over tensors already on the device (index
    batches, losses summed on the device and read once per epoch), as 05's guidance training runs;
(d) `fit_many R=…`: `train.fit_many`, R runs trained together, time divided by R·steps.

Cases (synthetic tensors of each study's `quick` training shape; the numbers do not depend on
the pixel values): 04 = Viviano's width-8 ResNet-18 on 28 px, batch 16, 2 classes (cross-entropy);
03 = Phang's §5.2 classifier (widths 8/16/32/64, stride-2 stem) on 64 px RGB, batch 72, 10 classes;
05 = Rao's B-cos toy network (widths 8/16/32/64) on 32 px RGB, batch 64, 6 multi-hot classes
(binary cross-entropy); 05's stage 1 (`guidance.train_baseline`) is the `engine` row's code path.

Each timing runs `steps` optimizer steps after a warm-up; CUDA timings synchronise before the
clock stops. Ratios are (b)/(x) and (a)/(x): above 1 means x is faster. Time on an idle machine:
numbers taken while other jobs load the CPU are meaningless. Nothing here is asserted in tests.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from study import data, train
from study.guidance import build_model as build_guidance_model
from study.masking import PartsClassifier
from study.models import SmallResNet18

CASES = {
    "04": {"name": "04 Viviano ResNet-18 w8", "build": lambda: SmallResNet18(in_channels=1, num_classes=2, width=8),
           "image": (1, 28, 28), "classes": 2, "multi_hot": False, "batch": 16},
    "03": {"name": "03 Phang classifier w8", "build": lambda: PartsClassifier(10, (8, 16, 32, 64), stem_stride=2),
           "image": (3, 64, 64), "classes": 10, "multi_hot": False, "batch": 72},
    "05": {"name": "05 Rao B-cos w8", "build": lambda: build_guidance_model("bcos", 6, (8, 16, 32, 64), layer_scale="sqrt_fan_in"),
           "image": (3, 32, 32), "classes": 6, "multi_hot": True, "batch": 64},
}


def make_data(case: dict, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *case["image"], generator=g)
    if case["multi_hot"]:
        labels = (torch.rand(n, case["classes"], generator=g) < 0.3).float()
    else:
        labels = torch.randint(0, case["classes"], (n,), generator=g)
    return {"image": images, "label": labels}


def build(case: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return case["build"]()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def plain_loop(case: dict, tensors: dict, steps: int, device: torch.device) -> None:
    model = build(case, 0).to(device).train()
    images, labels = tensors["image"].to(device), tensors["label"].to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(device)
    batch = case["batch"]
    for step in range(steps):
        rows = order[step * batch:(step + 1) * batch]
        loss = train.classification_loss(model(images[rows]), labels[rows])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def todays_fit(case: dict, tensors: dict, steps: int, device: torch.device) -> None:
    arrays = {"images": tensors["image"][:steps * case["batch"]].numpy(), "labels": tensors["label"][:steps * case["batch"]].numpy()}
    loader = data.make_loader(arrays, batch_size=case["batch"], shuffle=True, seed=0)
    train.fit(build(case, 0), loader, epochs=1, lr=1e-3, device=device, progress=False)


def engine_fit(case: dict, tensors: dict, steps: int, device: torch.device) -> None:
    subset = {k: v[:steps * case["batch"]].to(device) for k, v in tensors.items()}
    train.fit(build(case, 0), train.TensorLoader(subset, case["batch"], seed=0), epochs=1, lr=1e-3, device=device,
              progress=False)


def many(case: dict, tensors: dict, steps: int, runs: int, device: torch.device) -> None:
    subset = {k: v[:steps * case["batch"]] for k, v in tensors.items()}
    train.fit_many([build(case, r) for r in range(runs)], subset, seeds=list(range(runs)), epochs=1,
                   batch_size=case["batch"], lr=1e-3, device=device, progress=False)


def bench_case(key: str, device: torch.device, steps: int, runs: list[int]) -> list[dict]:
    case = CASES[key]
    tensors = make_data(case, steps * case["batch"])
    warm = 2
    rows = []
    # warm-ups (allocator, kernels, lazy init), then the timed runs
    plain_loop(case, tensors, warm, device)
    rows.append(("plain", 1, clocked(lambda: plain_loop(case, tensors, steps, device), device) / steps))
    todays_fit(case, tensors, warm, device)
    rows.append(("fit", 1, clocked(lambda: todays_fit(case, tensors, steps, device), device) / steps))
    engine_fit(case, tensors, warm, device)
    rows.append(("engine", 1, clocked(lambda: engine_fit(case, tensors, steps, device), device) / steps))
    for r in runs:
        many(case, tensors, warm, r, device)
        rows.append((f"fit_many R={r}", r, clocked(lambda r=r: many(case, tensors, steps, r, device), device) / (steps * r)))
    plain, fit = rows[0][2], rows[1][2]
    return [{"case": case["name"], "device": str(device), "batch": case["batch"], "method": method, "runs": r,
             "ms/step/run": round(1000 * seconds, 2), "fit/this": round(fit / seconds, 2), "plain/this": round(plain / seconds, 2)}
            for method, r, seconds in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per measurement")
    parser.add_argument("--runs", type=int, nargs="+", default=[3, 8, 24], help="R values for fit_many")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: torch's)")
    args = parser.parse_args()
    if args.steps < 1 or any(r < 1 for r in args.runs):
        parser.error("--steps and --runs must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for key in args.cases:
            rows += bench_case(key, torch.device(device), args.steps, args.runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.steps} steps per measurement")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
