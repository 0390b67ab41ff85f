"""The training side: ActivationDataset through DataLoaders, the chunk sampler, probes."""

import json
import logging
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from marstore.dataset import ActivationDataset, ChunkShuffleSampler, collate_padded, collate_rows
from marstore.probe import ProbeError, ProbeInterrupted, ProbeOptions, run_probes, table
from marstore.store import LayerSpec, Ragged, StoreError, StoreWriter, TargetSpec, open_store


def planted_store(path, n=2000, d=16, nan_rows=(), seed=0):
    """Layer 'signal' holds x; target 'y' = x @ w (3 outputs); layer 'noise' is unrelated."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float16)
    w = rng.standard_normal((d, 3))
    y = (x.astype(np.float64) @ w + 0.05 * rng.standard_normal((n, 3))).astype(np.float32)
    for r in nan_rows:
        x[r, 0] = np.nan if r % 2 else np.inf
    layers = [LayerSpec("signal", (d,), chunk_rows=128), LayerSpec("noise", (d,), chunk_rows=128)]
    targets = [TargetSpec("y", (3,), "float32"), TargetSpec("episode", (), "int64")]
    with StoreWriter(path, layers, targets, commit_rows=512) as w_:
        for a in range(0, n, 250):
            b = min(n, a + 250)
            w_.append({"signal": x[a:b], "noise": rng.standard_normal((b - a, d)).astype(np.float16)},
                      targets={"y": y[a:b], "episode": np.arange(a, b) // 10}, index=np.arange(a, b))
    return x, y


def rows_through_loader(ds, **kw):
    seen = {}
    for batch in DataLoader(ds, batch_size=64, **kw):
        for i, x, y in zip(batch["episode"].tolist(), batch["signal"], batch["y"]):
            seen.setdefault(i, []).append((x, y))
    return seen


@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_exact_rows_through_dataloader(tmp_path, workers, context):
    path = tmp_path / "s.h5"
    x, y = planted_store(path, n=700)
    ds = ActivationDataset(path, ["signal"], ["y", "episode"])
    ds[0]  # the parent opens the file first: forked workers must not use its handle
    kw = {"num_workers": workers}
    if context:
        kw["multiprocessing_context"] = multiprocessing.get_context(context)
    got = torch.cat([b["signal"] for b in DataLoader(ds, batch_size=64, **kw)])
    fast = torch.cat([b["signal"] for b in DataLoader(ds, batch_size=64, collate_fn=collate_rows, **kw)])
    assert torch.equal(fast, got)
    assert got.dtype == torch.float32 and got.shape == (700, 16)
    assert torch.equal(got, torch.from_numpy(x.astype(np.float32)))
    ys = torch.cat([b["y"] for b in DataLoader(ds, batch_size=100, shuffle=True, **kw, generator=torch.Generator().manual_seed(0))])
    assert sorted(map(tuple, ys.tolist())) == sorted(map(tuple, y.tolist()))


def test_getitems_reads_runs_and_keeps_order(tmp_path):
    path = tmp_path / "s.h5"
    x, _ = planted_store(path, n=300)
    ds = ActivationDataset(path, "signal", ["episode"], as_tuple=True)
    positions = [299, 5, 6, 7, 100, 0, 6]
    items = ds.__getitems__(positions)
    assert [int(it[1]) for it in items] == [p // 10 for p in positions]
    assert all(torch.equal(it[0], torch.from_numpy(x[p].astype(np.float32))) for it, p in zip(items, positions))


def test_rows_asked_for_twice_come_back_twice(tmp_path):
    """A sampler with replacement, or a bootstrap row list, asks for some rows more than once;
    such rows used to come back as their neighbours (every case below did)."""
    path = tmp_path / "s.h5"
    x, _ = planted_store(path, n=300)
    want = lambda rows: torch.from_numpy(x[rows].astype(np.float32))  # noqa: E731
    ds = ActivationDataset(path, "signal", ["episode"])
    batch = collate_rows(ds.__getitems__([9, 8, 11, 8]))
    assert torch.equal(batch["signal"], want([9, 8, 11, 8])) and batch["episode"].tolist() == [0, 0, 1, 0]
    drawn = [5, 5, 7, 8] + list(torch.utils.data.RandomSampler(range(300), replacement=True, generator=torch.Generator().manual_seed(0)))
    got = torch.cat([b["signal"] for b in DataLoader(ds, batch_size=4, sampler=drawn, collate_fn=collate_rows)])
    assert len(set(drawn)) < 300 and torch.equal(got, want(drawn))
    boot = ActivationDataset(path, "signal", rows=[8, 7, 10, 7], preload=True)
    assert torch.equal(boot.read_all()["signal"], want([8, 7, 10, 7]))
    splits = ActivationDataset(path, "signal", rows=[9, 12, 11, 9, 14, 12]).split((0.5, 0.5, 0.0), group="episode")
    assert sorted(p.tolist() for p in splits.values()) == [[], [0, 3], [1, 2, 4, 5]]  # episode 0, episode 1
    rpath = tmp_path / "r.h5"
    lengths = [1 + i % 3 for i in range(50)]
    with StoreWriter(rpath, [LayerSpec("enc", (2,), ragged=True)]) as w:
        w.append({"enc": Ragged(np.repeat(np.arange(50, dtype=np.float16), lengths)[:, None].repeat(2, 1), lengths)},
                 index=list(range(50)))
    rows = [v["enc"][:, 0].tolist() for v in ActivationDataset(rpath, "enc").__getitems__([40, 1, 1])]
    assert rows == [[40.0, 40.0], [1.0, 1.0], [1.0, 1.0]]


def test_row_selections_of_every_kind_and_the_ones_refused(tmp_path):
    path = tmp_path / "s.h5"
    x, y = planted_store(path, n=300)
    mask = np.zeros(300, bool)
    mask[[3, 7, 299]] = True
    for rows in (mask, torch.from_numpy(mask), [3, 7, 299], torch.tensor([3, 7, 299]), np.array([3, 7, 299], np.int32)):
        ds = ActivationDataset(path, "signal", "y", rows=rows)  # one target name, not its letters
        assert ds.rows.tolist() == [3, 7, 299] and ds.target_names == ["y"]
        assert ds[2]["signal"].tolist() == x[299].astype(np.float32).tolist()
    for rows, message in (
        ([5, -1], f"row selection holds the negative row -1; rows count from 0 to 299, the committed rows of {path}"),
        ([5, 300], f"row selection reaches past the 300 committed rows of {path} (row 300)"),
        (mask[:10], f"a boolean row mask of shape (10,) for {path}, whose committed rows are 300; give one value for each row"),
        ([2.7], "rows of dtype float64: give row numbers as integers, or a boolean mask"),  # was row 2, silently
        ([[1, 2]], "rows of shape (1, 2): give a flat list of row numbers"),
    ):
        with pytest.raises(StoreError) as info:
            ActivationDataset(path, "signal", rows=rows)
        assert str(info.value) == message

def test_sampler_covers_every_index_once_and_reads_whole_chunks():
    sampler = ChunkShuffleSampler(1000, chunk_rows=64, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    chunks = [i // 64 for i in order]
    assert sum(1 for a, b in zip(chunks, chunks[1:]) if a != b) == 15  # 16 chunks, each read in one go
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(1000))
    ranks = [list(ChunkShuffleSampler(1000, 64, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(r) == 334 for r in ranks) and set(sum(ranks, [])) == set(range(1000))
    # fewer rows than ranks: every rank still gets as many (a rank with fewer batches stalls DDP)
    assert [list(ChunkShuffleSampler(2, 64, num_replicas=5, rank=r)) for r in range(5)] == [[0], [1], [0], [1], [0]]
    subset = ChunkShuffleSampler(np.arange(100, 400), 64, seed=1)
    assert sorted(subset) == list(range(100, 400))


def test_splits_are_deterministic_and_respect_groups(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path, n=500)
    ds = ActivationDataset(path, "signal", ["episode"])
    a, b = ds.split((0.8, 0.1, 0.1), seed=7), ds.split((0.8, 0.1, 0.1), seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a) and sum(len(v) for v in a.values()) == 500
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (400, 50, 50)
    g = ds.split((0.6, 0.2, 0.2), seed=7, group="episode")
    episodes = {k: set((v // 10).tolist()) for k, v in g.items()}
    assert not (episodes["train"] & episodes["val"]) and not (episodes["train"] & episodes["test"])
    # two fractions: train and val, the same rows as three with no test split
    two = ds.split((0.8, 0.2), seed=7)
    assert list(two) == ["train", "val"] and (len(two["train"]), len(two["val"])) == (400, 100)
    three = ds.split((0.8, 0.2, 0.0), seed=7)
    assert np.array_equal(two["train"], three["train"]) and np.array_equal(two["val"], three["val"])
    assert not len(three["test"])
    for bad in ((0.5, 0.1, 0.1), (1.0,), (0.5, 0.2, 0.2, 0.1), (1.2, -0.2)):
        with pytest.raises(StoreError, match=r"must be two \(train, val\) or three \(train, val, test\) non-negative"):
            ds.split(bad)


def test_preload_ragged_and_errors(tmp_path):
    path = tmp_path / "s.h5"
    x, _ = planted_store(path, n=300)
    ds = ActivationDataset(path, ["signal"], ["y"], preload=True)
    assert torch.equal(ds[17]["signal"], torch.from_numpy(x[17].astype(np.float32)))
    with pytest.raises(StoreError, match=r"preload needs 0 MiB, more than the 0 MiB allowed"):
        ActivationDataset(path, ["signal"]).preload(max_bytes=10)
    with pytest.raises(StoreError) as info:
        ActivationDataset(path, ["sgnal"])
    assert str(info.value) == f"{path} has no layer 'sgnal'; nearest: ['signal']"
    blocks = tmp_path / "blocks.h5"
    with StoreWriter(blocks, [LayerSpec(f"encoder_blocks.{i}", (2,)) for i in range(2)]) as w:
        w.append({f"encoder_blocks.{i}": np.zeros((4, 2), np.float16) for i in range(2)}, index=range(4))
    with pytest.raises(StoreError) as info:  # a glob's misspelt component: the glob that the nearest one makes
        ActivationDataset(blocks, ["encoder_block.*"])
    assert str(info.value) == (f"{blocks} has no layer 'encoder_block.*'; did you mean 'encoder_blocks.*' (it matches 2)? "
                               "nearest: ['encoder_blocks.0', 'encoder_blocks.1']")
    # patterns as the probe's --layer takes them; the store's order ('signal' was written first)
    assert ActivationDataset(path, "re:.*").layer_names == ["signal", "noise"]
    assert ActivationDataset(path, ["noise", "*"]).layer_names == ["noise", "signal"]
    with pytest.raises(StoreError) as info:
        ActivationDataset(path, [])
    assert str(info.value) == f"no layers asked of {path}; it has ['signal', 'noise']"
    with pytest.raises(StoreError, match=r"has no layer 'enc\*'"):
        run_probes(probe_opts(tmp_path, path, layer="enc*"))
    with pytest.raises(StoreError) as info:
        ActivationDataset(path, "signal").split(group="episodes")
    assert str(info.value) == f"group 'episodes' is not a target of {path}; its targets are ['episode', 'y']"
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, group="episodes"))
    assert str(info.value) == f"--group 'episodes' is not in {path}; its targets are ['episode', 'y']"
    assert not (tmp_path / "probes").exists()  # refused before anything is written
    rpath = tmp_path / "r.h5"
    with StoreWriter(rpath, [LayerSpec("enc", (4,), ragged=True)]) as w:
        w.append({"enc": Ragged(np.arange(24, dtype=np.float16).reshape(6, 4), [1, 3, 2])}, index=[0, 1, 2])
    rds = ActivationDataset(rpath, "enc")
    batch = collate_padded(list(rds.__getitems__([0, 1, 2])))
    assert collate_rows(rds.__getitems__([0, 1, 2]))["enc.mask"].tolist() == batch["enc.mask"].tolist()
    assert batch["enc"].shape == (3, 3, 4) and batch["enc.mask"].tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert torch.equal(ActivationDataset(rpath, "enc", reduction="mean")[1]["enc"], torch.arange(4.0, 16).view(3, 4).mean(0))
    reduced = ActivationDataset(rpath, "enc", reduction="first")
    assert reduced.read_all([2, 0])["enc"].tolist() == [[16, 17, 18, 19], [0, 1, 2, 3]]
    assert reduced.read_all([])["enc"].shape == (0, 4) and ActivationDataset(path, "signal", ["y"]).read_all([])["y"].shape == (0, 3)


def test_read_all_reads_a_layer_stored_whole_in_blocks_and_keeps_the_order_asked(tmp_path, monkeypatch):
    """The probe reads every row of a split: a layer stored with its tokens (gigabytes) used to be
    read in one piece and then copied to float32 before its mean was taken."""
    path = tmp_path / "t.h5"
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((50, 6, 4)).astype(np.float16)
    lengths = rng.integers(1, 5, 50)
    with StoreWriter(path, [LayerSpec("tok", (6, 4)), LayerSpec("enc", (4,), ragged=True)], [TargetSpec("y", (), "int64")]) as w:
        w.append({"tok": tokens, "enc": Ragged(rng.standard_normal((int(lengths.sum()), 4)).astype(np.float16), lengths)},
                 targets={"y": np.arange(50) * 10}, index=np.arange(50))
    ds = ActivationDataset(path, ["tok", "enc"], "y", reduction="mean")
    assert ds.row_bytes() == 6 * 4 * 2 + int(lengths.sum()) * 4 * 2 // 50 + 8
    positions = rng.permutation(50)[:37]
    whole = ds.read_all(positions)
    sizes = []
    getitems = ActivationDataset.__getitems__
    monkeypatch.setattr(ActivationDataset, "__getitems__", lambda self, p: sizes.append(len(p)) or getitems(self, p))
    blocks = ds.read_all(positions, block_bytes=10 * ds.row_bytes())
    assert sizes == [10, 10, 10, 7]
    assert whole.keys() == blocks.keys() == {"tok", "enc", "y"}
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name
    assert blocks["y"].tolist() == (positions * 10).tolist()
    assert torch.equal(blocks["tok"], torch.from_numpy(tokens[positions]).mean(1, dtype=torch.float32))


def test_a_read_time_reduction_takes_every_axis_between_the_row_and_the_features_as_tokens(tmp_path):
    # as extraction's --reduction does: UVA's z_proj (frames, tokens, D) has frames * tokens tokens;
    # a mean used to average the frames only and leave tokens * D features
    path = tmp_path / "z.h5"
    z = np.arange(2 * 3 * 5 * 4, dtype=np.float16).reshape(2, 3, 5, 4)
    with StoreWriter(path, [LayerSpec("z_proj", (3, 5, 4))]) as w:
        w.append({"z_proj": z}, index=[0, 1])
    tokens = torch.from_numpy(z).float().reshape(2, 15, 4)
    assert torch.equal(ActivationDataset(path, "z_proj", reduction="mean").read_all()["z_proj"], tokens.mean(1))
    assert torch.equal(ActivationDataset(path, "z_proj", reduction="last")[1]["z_proj"], tokens[1, -1])

def test_ragged_layers_have_their_mask_in_every_batch(tmp_path):
    """Rows of one extraction batch have one token count (MAR draws one mask ratio a forward),
    so a batch read from one chunk often has rows of one length: it still needs the mask."""
    path = tmp_path / "r.h5"
    with StoreWriter(path, [LayerSpec("enc", (2,), ragged=True)], [TargetSpec("y", (), "int64")]) as w:
        w.append({"enc": Ragged(np.ones((7, 2), np.float16), [3, 3, 1])}, targets={"y": np.arange(3)}, index=[0, 1, 2])
    batches = list(DataLoader(ActivationDataset(path, "enc", ["y"]), batch_size=2, collate_fn=collate_rows))
    assert [b["enc.mask"].tolist() for b in batches] == [[[True] * 3] * 2, [[True]]]
    first = next(iter(DataLoader(ActivationDataset(path, "enc", ["y"], as_tuple=True), batch_size=2, collate_fn=collate_rows)))
    assert [tuple(t.shape) for t in first] == [(2, 3, 2), (2,), (2, 3)]  # the layer, the target, the layer's mask
    items = [{"enc": torch.ones(3, 2), "y": torch.tensor(0)}] * 2
    assert sorted(collate_padded(items, ragged=["enc"])) == ["enc", "enc.mask", "y"] and sorted(collate_padded(items)) == ["enc", "y"]


def test_refresh_sees_rows_committed_later(tmp_path):
    path = tmp_path / "live.h5"
    w = StoreWriter(path, [LayerSpec("a", (2,))], commit_rows=2)
    w.append({"a": np.ones((2, 2), np.float16)}, index=[0, 1])
    w.flush()
    ds, preloaded = ActivationDataset(path, "a"), ActivationDataset(path, "a", preload=True)
    assert len(ds) == 2
    w.append({"a": np.full((3, 2), 2, np.float16)}, index=[2, 3, 4])
    w.flush()
    assert ds.refresh() == 5 and len(ds) == 5
    assert preloaded.refresh() == 5 and preloaded.read_all()["a"][:, 0].tolist() == [1, 1, 2, 2, 2]
    chosen = ActivationDataset(path, "a", rows=[1, 0, 4])
    w.append({"a": np.ones((1, 2), np.float16)}, index=[5])
    w.flush()
    assert chosen.refresh() == 6 and chosen.rows.tolist() == [1, 0, 4]  # a chosen selection stays as chosen
    part = ds.subset([3, 1])
    assert part.refresh() == 6 and part.rows.tolist() == [3, 1]
    w.close()
    late = StoreWriter(tmp_path / "late.h5", [LayerSpec("a", (2,))], commit_rows=2)
    late.flush()
    reader = ActivationDataset(tmp_path / "late.h5", "a")  # opened before the first rows
    assert len(reader) == 0
    late.append({"a": np.ones((2, 2), np.float16)}, index=[0, 1])
    late.flush()
    assert reader.refresh() == 2 and len(reader) == 2
    late.close()


def probe_opts(tmp_path, path, **kw):
    base = dict(store=str(path), layer="signal", target="y", out=str(tmp_path / "probes"), epochs=60, lr=0.05,
                batch_size=128, progress=False, patience=60)
    base.update(kw)
    return ProbeOptions(**base)


@pytest.mark.parametrize("kw, message", [
    ({"epochs": 0}, "--epochs 0: give an integer of at least 1"),
    ({"max_rows": 0}, "--max-rows 0: give an integer of at least 1"),
    ({"batch_size": -3}, "--batch-size -3: give an integer of at least 1"),
    ({"lr": 0.0}, "--lr 0.0 --weight-decay None: the rate must be above 0, the decay at least 0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5},
     "--val-fraction 0.5 --test-fraction 0.5: each must be above 0, and together below 1 (the rest trains)"),
    ({"device": "gpu"}, "--device 'gpu': give cpu, cuda or cuda:N"),
    ({"out": __file__}, f"--out {__file__} is a file; give a folder for the report, the plots and the weights"),
    ({"group": "y"}, "--group y is the target itself: the test rows' values would never be seen in training; group by what "
                     "ties rows together (an episode id)"),
])
def test_settings_that_would_train_nothing_are_refused(tmp_path, kw, message):
    # --epochs 0 used to report the metrics of an untrained probe as if it had learned them.
    with pytest.raises(ProbeError) as info:
        probe_opts(tmp_path, "s.h5", **kw)
    assert str(info.value) == message


def test_max_rows_draws_the_same_rows_with_the_same_seed(tmp_path, caplog):
    path = tmp_path / "s.h5"
    planted_store(path, n=600)
    with caplog.at_level(logging.INFO, logger="marstore.probe"):
        first = run_probes(probe_opts(tmp_path, path, max_rows=250, out=str(tmp_path / "a")))
    assert "--max-rows 250: probing 250 of the 600 rows, drawn with --seed 0" in caplog.text
    again = run_probes(probe_opts(tmp_path, path, max_rows=250, out=str(tmp_path / "b")))
    other = run_probes(probe_opts(tmp_path, path, max_rows=250, seed=1, out=str(tmp_path / "c")))
    metric = [r["layers"][0]["probe"]["test"]["r2"] for r in (first, again, other)]
    assert metric[0] == metric[1] != metric[2]
    assert (first["selected_rows"], first["where_rows"], sum(first["layers"][0]["split_rows"].values())) == (250, 600, 250)
    assert "(complete, 600 rows; 250 of them, drawn at random with seed 0 by --max-rows)" in open(first["markdown"]).read()
    everything = run_probes(probe_opts(tmp_path, path, max_rows=600, out=str(tmp_path / "d")))  # as many as there are
    assert sum(everything["layers"][0]["split_rows"].values()) == 600 and "drawn at random" not in open(everything["markdown"]).read()


def test_classification_of_a_target_that_holds_no_labels_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path)
    with pytest.raises(ProbeError) as info:  # it failed inside the loss with a batch size mismatch
        run_probes(probe_opts(tmp_path, path, task="classification", epochs=1))
    assert str(info.value) == ("signal: --task classification needs one integer label a row, and target 'y' holds float32 "
                               "values of shape (3,) a row; use --task regression")

def test_a_store_too_small_to_split_is_refused_in_one_line(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path, n=2)
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path))
    assert str(info.value) == ("signal: the val and test splits would be empty with 2 rows (--val-fraction 0.1, "
                               "--test-fraction 0.1); extract more rows, or raise those fractions")
    with pytest.raises(ProbeError) as info:  # it used to fail in torch.stack
        run_probes(probe_opts(tmp_path, path, group="episode", val_fraction=0.3, test_fraction=0.3))
    assert str(info.value) == ("signal: the train and val splits would be empty with 2 rows grouped by 'episode' "
                               "(--val-fraction 0.3, --test-fraction 0.3); extract more rows")  # one episode


def test_a_test_split_of_few_rows_is_said_to_be_rough(tmp_path, caplog):
    path = tmp_path / "s.h5"
    planted_store(path, n=64)
    with caplog.at_level("WARNING", logger="marstore.probe"):
        run_probes(probe_opts(tmp_path, path, solver="direct"))
    assert ("the test split holds 7 of the 64 rows: each moves the metric by 0.14, and the interval from resamples of "
            "so few understates the spread; extract more rows, or raise --test-fraction") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="marstore.probe"):  # 0.5 of 64 rows: 32 test rows
        run_probes(probe_opts(tmp_path, path, solver="direct", val_fraction=0.1, test_fraction=0.5, out=str(tmp_path / "p2")))
    assert "the test split holds" not in caplog.text


def test_planted_linear_signal_is_found_and_the_control_is_not(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path)
    report = run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"]))
    by = {r["layer"]: r for r in report["layers"]}
    assert by["signal"]["probe"]["test"]["r2"] > 0.95
    assert abs(by["signal"]["control"]["test"]["r2"]) < 0.1
    assert by["noise"]["probe"]["test"]["r2"] < 0.1
    assert by["signal"]["selectivity"] > 0.85
    assert len(by["signal"]["probe"]["test"]["r2_per_dim"]) == 3
    for name in ("depth", "loss_curves"):
        assert os.path.getsize(report["plots"][name]) > 5000
    saved = json.load(open(report["report"]))
    assert saved["metric"] == "r2" and [r["layer"] for r in saved["layers"]] == ["signal", "noise"]
    markdown = open(report["markdown"]).read().splitlines()
    assert markdown[0] == "# What each layer knows about `y`"
    assert " Each probe reads the stored row, 16 inputs. " in markdown[2]
    assert markdown[4:6] == ["| layer | r2 | 95% interval | control | select. | skipped rows | skipped steps |",
                             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    s = by["signal"]
    low, high = s["probe"]["test"]["r2_ci95"]
    assert 0.95 < low <= s["probe"]["test"]["r2"] <= high <= 1
    c_low, c_high = s["control"]["test"]["r2_ci95"]
    assert c_low < 0 and c_low < c_high < 0.1 and s["selectivity_ci95"][0] > 0.85
    assert markdown[6] == (f"| signal | {s['probe']['test']['r2']:.3f} | {low:.3f} to {high:.3f} | "
                           f"{s['control']['test']['r2']:.3f} | {s['selectivity']:.3f} | 0 | - |")  # direct takes no steps
    assert "![test r2 of each layer's probe and its control](depth.png)" in markdown
    assert table(report).splitlines()[:2] == [
        f"{'layer':<28} {'r2':>9} {'95% interval':>17} {'control':>9} {'select.':>8} {'skipped rows':>13} "
        f"{'skipped steps':>14}",
        f"{'signal':<28} {s['probe']['test']['r2']:9.3f} {f'{low:.3f} to {high:.3f}':>17} {s['control']['test']['r2']:9.3f} "
        f"{s['selectivity']:8.3f} {0:13d} {'-':>14}"]
    weights = torch.load(by["signal"]["probe"]["weights"], weights_only=True)["state_dict"]
    assert set(weights) == {"weight", "bias"} and weights["weight"].shape == (3, 16)


def anisotropic_store(path, n=600, d=32, seed=0):
    """As token means of a transformer are: one shared direction holds nearly all the variance
    of every feature, and the target lives in a direction of small variance."""
    rng = np.random.default_rng(seed)
    u, v = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    shared, t = rng.standard_normal((n, 1)), rng.standard_normal((n, 1))
    x = (20 * shared * u + 0.1 * t * v + 0.01 * rng.standard_normal((n, d))).astype(np.float16)
    labels = (t[:, 0] > 0).astype(np.int64) + 2 * (t[:, 0] > 1)  # 3 classes by the small direction
    with StoreWriter(path, [LayerSpec("a", (d,))], [TargetSpec("y", (1,), "float32"), TargetSpec("label", (), "int64")]) as w:
        w.append({"a": x}, targets={"y": t.astype(np.float32), "label": labels}, index=np.arange(n))


def test_the_direct_solver_reads_a_signal_in_a_small_variance_direction(tmp_path):
    # minibatch AdamW, the default before, reports such a layer as knowing little
    path = tmp_path / "s.h5"
    anisotropic_store(path)
    direct = run_probes(probe_opts(tmp_path, path, layer="a", out=str(tmp_path / "direct"), epochs=40, lr=0.01, batch_size=256,
                                   patience=8))
    adamw = run_probes(probe_opts(tmp_path, path, layer="a", out=str(tmp_path / "adamw"), epochs=40, lr=0.01, batch_size=256,
                                  patience=8, solver="adamw"))
    probe, control = direct["layers"][0]["probe"], direct["layers"][0]["control"]
    assert (direct["solver"], direct["layers"][0]["solver"], adamw["solver"]) == ("direct", "direct", "adamw")
    assert probe["test"]["r2"] > 0.95 and abs(control["test"]["r2"]) < 0.1
    assert adamw["layers"][0]["probe"]["test"]["r2"] < 0.8  # 0.68: 80 steps leave the small direction half learned
    assert [p["penalty"] for p in probe["penalties"]] == [10.0 ** k for k in range(-6, 3)]
    assert probe["penalty"] == min(probe["penalties"], key=lambda p: p["loo_loss"])["penalty"]
    assert control["penalty"] >= 1  # nothing to find: the penalty that keeps the weights near zero
    markdown = open(direct["markdown"]).read()
    assert "Linear probes for regression, solved in closed form (ridge); the L2 penalty was chosen by its leave-one-out " \
        "error over the training rows" in markdown and "![the loss that chose each probe, by L2 penalty](loss_curves.png)" \
        in markdown
    weights = torch.load(probe["weights"], weights_only=True)["state_dict"]  # applies to the standardised features, as AdamW's
    assert set(weights) == {"weight", "bias"} and weights["weight"].shape == (1, 32)
    labels = run_probes(probe_opts(tmp_path, path, layer="a", target="label", out=str(tmp_path / "labels")))
    assert labels["task"] == "classification" and labels["layers"][0]["probe"]["test"]["accuracy"] > 0.9
    assert labels["layers"][0]["control"]["test"]["accuracy"] < 0.6
    given = run_probes(probe_opts(tmp_path, path, layer="a", out=str(tmp_path / "given"), weight_decay=0.5))
    assert [p["penalty"] for p in given["layers"][0]["probe"]["penalties"]] == [0.5]


def test_the_mlp_probe_starts_at_the_linear_optimum_and_finds_what_it_cannot(tmp_path, caplog):
    # a plain MLP reached R2 0.79 on this store where the linear optimum gives 0.99
    path = tmp_path / "s.h5"
    anisotropic_store(path)
    linear = run_probes(probe_opts(tmp_path, path, layer="a", out=str(tmp_path / "linear")))["layers"][0]
    report = run_probes(probe_opts(tmp_path, path, layer="a", out=str(tmp_path / "mlp"), kind="mlp", epochs=10))
    mlp = report["layers"][0]
    assert "MLP probes for regression, each the linear probe's optimum (frozen) plus an MLP trained by AdamW" \
        in open(report["markdown"]).read()
    assert mlp["solver"] == "adamw" and mlp["probe"]["linear_penalty"] == linear["probe"]["penalty"]
    start = mlp["probe"]["history"][0]
    assert start["epoch"] == -1 and start["val_loss"] == pytest.approx(linear["probe"]["val"]["mse"], rel=1e-5)
    assert mlp["probe"]["val"]["mse"] <= start["val_loss"] * (1 + 1e-6)  # never worse than where it started
    assert mlp["probe"]["test"]["r2"] > 0.98
    weights = torch.load(mlp["probe"]["weights"], weights_only=True)["state_dict"]
    assert list(weights) == ["linear.weight", "linear.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert torch.equal(weights["linear.weight"], torch.load(linear["probe"]["weights"], weights_only=True)["state_dict"]["weight"])
    # an epoch that beats the start by less than the validation rows' standard error does not count
    with caplog.at_level(logging.INFO, logger="marstore.probe"):
        labels = run_probes(probe_opts(tmp_path, path, layer="a", target="label", kind="mlp", epochs=10,
                                       out=str(tmp_path / "mlp-labels")))["layers"][0]
    best = min(labels["probe"]["history"][1:], key=lambda h: h["val_loss"])["epoch"]  # which one varies with the CPU's kernels
    kept = [m for m in caplog.messages if m.startswith(f"a: the MLP's best epoch ({best}) beat the linear optimum by")]
    assert len(kept) == 1 and kept[0].endswith(": the linear optimum is kept")
    assert labels["probe"]["best_epoch"] == -1 and labels["probe"]["history"][-1]["val_loss"] < labels["probe"]["history"][0]["val_loss"]
    linear_labels = run_probes(probe_opts(tmp_path, path, layer="a", target="label", out=str(tmp_path / "linear-labels")))
    assert labels["probe"]["test"] == linear_labels["layers"][0]["probe"]["test"]

    # labels no linear probe can read: the sign of a product of two features
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1500, 4)).astype(np.float16)
    xor = tmp_path / "xor.h5"
    with StoreWriter(xor, [LayerSpec("a", (4,))], [TargetSpec("y", (), "int64")]) as w:
        w.append({"a": x}, targets={"y": (x[:, 0].astype(np.float32) * x[:, 1] > 0).astype(np.int64)}, index=range(1500))
    by_kind = {kind: run_probes(probe_opts(tmp_path, xor, layer="a", kind=kind, out=str(tmp_path / f"xor-{kind}"),
                                           epochs=30, lr=0.01, batch_size=128))["layers"][0] for kind in ("linear", "mlp")}
    assert by_kind["linear"]["probe"]["test"]["accuracy"] < 0.65
    assert by_kind["mlp"]["probe"]["test"]["accuracy"] > 0.9 and by_kind["mlp"]["selectivity"] > 0.3


@pytest.mark.parametrize("rows, features, block", [(50, 8, 16384), (50, 8, 7), (8, 50, 16384)])
def test_ridge_regression_and_its_leave_one_out_error_are_the_closed_form_ones(rows, features, block, monkeypatch):
    from marstore.probe import _Ridge

    monkeypatch.setattr(_Ridge, "BLOCK", block)  # rows read in blocks of 7: the same fit, the same errors
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, features, generator=g, dtype=torch.float64), torch.randn(rows, 2, generator=g, dtype=torch.float64)

    def solve(x, y, penalty):  # the problem as it is written: [x 1] [w; b] = y, penalty * n on w only
        n = len(x)
        design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
        ridge = torch.diag(torch.tensor([penalty * n] * x.shape[1] + [0.0], dtype=torch.float64))
        solution = torch.linalg.solve(design.T @ design + ridge, design.T @ y)
        return solution[:-1].T, solution[-1]

    fitted = _Ridge(x, y)
    for penalty in (1e-3, 1.0):
        weight, bias = fitted.fit(penalty)
        want_weight, want_bias = solve(x, y, penalty)
        torch.testing.assert_close(weight, want_weight, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(bias, want_bias, rtol=1e-7, atol=1e-9)
        # each row predicted by the fit on the others (whose own penalty is penalty * (n - 1))
        held_out = []
        for i in range(rows):
            keep = torch.arange(rows) != i
            w, b = solve(x[keep], y[keep], penalty * rows / (rows - 1))
            held_out.append(x[i] @ w.T + b - y[i])
        assert fitted.loo_losses([penalty])[0] == pytest.approx(float(torch.stack(held_out).square().mean()), rel=1e-6)


@pytest.mark.parametrize("kw, message", [
    ({"solver": "sgd"}, "--solver 'sgd': use one of auto, direct, adamw"),
    ({"kind": "svm"}, "--kind 'svm': use linear or mlp"),
    ({"solver": "direct", "kind": "mlp"}, "--solver direct finds a linear probe's optimum; an mlp probe trains with --solver adamw"),
])
def test_a_solver_that_cannot_fit_the_probe_is_refused(tmp_path, kw, message):
    with pytest.raises(ProbeError) as info:
        probe_opts(tmp_path, "s.h5", **kw)
    assert str(info.value) == message

def test_a_store_still_written_is_probed_on_the_rows_committed_at_the_start(tmp_path, monkeypatch, caplog):
    """Every layer's probe sees the same rows, though the writer commits more between layers,
    and the report and the log say that the store was incomplete."""
    import marstore.probe as probe

    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    batch = lambda n: ({"a": rng.standard_normal((n, 4)).astype(np.float16), "b": rng.standard_normal((n, 4)).astype(np.float16)},
                       {"y": rng.standard_normal((n, 1)).astype(np.float32)})
    writer = StoreWriter(path, [LayerSpec("a", (4,)), LayerSpec("b", (4,))], [TargetSpec("y", (1,), "float32")], commit_rows=50)
    acts, targets = batch(300)
    writer.append(acts, targets=targets, index=np.arange(300))
    writer.flush()
    fit = probe._Trainer.fit

    def fit_then_write_more(self, label):
        fit(self, label)
        acts, targets = batch(100)
        writer.append(acts, targets=targets, index=np.arange(100))
        writer.flush()

    monkeypatch.setattr(probe._Trainer, "fit", fit_then_write_more)
    report = run_probes(probe_opts(tmp_path, path, layer="*", epochs=2, solver="adamw"))
    writer.close()
    assert (report["store_status"], report["rows"]) == ("incomplete", 300)
    assert [sum(r["split_rows"].values()) for r in report["layers"]] == [300, 300]
    assert f"{path} is incomplete (an extraction was interrupted or still runs): the probes see its 300 committed rows only" \
        in caplog.text
    assert open_store(path).rows == 700


def reference_metrics(task: str, pred: torch.Tensor, y: torch.Tensor) -> dict:
    """The metrics written out a class at a time, as their definitions read."""
    if task == "regression":
        err, var = ((pred - y) ** 2).mean(0), y.var(0, unbiased=False)
        return {"r2": float(torch.where(var > 0, 1 - err / var, torch.zeros_like(var)).mean())}
    labels, f1, recalls = pred.argmax(1), [], []
    for c in range(pred.shape[1]):
        tp, fp, fn = (float(((labels == c) & (y == c)).sum()), float(((labels == c) & (y != c)).sum()),
                      float(((labels != c) & (y == c)).sum()))
        if tp + fp + fn:  # a class neither present nor predicted does not count
            f1.append(2 * tp / (2 * tp + fp + fn))
        recalls.append(tp / float((y == c).sum()) if (y == c).any() else None)
    present = [r for r in recalls if r is not None]
    return {"accuracy": float((labels == y).double().mean()), "balanced_accuracy": float(np.mean(present)),
            "macro_f1": float(np.mean(f1)), "recall_per_class": recalls}


def test_classification_metrics_are_their_definitions():
    from marstore.probe import CLASSIFICATION_METRICS, _metrics

    g = torch.Generator().manual_seed(0)
    for rows, classes in ((1, 2), (50, 3), (997, 6)):
        y = torch.randint(classes - 1, (rows,), generator=g)  # the last class never true
        pred = torch.randn(rows, classes, generator=g) + torch.nn.functional.one_hot(y, classes)
        got, want = _metrics("classification", pred, y), reference_metrics("classification", pred, y)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-12 for k in CLASSIFICATION_METRICS)
        assert got["recall_per_class"][-1] is None  # no test rows of the last class
        assert got["recall_per_class"] == [None if r is None else round(r, 6) for r in want["recall_per_class"]]
    y = torch.tensor([0, 0, 1, 1, 2])  # by hand: classes 0 and 1 each half right, 2 wrong
    pred = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 0]), 3).float()
    assert _metrics("classification", pred, y) == {"accuracy": 0.4, "balanced_accuracy": 1 / 3,
                                                    "macro_f1": pytest.approx((0.4 + 0.5 + 0) / 3, abs=1e-15),
                                                    "recall_per_class": [0.5, 0.5, 0.0]}


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("metric", ["r2", "accuracy", "balanced_accuracy", "macro_f1"])
@pytest.mark.parametrize("rows", [1, 37, 5000])
def test_each_bootstrap_resample_gets_the_metric_of_its_rows(metric, rows, grouped):
    """The metric of a resample, computed from each row's count in it, is the metric of the resampled
    rows themselves; with groups, whole groups are drawn (every row of a group drawn twice, twice);
    blocks of resamples keep to about 32 MB whatever the rows."""
    from marstore.probe import _resampled_counts, _resampled_metric

    g = torch.Generator().manual_seed(rows)
    task = "regression" if metric == "r2" else "classification"
    if task == "regression":
        y = torch.randn(rows, 3, generator=g) * torch.tensor([1.0, 1e-3, 50.0]) + 1e4  # scales far apart, far from 0
        pred = y + torch.randn(rows, 3, generator=g) * torch.tensor([0.5, 1e-3, 10.0])
    else:
        y = torch.randint(4, (rows,), generator=g) % 3  # class 3 never true, sometimes predicted: macro F1 counts it
        pred = torch.randn(rows, 4, generator=g) + 2 * torch.nn.functional.one_hot(y, 4)
    groups = np.array([f"ep{i % 7}" for i in range(rows)]) if grouped else None
    blocks = list(_resampled_counts(rows, 3, groups, draws=50))
    assert sum(len(b) for b in blocks) == 50 and all(b.numel() <= max(rows, 1 << 22) for b in blocks)
    assert all(torch.equal(a, b) for a, b in zip(blocks, _resampled_counts(rows, 3, groups, draws=50)))  # seeded
    counts = torch.cat(blocks)
    if grouped:  # a row's count is its group's: rows of a group are drawn together
        assert all(torch.equal(c[groups == groups[0]], c[:1].expand(int((groups == groups[0]).sum()))) for c in counts)
    got = torch.cat([_resampled_metric(metric, pred, y, b) for b in blocks])
    picked = [torch.repeat_interleave(torch.arange(rows), c.long()) for c in counts]  # the rows of each resample
    want = torch.tensor([reference_metrics(task, pred[p].double(), y[p].double() if task == "regression" else y[p])[metric]
                         for p in picked], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-9)


def test_a_resample_in_which_a_target_value_is_constant_scores_it_zero_as_the_metric_does():
    """A mask position that is 1 in all but two of 40 test rows is constant in many resamples; its
    variance there must read 0 (R² 0 by convention, as _metrics gives it), not a rounding error's
    1e-17, which made one resample's R² -1e9 and the interval '-1659758581.864 to 0.272'."""
    from marstore.probe import _intervals, _resampled_counts, _resampled_metric

    g = torch.Generator().manual_seed(0)
    y = torch.ones(40, 2)
    y[[3, 17], 0] = 0
    y[:, 1] = torch.randn(40, generator=g)
    pred = y + 0.1 * torch.randn(40, 2, generator=g) + 0.05
    counts = torch.cat(list(_resampled_counts(40, 0, draws=200)))
    constant = int(((counts[:, [3, 17]] == 0).all(1)).sum())
    assert constant > 10  # the case at hand: resamples without either zero
    got = _resampled_metric("r2", pred, y, counts)
    picked = [torch.repeat_interleave(torch.arange(40), c.long()) for c in counts]
    want = torch.tensor([reference_metrics("regression", pred[p].double(), y[p].double())["r2"] for p in picked],
                        dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    low, high = _intervals("r2", {"probe": (pred, y)}, 0)["probe"]
    assert -1 < low < high < 1


def test_the_intervals_compare_probe_and_control_on_the_same_resamples():
    from marstore.probe import _intervals

    y = torch.arange(200) % 2
    right = torch.nn.functional.one_hot(y, 2).float()
    wrong = 1 - right
    half = torch.where((torch.arange(200) < 100)[:, None], right, wrong)
    intervals = _intervals("accuracy", {"probe": (right, y), "control": (half, y)}, seed=0)
    assert intervals["probe"] == [1.0, 1.0]  # every resample of a perfect probe is perfect
    low, high = intervals["control"]
    assert 0.4 < low < 0.5 < high < 0.6
    # paired: each resample's selectivity is 1 less that resample's control accuracy, exactly
    assert intervals["selectivity"] == pytest.approx([1 - high, 1 - low], abs=1e-12)
    assert _intervals("accuracy", {"probe": (right, y)}, seed=0) == {"probe": [1.0, 1.0]}


TASKS = ["push", "pick", "place é"]


def text_store(path, n=300):
    """Layer 'a' says which task a row is; targets 'task' (the task's name) and 'ep' (an episode
    name), text both, and 'y' a number."""
    rng = np.random.default_rng(0)
    which = np.arange(n) % 3
    x = (np.eye(3)[which] * 3 + rng.standard_normal((n, 3)) * 0.3).astype(np.float16)
    targets = [TargetSpec("task", (), "str"), TargetSpec("ep", (), "str"), TargetSpec("y", (), "int64"),
               TargetSpec("pair", (2,), "str")]
    with StoreWriter(path, [LayerSpec("a", (3,), chunk_rows=64)], targets) as w:
        for start in range(0, n, 100):
            rows = np.arange(start, min(n, start + 100))
            w.append({"a": x[rows]}, index=rows, targets={"task": [TASKS[k] for k in which[rows]],
                                                          "ep": [f"ep{r // 10}" for r in rows], "y": rows,
                                                          "pair": [["a", "b"]] * len(rows)})
    return [TASKS[k] for k in which]


def test_a_text_target_reads_as_strings_and_batches_as_lists(tmp_path):
    path = tmp_path / "s.h5"
    tasks = text_store(path)
    ds = ActivationDataset(path, "a", ["task", "y"])
    assert ds[5]["task"] == tasks[5] and int(ds[5]["y"]) == 5
    batches = list(DataLoader(ds, batch_size=64, collate_fn=collate_rows, num_workers=2))
    assert [t for b in batches for t in b["task"]] == tasks and all(isinstance(b["task"], list) for b in batches)
    assert collate_padded([ds[7], ds[2]])["task"] == [tasks[7], tasks[2]]
    positions = [250, 3, 128, 3]
    assert ds.read_all(positions)["task"].tolist() == [tasks[p] for p in positions]
    assert ds.read_all(positions, block_bytes=1)["task"].tolist() == [tasks[p] for p in positions]  # in blocks
    episodes = ActivationDataset(path, "a", "ep").read_all()["ep"]
    splits = ds.split(group="ep", seed=1)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(300))
    seen = [set(episodes[p].tolist()) for p in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])  # an episode's rows in one split


def test_a_text_target_is_probed_by_classification_with_its_strings_as_classes(tmp_path):
    path = tmp_path / "s.h5"
    text_store(path)
    report = run_probes(probe_opts(tmp_path, path, layer="a", target="task", group="ep"))
    layer = report["layers"][0]
    assert report["task"] == "classification" and layer["classes"] == ["pick", "place é", "push"]
    assert layer["probe"]["test"]["accuracy"] > 0.95 and layer["control"]["test"]["accuracy"] < 0.6
    assert torch.load(layer["probe"]["weights"], weights_only=True)["state_dict"]["weight"].shape == (3, 3)
    assert "1000 resamples of the test rows (drawn by whole 'ep' groups)." in open(report["markdown"]).read()
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="a", target="task", task="regression"))
    assert str(info.value) == "a: target 'task' holds text, whose strings are classes; use --task classification (or auto)"
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="a", target="pair"))
    assert str(info.value) == "a: target 'pair' holds text of shape (2,) a row; a probe takes one string a row for its class"


def test_tokens_side_by_side_read_what_their_mean_loses(tmp_path):
    # the target is frame 0 less frame 1 (as --reduction mean:2 stores frame means): their mean carries none of it
    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 2, 8)).astype(np.float16)
    w = rng.standard_normal(8)
    y = (x[:, 0].astype(np.float64) @ w - x[:, 1].astype(np.float64) @ w).astype(np.float32)[:, None]
    path = tmp_path / "frames.h5"
    with StoreWriter(path, [LayerSpec("frames", (2, 8))], [TargetSpec("y", (1,), "float32")]) as writer:
        writer.append({"frames": x}, targets={"y": y}, index=range(800))
    mean_report = run_probes(probe_opts(tmp_path, path, layer="frames", out=str(tmp_path / "mean")))
    mean = mean_report["layers"][0]
    flat = run_probes(probe_opts(tmp_path, path, layer="frames", out=str(tmp_path / "flat"), tokens="flat"))["layers"][0]
    assert mean["probe"]["test"]["r2"] < 0.05 and flat["probe"]["test"]["r2"] > 0.99
    assert (mean["features"], mean["inputs"], flat["features"], flat["inputs"]) == (
        "mean of 2 tokens", 8, "2 tokens side by side", 16)
    assert " Each probe reads the mean of 2 tokens, 8 inputs. " in open(mean_report["markdown"]).read()
    assert torch.load(flat["probe"]["weights"], weights_only=True)["state_dict"]["weight"].shape == (1, 16)
    with pytest.raises(ProbeError) as info:
        probe_opts(tmp_path, path, tokens="all")
    assert str(info.value) == "--tokens 'all': use one of mean, flat, each, aligned"
    ragged = tmp_path / "ragged.h5"
    with StoreWriter(ragged, [LayerSpec("enc", (2,), ragged=True)], [TargetSpec("y", (), "int64")]) as writer:
        writer.append({"enc": Ragged(np.zeros((30, 2), np.float16), [1, 2] * 10)}, targets={"y": np.arange(20) % 2},
                      index=range(20))
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, ragged, layer="enc", tokens="flat"))
    assert str(info.value) == "enc is ragged (its token count varies): --tokens flat needs one count; use --tokens mean (or aligned)"


def test_tokens_aligned_read_each_token_with_its_own_label_and_draw_whole_rows(tmp_path, monkeypatch):
    """A label for each of a row's 2 x 3 tokens (a frame's positions, say): --tokens aligned
    trains one probe on every token, each against its own label; its intervals draw whole rows,
    and the probe applied to rows labels each token."""
    import marstore.probe as probe_module
    from marstore.evaluate import EvaluateOptions, evaluate_probes
    from marstore.probe import load_probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 2, 3, 8)).astype(np.float16)
    w = rng.standard_normal(8)
    labels = (x.astype(np.float64) @ w > 0).astype(np.int64) * 2 - 1  # -1 or 1: the classes' values, kept
    path = tmp_path / "tokens.h5"
    with StoreWriter(path, [LayerSpec("frames", (2, 3, 8))], [TargetSpec("part", (2, 3), "int64"),
                                                            TargetSpec("kind", (), "int64")]) as writer:
        writer.append({"frames": x}, targets={"part": labels, "kind": np.arange(500) % 2}, index=range(500))
    drawn = []
    intervals = probe_module._add_intervals
    monkeypatch.setattr(probe_module, "_add_intervals",
                        lambda entry, metric, tests, seed, groups: drawn.append(groups) or intervals(entry, metric, tests, seed, groups))
    report = run_probes(probe_opts(tmp_path, path, layer="frames", target="part", tokens="aligned"))
    entry = report["layers"][0]
    assert (entry["features"], entry["inputs"], entry["classes"]) == (
        "tokens one by one (6 a row), each with its own target value", 8, [-1, 1])
    assert entry["split_rows"] == {"train": 400, "val": 50, "test": 50}
    assert entry["token_rows"] == {"train": 2400, "val": 300, "test": 300}
    assert entry["probe"]["test"]["accuracy"] > 0.95 and entry["control"]["test"]["accuracy"] < 0.65
    (groups,) = drawn  # each of the 50 test rows' 6 tokens, drawn together
    assert len(groups) == 300 and sorted(np.unique(groups, return_counts=True)[1]) == [6] * 50
    probe = load_probe(entry["probe"]["weights"])
    rows = torch.from_numpy(x[:40])
    assert probe(rows).shape == (40, 6, 2)
    predicted = probe.predict(rows)
    assert predicted.shape == (40, 2, 3) and set(predicted.unique().tolist()) == {-1, 1}  # laid out as the target
    assert (predicted == torch.from_numpy(labels[:40])).float().mean() > 0.95
    # another store's rows: the same probe, scored on each token against its own label
    evaluated = evaluate_probes(EvaluateOptions(probes=str(tmp_path / "probes"), store=str(path), rows="all",
                                                out=str(tmp_path / "evaluated")))["layers"][0]
    every = probe.predict(torch.from_numpy(x)).reshape(-1)
    assert (evaluated["split_rows"], evaluated["token_rows"]) == ({"test": 500}, {"test": 3000})
    assert evaluated["probe"]["test"]["accuracy"] == pytest.approx(float((every == torch.from_numpy(labels).reshape(-1)).float().mean()))
    # a convolution's (C, h, w): its positions are the tokens, row-major, each labelled by a (h, w) map
    maps = rng.standard_normal((300, 5, 3, 4)).astype(np.float16)
    segments = (maps[:, 2] > 0).astype(np.int64)  # (300, 3, 4): a pixel's label is its channel 2's sign
    conv = tmp_path / "conv.h5"
    with StoreWriter(conv, [LayerSpec("conv", (5, 3, 4), channel_axis=0)], [TargetSpec("segments", (3, 4), "int64")]) as writer:
        writer.append({"conv": maps}, targets={"segments": segments}, index=range(300))
    pixels = run_probes(probe_opts(tmp_path, conv, layer="conv", target="segments", tokens="aligned",
                                   out=str(tmp_path / "conv")))["layers"][0]
    assert (pixels["inputs"], pixels["token_rows"]["test"]) == (5, 30 * 12)
    assert pixels["probe"]["test"]["accuracy"] > 0.97
    assert torch.equal(load_probe(pixels["probe"]["weights"]).predict(torch.from_numpy(maps[:8])),
                       torch.from_numpy(segments[:8]))
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="frames", target="kind", tokens="aligned"))
    assert str(info.value) == ("frames: --tokens aligned reads each of its 6 tokens with its own value of target 'kind', "
                               "which holds one value a row; give a target of shape (6, ...) a row (a value for each "
                               "token), or probe --tokens mean")
    # every token in float32 in memory, and a copy: refused where that is more than the memory available
    monkeypatch.setattr(probe_module, "available_memory", lambda: 150_000)
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="frames", target="part", tokens="aligned"))
    assert str(info.value) == ("frames: --tokens aligned holds 93.8 KiB of float32 features (500 rows of (2, 3, 8)), twice "
                               "that while it standardises them, and 146.5 KiB of memory is available; probe fewer rows "
                               "(--max-rows 390 or fewer, or --where), their token means (--tokens mean), or store fewer "
                               "tokens (--reduction mean:G at extraction)")
    report = run_probes(probe_opts(tmp_path, path, layer="frames", target="part", tokens="aligned", max_rows=390,
                                   out=str(tmp_path / "drawn")))  # as many rows as the memory takes, drawn with the seed
    drawn = report["layers"][0]
    assert (report["selected_rows"], report["where_rows"], sum(drawn["split_rows"].values())) == (390, 500, 390)
    assert sum(drawn["token_rows"].values()) == 390 * 6
    with pytest.raises(ProbeError, match=r"^frames: --tokens aligned holds 93.8 KiB of float32 features \(500 rows"):
        evaluate_probes(EvaluateOptions(probes=str(tmp_path / "drawn"), store=str(path), rows="all",
                                        out=str(tmp_path / "evaluated")))
    scored = evaluate_probes(EvaluateOptions(probes=str(tmp_path / "drawn"), store=str(path), rows="all", max_rows=200,
                                             out=str(tmp_path / "evaluated")))
    assert (scored["layers"][0]["split_rows"], scored["layers"][0]["token_rows"]) == ({"test": 200}, {"test": 1200})
    assert "every committed row; 200 of those 500, drawn at random with seed 0 by --max-rows" in open(scored["markdown"]).read()
    monkeypatch.undo()
    means = tmp_path / "means.h5"
    with StoreWriter(means, [LayerSpec("frames", (8,), reduction="mean")], [TargetSpec("part", (6,), "int64")]) as writer:
        writer.append({"frames": x.mean((1, 2))}, targets={"part": labels.reshape(500, 6)}, index=range(500))
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, means, layer="frames", target="part", tokens="aligned"))
    assert str(info.value) == ("frames: its rows have no tokens (a row of features alone, or tokens reduced at extraction); "
                               "--tokens aligned reads a layer stored with its tokens (--reduction none)")


def test_where_on_a_label_for_each_token_selects_tokens_such_as_the_ones_not_padding(tmp_path, caplog):
    """Sentences padded to 5 tokens, their labels -100 at the padding (Hugging Face's): with
    --tokens aligned, --where labels!=-100 leaves the padding's tokens out, token by token, in the
    probe and in evaluate; a condition on a target of one value a row still selects rows."""
    from marstore.evaluate import EvaluateOptions, evaluate_probes

    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 6, 300)
    x = rng.standard_normal((300, 5, 8)).astype(np.float16)
    labels = (x[..., 1] > 0).astype(np.int64)
    padding = np.arange(5)[None, :] >= lengths[:, None]
    labels[padding] = -100
    x[padding] = 0  # the padding's tokens all alike: a probe of every token would score them free
    path = tmp_path / "sentences.h5"
    with StoreWriter(path, [LayerSpec("layers.0", (5, 8))], [TargetSpec("labels", (5,), "int64"),
                                                            TargetSpec("split", (), "int64")]) as writer:
        writer.append({"layers.0": x}, targets={"labels": labels, "split": np.arange(300) % 3}, index=range(300))
    report = run_probes(probe_opts(tmp_path, path, layer="layers.0", target="labels", tokens="aligned",
                                   where=["labels!=-100", "split!=2"]))
    entry = report["layers"][0]
    assert entry["classes"] == [0, 1]  # no class for the padding
    kept = ~padding & (np.arange(300) % 3 != 2)[:, None]
    assert sum(entry["token_rows"].values()) == int(kept.sum()) and sum(entry["split_rows"].values()) == 200
    assert entry["probe"]["test"]["accuracy"] > 0.95
    assert "(complete, 300 rows; the 200 where split!=2; their tokens where labels!=-100)" in open(report["markdown"]).read()
    evaluated = evaluate_probes(EvaluateOptions(probes=str(tmp_path / "probes"), store=str(path), rows="all",
                                                out=str(tmp_path / "evaluated")))["layers"][0]
    assert evaluated["token_rows"] == {"test": int(kept.sum())} and evaluated["split_rows"] == {"test": 200}
    assert "every committed row, where split!=2; their tokens where labels!=-100." in open(
        tmp_path / "evaluated" / "report.md").read()
    with caplog.at_level(logging.INFO, logger="marstore.probe"):  # probed on token means, a word to say what fits
        run_probes(probe_opts(tmp_path, path, layer="layers.0", target="labels", out=str(tmp_path / "means")))
    assert ("target labels holds (5,) a row, a value for each token of layers.0: if each belongs to its token (a label "
            "for each position), --tokens aligned probes every token against its own") in caplog.messages
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="layers.0", target="labels", tokens="aligned", where=["labels=7"]))
    assert str(info.value) == f"--where labels=7: no token of the rows of {path} has labels = 7; it holds -100, 0, 1"


def test_tokens_aligned_on_a_ragged_layer_reads_each_rows_first_labels(tmp_path):
    """An RNN tagger's packed sequences, stored ragged (each sample its own token count), and
    its tags padded to 7 with -100: each token is read against its own tag, the padding's
    never; the probe labels a padded batch's tokens."""
    import marstore.probe as probe_module
    from marstore.evaluate import EvaluateOptions, evaluate_probes
    from marstore.probe import load_probe
    from marstore.report import human_bytes

    rng = np.random.default_rng(3)
    counts = rng.integers(1, 7, 400)
    tokens = rng.standard_normal((int(counts.sum()), 8)).astype(np.float16)
    tags = np.full((400, 7), -100, np.int64)
    starts = np.cumsum(counts) - counts
    for i, (start, n) in enumerate(zip(starts, counts)):
        tags[i, :n] = tokens[start:start + n, 3] > 0
    path = tmp_path / "tagger.h5"
    with StoreWriter(path, [LayerSpec("lstm:0", (8,), ragged=True)], [TargetSpec("tags", (7,), "int64")]) as writer:
        writer.append({"lstm:0": Ragged(tokens, counts)}, targets={"tags": tags}, index=range(400))
    entry = run_probes(probe_opts(tmp_path, path, layer="lstm:0", target="tags", tokens="aligned"))["layers"][0]
    assert entry["classes"] == [0, 1] and sum(entry["token_rows"].values()) == int(counts.sum())
    assert entry["features"] == "tokens one by one (their count varies), each with its own target value"
    assert entry["probe"]["test"]["accuracy"] > 0.97
    probe = load_probe(entry["probe"]["weights"])
    padded = torch.zeros(5, 6, 8)
    for i in range(5):
        padded[i, :counts[i]] = torch.from_numpy(tokens[starts[i]:starts[i] + counts[i]].astype(np.float32))
    predicted = probe.predict(padded)
    assert predicted.shape == (5, 6)
    assert [predicted[i, :counts[i]].tolist() for i in range(5)] == [tags[i, :counts[i]].tolist() for i in range(5)]
    evaluated = evaluate_probes(EvaluateOptions(probes=str(tmp_path / "probes"), store=str(path), rows="all",
                                                out=str(tmp_path / "evaluated")))["layers"][0]
    assert (evaluated["split_rows"], evaluated["token_rows"]) == ({"test": 400}, {"test": int(counts.sum())})
    with pytest.MonkeyPatch.context() as patch:  # the memory check counts a ragged layer's tokens
        patch.setattr(probe_module, "available_memory", lambda: 40_000)
        with pytest.raises(ProbeError) as info:
            run_probes(probe_opts(tmp_path, path, layer="lstm:0", target="tags", tokens="aligned"))
    features = int(counts.sum()) * 8 * 4
    assert str(info.value) == (f"lstm:0: --tokens aligned holds {human_bytes(features)} of float32 features (400 rows of "
                               f"{int(counts.sum())} tokens of (8,) in all), twice that while it standardises them, and "
                               f"39.1 KiB of memory is available; probe fewer rows (--max-rows {int(40_000 / (2 * features / 400))} "
                               "or fewer, or --where), their token means (--tokens mean), or store fewer tokens (--reduction "
                               "mean:G at extraction)")
    short = tmp_path / "short.h5"
    with StoreWriter(short, [LayerSpec("lstm:0", (8,), ragged=True)], [TargetSpec("tags", (5,), "int64")]) as writer:
        writer.append({"lstm:0": Ragged(tokens, counts)}, targets={"tags": tags[:, :5]}, index=range(400))
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, short, layer="lstm:0", target="tags", tokens="aligned"))
    assert str(info.value) == ("lstm:0: --tokens aligned reads each of a row's tokens (their count varies, up to 6) with "
                               "its own value of target 'tags', which holds (5,) a row; give a target padded to at least 6 "
                               "values a row, its first ones the tokens'")


def test_a_probe_of_each_token_carries_between_padded_and_ragged_stores_of_a_layer(tmp_path):
    """Sentences padded to 6 tokens in one store, stored ragged (each its own tokens) in another:
    a probe of each token trained on either is scored on the other, token by token."""
    from marstore.evaluate import EvaluateOptions, evaluate_probes
    from marstore.probe import load_probe

    rng = np.random.default_rng(4)
    counts = rng.integers(1, 7, 300)
    padded = rng.standard_normal((300, 6, 8)).astype(np.float16)
    real = np.arange(6)[None, :] < counts[:, None]
    padded[~real] = 0
    tags = np.where(real, padded[..., 5] > 0, -100).astype(np.int64)
    dense, ragged = tmp_path / "dense.h5", tmp_path / "ragged.h5"
    with StoreWriter(dense, [LayerSpec("enc", (6, 8))], [TargetSpec("tags", (6,), "int64")]) as writer:
        writer.append({"enc": padded}, targets={"tags": tags}, index=range(300))
    with StoreWriter(ragged, [LayerSpec("enc", (8,), ragged=True)], [TargetSpec("tags", (6,), "int64")]) as writer:
        writer.append({"enc": Ragged(padded[real], counts)}, targets={"tags": tags}, index=range(300))
    for trained, other in ((dense, ragged), (ragged, dense)):
        out = tmp_path / f"from-{trained.stem}"
        entry = run_probes(probe_opts(tmp_path, trained, layer="enc", target="tags", tokens="aligned", where=["tags!=-100"],
                                      out=str(out)))["layers"][0]
        evaluated = evaluate_probes(EvaluateOptions(probes=str(out), store=str(other), rows="all",
                                                    out=str(tmp_path / f"on-{other.stem}")))["layers"][0]
        right = load_probe(entry["probe"]["weights"]).predict(torch.from_numpy(padded).float()).numpy() == tags
        assert evaluated["token_rows"] == {"test": int(counts.sum())}
        assert evaluated["probe"]["test"]["accuracy"] == pytest.approx(float(right[real].mean()))
        assert evaluated["probe"]["test"]["accuracy"] > 0.95


def test_a_layer_is_a_target_read_as_stored_such_as_a_mask_for_each_token(tmp_path):
    """What a method returned, stored as a layer (MAR's random_masking(): 1 where a token was
    masked), is a target: read as stored, in float32, never reduced; probed for on every other
    layer, each token against its own mask value."""
    from marstore.probe import load_probe

    rng = np.random.default_rng(1)
    mask = (rng.random((400, 6)) < 0.7).astype(np.float16)
    tokens = rng.standard_normal((400, 6, 8)).astype(np.float16)
    tokens[..., 0] += 6 * mask  # a masked token shows it in its first feature
    path = tmp_path / "masked.h5"
    with StoreWriter(path, [LayerSpec("blocks.0", (6, 8)), LayerSpec("random_masking()", (6,)),
                            LayerSpec("enc", (8,), ragged=True)], [TargetSpec("label", (), "int64")]) as writer:
        writer.append({"blocks.0": tokens, "random_masking()": mask, "enc": Ragged(np.zeros((800, 8), np.float16), [2] * 400)},
                      targets={"label": np.arange(400) % 3}, index=range(400))
    for preload in (False, True):
        ds = ActivationDataset(path, ["blocks.0"], ["random_masking()", "label"], reduction="mean", preload=preload)
        batch = collate_rows(ds.__getitems__([3, 1, 3]))
        assert batch["random_masking()"].dtype == torch.float32
        assert torch.equal(batch["random_masking()"], torch.from_numpy(mask[[3, 1, 3]]).float())  # not reduced
        assert batch["blocks.0"].shape == (3, 8) and batch["label"].tolist() == [0, 1, 0]
    report = run_probes(probe_opts(tmp_path, path, layer=["blocks.0", "random_masking()"], target="random_masking()",
                                   tokens="aligned", task="classification", metric="balanced_accuracy"))
    (entry,) = report["layers"]  # the target's own layer is not probed for itself
    assert entry["layer"] == "blocks.0" and entry["classes"] == [0, 1]
    # left to --task auto, float values are regressed; a mask the module gave as booleans is classified
    tasks = []
    for source in ("float32", "bool"):
        masked = tmp_path / f"{source}.h5"
        with StoreWriter(masked, [LayerSpec("blocks.0", (6, 8)), LayerSpec("mask", (6,), source_dtype=source)]) as writer:
            writer.append({"blocks.0": tokens, "mask": mask}, index=range(400))
        tasks += [entry["task"] for entry in run_probes(probe_opts(tmp_path, masked, layer="blocks.0", target="mask",
                                                                   tokens="aligned", out=str(tmp_path / source)))["layers"]]
    assert tasks == ["regression", "classification"]
    assert entry["probe"]["test"]["balanced_accuracy"] > 0.95 and entry["control"]["test"]["balanced_accuracy"] < 0.6
    assert load_probe(entry["probe"]["weights"]).predict(torch.from_numpy(tokens[:5])).tolist() == mask[:5].astype(int).tolist()
    for kw, message in (
            ({"layer": "blocks.0", "target": "mask"}, f"--target 'mask' is not in {path}; its targets are ['label'] (or name one of its layers)"),
            ({"layer": "random_masking()", "target": "random_masking()"},
             "--target 'random_masking()' is the one layer --layer selects; a layer cannot be its own target"),
            ({"layer": "blocks.0", "target": "enc"},
             f"{path}: the layer 'enc' is ragged (its token count varies); a layer read as a target needs one shape a row")):
        with pytest.raises((ProbeError, StoreError)) as info:
            run_probes(probe_opts(tmp_path, path, **kw))
        assert str(info.value) == message


def test_a_label_far_from_balanced_is_headed_by_the_metric_asked_for(tmp_path):
    # 9 rows in 10 are class 0 and the features say nothing: accuracy 0.9 from the majority alone
    rng = np.random.default_rng(0)
    path = tmp_path / "rare.h5"
    with StoreWriter(path, [LayerSpec("a", (4,))], [TargetSpec("y", (), "int64"), TargetSpec("v", (), "float32")]) as w:
        w.append({"a": rng.standard_normal((1000, 4)).astype(np.float16)},
                 targets={"y": (np.arange(1000) % 10 == 0).astype(np.int64), "v": rng.standard_normal(1000).astype(np.float32)},
                 index=range(1000))
    report = run_probes(probe_opts(tmp_path, path, layer="a", metric="balanced_accuracy"))
    test = report["layers"][0]["probe"]["test"]
    assert report["metric"] == "balanced_accuracy" and test["accuracy"] > 0.85 and test["balanced_accuracy"] == 0.5
    assert set(test) == {"accuracy", "balanced_accuracy", "macro_f1", "balanced_accuracy_ci95",
                         "recall_per_class"}
    assert report["layers"][0]["selectivity"] == test["balanced_accuracy"] - report["layers"][0]["control"]["test"][
        "balanced_accuracy"]
    assert table(report).splitlines()[0].split()[:2] == ["layer", "balanced_accuracy"]
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, layer="a", target="v", metric="macro_f1"))
    assert str(info.value) == "a: --metric macro_f1 is a classification's; target 'v' is probed by regression, whose metric is R²"
    with pytest.raises(ProbeError) as info:
        probe_opts(tmp_path, path, metric="f1")
    assert str(info.value) == "--metric 'f1': use one of accuracy, balanced_accuracy, macro_f1 (for classification)"


def test_a_target_of_one_value_is_refused_with_that_value(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, [LayerSpec("a", (4,))], [TargetSpec("k", (), "int64"), TargetSpec("task", (), "str"),
                                                    TargetSpec("xy", (2,), "float32")]) as w:
        w.append({"a": np.random.default_rng(0).standard_normal((200, 4)).astype(np.float16)},
                 targets={"k": np.full(200, 3), "task": ["pick"] * 100 + ["push"] * 100,
                          "xy": np.tile(np.float32([0.5, -1.0]), (200, 1))}, index=range(200))
    for kw, value in [({"target": "k"}, "3"), ({"target": "xy"}, "[0.5, -1.0]"),
                      ({"target": "task", "where": ["task=push"]}, "'push'")]:
        with pytest.raises(ProbeError) as info:
            run_probes(probe_opts(tmp_path, path, layer="a", **kw))
        assert str(info.value) == (f"a: target {kw['target']!r} is {value} in every selected row: a probe has nothing to "
                                   "predict; choose another target, or select rows where it varies (--where)")


def test_classification_probe(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path)
    report = run_probes(probe_opts(tmp_path, path, target="episode", kind="mlp", epochs=5, control=False))
    assert report["task"] == "classification" and set(report["layers"][0]["probe"]["test"]) == {
        "accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci95", "recall_per_class"}


def test_labels_such_as_minus_one_or_sparse_ids_are_classes(tmp_path):
    """Labels -1, 7 and 400 (an "unknown" and two sparse ids): three classes, found as well as
    labels 0, 1, 2 would be; -1 used to stop the probe with 'Target -1 is out of bounds'."""
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    values = np.array([-1, 7, 400])
    which = rng.integers(0, 3, 600)
    x = (np.eye(3)[which] * 3 + rng.standard_normal((600, 3)) * 0.3).astype(np.float16)
    with StoreWriter(path, [LayerSpec("a", (3,))], [TargetSpec("y", (), "int64")]) as w:
        w.append({"a": x}, targets={"y": values[which]}, index=np.arange(600))
    report = run_probes(probe_opts(tmp_path, path, layer="a", target="y", epochs=30, control=False))
    layer = report["layers"][0]
    assert report["task"] == "classification" and layer["classes"] == [-1, 7, 400]
    assert layer["probe"]["test"]["accuracy"] > 0.95
    weights = torch.load(layer["probe"]["weights"], weights_only=True)["state_dict"]
    assert weights["weight"].shape == (3, 3)  # one output per label value, not 401


def test_non_finite_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path, nan_rows=range(0, 2000, 100))
    report = run_probes(probe_opts(tmp_path, path, epochs=5, control=False))
    assert report["layers"][0]["skipped_rows"] == 20
    assert report["layers"][0]["probe"]["test"]["r2"] > 0.5


def test_interrupted_and_resumed_training_matches(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    planted_store(path)
    whole = run_probes(probe_opts(tmp_path, path, epochs=12, control=False, solver="adamw", out=str(tmp_path / "a")))
    from marstore import probe

    calls = {"n": 0}
    original = probe._Trainer._val_loss

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 7:  # Ctrl-C during the seventh epoch
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(probe._Trainer, "_val_loss", interrupting)
    with pytest.raises(ProbeInterrupted, match="state at epoch 6 saved"):
        run_probes(probe_opts(tmp_path, path, epochs=12, control=False, solver="adamw", out=str(tmp_path / "b")))
    saved = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.endswith((".state.pt", ".partial")))
    assert saved == ["signal.state.pt"]  # saved whole: written aside, then renamed
    monkeypatch.setattr(probe._Trainer, "_val_loss", original)
    with pytest.raises(ProbeError) as info:  # the saved optimizer would bring back the old rate unseen
        run_probes(probe_opts(tmp_path, path, epochs=12, lr=0.1, control=False, solver="adamw", out=str(tmp_path / "b"), resume=True))
    assert str(info.value) == ("signal: --resume: the options differ from the interrupted run's: lr (then 0.05, now 0.1); "
                               "repeat them, or run without --resume to start over")
    os.rename(path, tmp_path / "kept.h5")  # the store, grown since: other splits, which a resume must not mix
    planted_store(path, n=2100)
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, epochs=12, control=False, solver="adamw", out=str(tmp_path / "b"), resume=True))
    assert str(info.value) == ("signal: --resume: the splits now hold {'train': 1680, 'val': 210, 'test': 210} rows, "
                               "{'train': 1600, 'val': 200, 'test': 200} when it was interrupted (did an extraction add "
                               "rows since?); run without --resume to start over")
    os.replace(tmp_path / "kept.h5", path)
    resumed = run_probes(probe_opts(tmp_path, path, epochs=12, control=False, solver="adamw", out=str(tmp_path / "b"), resume=True))
    a, b = whole["layers"][0]["probe"], resumed["layers"][0]["probe"]
    assert a["test"] == b["test"] and a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]



def test_an_mlp_probe_resumes_to_the_same_result_and_refuses_a_state_of_another_probe(tmp_path, monkeypatch):
    from marstore import probe

    path = tmp_path / "s.h5"
    planted_store(path, n=600)
    opts = dict(epochs=8, control=False, kind="mlp", hidden=16)
    whole = run_probes(probe_opts(tmp_path, path, out=str(tmp_path / "a"), **opts))
    original = probe._Trainer._val_loss
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 4:  # epochs 0-2 (the start's loss comes from its rows' losses): Ctrl-C in epoch 3
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(probe._Trainer, "_val_loss", interrupting)
    with pytest.raises(ProbeInterrupted, match="state at epoch 3 saved"):
        run_probes(probe_opts(tmp_path, path, out=str(tmp_path / "b"), **opts))
    monkeypatch.setattr(probe._Trainer, "_val_loss", original)
    state_path = tmp_path / "b" / "signal.state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "model": {k.replace("mlp.", "net."): v for k, v in state["model"].items()}}, tmp_path / "other.pt")
    os.replace(state_path, tmp_path / "kept.pt")
    os.replace(tmp_path / "other.pt", state_path)  # as a marstore whose MLP had other parameter names saved it
    with pytest.raises(ProbeError) as info:
        run_probes(probe_opts(tmp_path, path, out=str(tmp_path / "b"), resume=True, **opts))
    assert str(info.value).startswith(f"signal: --resume: {state_path} holds another probe than this marstore trains (")
    assert str(info.value).endswith("); run without --resume to start over")
    os.replace(tmp_path / "kept.pt", state_path)
    resumed = run_probes(probe_opts(tmp_path, path, out=str(tmp_path / "b"), resume=True, **opts))
    a, b = whole["layers"][0]["probe"], resumed["layers"][0]["probe"]
    assert a["history"][0]["epoch"] == -1 and a["history"] == b["history"] and a["test"] == b["test"]


def test_a_resume_keeps_the_layers_finished_before_the_interruption(tmp_path, monkeypatch):
    from marstore import probe

    path = tmp_path / "s.h5"
    planted_store(path)
    whole = run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=6, out=str(tmp_path / "a")))
    prepared = []
    original = probe._prepare

    def interrupting(opts, layer, rows, token_where):
        prepared.append(layer)
        if layer == "noise" and len(prepared) == 2:  # Ctrl-C while the second layer is read, before any epoch
            raise KeyboardInterrupt
        return original(opts, layer, rows, token_where)

    monkeypatch.setattr(probe, "_prepare", interrupting)
    out = tmp_path / "b"
    with pytest.raises(ProbeInterrupted) as info:
        run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=6, out=str(out)))
    assert (str(info.value), info.value.signum) == ("noise: interrupted; 1 finished layer kept; run again with --resume",
                                                    signal.SIGINT)
    with pytest.raises(ProbeError, match=r"^signal: --resume: the options differ from the interrupted run's: epochs "
                                         r"\(then 6, now 7\); repeat them"):
        run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=7, out=str(out), resume=True))
    resumed = run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=6, out=str(out), resume=True))
    assert prepared == ["signal", "noise", "noise"]  # the finished layer was not read again
    for a, b in zip(whole["layers"], resumed["layers"]):
        assert (a["layer"], a["probe"]["test"], a["control"]["test"]) == (b["layer"], b["probe"]["test"], b["control"]["test"])
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".json")) == ["report.json"]


def test_a_resume_on_a_store_written_again_is_refused(tmp_path, monkeypatch):
    from marstore import probe

    path = tmp_path / "s.h5"
    planted_store(path)
    original = probe._prepare
    monkeypatch.setattr(probe, "_prepare", lambda opts, layer, rows, token_where: (_ for _ in ()).throw(KeyboardInterrupt)
                        if layer == "noise" else original(opts, layer, rows, token_where))
    with pytest.raises(ProbeInterrupted):
        run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=3))
    os.remove(path)
    time.sleep(1.1)  # a store written again, with as many rows: its creation time tells it apart
    planted_store(path, seed=1)
    with pytest.raises(ProbeError, match=r"^signal: --resume: the store is not the one the interrupted run read \(2000 rows "
                                         r"then, 2000 now; created .* then, .* now\); run without --resume to start over$"):
        run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], epochs=3, resume=True))


def test_sigterm_stops_the_probes_like_ctrl_c(tmp_path, monkeypatch):
    from marstore import probe

    path = tmp_path / "s.h5"
    planted_store(path)
    original = probe._Trainer._val_loss
    calls = []

    def terminated(self):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(probe._Trainer, "_val_loss", terminated)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(ProbeInterrupted) as info:
        run_probes(probe_opts(tmp_path, path, epochs=6, control=False, solver="adamw"))
    assert info.value.signum == signal.SIGTERM
    assert str(info.value).startswith("signal: interrupted; state at epoch 2 saved to ")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

def test_demo_store_shows_the_action_above_its_control(tmp_path, capsys):
    from marstore.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--rows", "512"]) == 0
    report = json.load(open(tmp_path / "demo" / "probes" / "report.json"))
    selectivity = {r["layer"]: r["probe"]["test"]["r2"] - r["control"]["test"]["r2"] for r in report["layers"]}
    assert list(selectivity) == ["proj_cond_x_layer", *(f"{p}_blocks.{i}" for p in ("encoder", "decoder") for i in range(4))]
    # the action is the policy's output, not its input: the layer that joins the frames (a linear
    # map, so its token means say where the blob is, not where it went) does not carry it, the
    # first attention block does
    assert abs(selectivity["proj_cond_x_layer"]) < 0.1 and selectivity["encoder_blocks.0"] > 0.4
    out = capsys.readouterr().out
    assert "encoder_blocks.0" in out and "depth.png" in out


def test_the_probe_command_takes_several_layer_patterns(tmp_path, capsys):
    from marstore.cli import main

    path = tmp_path / "s.h5"
    planted_store(path, n=400)
    out = tmp_path / "probes"
    assert main(["probe", str(path), "--layer", "noise", "sig*", "--target", "y", "--out", str(out), "--no-progress"]) == 0
    report = json.load(open(out / "report.json"))
    assert [r["layer"] for r in report["layers"]] == ["noise", "signal"] and report["options"]["layer"] == ["noise", "sig*"]
    assert main(["probe", str(path), "--layer", "signal", "--target", "y", "--out", str(out), "--no-progress"]) == 0
    assert json.load(open(out / "report.json"))["options"]["layer"] == "signal"  # one pattern, recorded as before
    assert capsys.readouterr().out.splitlines()[0].split() == ["layer", "r2", "95%", "interval", "control", "select.",
                                                              "skipped", "rows", "skipped", "steps"]


def test_the_target_is_the_stores_own_when_it_has_one(tmp_path, caplog):
    one = tmp_path / "one.h5"
    with StoreWriter(one, [LayerSpec("a", (2,))], [TargetSpec("y", (), "int64")]) as w:
        w.append({"a": np.eye(2, dtype=np.float16)[np.arange(100) % 2]}, targets={"y": np.arange(100) % 2}, index=range(100))
    with caplog.at_level(logging.INFO, logger="marstore.probe"):
        report = run_probes(ProbeOptions(str(one), out=str(tmp_path / "p"), progress=False))
    assert report["target"] == "y" and report["layers"][0]["probe"]["test"]["accuracy"] == 1.0
    assert f"probing for y, the target of {one}" in caplog.messages
    path = tmp_path / "two.h5"
    planted_store(path, n=100)
    with pytest.raises(ProbeError) as info:
        run_probes(ProbeOptions(str(path), out=str(tmp_path / "p")))
    assert str(info.value) == f"--target: name one of the targets of {path}: episode, y"
    with StoreWriter(tmp_path / "none.h5", [LayerSpec("a", (2,))]) as w:
        w.append({"a": np.zeros((4, 2), np.float16)}, index=range(4))
    with pytest.raises(ProbeError) as info:
        run_probes(ProbeOptions(str(tmp_path / "none.h5"), out=str(tmp_path / "p")))
    assert str(info.value) == f"{tmp_path / 'none.h5'} holds no targets to probe: extract with --targets"


def test_reports_are_compared_layer_by_layer(tmp_path, capsys):
    from marstore.cli import main
    from marstore.probe import compare_reports

    path = tmp_path / "s.h5"
    planted_store(path, n=400)
    both = run_probes(probe_opts(tmp_path, path, layer=["signal", "noise"], out=str(tmp_path / "both")))
    one = run_probes(probe_opts(tmp_path, path, layer="noise", out=str(tmp_path / "one"), seed=1))
    result = compare_reports([str(tmp_path / "both"), one["report"]], str(tmp_path / "cmp"), ["early", "late"])
    s, n = {r["layer"]: r for r in both["layers"]}["signal"], one["layers"][0]
    assert result["comparison"]["layers"]["signal"] == {
        "early": {"r2": s["probe"]["test"]["r2"], "ci95": s["probe"]["test"]["r2_ci95"], "control": s["control"]["test"]["r2"]},
        "late": None}
    assert result["comparison"]["layers"]["noise"]["late"]["r2"] == n["probe"]["test"]["r2"]
    assert json.load(open(result["json"])) == result["comparison"]
    lines = open(result["markdown"]).read().splitlines()
    low, high = s["probe"]["test"]["r2_ci95"]
    assert "| layer | early | late |" in lines and \
        f"| signal | {s['probe']['test']['r2']:.3f} ({low:.3f} to {high:.3f}) | - |" in lines
    assert os.path.getsize(result["depth"]) > 5000
    assert result["table"].splitlines()[0].split() == ["layer", "early", "late"]

    labels = run_probes(probe_opts(tmp_path, path, layer="signal", target="episode", task="classification",
                                   out=str(tmp_path / "labels"), control=False))
    for args, message in [
        ([str(tmp_path / "both"), labels["report"]], f"the reports are of different targets or metrics ({tmp_path / 'both'}: "
                                                      f"y r2, {labels['report']}: episode accuracy); compare reports of "
                                                      "one target"),
        ([str(tmp_path / "both")], "give two reports or more to compare"),
        ([str(tmp_path / "both"), str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: no probe report to read ([Errno 2] "
                                                              f"No such file or directory: '{tmp_path / 'nowhere'}'); give "
                                                              "a folder that `marstore probe` wrote, or its report.json"),
        ([str(tmp_path / "both"), str(tmp_path / "one"), "--label", "a"], "--label a: give one distinct label for each of "
                                                                          "the 2 reports"),
        ([str(tmp_path / "both"), str(tmp_path / "s.json")], f"{tmp_path / 's.json'} is not a report of `marstore probe` "
                                                             "(it lacks target, metric or layers)"),
    ]:
        (tmp_path / "s.json").write_text("[1]")
        assert main(["compare", *args, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.strip() == f"marstore compare: {message}"
    assert main(["compare", str(tmp_path / "both"), str(tmp_path / "one"), "--out", str(tmp_path / "y")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["layer", str(tmp_path / "both"), str(tmp_path / "one")]


def test_the_probe_command_takes_several_targets_and_resumes_past_the_finished_ones(tmp_path, capsys, monkeypatch):
    from marstore import probe
    from marstore.cli import main

    path = tmp_path / "s.h5"
    planted_store(path, n=400)
    out = tmp_path / "p"
    command = ["probe", str(path), "--layer", "signal", "--target", "y", "episode", "--task", "regression", "--out", str(out),
               "--no-progress"]
    assert main(command) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("target ")] == ["target y:", "target episode:"]
    reports = {t: json.load(open(out / t / "report.json")) for t in ("y", "episode")}
    assert {t: r["target"] for t, r in reports.items()} == {"y": "y", "episode": "episode"}
    # every target at a glance: each layer's test metric in a table and a heatmap
    r2 = {t: f"{r['layers'][0]['probe']['test']['r2']:.3f}" for t, r in reports.items()}
    assert printed[-4:] == ["each layer's test metric, by target:", "layer   y (r2)  episode (r2)",
                            f"signal  {r2['y']:>6}  {r2['episode']:>12}", f"summary: {out / 'summary.md'}, {out / 'by_target.png'}"]
    assert f"| signal | {r2['y']} | {r2['episode']} |" in open(out / "summary.md").read()
    assert os.path.getsize(out / "by_target.png") > 5000
    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out == (f"{out}: the probe reports of 2 targets, a folder each: episode, y; {out / 'summary.md'} "
                                       "holds each layer's metric by target\n")
    # a folder that holds a probe folder named otherwise (the demo's runs/demo/probes) is not one of targets
    shutil.copytree(out / "y", tmp_path / "run" / "probes")
    assert main(["info", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"marstore info: checkpoint {tmp_path / 'run'} is a folder without the "
                                              "weights save_pretrained writes")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished target was trained again")

    monkeypatch.setattr(probe, "_probe_layer", no_training)
    assert main([*command, "--resume"]) == 0  # both finished: kept, printed again
    assert capsys.readouterr().out.splitlines() == printed
    with pytest.raises(AssertionError, match="trained again"):  # other options: trained again
        main([*command[:-1], "--seed", "3", "--resume", "--no-progress"])
    assert main(["probe", str(path), "--target", "y", "y"]) == 2
    assert capsys.readouterr().err.strip() == "marstore probe: --target y y: name each target once"


def test_the_probe_command_probes_every_layer_when_none_is_named(tmp_path, caplog):
    from marstore.cli import main

    path = tmp_path / "s.h5"
    planted_store(path, n=400)
    with caplog.at_level(logging.INFO, logger="marstore.probe"):
        assert main(["probe", str(path), "--target", "y", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert [r["layer"] for r in json.load(open(tmp_path / "p" / "report.json"))["layers"]] == ["signal", "noise"]
    assert f"probing every layer of {path} (2; --layer picks some)" in caplog.messages


def test_an_unknown_layer_names_every_layer_when_none_is_close(tmp_path):
    path = tmp_path / "s.h5"
    planted_store(path, n=20)
    # a store's layer list has no root module "": the first layer was left out of the names offered
    with pytest.raises(StoreError, match=r"has no layer 'qqq'; nearest: \['signal', 'noise'\]$"):
        ActivationDataset(path, "qqq")


def test_runs_of_rows_merge_across_small_gaps_only():
    from marstore.dataset import GAP_BYTES, _runs

    rows = np.array([0, 1, 2, 10, 11, 500])
    assert _runs(rows, row_bytes=1024) == [(0, 12), (500, 501)]  # 7 rows of 1 KiB between: one read; 488: another
    assert _runs(rows, row_bytes=GAP_BYTES // 7) == [(0, 12), (500, 501)]  # a gap of exactly GAP_BYTES still merges
    assert _runs(rows, row_bytes=GAP_BYTES // 7 + 1) == [(0, 3), (10, 12), (500, 501)]
    assert _runs(np.array([], dtype=np.int64)) == []
