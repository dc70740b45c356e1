"""Perturbation metrics: study.metrics.perturbation vs Quantus 0.6.0 vs our forward floor.

    .venv/bin/python benchmarks/metrics_vs_quantus.py            # the full table (a few minutes)
    .venv/bin/python benchmarks/metrics_vs_quantus.py --quick    # 1/8 of the images, a smoke run

Same SmallCNN (3 channels, 10 classes, width 16, seed 0, eval mode), same inputs (U(0,1) images,
targets = the model's prediction), two settings: 256 images at 32×32 and 64 images at 64×64.

Metrics (Quantus 0.6.0 → ours):

* region perturbation: RegionPerturbation(patch_size=4, regions_evaluation=64, order="morf")
  → perturbation_curve(patch=4, pixels_per_step=16, steps=64);
* pixel flipping: PixelFlipping(features_in_step=48) on the interleaved layout (below)
  → perturbation_curve(pixels_per_step=16): every pixel, 64 steps at 32×32, 256 at 64×64;
* faithfulness estimate: FaithfulnessEstimate(features_in_step=48) on the interleaved layout
  → faithfulness(patch=4): 64 / 256 features of 16 pixels.

All use the zero replacement (Quantus ``perturb_baseline=0.0``), ``normalise=False, abs=False``; the
curves score the softmax probability, faithfulness the logit (Quantus' defaults). Compared values:
Quantus' L drops vs our f(x0) − f(xk), k = 1..L; Quantus' curve vs our columns 1..L; the
correlations. Quantus' element-wise metrics need ``features_in_step`` to divide H·W, so 48 = 3 × 16
is refused on (B, 3, H, W); they get the image as (B, 1, H, W·3) with each pixel's three channel
values side by side and a wrapper model that turns it back into contiguous (B, 3, H, W) (one
permute-copy per batch, negligible). Groups of 48 elements are then whole pixels. Faithfulness uses
maps that are constant on 4×4 patches, for which Quantus' relevance-ordered groups of 48 elements
are exactly our 4×4 patches (the two definitions differ for other maps). Quantus gets the same
batch size as ours (``batch_size`` images per step).

``--optimise jit`` (the default) runs ours and the floor on ``torch.jit.optimize_for_inference`` of
the model (frozen weights, conv+ReLU fused by oneDNN), ``none`` on the eager model, ``compile`` on
``torch.compile`` with inductor freezing. Quantus always gets the eager model, as a user passes it
(its PyTorchModel reads ``model.training``, which a frozen TorchScript module does not have).

The floor pushes exactly the number of images our call evaluates (B × (L+1), in batches of the
same size, the same memory format) through the model under ``torch.inference_mode()`` with no
metric logic. ``ours / floor`` is the overhead of the metric; ``Quantus / ours`` the speed-up.
Times are the best of ``--repeats`` runs, measured interleaved. By default they are this process's
CPU seconds (user + system) with one torch thread: the machine's 2 cores are shared with other
processes, and wall-clock times (``--clock wall``) then mostly measure the others' load, while
multi-threaded CPU times would count OpenMP spin-waits. The batch size is tuned on the floor
(16 … 256): on the CPU large batches are *slower* per image, because every activation of a big
batch is a fresh multi-MB allocation that glibc maps from the kernel and page-faults in again.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

import study  # noqa: F401  (must precede quantus / torchvision)
from study.metrics import perturbation as P
from study.models import SmallCNN

import quantus  # noqa: E402

QUANTUS_OPTIONS = dict(abs=False, normalise=False, disable_warnings=True)


class Interleaved(torch.nn.Module):
    """The model applied to the (B, 1, H, W·C) interleaved layout, restored to contiguous NCHW."""

    def __init__(self, model: torch.nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x):
        b, _, h, wc = x.shape
        return self.model(x.reshape(b, h, wc // self.channels, self.channels).permute(0, 3, 1, 2).contiguous())


def interleave(images: torch.Tensor, maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    b, c, h, w = images.shape
    return (images.permute(0, 2, 3, 1).reshape(b, 1, h, w * c).numpy(),
            maps.reshape(b, 1, h, w).repeat_interleave(c, dim=3).numpy())


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def best_time(function, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = clock()
        result = function()
        best = min(best, clock() - start)
    return best, result


def optimise(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """The model that ours and the floor run (Quantus always gets the eager model)."""
    if how == "jit":
        with torch.no_grad():
            return torch.jit.optimize_for_inference(torch.jit.script(model))
    if how == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        return torch.compile(model, dynamic=False)
    return model


def forward_floor(model, n_images: int, image_size: int, batch_size: int, channels_last: bool) -> None:
    """Push `n_images` prepared images through the model in batches: no metric logic at all."""
    batch = torch.rand(batch_size, 3, image_size, image_size)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for start in range(0, n_images, batch_size):
            model(batch[: min(batch_size, n_images - start)])


def tune_batch_size(model, image_size: int, candidates, channels_last: bool) -> int:
    n_images = max(candidates) * 2
    times = {bs: best_time(lambda bs=bs: forward_floor(model, n_images, image_size, bs, channels_last), 2)[0]
             for bs in candidates}
    return min(times, key=times.get)


def run_setting(n_images: int, image_size: int, args) -> list[dict]:
    torch.manual_seed(0)
    model = SmallCNN(3, 10, 16, image_size).eval()
    quantus_model = copy.deepcopy(model).eval()
    model = optimise(model, args.optimise)
    images = torch.rand(n_images, 3, image_size, image_size)
    # Tie-free maps: with ties the order is arbitrary in Quantus' non-stable argsort and the curves
    # would legitimately differ. Pixel maps: a random permutation of distinct values per image
    # (U(0,1) float32 draws tie about once per 4096 pixels); region maps: U(0,1) (sums of 16 draws).
    region_maps = torch.rand(n_images, 1, image_size, image_size)
    pixels = image_size * image_size
    maps = torch.stack([torch.randperm(pixels) for _ in range(n_images)]).float().div(pixels)
    maps = maps.reshape(n_images, 1, image_size, image_size)
    patches = image_size // 4
    coarse_maps = torch.stack([torch.randperm(patches * patches) for _ in range(n_images)]).float()
    coarse_maps = coarse_maps.reshape(n_images, 1, patches, patches).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.inference_mode():
        targets = quantus_model(images).argmax(1)
    channels_last = not args.no_channels_last
    batch_size = args.batch_size or tune_batch_size(model, image_size, (16, 32, 64, 128, 256), channels_last)
    x_np, y_np = images.numpy(), targets.numpy()
    x_inter, a_inter = interleave(images, maps)
    _, coarse_inter = interleave(images, coarse_maps)
    n_pixel_steps = image_size * image_size // 16

    def quantus_call(metric, model_, x, a, softmax):
        return np.asarray(metric(model=model_, x_batch=x, y_batch=y_np, a_batch=a, channel_first=True,
                                 softmax=softmax, device="cpu", batch_size=batch_size), dtype=np.float64)

    common = dict(batch_size=batch_size, channels_last=channels_last, replacement="zero")
    cases = [
        dict(
            name="region perturbation 4×4, 64 steps",
            copies=n_images * 65,
            quantus=lambda: quantus_call(quantus.RegionPerturbation(patch_size=4, regions_evaluation=64, order="morf",
                                                                    perturb_baseline=0.0, **QUANTUS_OPTIONS),
                                         quantus_model, x_np, region_maps.numpy(), True),
            ours=lambda: (lambda c: (c[:, :1] - c[:, 1:]).double().numpy())(P.perturbation_curve(
                model, images, region_maps, targets, patch=4, pixels_per_step=16, steps=64, output="prob", **common)),
        ),
        dict(
            name=f"pixel flipping 16 px/step, {n_pixel_steps} steps",
            copies=n_images * (n_pixel_steps + 1),
            quantus=lambda: quantus_call(quantus.PixelFlipping(features_in_step=48, perturb_baseline=0.0,
                                                               **QUANTUS_OPTIONS),
                                         Interleaved(quantus_model, 3).eval(), x_inter, a_inter, True),
            ours=lambda: P.perturbation_curve(model, images, maps, targets, pixels_per_step=16, output="prob",
                                              **common)[:, 1:].double().numpy(),
        ),
        dict(
            name=f"faithfulness estimate 16-px features ({patches * patches})",
            copies=n_images * (patches * patches + 1),
            quantus=lambda: quantus_call(quantus.FaithfulnessEstimate(features_in_step=48, perturb_baseline=0.0,
                                                                      **QUANTUS_OPTIONS),
                                         Interleaved(quantus_model, 3).eval(), x_inter, coarse_inter, False),
            ours=lambda: P.faithfulness(model, images, coarse_maps, targets, patch=4, output="logit",
                                        **common).double().numpy(),
        ),
    ]
    rows = []
    for case in cases:
        case["ours"]()  # warm-up (oneDNN primitives, compile)
        t_ours, t_quantus, t_floor = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeats):  # interleaved so that load changes hit all three alike
            t, theirs = best_time(case["quantus"], 1)
            t_quantus = min(t_quantus, t)
            t, mine = best_time(case["ours"], 1)
            t_ours = min(t_ours, t)
            t, _ = best_time(lambda: forward_floor(model, case["copies"], image_size, batch_size, channels_last), 1)
            t_floor = min(t_floor, t)
        rows.append(dict(setting=f"{n_images}×{image_size}²", metric=case["name"], copies=case["copies"],
                         batch=batch_size, quantus=t_quantus, ours=t_ours, floor=t_floor,
                         diff=float(np.max(np.abs(mine - theirs)))))
        print_row(rows[-1], flush=True)
    return rows


HEADER = (f"{'setting':<10} {'metric':<42} {'copies':>7} {'batch':>5} {'Quantus s':>9} {'ours s':>7} "
          f"{'floor s':>7} {'Q/ours':>6} {'ours/floor':>10} {'max |diff|':>10}")


def print_row(row: dict, flush: bool = False) -> None:
    print(f"{row['setting']:<10} {row['metric']:<42} {row['copies']:>7} {row['batch']:>5} {row['quantus']:>9.2f} "
          f"{row['ours']:>7.2f} {row['floor']:>7.2f} {row['quantus'] / row['ours']:>6.2f} "
          f"{row['ours'] / row['floor']:>10.3f} {row['diff']:>10.1e}", flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the images (smoke run)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per timing; the best is kept")
    parser.add_argument("--batch-size", type=int, default=None, help="default: tuned on the floor (16 … 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see below)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU seconds (default, robust to other load); wall: elapsed")
    parser.add_argument("--no-channels-last", action="store_true", help="feed NCHW copies to the model")
    parser.add_argument("--optimise", choices=("none", "jit", "compile"), default="jit",
                        help="model optimisation for ours and the floor (Quantus keeps the eager model): "
                             "jit = torch.jit.optimize_for_inference (frozen, conv+ReLU fused); "
                             "compile = torch.compile with inductor freezing (about a minute to compile)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    scale = 8 if args.quick else 1
    print(f"torch {torch.__version__}, quantus {getattr(quantus, '__version__', '0.6.0')}, "
          f"threads {torch.get_num_threads()}, clock {args.clock}, channels_last {not args.no_channels_last}, "
          f"optimise {args.optimise}, load average before {os.getloadavg()[0]:.2f}")
    print(HEADER)
    rows = run_setting(256 // scale, 32, args) + run_setting(64 // scale, 64, args)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    worst_speedup = min(r["quantus"] / r["ours"] for r in rows)
    worst_overhead = max(r["ours"] / r["floor"] for r in rows)
    print(f"slowest speed-up vs Quantus {worst_speedup:.2f}× (target ≥ 2.5×); "
          f"largest overhead vs floor {worst_overhead:.3f}× (target ≤ 1.2×); "
          f"largest |diff| {max(r['diff'] for r in rows):.1e}")


if __name__ == "__main__":
    main()
