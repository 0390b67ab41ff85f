"""Store -> similarity: linear CKA (centered kernel alignment) between layers, of one store or of
two stores of the same samples (two checkpoints of a training run, two models): how alike their
representations are, where probes ask what they hold about a target.

    result = layer_similarity(SimilarityOptions("a.h5", against="b.h5", rows=2048, out="sim"))
    result["cka"]  # layers of a.h5 x layers of b.h5

CKA is that of Kornblith et al. (2019), from the rows' Gram matrices: 1 for representations
that differ by a rotation, a scale and a shift, and below 1 for ones that differ by another
linear map (a per-feature scaling, say). With more features than rows the plain estimate is biased upward (unrelated layers
score well above 0), and `debiased` uses the unbiased HSIC estimator instead (Song et al. 2012,
as Kornblith's code centres it). Each layer is read as the probes read it (a row of tokens as
their mean), its features centred; or with tokens="flat" each token of a sample is a row, the
same token (by position) in every layer compared, so they must hold as many tokens a sample.
Rows where any layer read holds a non-finite value are left out and counted. Two stores are
matched by the rows' source indices.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from marstore.dataset import READ_BLOCK_BYTES, ActivationDataset, flat_tokens, in_forward_order, layers_of, row_tokens, rows_where
from marstore.errors import MarstoreError
from marstore.report import heatmap, markdown_table, text_table
from marstore.store import open_store, rows_equal
from marstore.transfer import resolve_device

log = logging.getLogger(__name__)

MIN_ROWS = 4  # the unbiased estimator divides by n - 3
TOKEN_MODES = ("mean", "flat")


class SimilarityError(MarstoreError):
    """Stores, layers or rows that CKA cannot compare; the message says what would."""


@dataclass
class SimilarityOptions:
    store: str
    against: str | None = None  # a second store of the same samples; by default the first against itself
    layer: str | list[str] = "**"  # names or patterns of the first store's layers
    against_layer: str | list[str] | None = None  # of the second store's; by default the same patterns
    rows: int = 2048  # a seeded sample of the rows the stores share: each layer's Gram matrix is rows x rows
    seed: int = 0
    debiased: bool = False
    where: list[str] = field(default_factory=list)  # TARGET=VALUE conditions on the first store's rows
    out: str = "similarity"
    device: str = "cpu"  # where the Gram matrices are made and multiplied (cuda: many layers, many rows)
    tokens: str = "mean"  # a row of tokens read as their mean, or "flat": each token a row (rows counts tokens)
    samples: int | None = None  # tokens flat: the token rows drawn from this many samples' tokens (default: all)


def _shared_rows(opts: SimilarityOptions, sample: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The rows to compare: (positions in the first store, positions in the second or None, the
    count available before sampling), sampled by seed where sample, in the first store's row order."""
    with open_store(opts.store) as store:
        selected = rows_where(store, opts.where) if opts.where else np.arange(store.rows)
        sources = store.index()[selected]
    if opts.against is None:
        first, second = selected, None
    else:
        with open_store(opts.against) as other:
            other_sources = other.index()
        # a source index held twice (two runs of one sample) is matched at its first row
        other_sources, other_rows = np.unique(other_sources, return_index=True)
        sources, first_of = np.unique(sources, return_index=True)
        common, in_first, in_second = np.intersect1d(sources, other_sources, assume_unique=True, return_indices=True)
        if not len(common):
            raise SimilarityError(f"{opts.store} and {opts.against} share no sample (no source index in both); CKA "
                                  "compares representations of the same samples: extract both from one data set")
        order = np.argsort(selected[first_of[in_first]])
        first, second = selected[first_of[in_first]][order], other_rows[in_second][order]
        _check_same_samples(opts.store, opts.against, first, second)
    available = len(first)
    if available < MIN_ROWS:
        raise SimilarityError(f"{available} rows to compare{' (shared by the two stores)' if second is not None else ''}; "
                              f"CKA needs {MIN_ROWS} or more")
    if sample and available > opts.rows:
        keep = np.sort(np.random.default_rng(opts.seed).choice(available, opts.rows, replace=False))
        first, second = first[keep], None if second is None else second[keep]
    return first, second, available


def _check_same_samples(path: str, other_path: str, rows: np.ndarray, other_rows: np.ndarray) -> None:
    """Source indices name samples of one data set: two stores' targets of one name must agree on
    the rows matched by index (two data sets, or one drawn with other arguments, would not)."""
    with open_store(path) as store, open_store(other_path) as other:
        shared = sorted(set(store.targets) & set(other.targets))
        for name in shared:
            same = rows_equal(store.target(name)[rows], other.target(name)[other_rows])
            if not same.all():
                sample = int(store.index()[rows[np.flatnonzero(~same)[0]]])
                raise SimilarityError(f"target {name!r} differs between {path} and {other_path} for sample {sample} (and "
                                      f"{int((~same).sum()) - 1} more): their source indices name other samples; compare "
                                      "extractions of one data set")
        if not shared:
            runs = [(s.metadata.get("dataset"), s.metadata.get("dataset_args")) for s in (store, other)]
            if runs[0] != runs[1]:
                log.warning("%s and %s share no target to check their samples by, and record other data sets (%s, %s): "
                            "rows are matched by source index alone", path, other_path, *runs)


def _features(path: str, layers: list[str], positions: np.ndarray) -> dict[str, torch.Tensor]:
    """Each layer's rows at positions as (rows, features) float64, a row of tokens as their mean."""
    ds = ActivationDataset(path, layers, rows=positions, reduction="mean")
    try:
        data = ds.read_all()
    finally:
        ds.close()
    return {name: data[name].reshape(len(positions), -1).double() for name in layers}


def _token_counts(path: str, layers: list[str], positions: np.ndarray) -> dict[str, np.ndarray]:
    """Each layer's tokens in each row at positions, as flat_tokens lays them out."""
    counts = {}
    with open_store(path) as store:
        for name in layers:
            info = store.layers[name]
            if info.layout == "ragged":
                counts[name] = store.token_counts(name)[positions] * math.prod(info.row_shape[:-1])
                continue
            tokens, _ = row_tokens(info.row_shape, info.attrs.get("channel_axis"))
            if not tokens:
                raise SimilarityError(f"--tokens flat: {name} of {path} holds rows of shape {tuple(info.row_shape)}, one "
                                      "vector a sample (its tokens reduced at extraction): compare token means (--tokens "
                                      "mean), or leave it out (--layer)")
            counts[name] = np.full(len(positions), tokens, dtype=np.int64)
    return counts


def _token_rows(opts: SimilarityOptions, layers: list[str], other_layers: list[str], first: np.ndarray,
                second: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """--tokens flat: (the sample of each token row, as a position in first, its token, the tokens
    available before sampling), the token rows a seeded sample of opts.rows, from the tokens of
    opts.samples seeded samples where given (rows are read whole: fewer samples, less read).
    Every layer must hold as many tokens in each sample: token i of one is compared with token
    i of another."""
    counts = _token_counts(opts.store, layers, first)
    if second is None:
        counts |= _token_counts(opts.store, [n for n in other_layers if n not in counts], first)
    else:
        counts |= {f"{n} of {opts.against}": c for n, c in _token_counts(opts.against, other_layers, second).items()}

    def said(c: np.ndarray) -> str:
        return str(c[0]) if (c == c[0]).all() else f"{c.min()}-{c.max()}"

    (name, reference), *rest = counts.items()
    for other, c in rest:
        if not np.array_equal(c, reference):
            raise SimilarityError(f"--tokens flat compares token i of a sample in one layer with token i in another, and "
                                  f"{name} holds {said(reference)} tokens a sample where {other} holds {said(c)}: compare "
                                  "layers of one token count (--layer, --against-layer), or token means (--tokens mean)")
    rng = np.random.default_rng(opts.seed)
    pool = np.arange(len(reference))  # the samples whose tokens are drawn from (--samples: a seeded few)
    if opts.samples is not None and opts.samples < len(pool):
        pool = np.sort(rng.choice(len(pool), opts.samples, replace=False))
    counts = reference[pool]
    available = int(counts.sum())
    starts = np.cumsum(counts) - counts
    picked = np.arange(available) if available <= opts.rows else np.sort(rng.choice(available, opts.rows, replace=False))
    which = np.searchsorted(starts, picked, side="right") - 1
    return pool[which], picked - starts[which], available


def _token_features(path: str, layers: list[str], positions: np.ndarray, tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """Each layer's token tokens[i] of the row at positions[i], as (len(positions), features)
    float64: the rows read whole, a block of them at a time, and their other tokens let go."""
    rows, back = np.unique(positions, return_inverse=True)
    ds = ActivationDataset(path, layers, rows=rows)
    picked: dict[str, torch.Tensor] = {}
    try:
        block = max(1, READ_BLOCK_BYTES // max(1, ds.row_bytes()))
        for start in range(0, len(rows), block):
            columns = ds.__getitems__(range(start, min(start + block, len(rows)))).columns
            mine = np.flatnonzero((back >= start) & (back < start + block))
            for name in layers:
                data = columns[name]
                if isinstance(data, list):  # ragged: a (tokens, ...) tensor a row
                    x = torch.stack([flat_tokens(data[back[i] - start], 0)[tokens[i]] for i in mine])
                else:
                    x = flat_tokens(data, 1, ds.channel_axes.get(name))[back[mine] - start, tokens[mine]]
                if name not in picked:
                    picked[name] = torch.empty(len(positions), x.shape[-1], dtype=torch.float64)
                picked[name][mine] = x.double()
    finally:
        ds.close()
    return picked


def centered_gram(x: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """The centred Gram matrix of x's rows (float64), scaled to unit Frobenius norm, so that CKA
    is the inner product of two. debiased: centred for the unbiased HSIC estimator (diagonal
    zero). A layer whose rows are all alike has no norm to scale by: NaN."""
    x = x - x.mean(0)
    gram = x @ x.T
    n = len(gram)
    if debiased:
        gram.fill_diagonal_(0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]  # in place: no second rows x rows matrix
        gram -= means[None, :]
        gram.fill_diagonal_(0)
    norm = torch.linalg.matrix_norm(gram)
    return gram.div_(norm) if norm > 0 else gram.fill_(float("nan"))


def inner_products(stack: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """<stack[i], g> for every matrix of stack (float64): float32 products summed a row at a
    time, the rows' sums added in float64. One float32 sum of all rows x rows products drifts
    (a unit Gram matrix with itself gives 0.99998 at 2048 rows)."""
    return torch.bmm(stack.transpose(0, 1), g.unsqueeze(-1)).double().sum((0, 2))


def layer_similarity(opts: SimilarityOptions) -> dict:
    """Linear CKA of every layer of opts.store against every layer of opts.against (or of itself):
    similarity.json, similarity.md and similarity.png in opts.out; the JSON's content, with the
    paths and a text table of each layer's most similar layer, returned. Memory: a Gram matrix
    of rows x rows float32 for each layer of the first store (16 MiB at 2048 rows), and features."""
    if opts.rows < MIN_ROWS:
        raise SimilarityError(f"--rows {opts.rows}: CKA needs {MIN_ROWS} rows or more")
    if opts.tokens not in TOKEN_MODES:
        raise SimilarityError(f"--tokens {opts.tokens!r}: use one of {', '.join(TOKEN_MODES)}")
    if opts.samples is not None and (opts.tokens != "flat" or opts.samples < 1):
        raise SimilarityError(f"--samples {opts.samples}: the samples whose tokens --tokens flat compares, 1 or more; "
                              "with token means, --rows draws the samples")
    try:
        device = resolve_device(opts.device)
    except ValueError as exc:
        raise SimilarityError(str(exc)) from None
    with open_store(opts.store) as store:
        layers = in_forward_order(store, layers_of(store, opts.layer))
    with open_store(opts.against or opts.store) as other:
        other_layers = in_forward_order(other, layers_of(other, opts.against_layer if opts.against_layer is not None
                                                         else opts.layer))
    first, second, available = _shared_rows(opts, sample=opts.tokens == "mean")
    samples = None
    if opts.tokens == "flat":
        which, tokens, available = _token_rows(opts, layers, other_layers, first, second)
        samples = len(np.unique(which))
        first, second = first[which], None if second is None else second[which]

        def read(path: str, names: list[str], positions: np.ndarray) -> dict[str, torch.Tensor]:
            return _token_features(path, names, positions, tokens)
    else:
        read = _features
    if second is None:  # one store: each layer read once
        features = read(opts.store, list(dict.fromkeys(layers + other_layers)), first)
        other_features = features
    else:
        features, other_features = read(opts.store, layers, first), read(opts.against, other_layers, second)
    finite = torch.ones(len(first), dtype=torch.bool)
    for x in [*features.values(), *other_features.values()]:
        finite &= torch.isfinite(x).all(1)
    rows, skipped = int(finite.sum()), int((~finite).sum())
    if rows < MIN_ROWS:
        raise SimilarityError(f"{rows} of {len(first)} rows hold finite values in every layer compared; "
                              f"CKA needs {MIN_ROWS} or more")
    if skipped:
        log.warning("left out %d of %d rows: a layer compared holds a non-finite value in them", skipped, len(first))
    log.info("linear CKA%s of %d layers against %d on %d rows", " (debiased)" if opts.debiased else "", len(layers),
             len(other_layers), rows)
    # float32 once centred and scaled: half the memory of float64, for figures read to five decimals
    names = list(features)
    stack = torch.empty(len(names), rows, rows, device=device)
    for i, name in enumerate(names):
        stack[i] = centered_gram(features[name][finite].to(device), opts.debiased)
    position = {name: i for i, name in enumerate(names)}
    undefined = {name for name in names if torch.isnan(stack[position[name], 0, 0])}
    cka = np.empty((len(layers), len(other_layers)))
    for j, name in enumerate(other_layers):  # a second store's Gram matrices one at a time
        g = stack[position[name]] if second is None else \
            centered_gram(other_features[name][finite].to(device), opts.debiased).float()
        if torch.isnan(g[0, 0]):
            undefined.add(name)
        cka[:, j] = inner_products(stack, g)[[position[a] for a in layers]].cpu().numpy()
    if undefined:
        log.warning("%s hold the same row for every sample compared: their CKA is undefined (NaN)", sorted(undefined))
    return _write(opts, layers, other_layers, cka, rows=rows, available=available, skipped=skipped, samples=samples)


def _write(opts: SimilarityOptions, layers: list[str], other_layers: list[str], cka: np.ndarray, *, rows: int,
           available: int, skipped: int, samples: int | None) -> dict:
    os.makedirs(opts.out, exist_ok=True)
    kind = "debiased linear CKA" if opts.debiased else "linear CKA"
    against = os.path.abspath(opts.against) if opts.against else None
    result = {"store": os.path.abspath(opts.store), "against": against, "measure": kind, "rows": rows,
              "rows_available": available, "skipped_rows": skipped, "tokens": opts.tokens,
              **({"samples": samples} if samples is not None else {}), "layers": layers, "against_layers": other_layers,
              "cka": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in cka],
              "options": asdict(opts)}
    paths = {name: os.path.join(opts.out, name) for name in ("similarity.json", "similarity.md", "similarity.png")}
    with open(paths["similarity.json"], "w") as f:
        json.dump(result, f, indent=2)
    second = os.path.basename(opts.against) if opts.against else os.path.basename(opts.store)
    heatmap(paths["similarity.png"], cka, layers, other_layers, label=kind, annotate=True,
            title=f"{kind}: {os.path.basename(opts.store)} (rows) against {second} (columns)", xlabel=f"layers of {second}")
    # each layer's nearest other layer (itself excepted, against the same store); against another
    # store, also its namesake there: how far a layer moved between two checkpoints
    namesakes = opts.against is not None and bool(set(layers) & set(other_layers))
    header = ["layer", "most similar", kind, *(["same layer"] if namesakes else [])]
    table = []
    for i, name in enumerate(layers):
        scores = [(v, other) for v, other in zip(cka[i], other_layers)
                  if np.isfinite(v) and (opts.against is not None or other != name)]
        best = max(scores, default=None)
        row = [name, "-" if best is None else best[1], "-" if best is None else f"{best[0]:.3f}"]
        if namesakes:
            same = cka[i][other_layers.index(name)] if name in other_layers else np.nan
            row.append("-" if np.isnan(same) else f"{same:.3f}")
        table.append(row)
    unit = "token rows" if samples is not None else "rows"
    rows_text = f"{rows} {unit}" + (f" (a seeded sample of {available})" if available > opts.rows else "") + (
        f" from {samples} samples" if samples is not None else "") + (
        f", {skipped} left out for non-finite values" if skipped else "")
    read_as = "Each row one token of a sample, the same token in every layer" if samples is not None else \
        "Each layer read as the probes read it (a row of tokens as their mean)"
    with open(paths["similarity.md"], "w") as f:
        f.write("\n".join([
            f"# How alike the layers are: {kind}", "",
            f"Store `{result['store']}`" + (f" against `{against}` (the samples both hold)" if against else "")
            + f"; {rows_text}" + (f", where {' and '.join(opts.where)}" if opts.where else "")
            + f". {read_as}. 1: the same representation up to a rotation and a scale.", "",
            *markdown_table(["layer", *other_layers], [[n, *("-" if np.isnan(v) else f"{v:.3f}" for v in cka[i])]
                                                       for i, n in enumerate(layers)]), "",
            f"![{kind} of each pair of layers](similarity.png)", ""]))
    return {**result, "json": paths["similarity.json"], "markdown": paths["similarity.md"],
            "plot": paths["similarity.png"], "table": text_table(header, table)}
