"""The `marstore` command line: a thin layer over the library's stages."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys


def _doctor(args: argparse.Namespace) -> int:
    import h5py
    import torch

    from marstore import ops

    ext = ops._C
    rows = [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("marstore._C", ops.EXTENSION_STATUS),
        ("operators use", ops.backend()),
    ]
    if ext is not None:
        rows.append(("compiled with CUDA", "yes" if ext.with_cuda else "no"))
        rows.append(("CPU kernels", f"{ext.cpu_kernels()} (this processor runs: {', '.join(ext.cpu_kernels_available())})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    else:
        rows.append(("GPU", "none seen"))
    rows.append(("h5py / HDF5", f"{h5py.version.version} / {h5py.version.hdf5_version}"))
    try:
        import safetensors
        rows.append(("safetensors", safetensors.__version__))
    except ImportError:
        rows.append(("safetensors", "not installed (only .safetensors checkpoints need it: pip install safetensors)"))
    usable = ext is not None and (ext.with_cuda or not torch.cuda.is_available())
    if ext is not None and not usable:
        rows.append(("problem", "a GPU is present but marstore._C has no CUDA kernels; rebuild with "
                                "MARSTORE_BUILD=cuda pip install --no-build-isolation -e ."))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("ok" if usable else "NOT OK: the extension is not usable (see above)")
    return 0 if usable else 1


SKIPPED_SHOWN = 10  # items left out that `marstore info` lists (--json: all)
SUMMARY_LABELS = 50  # a target of integers, booleans or strings with at most this many values: counted
SUMMARY_MAX_BYTES = 256 << 20  # a larger target is not read for `marstore info`


def _target_summary(store, name: str) -> dict | None:
    """What a target holds, for a look before probing: each value's count for labels (over every
    entry of a target of several a row: a label for each token), or the values' mean, std, min
    and max; None for a target too large to read here."""
    import numpy as np

    ds = store.targets[name]
    if store.rows * max(1, int(np.prod(ds.shape[1:]))) * ds.dtype.itemsize > SUMMARY_MAX_BYTES:
        return None
    values = store.target(name)
    if values.dtype.kind in "biuO":
        labels, counts = np.unique(values.reshape(-1), return_counts=True)
        if len(labels) <= SUMMARY_LABELS:
            order = np.argsort(-counts, kind="stable")
            return {"counts": {str(labels[i].item() if hasattr(labels[i], "item") else labels[i]): int(counts[i])
                               for i in order}, **({"entries": int(values.size)} if values.ndim > 1 else {})}
    if values.dtype.kind == "O":
        return {"distinct": int(len(np.unique(values)))}
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if not finite.size:
        return {"finite": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "nonfinite": int(values.size - finite.size)}


def _summary_text(summary: dict | None) -> str:
    if summary is None:
        return "(not read: too large)"
    if "counts" in summary:
        counts = list(summary["counts"].items())
        shown = ", ".join(f"{value} ({n})" for value, n in counts[:8])
        over = f" over its {summary['entries']} entries" if "entries" in summary else ""
        return f"{len(counts)} value{'s' * (len(counts) != 1)}{over}: {shown}" + (", ..." if len(counts) > 8 else "")
    if "distinct" in summary:
        return f"{summary['distinct']} distinct strings"
    if "mean" not in summary:
        return "no finite values"
    text = f"mean {summary['mean']:.4g}, std {summary['std']:.4g}, from {summary['min']:.4g} to {summary['max']:.4g}"
    return text + (f", {summary['nonfinite']} non-finite" if summary["nonfinite"] else "")


def _probe_info(args: argparse.Namespace) -> int:
    """`marstore info` of a probe file: what it reads, from what, and what it saw."""
    import json

    from marstore.hooks import reduction_text, unfolded_text
    from marstore.probe import load_probe

    probe = load_probe(args.store)
    linear = probe.head.linear if probe.kind == "mlp" else probe.head
    seen = probe.seen_sources
    info = {"path": args.store, "name": probe.name, "layer": probe.layer, "target": probe.target, "task": probe.task,
            "kind": probe.kind, "control": probe.control, "inputs": linear.in_features, "outputs": linear.out_features,
            "classes": probe.classes, "target_shape": list(probe.target_shape), "tokens": probe.tokens, "token": probe.token,
            "row_shape": list(probe.row_shape), "ragged": probe.ragged, "reduction": probe.reduction,
            "standardised": probe.mean is not None, "trained_on": probe.trained_on, "where": probe.where,
            "multi_fire": probe.multi_fire, "unfolded": probe.unfolded, "unfold_layout": probe.unfold_layout,
            "seen_samples": int((seen[:, 1] - seen[:, 0]).sum()), "seen_ranges": len(seen)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tokens = {"mean": "token means", "flat": "every token side by side", "each": f"token {probe.token}",
              "aligned": "the tokens one by one, each with its own target value,"}[probe.tokens]
    outputs = f"{len(probe.classes)} classes" if probe.task == "classification" else f"{info['outputs']} outputs"
    where = probe.trained_on
    dataset = f"; data set {where['dataset'][0]} {json.dumps(where['dataset'][1])}" if where["dataset"][0] else ""
    print(f"{args.store}: marstore probe{' (the control task)' if probe.control else ''}")
    rows = f"rows {tuple(probe.row_shape)}" if len(probe.row_shape) == 1 and not probe.ragged else \
        f"{tokens} of {'ragged rows of tokens' if probe.ragged else 'rows'} {tuple(probe.row_shape)}"
    hooked = unfolded_text(probe.unfolded, probe.unfold_layout) + (
        f", --multi-fire {probe.multi_fire}" if probe.multi_fire not in (None, "error") else "")
    print(f"  {probe.name} -> {probe.target}: {probe.kind} {probe.task}, {outputs} from {info['inputs']} features "
          f"({rows}, extraction reduction {reduction_text(probe.reduction)}{hooked}"
          f"{', standardised' if info['standardised'] else ''})")
    if probe.task == "classification":
        print(f"  classes: {', '.join(map(str, probe.classes))}")
    print(f"  trained on {where['path']} ({where['status']}, {where['rows']} rows, created {where['created']}{dataset})"
          + (f", on the rows where {' and '.join(probe.where)}" if probe.where else ""))
    print(f"  fitted or chosen on {info['seen_samples']} samples (source indices in {info['seen_ranges']} ranges)")
    return 0


def _checkpoint_info(args: argparse.Namespace, ckpt: object) -> int:
    """`marstore info` of a checkpoint: its entries, the config and the weights a run would take,
    and the modules those weights belong to (what --layers can name)."""
    import json

    from marstore.loading import CONFIG_KEYS, checkpoint_bytes, describe_checkpoint, state_key_within
    from marstore.report import human_bytes, text_table

    info = {"path": args.store, "bytes": checkpoint_bytes(args.store), "trusted": args.trust_checkpoint,
            **describe_checkpoint(ckpt)}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    how = "full unpickling (--trust-checkpoint)" if args.trust_checkpoint else "weights_only=True"
    print(f"{args.store}: a checkpoint ({human_bytes(info['bytes'])}), read with {how}")
    width = max(map(len, info["top_level"]))
    for key, what in info["top_level"].items():
        print(f"  {key:<{width}}  {what}")
    config = info["config"]
    if config is None:
        print(f"config: none under {', '.join(CONFIG_KEYS)} (--config-key names one; else --model-arg values alone)")
    elif "problem" in config:
        print(f"config: {config['problem']}")
    else:
        sections = f"; sections: {', '.join(config['sections'])}" if config["sections"] else ""
        print(f"config: checkpoint[{config['key']!r}], {config['keys']} key{'s' * (config['keys'] != 1)}{sections} "
              "(--config-key chooses another)")
        if config["scalars"]:
            values = ", ".join(f"{k}={v!r}" for k, v in list(config["scalars"].items())[:16])
            print(f"  {values}{' ...' if len(config['scalars']) > 16 else ''}")
        targets = config["hydra_targets"]
        if targets:
            listed = ", ".join(f"{path} ({target})" for path, target in targets[:6]) + (" ..." if len(targets) > 6 else "")
            print(f"  hydra _target_: {listed}; --model hydra --config-key {targets[0][0]} builds the first")
    if "weights_problem" in info:
        print(f"weights: {info['weights_problem']}")
    if info["weights"]:
        rows = [[w["key"], ("EMA, " if w["ema"] else "") + ("loaded" if w["chosen"] else "-"), str(w["tensors"]),
                 f"{w['values']:,}", human_bytes(w["bytes"]), ", ".join(w["dtypes"]), repr(w["prefix"]) if w["prefix"] else "-"]
                for w in info["weights"]]
        print(text_table(["weights", "run", "tensors", "values", "bytes", "dtypes", "prefix"], rows))
    chosen = next((w for w in info["weights"] if w["chosen"]), None)
    if chosen and chosen["copies"]:
        ema, other = chosen["copies"]
        keyed = state_key_within(chosen["key"], other)
        print(f"{chosen['key']} holds its weights twice, under {other!r} and, as EMA weights, under {ema!r}: a model "
              f"named as one copy gets the EMA ones (--state-key {keyed} the others)")
    if chosen and info["modules"]:
        stripped = f", {chosen['prefix']!r} stripped" if chosen["prefix"] else ""
        print(f"modules of {chosen['key']}{stripped}, which --layers names (each with the modules inside it):")
        print(text_table(["module", "tensors", "values"],
                         [[m["name"], str(m["tensors"]), f"{m['values']:,}"] for m in info["modules"]]))
    return 0


def _report_folders(folder: str) -> list[str]:
    """The folders of one report each that `marstore probe --target a b` writes into folder, each
    named for its target."""
    import json

    names = []
    for name in sorted(os.listdir(folder)):
        try:
            with open(os.path.join(folder, name, "report.json")) as f:
                target = json.load(f).get("target")
        except (OSError, ValueError, AttributeError):
            continue
        if target == name:
            names.append(name)
    return names


def _report_info(args: argparse.Namespace) -> int:
    """`marstore info` of a folder that `marstore probe` or `marstore evaluate` wrote: what was
    probed, on which store, and the table (of each target's folder, where there are several)."""
    import json

    from marstore.probe import _read_report, table

    if not os.path.isfile(os.path.join(args.store, "report.json")):
        folders = _report_folders(args.store)
        summary = os.path.join(args.store, "summary.md")
        print(f"{args.store}: the probe reports of {len(folders)} targets, a folder each: {', '.join(folders)}"
              + (f"; {summary} holds each layer's metric by target" if os.path.isfile(summary) else ""))
        return 0
    report = _read_report(args.store)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    evaluated = report.get("evaluation")
    whose = f" in {evaluated['probes']}" if evaluated else ""
    print(f"{args.store}: the probes of {report['target']!r}{whose} ({report['task']}, {report['metric']}, "
          f"{len(report['layers'])} entries), {'evaluated' if evaluated else 'trained'} on {report['store']} "
          f"({report['store_status']}, {report['rows']} rows)")
    print(table(report))
    return 0


def _ragged_tokens(store, name: str) -> dict | None:
    """A ragged layer's token rows: in all, and the fewest and most a committed row holds."""
    counts = store.token_counts(name)
    if not len(counts):
        return None
    return {"total": int(counts.sum()), "fewest": int(counts.min()), "most": int(counts.max())}


def _info(args: argparse.Namespace) -> int:
    import json

    import h5py

    from marstore.extract import describe_output, summarize_outputs
    from marstore.hooks import reduction_text
    from marstore.store import TEXT, is_text, open_store, text_attr

    if os.path.isdir(args.store) and (os.path.isfile(os.path.join(args.store, "report.json")) or _report_folders(args.store)):
        return _report_info(args)
    store_name = args.store.endswith((".h5", ".hdf5"))  # one that is not HDF5 is said to be damaged
    if os.path.isdir(args.store) or os.path.isfile(args.store) and not store_name and not h5py.is_hdf5(args.store):
        # a probe file, or a checkpoint (a folder: the weights Hugging Face's save_pretrained writes there)
        from marstore.loading import read_checkpoint
        from marstore.probe import PROBE_FORMAT

        ckpt = read_checkpoint(args.store, trust=args.trust_checkpoint)
        if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith(PROBE_FORMAT.split("/")[0]):
            return _probe_info(args)
        return _checkpoint_info(args, ckpt)
    with open_store(args.store) as store:
        size = os.path.getsize(args.store)
        attrs = store.file.attrs
        info = {
            "path": args.store,
            "format_version": int(attrs["format_version"]),
            "status": store.status,
            "rows": store.rows,
            "file_bytes": size,
            "bytes_per_row": size / store.rows if store.rows else None,
            "created": str(attrs["created"]),
            "committed_at": text_attr(attrs["committed_at"]),
            "layers": {
                name: {
                    "layout": layer.layout,
                    "shape": [store.rows, *layer.row_shape] if layer.layout == "dense" else ["ragged", *layer.row_shape],
                    "dtype": layer.dtype,
                    "source_dtype": layer.attrs.get("source_dtype"),
                    "reduction": layer.attrs.get("reduction"),
                    "channel_axis": layer.attrs.get("channel_axis"),
                    "unfolded": layer.attrs.get("unfolded"),  # k rows a sample in the module's batch
                    "unfold_layout": layer.attrs.get("unfold_layout"),  # their order there: (m=4 b t=64)
                    "chunks": list(layer.chunks),
                    "compression": layer.compression,
                    "nonfinite": int(layer.attrs.get("nonfinite", 0)),
                    "overflow": int(layer.attrs.get("overflow", 0)),
                    "joined_from": layer.attrs.get("joined_from"),  # the store a joined layer lives in
                    "rewritten_at_row": layer.attrs.get("rewritten_at_row"),  # stored dense before, rewritten ragged
                    **({"tokens": _ragged_tokens(store, name)} if layer.layout == "ragged" else {}),
                }
                for name, layer in store.layers.items()
            },
            "targets": {name: {"shape": [store.rows, *ds.shape[1:]], "dtype": TEXT if is_text(ds) else str(ds.dtype),
                               "summary": _target_summary(store, name)} for name, ds in store.targets.items()},
            "outputs": summarize_outputs(store),
            "skipped": [{"index": i, "error": e} for i, e in store.skipped()],
            "run": store.metadata,
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: marstore store, format {info['format_version']}, {info['status']}")
    per_row = f", {info['bytes_per_row']:.0f} bytes a row" if info["bytes_per_row"] else ""
    print(f"  {info['rows']} committed rows, {size / 2**20:.1f} MiB{per_row}; last commit {info['committed_at']}")
    print("  layers:")
    for name, layer in info["layers"].items():
        shape = "x".join(str(s) for s in layer["shape"])
        if layer.get("tokens"):  # ragged: the rows' fewest and most tokens, where the shape says "ragged"
            counts = layer["tokens"]
            span = str(counts["fewest"]) if counts["fewest"] == counts["most"] else f"{counts['fewest']}-{counts['most']}"
            shape = "x".join([str(info["rows"]), f"({span})", *map(str, layer["shape"][1:])])
        flags = f", {layer['compression']}" if layer["compression"] else ""
        chunks = f"chunks {tuple(layer['chunks'])}" if layer["chunks"] else \
            f"virtual, in {layer['joined_from']}" if layer["joined_from"] else "virtual"
        print(f"    {name:<28} {layer['layout']:<6} {shape:<18} {layer['dtype']:<8} (from {layer['source_dtype']}, "
              f"reduction {reduction_text(str(layer['reduction']))}{_channels_text(layer)}) {chunks}{flags}; "
              f"nonfinite {layer['nonfinite']}, overflow {layer['overflow']}")
    if info["targets"]:
        print("  targets:")
        for name, target in info["targets"].items():
            print(f"    {name:<28} {'x'.join(map(str, target['shape'])):<18} {target['dtype']:<8} "
                  f"{_summary_text(target['summary'])}")
    for name, summary in info["outputs"].items():
        print(describe_output(name, summary))
    if info["skipped"]:
        print(f"  left out (--skip-failed): {len(info['skipped'])} item{'s' * (len(info['skipped']) != 1)} the data set "
              "failed to give:")
        for item in info["skipped"][:SKIPPED_SHOWN]:
            print(f"    item {item['index']}: {item['error']}")
        if len(info["skipped"]) > SKIPPED_SHOWN:
            print(f"    ... and {len(info['skipped']) - SKIPPED_SHOWN} more (marstore info --json lists every one)")
    for joined in info["run"].get("joined", [info["run"]]):  # a joined store: the run of each store it joins
        run, indent = joined.get("run", joined), "    " if "path" in joined else "  "
        if "path" in joined:
            print(f"  joined {joined['path']}:")
        for key in ("model", "checkpoint", "command"):
            if key in run:
                print(f"{indent}{key}: {json.dumps(run[key]) if not isinstance(run[key], str) else run[key]}")
        order = [name for name in run.get("forward_order") or () if name in info["layers"]]
        if order and order != [name for name in info["layers"] if name in order]:  # probes' depth plots follow it
            print(f"{indent}the forward ran the layers in the order: {', '.join(order)}")
        if "seed" in run.get("options", {}):  # what a random forward's rows (MAR's masks) were drawn from
            print(f"{indent}seed: {run['options']['seed']}, "
                  f"{run.get('seeding', 'torch seeded once at the start (an earlier marstore)')}")
        if run.get("state_changes"):
            dependent = run.get("state_dependent_layers")
            verdict = "where a later forward reads it, rows depend on the batches before them" if dependent is None else \
                f"the rows of {', '.join(dependent)} depend on it" if dependent else "the rows do not depend on it"
            print(f"{indent}the forward changed the model's own state ({verdict}): {', '.join(run['state_changes'])}")
        if run.get("checkpoint") and run.get("load_report"):
            from marstore.loading import LoadReport

            print(f"{indent}weights from {run.get('state_key')!r}: {LoadReport.counts(run['load_report'])}")
    return 0


def _channels_text(layer: dict) -> str:
    from marstore.hooks import unfolded_text

    unfolded = unfolded_text(layer["unfolded"], layer["unfold_layout"])
    rewritten = "" if layer["rewritten_at_row"] is None else f", rewritten ragged at row {layer['rewritten_at_row']}"
    return unfolded + rewritten + ("" if layer["channel_axis"] is None else f", channels at row axis {layer['channel_axis']}")


def _key_value(text: str) -> tuple[str, object]:
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _pattern_value(text: str) -> tuple[str, str]:
    pattern, sep, value = text.rpartition("=")  # a reduction has no '=', a regular expression may
    if not sep or not pattern or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: write PATTERN=REDUCTION")
    return pattern, value


def _unfold_option(values: list[str]) -> bool | str | dict[str, str]:
    """--unfold-batch alone: True; one LAYOUT for every layer; or PATTERN=LAYOUT..."""
    if not values:
        return True
    if len(values) == 1 and values[0].lstrip().startswith("("):
        return values[0]
    pairs = [v.partition("=") for v in values]  # a pattern has no '='; the layout after it may (m=4)
    bad = [v for v, (pattern, sep, layout) in zip(values, pairs) if not (pattern and sep and layout.lstrip().startswith("("))]
    if bad:
        raise SystemExit(f"marstore extract: --unfold-batch {bad[0]!r}: give one LAYOUT for every layer, such as "
                         "'(k b)', or PATTERN=LAYOUT for each, such as 'diffloss.net.**=(m=4 b t)'")
    return {pattern: layout for pattern, _, layout in pairs}


def _options_from(args: argparse.Namespace):
    from marstore.extract import ExtractOptions

    config = {}
    if args.config:
        import json

        import yaml

        try:
            with open(args.config) as f:
                config = (yaml.safe_load(f) if args.config.endswith((".yaml", ".yml")) else json.load(f)) or {}
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
            reason = " ".join(str(exc).split())
            raise SystemExit(f"marstore extract: --config {args.config}: cannot read it ({reason})") from None
        if not isinstance(config, dict):
            raise SystemExit(f"marstore extract: --config {args.config} holds a {type(config).__name__}; "
                             "give a mapping of options (out: ..., layers: [...])")
        fields = list(ExtractOptions.__dataclass_fields__)
        unknown = sorted(set(config) - set(fields))
        if unknown:
            import difflib

            near = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
            hints = ", ".join(f"{k} -> {m[0]}" for k, m in near.items() if m)
            raise SystemExit(f"marstore extract: --config {args.config}: unknown options {unknown}"
                             + (f" (did you mean {hints}?)" if hints else "") + "; the options are the long flags with _ for -")
    given = {k: v for k, v in vars(args).items() if k in ExtractOptions.__dataclass_fields__ and v not in (None, [], {})}
    given.pop("progress", None)
    merged = {**config, **given}
    for key in ("model_args", "dataset_args", "layer_reductions"):
        from_config, from_flags = config.get(key, {}), dict(getattr(args, key[:-1]) or [])
        # a config value that is no mapping goes through as it is, for ExtractOptions to refuse in one line
        merged[key] = {**from_config, **from_flags} if isinstance(from_config, dict) else from_config
    for key, f in ExtractOptions.__dataclass_fields__.items():  # a flag left out leaves the config's value
        if f.type == "bool" and isinstance(getattr(args, key, None), bool):
            merged[key] = True if getattr(args, key) else config.get(key, False)
    if args.channels_first is not None:  # the flag alone: every layer; with patterns: their layers
        merged["channels_first"] = args.channels_first or True
    if args.unfold_batch is not None:
        merged["unfold_batch"] = _unfold_option(args.unfold_batch)
    dry_run = merged.get("dry_run") not in (None, False)  # from the flag or the --config file
    if dry_run:
        merged.setdefault("out", "")  # a dry run writes nothing
    required = ("model", "dataset", "layers") if dry_run else ("out", "model", "dataset", "layers")
    missing = [k for k in required if not merged.get(k)]
    if missing:
        raise SystemExit(f"marstore extract: missing {', '.join('--' + m for m in missing)} (or give "
                         f"{'it' if len(missing) == 1 else 'them'} in --config)")
    from marstore.extract import command_line

    merged["command"] = command_line()
    merged["progress"] = not args.no_progress
    if args.no_malloc_tuning:
        merged["malloc_tuning"] = False
    return ExtractOptions(**merged)


def _extract(args: argparse.Namespace) -> int:
    from marstore import extract as ex

    try:
        result = ex.extract(_options_from(args))
    except ex.Interrupted as exc:
        print(f"marstore extract: {exc}", file=sys.stderr)
        return 128 + exc.signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    if isinstance(result, ex.Survey):
        print(result.describe())
        return 1 if result.problems() else 0  # a script can tell a plan that would stop
    print(ex.describe(result))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from marstore.probe import ProbeInterrupted, ProbeOptions, run_probes, summarize_targets

    fields = ProbeOptions.__dataclass_fields__
    if args.layer is not None and len(args.layer) == 1:  # one pattern, recorded as one (as before several were taken)
        args.layer = args.layer[0]
    targets = args.target or [None]
    if len(set(targets)) != len(targets):
        print(f"marstore probe: --target {' '.join(targets)}: name each target once", file=sys.stderr)
        return 2
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k not in ("progress", "target")}
    out = given.pop("out", fields["out"].default)
    reports = []
    for target in targets:  # several: one report each, in OUT/<target>
        try:
            report = run_probes(ProbeOptions(**given, target=target, progress=not args.no_progress,
                                             out=os.path.join(out, target) if len(targets) > 1 else out))
        except ProbeInterrupted as exc:
            print(f"marstore probe: {exc}", file=sys.stderr)
            return 128 + exc.signum
        if len(targets) > 1:
            print(f"\ntarget {target}:")
        _print_report(report)
        reports.append(report)
    if len(reports) > 1:  # every target at a glance
        summary = summarize_targets(reports, out)
        print(f"\neach layer's test metric, by target:\n{summary['table']}")
        print(f"summary: {summary['markdown']}, {summary['by_target']}")
    return 0


def _print_report(report: dict) -> None:
    """A probe report (of `probe` or `evaluate`) as the terminal shows it: its table and files."""
    from marstore.probe import table

    print(table(report))
    print(f"report: {report['report']}, {report['markdown']}")
    print(f"plots: {', '.join(report['plots'].values())}")


def _merge(args: argparse.Namespace) -> int:
    from marstore.scaleout import merge

    rows = merge(args.store, args.out)
    print(f"copied {rows} rows of {args.store} into {args.out}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from marstore.scaleout import join_layers

    layers = join_layers(args.out, args.stores)
    print(f"{args.out}: the {len(layers)} layers of {', '.join(args.stores)} ({', '.join(layers)})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from marstore.probe import compare_reports

    result = compare_reports(args.reports, args.out, args.label)
    print(result["table"])
    print(f"report: {result['markdown']}, {result['json']}")
    print(f"plot: {result['depth']}")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    from marstore.similarity import SimilarityOptions, layer_similarity

    result = layer_similarity(SimilarityOptions(args.store, args.against, args.layer, args.against_layer, args.rows,
                                                args.seed, args.debiased, args.where or [], args.out, args.device,
                                                args.tokens, args.samples))
    print(result["table"])
    print(f"report: {result['json']}, {result['markdown']}")
    print(f"plot: {result['plot']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from marstore.evaluate import EvaluateOptions, evaluate_probes

    report = evaluate_probes(EvaluateOptions(args.probes, args.store, args.out, args.layer, args.target, args.rows,
                                             args.group, args.device, args.where, args.max_rows))
    _print_report(report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from marstore.models import save_checkpoint, video_mar

    os.makedirs(args.out, exist_ok=True)
    config = {"task_name": "synthetic", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": 64,
              "depth": 4, "decoder_depth": 4, "num_heads": 4}
    torch.manual_seed(0)
    checkpoint = os.path.join(args.out, "latest.ckpt")
    save_checkpoint(video_mar(**config), config, checkpoint, "workspace")
    store = os.path.join(args.out, "activations.h5")
    if os.path.exists(store):
        print(f"replacing {store}, the store of an earlier demo run", flush=True)
        os.remove(store)
    argv = ["extract", "--checkpoint", checkpoint, "--config-key", "cfg.policy.model",
            "--model", "marstore.models:video_mar", "--dataset", "marstore.models:synthetic_video_actions",
            # UVA's policy mode: the model sees the frames and must give the action, which does not
            # enter the forward, so a probe finds it only where the layers have worked out the motion
            "--dataset-arg", f"size={args.rows}", "--forward", "marstore.models:policy_forward",
            "--output-names", "loss", "video_loss", "act_loss",
            "--layers", "proj_cond_x_layer", "encoder_blocks.*", "decoder_blocks.*", "--reduction", "mean",
            "--targets", "nactions", "label", "--batch-size", "32", "--out", store]
    print("running: marstore " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        return code
    print()
    code = main(["info", store])
    if code:
        return code
    print()
    probes = ["probe", store, "--target", "nactions", "--out", os.path.join(args.out, "probes")]
    print("running: marstore " + " ".join(probes), flush=True)
    return main(probes)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, which refuses the arguments it does not know itself, naming the
    command and the nearest option to a misspelt one (argparse leaves them to the top parser,
    which does neither). It takes -v after the command too, where people put it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: when not given here, the top parser's value stands
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log marstore's debug messages")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            hints = []
            options = list(self._option_string_actions)
            for arg in extras:
                name = arg.split("=", 1)[0]
                # 0.75: a misspelling ("--chekpoint"), not any option sharing letters ("--probe", "--no-progress")
                near = name.startswith("-") and difflib.get_close_matches(name, options, n=1, cutoff=0.75)
                if near:
                    hints.append(f"{name}: did you mean {near[0]}?")
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marstore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log marstore's debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    doctor = sub.add_parser("doctor", help="check the installation: torch, marstore._C, GPU, HDF5")
    doctor.set_defaults(func=_doctor)
    info = sub.add_parser("info", help="describe a store (status, rows, layers, targets, the recorded run), a probe file, "
                                       "or a checkpoint (its config, weights and modules)")
    info.add_argument("store", help="the store's .h5 file, a probe's .pt file, a folder of probes, or a checkpoint (any "
                                    "layout)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--trust-checkpoint", action="store_true", help="a checkpoint: allow full unpickling (runs code in the file)")
    info.set_defaults(func=_info)

    ex = sub.add_parser("extract", help="load a checkpoint, hook layers, run a data set, write a store")
    ex.add_argument("--checkpoint", help="checkpoint file, or a folder of one (save_pretrained's, a distributed checkpoint's); any "
                    "layout, read with weights_only=True")
    ex.add_argument("--model", help="MODULE:CALLABLE that builds the model from the config's keys, or hydra: the config's "
                    "_target_, built by hydra.utils.instantiate (pip install hydra-core)")
    ex.add_argument("--model-arg", action="append", type=_key_value, metavar="KEY=VALUE", help="override a config key")
    ex.add_argument("--config-key", help="dotted path of the model config in the checkpoint (e.g. cfg.model)")
    ex.add_argument("--state-key", help="dotted path of the weights (e.g. ema_model or model_ema); it may go on into a "
                                        "state dict's names: state_dict.teacher takes the teacher.* tensors")
    ex.add_argument("--strict", action="store_true", help="missing, unexpected or mis-shaped weights are errors")
    ex.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (runs code in the file)")
    ex.add_argument("--dataset", help="MODULE:CALLABLE returning a torch Dataset")
    ex.add_argument("--dataset-arg", action="append", type=_key_value, metavar="KEY=VALUE")
    ex.add_argument("--forward", help="MODULE:CALLABLE called as fn(model, batch) (default: batch as arguments)")
    ex.add_argument("--collate", help="MODULE:CALLABLE called as fn(items) to batch a list of items, e.g. padding "
                                      "sequences of different lengths (default: torch's default_collate)")
    ex.add_argument("--layers", nargs="+", help="module names, globs (* one level, ** any) or re:REGEX; @input, :index")
    ex.add_argument("--dry-run", nargs="?", const=True, type=int, metavar="BATCHES",
                    help="run two batches (or BATCHES) with every selected layer hooked and say what each layer, target "
                         "and the forward gives and the run would store, or what stands in its way (all at once); write "
                         "nothing (status 1 if anything would stop the run)")
    ex.add_argument("--exclude-layers", nargs="+", metavar="PATTERN",
                    help="modules to leave out of what --layers selects (e.g. '**' but '**.attn')")
    ex.add_argument("--reduction", help="none, mean, mean:G (means of G equal groups of tokens: frames), first, last, "
                                        "or token indices and spans like 0,5,9 or 0:256 (default none)")
    ex.add_argument("--layer-reduction", action="extend", nargs="+", type=_pattern_value, metavar="PATTERN=REDUCTION",
                    help="another reduction for the layers a pattern names (e.g. decoder_norm=none)")
    ex.add_argument("--channels-first", nargs="*", metavar="PATTERN",
                    help="these layers' activations are (batch, channels, *positions), as convolutions give: reduce "
                         "the positions (without patterns: every layer of the run)")
    ex.add_argument("--ragged", nargs="+", action="extend", metavar="PATTERN",
                    help="layers (names or patterns, as --layers) to store ragged even if the first batches agree")
    ex.add_argument("--multi-fire", choices=["error", "first", "last", "stack"], help="a module firing more than once")
    ex.add_argument("--allow-missing", action="store_true", help="a module that does not fire gives NaN rows")
    ex.add_argument("--unfold-batch", nargs="*", metavar="LAYOUT|PATTERN=LAYOUT",
                    help="a module with k rows per sample (UVA's action head: B*4) is stored as (B, k, ...), its rows "
                         "taken as sample-major; a layout in einops' notation orders them otherwise: '(k b)' for "
                         "x.repeat(k, 1), '(m=4 b t)' for MAR's diffusion loss (for the layers a PATTERN names)")
    ex.add_argument("--stop-early", action="store_true", help="stop the forward once every hooked module fired")
    ex.add_argument("--autocast", choices=["bfloat16", "float16"],
                    help="run the forward under torch.autocast with this dtype (mixed precision, as UVA trains)")
    ex.add_argument("--train-mode", action="store_true", help="run in train mode, with autograd (default: eval, inference)")
    ex.add_argument("--redirect-cuda", action="store_true",
                    help="the model's own CUDA calls (MAR's .cuda(), .to('cuda'), device='cuda') keep their tensors on "
                         "--device: a MAR runs on a CPU")
    ex.add_argument("--targets", nargs="+", metavar="[NAME=]PATH",
                    help="batch entries to keep as targets (dotted paths; NAME=PATH stores one under NAME: label=1)")
    ex.add_argument("--output-names", nargs="+", metavar="NAME",
                    help="names for the scalars of a tuple the forward returns, in order (e.g. loss video_loss act_loss)")
    ex.add_argument("--num-samples", type=int, help="extract the first N samples (needed for an iterable data set)")
    ex.add_argument("--sample-seed", type=int, help="with --num-samples, a seeded random sample instead of the first ones")
    ex.add_argument("--skip-failed", action="store_true",
                    help="leave out the items that the data set fails to give (a corrupt file), each recorded in the "
                         "store, instead of stopping at the first; a resume may add it")
    ex.add_argument("--batch-size", type=int)
    ex.add_argument("--workers", type=int, help="DataLoader workers")
    ex.add_argument("--device", help="default: cuda when available")
    ex.add_argument("--seed", type=int, help="seeds torch's, numpy's and Python's generators before each item and "
                    "each batch, from this and the source index: a row's draws (MAR's masks) do not depend on the rows "
                    "before it (default 0)")
    ex.add_argument("--dtype", choices=["float16", "float32", "bfloat16"], help="stored dtype (default float16)")
    ex.add_argument("--compression", choices=["lzf", "gzip"])
    ex.add_argument("--commit-rows", type=int, help="rows between commit points (default 4096)")
    ex.add_argument("--out", help="the store to write (.h5)")
    ex.add_argument("--resume", action="store_true", help="continue an interrupted store (options must match)")
    ex.add_argument("--config", help="a YAML or JSON file with the same options")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex.add_argument("--no-malloc-tuning", action="store_true",
                    help="on the CPU, leave glibc's malloc thresholds alone (by default freed memory is kept for reuse)")
    ex.set_defaults(func=_extract)

    pr = sub.add_parser("probe", help="train linear or MLP probes on a store's layers, with a control task")
    pr.add_argument("store")
    pr.add_argument("--layer", nargs="+", metavar="LAYER",
                    help="layer names, globs or re:REGEX; several layers give a depth plot (default: every layer)")
    pr.add_argument("--target", nargs="+", help="the target to probe for (default: the store's, when it has one), or a "
                                                "layer the store holds dense (MAR's mask, 'random_masking()'); several: "
                                                "a report each, in OUT/TARGET")
    pr.add_argument("--task", choices=["auto", "regression", "classification"])
    pr.add_argument("--kind", choices=["linear", "mlp"])
    pr.add_argument("--metric", choices=["accuracy", "balanced_accuracy", "macro_f1"],
                    help="a classification's headline, with its interval and selectivity (default accuracy; "
                         "balanced_accuracy or macro_f1 for labels far from balanced)")
    pr.add_argument("--tokens", choices=["mean", "flat", "each", "aligned"],
                    help="a layer stored with tokens: probe their mean (default), all of them side by side (a few "
                         "tokens a row, as the frame means of --reduction mean:4), each alone, a probe each (the "
                         "denoising steps of --multi-fire stack, frames): entries LAYER[0], LAYER[1], ..., or aligned: "
                         "one probe reading each token as a row, with its own value of a target that holds one a token "
                         "(a label for each frame or position)")
    pr.add_argument("--solver", choices=["auto", "direct", "adamw"],
                    help="direct: the linear probe's optimum (ridge, its L2 penalty chosen by leave-one-out error; or "
                         "L-BFGS logistic regression, chosen on the validation split); adamw: minibatch training with "
                         "--epochs, --lr, --batch-size (default: direct for linear probes, adamw for MLPs)")
    pr.add_argument("--hidden", type=int, help="MLP width (default 256)")
    pr.add_argument("--out", help="where report.json, the plots and the weights go (default probes/)")
    pr.add_argument("--epochs", type=int)
    pr.add_argument("--lr", type=float)
    pr.add_argument("--weight-decay", type=float, help="L2 penalty (default: adamw 1e-4; direct chooses it)")
    pr.add_argument("--batch-size", type=int)
    pr.add_argument("--val-fraction", type=float)
    pr.add_argument("--test-fraction", type=float)
    pr.add_argument("--group", help="a target (e.g. an episode id) whose values never straddle two splits")
    pr.add_argument("--where", nargs="+", metavar="TARGET=VALUE",
                    help="probe only the rows whose targets meet every condition (TARGET=VALUE or TARGET!=VALUE: "
                         "the rows of one task, say)")
    pr.add_argument("--max-rows", type=int, metavar="N",
                    help="probe at most N of the rows (of those --where selects), drawn at random with --seed: a "
                         "quick look at a large store, or token-level probes whose tokens would not fit in memory")
    pr.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping")
    pr.add_argument("--seed", type=int)
    pr.add_argument("--device")
    pr.add_argument("--resume", action="store_true", help="continue probes interrupted with Ctrl-C")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_probe)

    ev = sub.add_parser("evaluate", help="apply trained probes, unchanged, to another store (another checkpoint, model "
                                         "or data set): how far what they read carries over")
    ev.add_argument("probes", help="a folder that `marstore probe` wrote (or its report.json)")
    ev.add_argument("store", help="the store to apply them to (.h5)")
    ev.add_argument("--out", default="evaluation", help="where report.json, report.md and depth.png go")
    ev.add_argument("--layer", nargs="+", metavar="LAYER", help="names or patterns among the probes' layers (default: all)")
    ev.add_argument("--target", help="the store's target to score against (default: the one the probes were trained for)")
    ev.add_argument("--rows", choices=["auto", "all", "held-out"], default="auto",
                    help="held-out: only samples the probes were never fitted or chosen on; all: every row; auto "
                         "(default): held-out where the store holds samples of the probes' data set, else all")
    ev.add_argument("--group", help="a target whose groups the intervals resample whole (default: the probes' --group)")
    ev.add_argument("--where", nargs="*", metavar="TARGET=VALUE",
                    help="score only the rows that meet every condition (default: the probes' --where; with no "
                         "condition, every row)")
    ev.add_argument("--max-rows", type=int, metavar="N",
                    help="score at most N of those rows, drawn at random with the probes' --seed")
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=_evaluate)

    cmp = sub.add_parser("compare", help="probe reports side by side (one per checkpoint, say): a depth plot and a table")
    cmp.add_argument("reports", nargs="+", metavar="REPORT", help="folders that `marstore probe` wrote (or their report.json)")
    cmp.add_argument("--label", nargs="+", help="a name for each report (default: its path)")
    cmp.add_argument("--out", default="comparison", help="where depth.png, report.md and comparison.json go")
    cmp.set_defaults(func=_compare)

    sim = sub.add_parser("similarity", help="how alike layers are (linear CKA), within a store or against another "
                                            "store of the same samples (another checkpoint or model)")
    sim.add_argument("store", help="the store whose layers to compare (.h5)")
    sim.add_argument("--against", metavar="STORE", help="a second store, its rows matched by source index (default: "
                                                        "the first against itself)")
    sim.add_argument("--layer", nargs="+", default="**", metavar="LAYER", help="names or patterns (default: every layer)")
    sim.add_argument("--against-layer", nargs="+", metavar="LAYER", help="the second store's (default: as --layer)")
    sim.add_argument("--rows", type=int, default=2048,
                     help="a seeded sample of the rows compared (default 2048): each layer's Gram matrix is rows x rows")
    sim.add_argument("--tokens", choices=["mean", "flat"], default="mean",
                     help="a row of tokens read as their mean (default), or flat: each token of a sample a row, token i "
                          "of one layer against token i of another (--rows then counts tokens)")
    sim.add_argument("--samples", type=int, metavar="N",
                     help="--tokens flat: draw the token rows from the tokens of N seeded samples (default: all; "
                          "each sample drawn is read whole, so fewer read less)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--debiased", action="store_true",
                     help="the unbiased HSIC estimator: unrelated layers near 0 where features outnumber rows")
    sim.add_argument("--where", nargs="*", metavar="TARGET=VALUE", help="compare only the rows that meet every condition")
    sim.add_argument("--out", default="similarity", help="where similarity.json, similarity.md and similarity.png go")
    sim.add_argument("--device", default="cpu", help="where the Gram matrices are made (cuda for many layers and rows)")
    sim.set_defaults(func=_similarity)

    mg = sub.add_parser("merge", help="copy a store written by several ranks into one self-contained file")
    mg.add_argument("store")
    mg.add_argument("--out", required=True)
    mg.set_defaults(func=_merge)

    jn = sub.add_parser("join", help="one store of the layers of several extractions of the same samples (another "
                                     "layer extracted later), to probe together")
    jn.add_argument("stores", nargs="+", metavar="STORE")
    jn.add_argument("--out", required=True, help="the joined store: virtual datasets over the stores, which stay beside it")
    jn.set_defaults(func=_join)

    demo = sub.add_parser("demo", help="the whole loop on the built-in model and synthetic data, no downloads")
    demo.add_argument("--out", default="runs/demo", help="where the checkpoint and the store go")
    demo.add_argument("--rows", type=int, default=1024, help="samples to extract")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:  # marstore's debug messages, not every library's (h5py logs each type converter it makes)
        logging.getLogger("marstore").setLevel(logging.DEBUG)
    from marstore.errors import MarstoreError

    try:
        return args.func(args)
    except MarstoreError as exc:  # bad input or state: its one line, no traceback
        print(f"marstore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C where no loop of marstore's handles it (while a checkpoint loads, say): one
        # line, not a traceback
        print(f"marstore {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout left (`marstore info s.h5 | head`): stop quietly, as other tools do;
        # stdout goes to devnull so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
