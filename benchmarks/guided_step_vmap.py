"""Can notebook 05's guided step gain from training R runs together? Milliseconds per optimizer
step per run, for the B-cos toy network guided with the Energy loss at the input layer (every
image annotated: the most expensive step of E1, with double backprop through a second forward
pass in explanation mode):

    python benchmarks/guided_step_vmap.py [--steps 10] [--runs 3 6 12] [--devices cpu cuda]

(a) `loop`: R runs one after another, each step `guidance.guidance_step_loss` + Adam (05's code);
(b) `vmap R=…`: the same loss for R stacked runs in one pass (torch.func.stack_module_state +
    functional_call + vmap over the layers after the input, the attribution's input gradient
    taken outside vmap), one Adam over the stacked parameters; time divided by R·steps.

The vmap step exists only here, to decide whether 05 should move to a batched engine; its loss
is checked against (a) before timing. Synthetic tensors of 05's `quick` shape (32 px RGB, batch
64, 6 multi-hot classes, widths 8/16/32/64). Time on an idle machine; nothing here is asserted
in tests.
"""
from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from study import guidance as G

CLASSES, BATCH, SIZE, WIDTHS = 6, 64, 32, (8, 16, 32, 64)


def make_batch(device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(BATCH, CLASSES, generator=g) < 0.3).float()
    labels[:, 0] = 1.0
    return {"images": torch.rand(BATCH, 3, SIZE, SIZE, generator=g).to(device), "labels": labels.to(device),
            "masks": (torch.rand(BATCH, CLASSES, SIZE, SIZE, generator=g) < 0.3).to(device)}


def build(seed: int, device: torch.device) -> G.BcosNet:
    torch.manual_seed(seed)
    return G.build_model("bcos", CLASSES, WIDTHS, layer_scale="sqrt_fan_in").to(device)


def loop_steps(batch: dict, runs: int, steps: int, device: torch.device, lam: float = 0.05) -> list[float]:
    losses = []
    for r in range(runs):
        model = build(r, device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(r)
        for _ in range(steps):
            total, _parts = G.guidance_step_loss(model, batch["images"], batch["labels"], batch["masks"],
                                                 torch.ones(BATCH, dtype=torch.bool, device=device), loss="energy",
                                                 layer="input", method=None, lam=lam, generator=generator)
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            losses.append(float(total.detach()))
    return losses


class _AfterInput(torch.nn.Module):
    """ToyNet from its encoded input to the logits, so the input activation is a stacked tensor."""

    def __init__(self, model: G.ToyNet):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.pool(m.blocks[1](m.pool(m.blocks[0](h))))
        return m.head(m.blocks[3](m.pool(m.blocks[2](h))))


def vmap_steps(batch: dict, runs: int, steps: int, device: torch.device, lam: float = 0.05) -> list[float]:
    models = [build(r, device) for r in range(runs)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])
    after = _AfterInput(base)

    def one(p, b, h):
        return functional_call(after, ({f"model.{k}": v for k, v in p.items()}, {f"model.{k}": v for k, v in b.items()}), (h,))

    forward = torch.vmap(one, in_dims=(0, 0, None))
    forward_stacked = torch.vmap(one, in_dims=(0, 0, 0))
    optimiser = torch.optim.Adam(list(params.values()), lr=1e-3)
    generators = [torch.Generator().manual_seed(r) for r in range(runs)]
    encoded = base.encode(batch["images"])
    losses = []
    for _ in range(steps):
        classification = F.binary_cross_entropy_with_logits(
            forward(params, buffers, encoded), batch["labels"].expand(runs, -1, -1), reduction="none").mean((1, 2))
        targets = torch.stack([G.sample_loss_classes(batch["labels"], g) for g in generators])
        h = encoded.expand(runs, *encoded.shape).detach().requires_grad_(True)
        with G.explanation_mode(base):
            logits = forward_stacked(params, buffers, h)
        score = logits.gather(2, targets[..., None]).sum()
        (gradient,) = torch.autograd.grad(score, h, create_graph=True)
        maps = (gradient * h).sum(2, keepdim=True)
        masks = batch["masks"][torch.arange(BATCH, device=device), targets][:, :, None]
        localisation = torch.stack([G.energy_loss(maps[r], masks[r], reduction="sum") for r in range(runs)])
        total = classification + lam * localisation
        optimiser.zero_grad(set_to_none=True)
        total.sum().backward()
        optimiser.step()
        losses.append(total.detach())
    return torch.stack(losses).T.reshape(-1).tolist()


def clocked(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, nargs="+", default=[3, 6, 12])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]):
        device = torch.device(name)
        batch = make_batch(device)
        reference, batched = loop_steps(batch, 2, 3, device), vmap_steps(batch, 2, 3, device)
        gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, batched))
        if gap > 1e-3:
            raise RuntimeError(f"the vmap step's losses differ from guidance_step_loss by {gap:.2e} (relative)")
        loop = clocked(lambda: loop_steps(batch, 3, args.steps, device), device) / (3 * args.steps)
        rows.append({"device": name, "method": "loop", "runs": 3, "ms/step/run": 1000 * loop, "loop/this": 1.0})
        for runs in args.runs:
            vmap_steps(batch, runs, 1, device)
            seconds = clocked(lambda r=runs: vmap_steps(batch, r, args.steps, device), device) / (runs * args.steps)
            rows.append({"device": name, "method": f"vmap R={runs}", "runs": runs, "ms/step/run": 1000 * seconds,
                         "loop/this": loop / seconds})
        rows[-1 - len(args.runs)]["max rel. loss gap"] = f"{gap:.1e}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.steps} steps per measurement")
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
