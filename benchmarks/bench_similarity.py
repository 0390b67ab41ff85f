"""Layer similarity: `marstore similarity` against the way users compute CKA, on the same rows.

    python benchmarks/bench_similarity.py [--quick] [--json PATH]

A store of 12 layers (--quick 6) of 512 float16 features, 4096 rows, each layer a noisy
nonlinear view of the one before, compared every layer against every layer on a seeded sample
of 2048 rows (--quick 1024), by:
  marstore  layer_similarity(): the whole command (reading, one centred Gram matrix a layer,
            one inner product a pair, the JSON, the Markdown and the heatmap)
  users     the rows read with h5py, a Gram matrix a layer in float64 numpy, and Kornblith et
            al.'s published cka(gram_x, gram_y) for each pair, which centres both Grams each
            call (the strongest form of the users' script: the Grams are not recomputed per pair)
timed in interleaved rounds (median of 3); `marstore_vs_users` is the users' time over
marstore's. Both give the same matrix (the largest difference is printed and must stay under
1e-5).
"""

from __future__ import annotations

import os
import sys
import tempfile

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, compare, finish, machine  # noqa: E402

from marstore.similarity import SimilarityOptions, layer_similarity  # noqa: E402
from marstore.store import LayerSpec, StoreWriter  # noqa: E402

FEATURES = 512
ROWS = 4096


def make_store(path: str, layers: int) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, FEATURES))
    data = {}
    for i in range(layers):
        data[f"blocks.{i}"] = x.astype(np.float16)
        x = np.tanh(x @ (rng.standard_normal((FEATURES, FEATURES)) / np.sqrt(FEATURES))) + 0.3 * rng.standard_normal(x.shape)
    with StoreWriter(path, [LayerSpec(name, (FEATURES,)) for name in data]) as writer:
        writer.append(data, index=np.arange(ROWS))
    return list(data)


def users_cka(path: str, names: list[str], rows: np.ndarray) -> np.ndarray:
    """What users' scripts do, after Kornblith et al.'s CKA colab."""
    def center_gram(gram: np.ndarray) -> np.ndarray:
        gram = gram.copy()
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
        return gram

    def cka(gram_x: np.ndarray, gram_y: np.ndarray) -> float:
        gram_x, gram_y = center_gram(gram_x), center_gram(gram_y)
        scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
        return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))

    with h5py.File(path, "r") as f:
        grams = {}
        for name in names:
            x = f["activations"][name][rows].astype(np.float64)
            grams[name] = x @ x.T
    return np.array([[cka(grams[a], grams[b]) for b in names] for a in names])


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    layers, sample = (6, 1024) if args.quick else (12, 2048)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "layers.h5")
        names = make_store(path, layers)
        # the rows marstore samples (a seeded choice of the store's rows, in row order)
        rows = np.sort(np.random.default_rng(0).choice(ROWS, sample, replace=False))
        options = SimilarityOptions(path, rows=sample, out=os.path.join(tmp, "sim"))
        got = {}
        seconds = compare({"marstore": lambda: got.update(ours=layer_similarity(options)["cka"]),
                           "users": lambda: got.update(users=users_cka(path, names, rows))}, repeats=3)
    difference = float(np.max(np.abs(np.array(got["ours"]) - got["users"])))
    payload = {
        "device": machine(),
        "layers": layers, "features": FEATURES, "rows": sample,
        "seconds": seconds,
        "max_abs_difference": difference,
        "ratios": {"marstore_vs_users": seconds["users"] / seconds["marstore"]},
    }
    print(f"device: {payload['device']}; {layers} layers of {FEATURES} features, every pair on {sample} rows")
    for name, value in seconds.items():
        print(f"{name:<10} {value:8.3f} s")
    print(f"largest difference between the two matrices: {difference:.2e}")
    if difference > 1e-5:
        raise SystemExit(f"the matrices differ by {difference:.2e}: the benchmark compares unequal results")
    finish(payload, args.json)


if __name__ == "__main__":
    main()
