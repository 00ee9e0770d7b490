#!/usr/bin/env python3
"""Reference sgemm peaks for `factune bench peak`: the same f32 products `[m, k] · [k, n]` through torch and
numpy, best of `reps`. Prints one JSON line."""
import argparse
import json
import time

import numpy as np
import torch


def best_gflops(f, m, n, k, reps):
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * n * k / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    shapes = [(a.tokens, 576, 576), (a.tokens, 1536, 576), (a.tokens, 576, 1536), (a.tokens, 8192, 576)]
    out = {"torch": [], "numpy": []}
    for m, n, k in shapes:
        x, w = torch.rand(m, k) * 2 - 1, torch.rand(n, k) * 2 - 1
        out["torch"].append(best_gflops(lambda: x @ w.T, m, n, k, a.reps))
        xn, wn = x.numpy(), w.numpy()
        out["numpy"].append(best_gflops(lambda: xn @ wn.T, m, n, k, a.reps))
    print(json.dumps({"torch_peak_gflops": max(out["torch"]), "numpy_peak_gflops": max(out["numpy"]),
                      "torch": out["torch"], "numpy": out["numpy"], "threads": torch.get_num_threads(),
                      "torch_version": torch.__version__}))


if __name__ == "__main__":
    main()
