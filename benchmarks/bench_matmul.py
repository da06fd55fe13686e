"""torch's BLAS (MKL in the CPU wheels) against oneDNN for the float32 products tunesmith runs on CPU.

    python benchmarks/bench_matmul.py [--threads 2]

Prints, per shape, GFLOP/s of x W^T + (for training shapes) the two backward products, and which
backend `algorithms/linear.py` chose on this machine. Training shapes are a 40M model's layers over
1,024 tokens; decode shapes stream every weight of that model (8 layers + a 32,000-token head) once per
step for 1-16 rows, reported as seconds per step and GB/s of weights read.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from tunesmith.algorithms.linear import onednn_is_faster, onednn_linear

LAYER = [(768, 512), (512, 512), (1536, 512), (1536, 512), (512, 1536)]  # q+k+v, o, gate, up, down


def best(run, repeats: int, *args) -> float:  # noqa: ANN001
    run(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def training(repeats: int) -> list[dict]:
    rows = []
    for outer, inner in dict.fromkeys([*LAYER[1:], (32000, 512)]):  # each shape once
        x, weight, grad = torch.randn(1024, inner), torch.randn(outer, inner), torch.randn(1024, outer)
        flop = 2 * 1024 * inner * outer / 1e9
        products = {  # (a, b) of a b^T
            "forward": (x, weight),
            "grad_input": (grad, weight.t()),
            "grad_weight": (grad.t(), x.t()),
        }
        for name, (a, b) in products.items():
            rows.append({"shape": f"1024x{inner}->{outer}", "product": name,
                         "blas_gflops": round(flop / best(F.linear, repeats, a, b), 1),
                         "onednn_gflops": round(flop / best(onednn_linear, repeats, a, b, None), 1)})
    return rows


def decoding(repeats: int) -> list[dict]:
    weights = [torch.randn(outer, inner) for outer, inner in LAYER * 8 + [(32000, 512)]]
    size = sum(w.numel() * 4 for w in weights) / 1e9
    rows = []
    for count in (1, 4, 8, 16):
        inputs = {inner: torch.randn(count, inner) for inner in (512, 1536)}
        products = {
            "blas": F.linear,
            "blas_w_xt": lambda x, w: (w @ x.t()).t(),  # few_row_linear's orientation
            "onednn": lambda x, w: onednn_linear(x, w, None),
        }
        step = lambda product, inputs: [product(inputs[w.shape[1]], w) for w in weights]  # noqa: E731
        seconds = {name: best(step, repeats, product, inputs) for name, product in products.items()}
        rows.append({"rows": count, **{f"{name}_ms": round(s * 1e3, 2) for name, s in seconds.items()},
                     **{f"{name}_gb_per_s": round(size / s, 1) for name, s in seconds.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"threads": torch.get_num_threads(), "chosen": "onednn" if onednn_is_faster() else "blas",
                      "training": training(args.repeats), "decoding": decoding(args.repeats)}, indent=1))


if __name__ == "__main__":
    main()
