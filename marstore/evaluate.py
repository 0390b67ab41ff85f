"""Trained probes on another store: does what a probe read in one model, checkpoint or data set
carry over to another?

    report = evaluate_probes(EvaluateOptions(probes="probes", store="acts-ckpt200.h5", out="transfer"))

Every probe that `marstore probe` wrote into the folder `probes` (and its control) is applied,
unchanged, to its layer's rows in `store`: standardised with the statistics the probe was
trained with, not the new store's, so that the probe is the same function of the activations.
Which rows: a store of other samples is evaluated whole; a store of the same samples (the
store the probes were trained on, another extraction of the same data set, such as another
checkpoint's, or of its callable with other arguments whose targets agree with the probes'
store's) only on the samples the probes were never fitted or chosen on: their test samples,
and samples their store did not hold (rows="auto", logged; "all" or "held-out" choose). A
probe of token means applies to any store whose rows give those means (token means stored,
full tokens, ragged ones). The report has the layout of a probe report (report.json, report.md, depth.png, with
the 95% bootstrap intervals), so that `marstore compare probes transfer` puts the two side by
side. LiveProbes applies probe files to a model as it runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from marstore.dataset import ActivationDataset, row_tokens
from marstore.hooks import Capture, did_you_mean, match_modules, nearest_names, parse_layers, recorded_unfold, reduction_text
from marstore.loading import IN_HAND
from marstore.probe import (ProbeError, TrainedProbe, _add_intervals, _breakdown_lines, _features_text, _metrics, _read_report,
                            _table_rows, aligned_targets, check_token_memory, drawn_rows, finite_rows, load_probe,
                            probe_inputs, read_ragged_tokens, report_breakdown_plot, report_depth_plot, the_one_value,
                            token_mean_shape, tokens_meeting, where_rows_and_tokens)
from marstore.report import markdown_table
from marstore.store import Store, StoreError, open_store, rows_equal
from marstore.transfer import resolve_device

log = logging.getLogger(__name__)

ROWS = ("auto", "all", "held-out")
_TOKEN = re.compile(r"\[\d+\]$")  # a token's probe: layer[i]


@dataclass
class EvaluateOptions:
    probes: str  # a folder that `marstore probe` wrote (or its report.json)
    store: str
    out: str = "evaluation"
    layer: str | list[str] | None = None  # names or patterns among the report's layers; None: all of them
    target: str | None = None  # the store's target to score against; None: the one the probes were trained for
    rows: str = "auto"
    group: str | None = None  # resample whole groups for the intervals; None: the probes' --group, where the store has it
    device: str = "cpu"
    where: list[str] | None = None  # TARGET=VALUE conditions on the rows scored; None: the probes' --where; []: none
    max_rows: int | None = None  # at most this many of those rows, drawn at random with the probes' seed

    def __post_init__(self) -> None:
        if self.rows not in ROWS:
            raise ProbeError(f"--rows {self.rows!r}: use one of {', '.join(ROWS)}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise ProbeError(f"--max-rows {self.max_rows!r}: give an integer of at least 1")
        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise ProbeError(str(exc)) from None


class _Samples(NamedTuple):
    """How a store's samples relate to the probes' data set: the same (why), perhaps the same
    (the store, in words: it cannot be told), or others (why)."""
    same: str | None = None
    perhaps: str | None = None
    other: str | None = None


def _same_samples(trained_on: dict, store: Store) -> _Samples:
    """Whether the store's source indices name samples of the probes' data set. The same data
    set callable with other arguments (another size, another split) is told by the probes'
    store, where it is still there: the targets of samples of one source index agree in both
    only if they are one sample. A store recorded without its data set, or from a data set
    object recorded by its class alone, is taken for other samples."""
    if os.path.abspath(store.path) == trained_on["path"] and str(store.file.attrs["created"]) == trained_on["created"]:
        return _Samples(same="the store the probes were trained on")
    then = trained_on["dataset"]
    now = [store.metadata.get("dataset"), store.metadata.get("dataset_args")]
    if then[0] is None or then[0].startswith(IN_HAND) or then[0] != now[0]:
        return _Samples()
    if then == now:
        return _Samples(same=f"an extraction of the same data set ({then[0]} {json.dumps(then[1], sort_keys=True)})")
    other = f"{now[0]} with {json.dumps(now[1], sort_keys=True)}, the probes' with {json.dumps(then[1], sort_keys=True)}"
    compared = _compare_targets(trained_on, store)
    if compared is None:
        return _Samples(perhaps=f"an extraction of {other}")
    differ, shared = compared
    if not differ:
        return _Samples(same=f"an extraction of {other}, whose targets agree with the probes' store's on all {shared} "
                             "samples both hold")
    return _Samples(other=f"an extraction of {other}, whose targets differ from the probes' store's on {differ} of the "
                          f"{shared} samples of source indices both hold: other samples")


def _compare_targets(trained_on: dict, store: Store) -> tuple[int, int] | None:
    """(samples whose targets differ, samples compared) between the probes' store and store, by
    source index, over the targets both hold; None where the probes' store is gone (or rewritten),
    or the two share no target or no source index."""
    path = trained_on["path"]
    if not os.path.isfile(path):
        return None
    try:
        theirs = open_store(path)
    except StoreError:
        return None
    with theirs:
        names = sorted(set(theirs.targets) & set(store.targets))
        if str(theirs.file.attrs["created"]) != trained_on["created"] or not names:
            return None
        common, mine, other = np.intersect1d(store.index(), theirs.index(), return_indices=True)
        if not len(common):
            return None
        same = np.ones(len(common), dtype=bool)
        for name in names:
            same &= rows_equal(store.target(name)[mine], theirs.target(name)[other])
    return int((~same).sum()), len(common)


def _held_out_rows(probe: TrainedProbe, index: np.ndarray, store_path: str, allowed: np.ndarray | None) -> np.ndarray:
    """The store's rows (of allowed ones) of samples the probe was never fitted or chosen on (on
    its own store: its test rows, in their order, so that the metric and its interval are the
    report's)."""
    rows = np.flatnonzero(~probe.saw(index))
    if allowed is not None:
        rows = np.intersect1d(rows, allowed)
    if not len(rows):
        raise ProbeError(f"{probe.name}: every row of {store_path} is of a sample the probe was fitted or chosen on; "
                         "use --rows all")
    return rows


def _check_rows(probe: TrainedProbe, store: Store) -> str | None:
    """None where the store holds the probe's layer as the probe's store did (rows alike, reduced
    alike at extraction). Where it holds it otherwise but gives the probe's input all the same (a
    probe of token means on a store of token means, of full tokens or of ragged ones, hooked
    alike), how it holds it, in words; otherwise a ProbeError."""
    info = store.layers[probe.layer]
    unfolded = recorded_unfold(info.attrs.get("unfolded"), info.attrs.get("unfold_layout"))
    if unfolded != probe.unfold_layout:  # rows of one shape, but of other samples' copies
        said = {None: "not unfolded"}
        raise ProbeError(f"{probe.layer}: {store.path} holds it {said.get(unfolded, f'unfolded as {unfolded}')}, the probe "
                         f"was trained on it {said.get(probe.unfold_layout, f'unfolded as {probe.unfold_layout}')}; "
                         "evaluate on a store of this layer extracted as the probe's was")
    held = {"row_shape": list(info.row_shape), "ragged": info.layout == "ragged", "channel_axis": info.attrs.get("channel_axis"),
            "reduction": str(info.attrs.get("reduction", "none")), "tokens": probe.tokens}
    trained = {"row_shape": list(probe.row_shape), "ragged": probe.ragged, "channel_axis": probe.channel_axis,
               "reduction": probe.reduction, "tokens": probe.tokens}
    if all(held[k] == trained[k] for k in ("ragged", "row_shape", "reduction")):
        return None
    hooked = (info.attrs.get("unfolded"), store.run_of(probe.layer).get("options", {}).get("multi_fire", "error"))
    mean_shape = token_mean_shape(trained)
    if probe.tokens == "mean" and hooked == (probe.unfolded, probe.multi_fire) and mean_shape is not None \
            and mean_shape == token_mean_shape(held):
        log.info("%s: %s holds %s, the probe's store held %s: the mean of their tokens is the probe's input all the same",
                 probe.layer, store.path, _rows_text(held), _rows_text(trained))
        return _features_text(held)
    if probe.tokens == "aligned" and hooked == (probe.unfolded, probe.multi_fire) and _token_width(held) is not None \
            and all(held[k] == trained[k] for k in ("reduction", "channel_axis")) and _token_width(held) == _token_width(trained):
        log.info("%s: %s holds %s, the probe's store held %s: each token is the probe's input all the same",
                 probe.layer, store.path, _rows_text(held), _rows_text(trained))
        return _features_text(held)
    raise ProbeError(f"{probe.layer}: {store.path} holds {_rows_text(held)}, the probe was trained on {_rows_text(trained)}"
                     "; evaluate on a store of this layer extracted as the probe's was")


def _token_width(features: dict) -> int | None:
    """The features of one token of rows held as features describes them (a ragged layer's rows
    are its tokens'); None for rows without tokens."""
    if features["ragged"]:
        return features["row_shape"][-1]
    tokens, width = row_tokens(features["row_shape"], features["channel_axis"])
    return width if tokens else None


def _rows_text(features: dict) -> str:
    rows = f"{'ragged rows of tokens' if features['ragged'] else 'rows'} of shape {tuple(features['row_shape'])}"
    return rows + ("" if features["reduction"] == "none" else f" reduced at extraction ({reduction_text(features['reduction'])})")


def _class_numbers(probe: TrainedProbe, y: np.ndarray | torch.Tensor, target: str) -> tuple[torch.Tensor, int]:
    """Targets as the probe's class numbers; a label the probe has no class for becomes the
    extra class len(classes), which no prediction is. (numbers, rows with such a label)"""
    text_classes = bool(probe.classes) and isinstance(probe.classes[0], str)
    if text_classes != isinstance(y, np.ndarray):
        held = ("numbers", "text") if text_classes else ("text", "numbers")
        raise ProbeError(f"{probe.name}: target {target!r} holds {held[0]}, and the probe's classes are {held[1]} "
                         f"({', '.join(map(str, probe.classes[:5]))}); score it against a target like the one it was trained for")
    values = y.tolist() if isinstance(y, np.ndarray) else y.reshape(len(y), -1).tolist()
    if not isinstance(y, np.ndarray):
        if any(len(v) != 1 or v[0] != int(v[0]) for v in values):
            raise ProbeError(f"{probe.name}: the probe classifies, and target {target!r} does not hold one whole number "
                             "a row; score it against a target of labels (--target)")
        values = [int(v[0]) for v in values]
    number = {label: i for i, label in enumerate(probe.classes)}
    classes = [number.get(v, len(probe.classes)) for v in values]
    return torch.tensor(classes, dtype=torch.long), sum(c == len(probe.classes) for c in classes)


class _Reads:
    """A layer's rows, read once for the probes of all its tokens (--tokens each): the last read is kept."""

    def __init__(self, store: str, columns: list[str]):
        self.store, self.columns = store, list(dict.fromkeys(columns))
        self.key: tuple | None = None
        self.data: dict = {}

    def __call__(self, probe: TrainedProbe, rows: np.ndarray) -> dict:
        reduction = "mean" if probe.tokens == "mean" else None
        key = (probe.layer, reduction, rows.tobytes())
        if key != self.key:
            self.data = {}  # the last layer's rows go before the next are read
            if probe.tokens != "mean":  # every token of the rows in memory: refused where they would not fit
                check_token_memory(self.store, probe.layer, probe.tokens, rows)
            ds = ActivationDataset(self.store, [probe.layer], self.columns, rows=rows, reduction=reduction)
            ragged = ds.ragged and probe.tokens == "aligned"  # every token of the rows, one after another
            self.data = read_ragged_tokens(ds, np.arange(len(rows)), probe.layer) if ragged else ds.read_all()
            self.key = key
            ds.close()
        return self.data


def _evaluate_layer(opts: EvaluateOptions, probes: dict[str, TrainedProbe], data: dict, target: str, group: str | None,
                    seed: int, metric: str, token_where: list[tuple]) -> dict:
    """The entry of one probe (and its control), from data: its layer's rows, the target's and the group's."""
    probe = probes["probe"]
    layer, device = probe.name, resolve_device(opts.device)
    x = probe.features(data[probe.layer])
    y = data[target]
    groups = np.asarray(data[group]) if group else None
    count: int | np.ndarray = 0
    if probe.tokens == "aligned":  # a row for each token, with its own target value
        # as this store holds the layer (a probe of tokens stored dense reads a ragged store's too, and back)
        count = data["token counts"] if "token counts" in data else \
            row_tokens(tuple(data[probe.layer].shape[1:]), probe.channel_axis)[0]
        y, owner = aligned_targets(y, count, target, layer)
        groups = owner if groups is None else groups[owner]  # the intervals draw whole rows
    meeting = tokens_meeting(data, token_where, len(x), count, layer)
    finite = finite_rows(x, y)
    skipped = int((meeting & ~finite).sum())
    finite &= meeting
    x, y = x[finite], y[finite.numpy()] if isinstance(y, np.ndarray) else y[finite]
    if not len(x):
        raise ProbeError(f"{layer}: none of the {len(finite)} rows has finite features and targets")
    entry: dict = {"layer": layer, "task": probe.task, "split_rows": {"test": len(x)}, "skipped_rows": skipped}
    if probe.tokens == "aligned":  # as a probe report says it: the rows, and their tokens (skipped_rows counts these)
        entry |= {"split_rows": {"test": len(np.unique(owner[finite.numpy()]))}, "token_rows": {"test": len(x)}}
    if probe.task == "classification":
        y, unseen = _class_numbers(probe, y, target)
        entry |= {"classes": probe.classes, "unseen_label_rows": unseen}
        if unseen:
            log.warning("%s: %d of %d rows hold a label the probe has no class for (it never saw it in training); they "
                        "count as wrong", layer, unseen, len(y))
    else:
        if isinstance(y, np.ndarray):
            raise ProbeError(f"{layer}: target {target!r} holds text; this probe regresses numbers")
        entry["target_shape"] = list(probe.target_shape)
        y = y.float().reshape(len(y), -1)
        dims = probe.head(x[:0]).shape[1]
        if y.shape[1] != dims:
            raise ProbeError(f"{layer}: target {target!r} has {y.shape[1]} values a row, the probe predicts {dims}")
        value = the_one_value(y)
        if value is not None:  # R² would be 0 by convention, with an interval of 0 to 0
            raise ProbeError(f"{layer}: target {target!r} is {value!r} in every evaluated row, where R² is undefined; "
                             "evaluate on rows where it varies")
    tests = {}
    for which, p in probes.items():
        with torch.no_grad():
            pred = p.head.to(device)(x.to(device)).float().cpu()
        if probe.task == "classification":  # a column for labels without a class, never chosen
            pred = torch.cat([pred, torch.full((len(pred), 1), -torch.inf)], 1)
        tests[which] = (pred, y)
        entry[which] = {"test": _metrics(probe.task, pred, y), "weights": p.path}
        if probe.task == "classification":  # not the extra column's: its rows are counted as unseen_label_rows
            del entry[which]["test"]["recall_per_class"][len(probe.classes):]
    if "control" in tests:
        entry["selectivity"] = entry["probe"]["test"][metric] - entry["control"]["test"][metric]
    _add_intervals(entry, metric, tests, seed, None if groups is None else groups[finite.numpy()])
    return entry


def _chosen(names: list[str], patterns: str | list[str] | None, folder: str) -> list[str]:
    """The report's entries that --layer picks (all of them without it)."""
    if patterns is None:
        return names
    chosen: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        # a layer's name also picks the probes of its tokens (--tokens each: layer[0], layer[1], ...)
        found = [n for n in names if match_modules(pattern, [n]) or match_modules(pattern, [_TOKEN.sub("", n)])]
        if not found:
            raise ProbeError(f"--layer {pattern!r}: no probe of {folder} is of such a layer; "
                             f"{did_you_mean(pattern, names)}nearest: {', '.join(nearest_names(pattern, names))}")
        chosen += [n for n in found if n not in chosen]
    return chosen


def evaluate_probes(opts: EvaluateOptions) -> dict:
    """Applies the probes of opts.probes to opts.store; writes report.json, report.md and depth.png
    into opts.out; returns the report."""
    report = _read_report(opts.probes)
    folder = opts.probes if os.path.isdir(opts.probes) else os.path.dirname(opts.probes)
    chosen = _chosen([entry["layer"] for entry in report["layers"]], opts.layer, folder)
    entries = {entry["layer"]: entry for entry in report["layers"]}
    training = report["options"]
    with open_store(opts.store) as store:
        target = opts.target or report["target"]
        if target not in store.targets and target not in store.layers:
            raise ProbeError(f"target {target!r} is not in {opts.store}; its targets are {sorted(store.targets)} "
                             "(--target names the one to score against, or a layer)")
        group = opts.group
        if group is None and training.get("group") in store.targets:
            group = training["group"]
            log.info("intervals drawn by whole %r groups, as the probes' were (--group names another)", group)
        elif group is not None and group not in store.targets:
            raise ProbeError(f"--group {group!r} is not in {opts.store}; its targets are {sorted(store.targets)}")
        layers, held_as = [], {}
        for name in chosen:
            files = {"probe": entries[name]["probe"]["weights"], **({"control": entries[name]["control"]["weights"]}
                                                                     if "control" in entries[name] else {})}
            # the folder may have moved since: the files are looked for beside its report
            layers.append({which: load_probe(os.path.join(folder, os.path.basename(path))) for which, path in files.items()})
            layer = layers[-1]["probe"].layer
            if layer not in store.layers:
                raise ProbeError(f"{opts.store} has no layer {layer!r}; nearest: {nearest_names(layer, list(store.layers))}")
            held_as[name] = _check_rows(layers[-1]["probe"], store)
        first = layers[0]["probe"]
        samples = _same_samples(first.trained_on, store)
        same = samples.same
        mode = opts.rows if opts.rows != "auto" else "held-out" if same else "all"
        if same and mode == "all":
            log.warning("rows: %s is %s, and every row of it includes the samples the probes were fitted and chosen on: "
                        "the metric is not a test metric (--rows held-out keeps the others)", opts.store, same)
        index = store.index(0, store.rows)
        if opts.rows == "auto" and same:
            log.info("rows: the samples the probes were not fitted or chosen on, as %s is %s", opts.store, same)
        elif opts.rows == "auto":
            seen = int(first.saw(index).sum()) if samples.perhaps else 0
            log.info("rows: all %d committed rows of %s, %s", store.rows, opts.store, samples.other or (
                f"{samples.perhaps}: where a source index is the same sample in both, {seen} of them are of samples the "
                "probes were fitted or chosen on (--rows held-out leaves those out)" if seen else
                "whose samples the probes never saw"))
        where = training.get("where", []) if opts.where is None else opts.where
        try:
            aligned = training.get("tokens") == "aligned"  # conditions on a target of a value a token select tokens
            allowed, token_where = where_rows_and_tokens(store, where, store.rows, aligned) if where else (None, [])
        except StoreError as exc:
            raise ProbeError(str(exc) + (" (the probes' --where; --where with no condition scores every row)"
                                         if opts.where is None else "")) from None
        if where:
            log.info("--where %s%s: %d of the %d committed rows", " ".join(where), " (as the probes were trained)"
                     if opts.where is None else "", len(allowed), store.rows)
        source = {"path": os.path.abspath(opts.store), "status": store.status, "rows": store.rows}
    os.makedirs(opts.out, exist_ok=True)
    metric, seed = report["metric"], training.get("seed", 0)
    out_entries = []
    read = _Reads(opts.store, [target, *([group] if group else []), *(c[1] for c in token_where)])
    drawn_from = None  # the rows --max-rows drew from, where it drew
    for name, probes in zip(chosen, layers):
        rows = _held_out_rows(probes["probe"], index, opts.store, allowed) if mode == "held-out" else \
            np.arange(len(index)) if allowed is None else allowed
        if opts.max_rows is not None and len(rows) > opts.max_rows:  # the same draw for every layer's rows
            log.info("--max-rows %d: scoring %d of %d rows, drawn with the probes' seed %d", opts.max_rows, opts.max_rows,
                     len(rows), seed)
            rows, drawn_from = drawn_rows(rows, opts.max_rows, seed), len(rows)
        entry = _evaluate_layer(opts, probes, read(probes["probe"], rows), target, group, seed, metric, token_where)
        out_entries.append({**entry, **{k: entries[name][k] for k in ("features", "inputs") if k in entries[name]},
                            **({"store_rows": held_as[name]} if held_as[name] else {})})
        log.info("%s: test %s %.3f on %d rows", probes["probe"].name, metric, out_entries[-1]["probe"]["test"][metric],
                 out_entries[-1]["split_rows"]["test"])
    result = {"store": source["path"], "store_status": source["status"], "rows": source["rows"], "target": target,
              "task": report["task"], "metric": metric, "solver": report["solver"], "options": training,
              "evaluation": {**asdict(opts), "probes": os.path.abspath(folder), "trained_on": report["store"], "rows": mode,
                             "same_samples": same, "group": group, "where": where,
                             **({"token_where": [c for c, *_ in token_where]} if token_where else {}),
                             **({"drawn_from": drawn_from, "seed": seed} if drawn_from else {})},
              "layers": out_entries}
    result["plots"] = {"depth": report_depth_plot(result, opts.out, f"Probes of {report['target']} from {report['store']}, "
                                                                     f"on {os.path.basename(opts.store)}"),
                       **report_breakdown_plot(result, opts.out)}
    with open(os.path.join(opts.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["report"] = os.path.join(opts.out, "report.json")
    result["markdown"] = _markdown(result, opts.out)
    return result


class LiveProbes:
    """Trained probes reading a model as it runs (a policy in closed loop, a sampler): for the
    with block, each probe's layer is hooked, and after each forward read() gives every probe's
    predictions for that forward's samples. The hooks capture each module as it is, and each
    probe applies its extraction's token reduction itself, so a probe of stored token means
    takes UVA's (B, 1024, D) block outputs, and unfolds a module that ran on k rows a sample
    (UVA's action head, B*4) as extraction did. A module that fires several times a forward (a
    diffusion head's steps) is hooked with the multi_fire policy the probes' files record
    (multi_fire= overrides).

        with LiveProbes(policy.model, ["probes/encoder_blocks.3.pt"]) as live:
            action = policy.predict_action(obs)
            live.read()["encoder_blocks.3"]   # what that block held of the actions, decoded
    """

    def __init__(self, model: torch.nn.Module, probes: Sequence[TrainedProbe | str | os.PathLike], *,
                 multi_fire: str | None = None):
        loaded = [p if isinstance(p, TrainedProbe) else load_probe(p) for p in probes]
        self.probes = {p.name: p for p in loaded}
        if len(self.probes) != len(loaded):
            raise ProbeError(f"probes of one name given twice: {sorted(p.name for p in loaded)}; give each once")
        if multi_fire is None:  # as the probes' extraction hooked their modules: one policy for one hooking
            recorded = {p.name: p.multi_fire for p in loaded if p.multi_fire is not None}
            if len(set(recorded.values())) > 1:
                raise ProbeError(f"the probes were extracted with different multi_fire policies ({recorded}); read them "
                                 "with separate LiveProbes, or give multi_fire=")
            multi_fire = next(iter(recorded.values()), "error")
        layers = list(dict.fromkeys(p.layer for p in loaded))
        self.capture = Capture(model, parse_layers(layers, model), multi_fire=multi_fire)  # captures as the module gives them

    def __enter__(self) -> "LiveProbes":
        self.capture.__enter__()
        self.capture.start_batch()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.capture.remove()

    @torch.no_grad()
    def read(self) -> dict[str, torch.Tensor | list[str]]:
        """{probe name: its predictions (as TrainedProbe.predict gives them)} from what the hooked
        modules gave since the last read; a module that did not fire since is an error."""
        captured = self.capture.finish_batch()
        self.capture.start_batch()
        out = {}
        for name, probe in self.probes.items():
            x, lengths = captured[probe.layer], self.capture.lengths.get(probe.layer)
            probe = probe.to(x.device)
            if lengths is None or probe.tokens == "aligned":  # (each token alone: a padded sample's first ones its own)
                out[name] = probe.predict(x)
                continue
            # samples of different lengths, padded: each is read over its own tokens, as extraction stored it
            parts = [probe.predict(x[i:i + 1, :n]) for i, n in enumerate(lengths)]
            out[name] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [p for part in parts for p in part]
        return out


def _held_otherwise(entries: list[dict]) -> str:
    """For report.md: what the probes read on a store that holds their layers otherwise than
    theirs did (a store of token means for probes of full tokens), where that gives their input."""
    by_text: dict[str, list[str]] = {}
    for entry in entries:
        if "store_rows" in entry:
            by_text.setdefault(entry["store_rows"], []).append(entry["layer"])
    return "".join(f" On this store the probes of {'every layer' if len(layers) == len(entries) else ', '.join(layers)} "
                   f"read the {text}, which gives them their input all the same." for text, layers in by_text.items())


def _markdown(result: dict, out: str) -> str:
    header, cells = _table_rows(result)
    reads = probe_inputs(result, header, cells) + _held_otherwise(result["layers"])
    e = result["evaluation"]
    rows = (f"the {result['layers'][0]['split_rows']['test']} rows of samples the probes were not fitted or chosen on"
            if e["rows"] == "held-out" else "every committed row")
    row_where = [c for c in e["where"] if c not in e.get("token_where", [])]
    if row_where:
        rows += f", where {' and '.join(row_where)}"
    if e.get("drawn_from"):
        rows += f"; {e['max_rows']} of those {e['drawn_from']}, drawn at random with seed {e['seed']} by --max-rows"
    if e.get("token_where"):  # conditions that selected tokens (--tokens aligned)
        rows += f"; their tokens where {' and '.join(e['token_where'])}"
    drawn = f" (drawn by whole {e['group']!r} groups)" if e["group"] else ""
    lines = [f"# Probes of `{result['target']}` from another store", "",
             f"The probes trained on `{e['trained_on']}` (`{e['probes']}`), unchanged, on `{result['store']}` "
             f"({result['store_status']}, {result['rows']} rows): {rows}. The metric is the {result['metric']}, its 95% "
             f"interval the percentiles of bootstrap resamples of those rows{drawn}; the control is the probe trained on "
             f"shuffled targets, applied the same way.{reads}", "",
             *markdown_table(header, cells), "",
             f"![{result['metric']} of each layer's probe and its control]({os.path.basename(result['plots']['depth'])})", "",
             *_breakdown_lines(result)]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
