"""Notebook 04's training at `quick` from a cold cache, against a plain PyTorch loop of the same steps.

    python benchmarks/notebook04_vs_plain.py [--steps 40] [--skip-notebook]

The training engine issue's target: "notebook 04 at quick from a cold cache faster than a plain
per-run PyTorch loop running the same optimizer steps".

(a) `plain`: for every method of 04's `quick` settings, the method's model (the width-8 ResNet-18),
    its training arrays (`viviano2021.method_arrays`, seed 0), batch 16, Adam at the method's lr and
    the method's loss: cross-entropy (`train.classification_loss`); plus the GradMask or RRR
    input-gradient term; plus ActDiff's x̃ pass; the adversarial method's `adversarial_step`
    (discriminator step on every batch, encoder step on every disc_iter-th). Data as tensors, each
    batch an index slice of one permutation; no validation, no selection, no history, no cache.
    Masked-shuffle's per-item x̃ is left out (its plain step is plain cross-entropy), so its plain
    time is a lower bound. Milliseconds per batch: the fastest 10-batch block of `steps` timed batches
    after a 10-batch warm-up (the plain loop's best case, so the comparison favours it), in this
    process at 2 threads (torch's default here: one process, as the issue's 15.3 ms per step) and at
    1 thread (the setting of 04's two training workers). The totals multiply each method's time by
    its batches in the notebook (seeds × epochs × ⌈n_train / 16⌉); "2 processes × 1 thread" is the
    1-thread total halved, the ideal split of the same loop over both cores.
(b) `notebook`: `viviano2021.train_all` at `quick`, seed 0, in a fresh cache folder (data generation,
    the prefill's two single-thread worker processes, evaluation each epoch, selection, caching, and
    loading the cached runs back): the notebook's `train_all` cell, cold.

Run on an idle machine; nothing here is asserted in tests.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

# Batches are timed in blocks of 10, a whole adversarial cycle (disc_iter = 10 on synth_hard).
BLOCK = 10


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed batches per method and thread count (blocks of 10)")
    parser.add_argument("--skip-notebook", action="store_true", help="only (a), the plain loop")
    args = parser.parse_args()
    if args.steps < BLOCK or args.steps % BLOCK:
        parser.error(f"--steps must be a positive multiple of {BLOCK}, got {args.steps}")
    return args


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.skip_notebook:
    # before `study` is imported: its cache folder is read once, at import
    os.environ["STUDY_CACHE_DIR"] = tempfile.mkdtemp(prefix="nb04-cold-")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from study import losses, train  # noqa: E402
from study.experiments import viviano2021 as v4  # noqa: E402
from study.models import SmallResNet18  # noqa: E402


def plain_ms_per_batch(method: str, arrays: dict, s: dict, steps: int, warmup: int = 10, seed: int = 0) -> float:
    """One method's plain loop (module docstring, (a)): milliseconds per batch, the fastest block."""
    hyper = v4.HYPERPARAMETERS[v4.SYNTHETIC][method]
    images = torch.as_tensor(arrays["images"])
    labels = torch.as_tensor(arrays["labels"]).long()
    masks = torch.as_tensor(arrays["masks"])
    torch.manual_seed(seed)
    model = SmallResNet18(in_channels=int(images.shape[1]), num_classes=2, width=s["width"]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=hyper.lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    extra = v4.input_gradient_extra_loss(method, hyper.lam)
    actdiff = losses.ActDiffExtraLoss(model, hyper.lam, seed=seed) if method == "actdiff" else None
    schedule = v4.adversarial_schedule(model, hyper, s["disc_hidden"]) if method == "adversarial" else None

    def one(i: int) -> None:
        start = (i * v4.BATCH_SIZE) % len(labels)
        index = order[start:start + v4.BATCH_SIZE]
        batch = {"image": images[index], "label": labels[index], "mask": masks[index]}
        if schedule is not None:
            v4.adversarial_step(model, optimizer, schedule, batch["image"], batch["mask"], batch["label"], generator)
            return
        if extra is not None:
            batch["image"].requires_grad_(True)
        logits = model(batch["image"])
        loss = train.classification_loss(logits, batch["label"])
        if extra is not None:
            loss = loss + extra(model, batch, logits)
        if actdiff is not None:
            loss = loss + actdiff(model, batch, logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        for i in range(warmup):
            one(i)
        blocks = []
        for first in range(warmup, warmup + steps, BLOCK):
            start = time.perf_counter()
            for i in range(first, first + BLOCK):
                one(i)
            blocks.append((time.perf_counter() - start) / BLOCK * 1e3)
        return min(blocks)
    finally:
        if actdiff is not None:
            actdiff.close()


def plain_table(s: dict, steps: int) -> pd.DataFrame:
    splits = v4.load_splits(v4.SYNTHETIC, 0, s)
    rows = []
    for method in s["methods"]:
        hyper = v4.HYPERPARAMETERS[v4.SYNTHETIC][method]
        arrays = v4.method_arrays(method, splits, hyper, only=("train",))["train"]
        batches = s["n_seeds"] * s["epochs"] * math.ceil(len(arrays["labels"]) / v4.BATCH_SIZE)
        row = {"method": method, "batches": batches}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            row[f"ms/batch, {threads} thread{'s' if threads > 1 else ''}"] = plain_ms_per_batch(method, arrays, s, steps)
        rows.append(row)
    torch.set_num_threads(2)
    return pd.DataFrame(rows).set_index("method")


def main() -> None:
    s = v4.experiment_settings("quick")
    print(f"04 quick: {len(s['methods'])} methods × {s['n_seeds']} seeds × {s['epochs']} epochs, n_train "
          f"{s['n_train']}, batch {v4.BATCH_SIZE}, width {s['width']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    table = plain_table(s, ARGS.steps)
    print(table.round(1).to_string(), flush=True)
    plain_2 = (table["batches"] * table["ms/batch, 2 threads"]).sum() / 1e3
    plain_1x2 = (table["batches"] * table["ms/batch, 1 thread"]).sum() / 1e3 / 2
    rows = [{"what": "plain loop, one process, 2 threads", "seconds": plain_2},
            {"what": "plain loop, 2 processes × 1 thread (ideal split)", "seconds": plain_1x2}]
    if not ARGS.skip_notebook:
        start = time.perf_counter()
        try:
            runs, _ = v4.train_all(v4.SYNTHETIC, s, 0, device="cpu")
        finally:
            shutil.rmtree(os.environ["STUDY_CACHE_DIR"], ignore_errors=True)
        rows.append({"what": f"notebook 04 train_all, cold ({len(runs)} runs)", "seconds": time.perf_counter() - start})
    summary = pd.DataFrame(rows)
    summary["plain (one process) / this"] = plain_2 / summary["seconds"]
    print(f"\n{int(table['batches'].sum())} batches in all")
    print(summary.round(2).to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
