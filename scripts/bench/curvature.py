"""Curvature toolkit benchmark: HVP cost, eigenvalue solvers, diagonal estimators. Prints a table, writes JSON.

1. One Hessian-vector product ÷ one gradient (median wall time; CPU, eager), for an MLP and a tiny BERT.
2. Products and seconds until the top-eigenvalue estimate is within 1e-6 (relative) of the reference, for
   Lanczos, our power iteration and a PyHessian-style power iteration (written below: plain power iteration,
   no shift, stopping on the relative change of the Rayleigh quotient). A recording wrapper sees every product,
   so each method's estimate after every product is known (Lanczos: top Ritz value of Qᵀ A Q).
3. Diagonal estimators' relative error ‖d̂ − d‖/‖d‖ against the exact diagonal, by number of probes.

Usage: python scripts/bench/curvature.py [--out bench_results/curvature.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from _report import median_seconds, write_report  # scripts/bench is on sys.path
from torch import nn

from arrcoc_sam.curvature import (
    GGNOperator,
    HessianOperator,
    control_variate_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
    lanczos,
    power_iteration,
    probe_context,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ACCURACY = 1e-6


def _mlp(width: int, depth: int, dtype: torch.dtype, inputs: int = 16, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    size = inputs
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    layers.append(nn.Linear(size, classes))
    return nn.Sequential(*layers).to(dtype)


def _classification_batch(n: int, dtype: torch.dtype, inputs: int = 16, classes: int = 10):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, inputs, dtype=dtype, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _fit(model: nn.Module, batch, steps: int) -> float:
    """Full-batch Adam, so the curvature is measured near a minimum (where the GGN approaches the Hessian)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _ce(model, batch)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(_ce(model, batch).detach())


def _bert(dtype: torch.dtype):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=5)
    model = BertForTokenClassification(config).to(dtype)
    generator = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, 100, (8, 32), generator=generator),
             "attention_mask": torch.ones(8, 32, dtype=torch.long),
             "labels": torch.randint(0, 5, (8, 32), generator=generator)}
    return model, batch


def hvp_cost(name: str, model: nn.Module, batch, loss_fn, repeats: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    with probe_context(model, params):
        hessian = HessianOperator(model, params, batch, loss_fn)
        ggn = GGNOperator(model, params, batch)
        vector = torch.randn(hessian.numel, dtype=hessian.dtype)
        gradient_s = median_seconds(lambda: hessian.loss_and_gradient(), repeats)
        hvp_s = median_seconds(lambda: hessian.matvec(vector), repeats)
        ggn_s = median_seconds(lambda: ggn.matvec(vector), repeats)
    return {"model": name, "params": hessian.numel, "gradient_ms": 1e3 * gradient_s, "hvp_ms": 1e3 * hvp_s,
            "hvp_over_gradient": hvp_s / gradient_s, "ggnvp_over_gradient": ggn_s / gradient_s}


class Recording:
    """Wraps an operator; keeps every (v, Av) pair and the time of each product."""

    def __init__(self, op) -> None:
        self.op, self.numel, self.dtype, self.device = op, op.numel, op.dtype, op.device
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.times: list[float] = []
        self.start = time.perf_counter()

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        out = self.op.matvec(vector)
        self.inputs.append(vector.clone())
        self.outputs.append(out.clone())
        self.times.append(time.perf_counter() - self.start)
        return out


def pyhessian_power(op, tol: float = 1e-6, max_iter: int = 1000) -> float:
    """The baseline: PyHessian's power iteration (top-1): stop when |Δλ|/|λ| < tol; no shift, no residual test."""
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(op.numel, dtype=op.dtype, generator=generator)
    vector /= vector.norm()
    eigenvalue = None
    for _ in range(max_iter):
        product = op.matvec(vector)
        estimate = float(vector @ product)
        vector = product / product.norm()
        if eigenvalue is not None and abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol:
            return estimate
        eigenvalue = estimate
    return eigenvalue


def _first_accurate(estimates: list[float], times: list[float], reference: float) -> tuple[int | None, float | None]:
    for index, estimate in enumerate(estimates):
        if abs(estimate - reference) <= ACCURACY * abs(reference):
            return index + 1, times[index]
    return None, None


def eigen_race(name: str, op, reference: float, max_iter: int) -> list[dict]:
    rows = []
    runs = {
        "lanczos": lambda rec: lanczos(rec, k=1, tol=1e-9, max_iter=min(max_iter, op.numel)),
        "power (ours)": lambda rec: power_iteration(rec, k=1, tol=1e-7, max_iter=max_iter),
        "power (PyHessian-style)": lambda rec: pyhessian_power(rec, tol=1e-9, max_iter=max_iter),
    }
    for method, run in runs.items():
        recording = Recording(op)
        run(recording)
        inputs = torch.stack(recording.inputs)
        outputs = torch.stack(recording.outputs)
        if method == "lanczos":
            gram = (inputs @ outputs.T).double()
            gram = 0.5 * (gram + gram.T)
            estimates = [float(torch.linalg.eigvalsh(gram[: j + 1, : j + 1])[-1]) for j in range(len(inputs))]
        else:
            estimates = (inputs * outputs).sum(1).double().tolist()
        count, seconds = _first_accurate(estimates, recording.times, reference)
        rows.append({"model": name, "method": method, "matvecs_to_1e-6": count, "seconds_to_1e-6": seconds,
                     "matvecs_total": len(inputs), "final_rel_error": abs(estimates[-1] - reference) / abs(reference)})
    return rows


def diagonal_errors(name: str, model, batch, loss_fn, probe_counts: list[int]) -> list[dict]:
    params = list(model.parameters())
    rows = []
    with probe_context(model, params):
        hessian = HessianOperator(model, params, batch, loss_fn)
        ggn = GGNOperator(model, params, batch, sampling="rademacher")
        ggn_labels = GGNOperator(model, params, batch, sampling="labels")
        exact_h = hessian.to_dense().diagonal()
        exact_g = ggn.to_dense().diagonal()
        for probes in probe_counts:
            for method, run, exact, cost in (
                ("hutchinson", lambda g, n=probes: hutchinson_diagonal(hessian, n, g), exact_h, probes),
                ("hutchinson_cv", lambda g, n=probes: control_variate_diagonal(hessian, ggn, n, g), exact_h, 3 * probes),
                ("ggn (labels)", lambda g, n=probes: ggn_diagonal(ggn_labels, n, g), exact_g, probes),
                ("ggn (rademacher)", lambda g, n=probes: ggn_diagonal(ggn, n, g), exact_g, probes),
            ):
                estimate = run(torch.Generator().manual_seed(probes))
                error = float((estimate.value - exact).norm() / exact.norm())
                rows.append({"model": name, "method": method, "probes": probes, "cost_products": cost,
                             "rel_error": error, "target": "diag GGN" if method.startswith("ggn") else "diag H"})
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/curvature.json", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    torch.manual_seed(0)

    width = 64 if args.quick else 256
    mlp32, batch32 = _mlp(width, 2, torch.float32), _classification_batch(256, torch.float32)
    bert, bert_batch = _bert(torch.float32)
    cost = [hvp_cost(f"mlp {width}x2 (fp32, batch 256)", mlp32, batch32, _ce, repeats),
            hvp_cost("bert 2x32 (fp32, 8x32 tokens)", bert, bert_batch, None, repeats)]

    mlp64, batch64 = _mlp(24, 2, torch.float64), _classification_batch(128, torch.float64)
    fitted_loss = _fit(mlp64, batch64, steps=100 if args.quick else 300)
    params = list(mlp64.parameters())
    with probe_context(mlp64, params):
        op = HessianOperator(mlp64, params, batch64, _ce)
        reference = float(torch.linalg.eigvalsh(op.to_dense())[-1])
        race = eigen_race(f"mlp 24x2 fitted (fp64, P={op.numel})", op, reference, max_iter=1000)
    bert64, bert64_batch = _bert(torch.float64)
    params = list(bert64.parameters())
    with probe_context(bert64, params):
        op = HessianOperator(bert64, params, bert64_batch)
        reference = float(lanczos(op, k=1, tol=1e-12, max_iter=200).values[0])
        race += eigen_race(f"bert 2x32 (fp64, P={op.numel})", op, reference, max_iter=300 if args.quick else 600)

    diagonals = diagonal_errors("mlp 24x2 fitted (fp64)", mlp64, batch64, _ce, [4, 16] if args.quick else [4, 16, 64])

    print("HVP cost (median wall time, CPU, eager)")
    print(_table(cost, ["model", "params", "gradient_ms", "hvp_ms", "hvp_over_gradient", "ggnvp_over_gradient"]))
    print(f"\nTop eigenvalue to {ACCURACY:g} relative accuracy")
    print(_table(race, ["model", "method", "matvecs_to_1e-6", "seconds_to_1e-6", "matvecs_total", "final_rel_error"]))
    print("\nDiagonal estimators: relative error vs exact diagonal")
    print(_table(diagonals, ["model", "method", "target", "probes", "cost_products", "rel_error"]))

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "mlp_fitted_loss": fitted_loss, "hvp_cost": cost,
              "top_eigenvalue": race, "diagonal": diagonals}
    out = write_report(args.out, result)
    print(f"\nwrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
