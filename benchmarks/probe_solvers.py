"""Probe quality by solver: the direct linear solver against minibatch AdamW on the same rows.

    python benchmarks/probe_solvers.py [--rows 512] [--json PATH]

Extracts token means of every encoder and decoder block of the built-in model (random
weights, the demo's size, UVA's policy forward, which takes the actions as input), then probes
each block for the actions (regression) and for the label (classification) with
`--solver direct` and with `--solver adamw` at the default settings, on the same splits. A
figure of quality, not of speed: the test metric of each, the seconds each took, and the
ratios of the mean metrics (direct over adamw; above 1 means the direct solver reads more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, machine  # noqa: E402

from marstore.extract import ExtractOptions, extract  # noqa: E402
from marstore.probe import ProbeOptions, run_probes  # noqa: E402

CONFIG = {"task_name": "synthetic", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": 64,
          "depth": 4, "decoder_depth": 4, "num_heads": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "acts.h5")
        extract(ExtractOptions(out=store, model="marstore.models:video_mar", model_args=CONFIG,
                               dataset="marstore.models:synthetic_video_actions", dataset_args={"size": args.rows},
                               forward="marstore.models:policy_forward", layers=["encoder_blocks.*", "decoder_blocks.*"],
                               reduction="mean", targets=["nactions", "label"], batch_size=64, device="cpu", progress=False))
        results: dict[str, dict] = {}
        for target in ("nactions", "label"):
            for solver in ("direct", "adamw"):
                start = time.perf_counter()
                report = run_probes(ProbeOptions(store=store, layer=["encoder_blocks.*", "decoder_blocks.*"], target=target,
                                                 solver=solver, out=os.path.join(tmp, f"{target}-{solver}"), progress=False))
                results[f"{target}/{solver}"] = {
                    "metric": report["metric"], "seconds": time.perf_counter() - start,
                    "layers": {r["layer"]: {"probe": r["probe"]["test"][report["metric"]],
                                            "control": r["control"]["test"][report["metric"]]} for r in report["layers"]}}
    names = list(results["nactions/direct"]["layers"])
    print(f"{'layer':<18}" + "".join(f"{key:>18}" for key in results))
    for name in names:
        print(f"{name:<18}" + "".join(f"{r['layers'][name]['probe']:>18.3f}" for r in results.values()))
    print(f"{'seconds':<18}" + "".join(f"{r['seconds']:>18.1f}" for r in results.values()))
    mean = {key: statistics.mean(v["probe"] for v in r["layers"].values()) for key, r in results.items()}
    print(f"{'mean':<18}" + "".join(f"{m:>18.3f}" for m in mean.values()))
    # an R2 can be negative, so the regression figure is a difference, not a ratio
    print(f"r2_direct_minus_adamw: {mean['nactions/direct'] - mean['nactions/adamw']:.3f}")
    finish({"machine": machine(), "rows": args.rows, "results": results, "mean": mean,
            "r2_direct_minus_adamw": mean["nactions/direct"] - mean["nactions/adamw"],
            "ratios": {"accuracy_direct_vs_adamw": mean["label/direct"] / mean["label/adamw"]}}, args.json)

if __name__ == "__main__":
    main()
