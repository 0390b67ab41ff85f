"""Probe quality by solver: the direct linear solver against minibatch AdamW on the same rows,
and the MLP probe (the linear optimum plus an MLP) against the same MLP without the linear path.

    python benchmarks/probe_solvers.py [--rows 512] [--json PATH]

Extracts token means of every encoder and decoder block of the built-in model (random
weights, the demo's size, UVA's policy forward, which takes the actions as input), then probes
each block for the actions (regression) and for the label (classification) on the same splits,
four ways at the default settings: linear by `--solver direct` and by `--solver adamw`;
`--kind mlp`; and `--kind mlp` with its forward patched to leave out the linear path ("mlp-plain":
an MLP trained from scratch, its output layer starting at zero). A figure of quality, not of
speed: the test metric of each, the seconds each took, and the mean metrics compared (as ratios
for accuracies, as differences for R², which can be negative).
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
from marstore import probe  # noqa: E402
from marstore.probe import ProbeOptions, run_probes  # noqa: E402

WAYS = {"direct": {"solver": "direct"}, "adamw": {"solver": "adamw"}, "mlp": {"kind": "mlp"}, "mlp-plain": {"kind": "mlp"}}


def _plain_forward(self, x):
    return self.mlp(x)

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
        residual_forward = probe.ResidualMLP.forward
        for target in ("nactions", "label"):
            for way, options in WAYS.items():
                probe.ResidualMLP.forward = _plain_forward if way == "mlp-plain" else residual_forward
                start = time.perf_counter()
                report = run_probes(ProbeOptions(store=store, layer=["encoder_blocks.*", "decoder_blocks.*"], target=target,
                                                 out=os.path.join(tmp, f"{target}-{way}"), progress=False, **options))
                results[f"{target}/{way}"] = {
                    "metric": report["metric"], "seconds": time.perf_counter() - start,
                    "layers": {r["layer"]: {"probe": r["probe"]["test"][report["metric"]],
                                            "control": r["control"]["test"][report["metric"]]} for r in report["layers"]}}
    names = list(results["nactions/direct"]["layers"])
    print(f"{'layer':<18}" + "".join(f"{key:>19}" for key in results))
    for name in names:
        print(f"{name:<18}" + "".join(f"{r['layers'][name]['probe']:>19.3f}" for r in results.values()))
    print(f"{'seconds':<18}" + "".join(f"{r['seconds']:>19.1f}" for r in results.values()))
    mean = {key: statistics.mean(v["probe"] for v in r["layers"].values()) for key, r in results.items()}
    print(f"{'mean':<18}" + "".join(f"{m:>19.3f}" for m in mean.values()))
    # an R2 can be negative, so the regression figures are differences, not ratios
    differences = {f"r2_{a}_minus_{b}": mean[f"nactions/{a}"] - mean[f"nactions/{b}"]
                   for a, b in (("direct", "adamw"), ("mlp", "mlp-plain"), ("mlp", "direct"))}
    ratios = {f"accuracy_{a}_vs_{b}": mean[f"label/{a}"] / mean[f"label/{b}"]
              for a, b in (("direct", "adamw"), ("mlp", "mlp-plain"), ("mlp", "direct"))}
    for name, value in {**differences, **ratios}.items():
        print(f"{name}: {value:.3f}")
    finish({"machine": machine(), "rows": args.rows, "results": results, "mean": mean, "differences": differences,
            "r2_direct_minus_adamw": differences["r2_direct_minus_adamw"], "ratios": ratios}, args.json)

if __name__ == "__main__":
    main()
