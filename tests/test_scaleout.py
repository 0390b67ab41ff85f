"""Scale-out: torchrun ranks with gloo on the CPU write one store (part files + virtual top file)."""

import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from marstore.dataset import ActivationDataset
from marstore.store import open_store

ROOT = os.path.dirname(os.path.dirname(__file__))
TESTS = os.path.dirname(__file__)
MODEL = ["--model", "marstore.models:video_mar", "--model-arg", "task_name=t", "--model-arg", "embed_dim=32",
         "--model-arg", "depth=2", "--model-arg", "decoder_depth=2", "--model-arg", "num_heads=2",
         "--forward", "marstore.models:policy_forward", "--layers", "encoder_blocks.*", "decoder_norm",
         "--targets", "nactions", "label", "--batch-size", "4", "--no-progress", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marstore(*args, ranks: int = 1, **popen):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "marstore"] if ranks > 1 else [sys.executable, "-m", "marstore"]
    return subprocess.Popen(prefix + list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)


def run(*args, ranks=1):
    p = marstore(*args, ranks=ranks)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def by_index(path):
    """Every dataset's rows, ordered by source index."""
    with open_store(path) as s:
        order = np.argsort(s.index())
        rows = {name: s.read(name)[order] for name in s.layers}
        rows.update({f"target/{n}": s.target(n)[order] for n in s.targets})
        return s.rows, np.sort(s.index()), rows


@pytest.mark.parametrize("ranks,size", [(2, 37), (3, 10)])
def test_ranks_write_one_store_equal_to_one_process(tmp_path, ranks, size):
    data = ["--dataset", "marstore.models:synthetic_video_actions", "--dataset-arg", f"size={size}"]
    run("extract", *MODEL, *data, "--out", str(tmp_path / "one.h5"))
    run("extract", *MODEL, *data, "--out", str(tmp_path / "many.h5"), ranks=ranks)
    parts = sorted(p for p in os.listdir(tmp_path) if ".part" in p)
    assert parts == [f"many.part{r:03d}-of-{ranks:03d}.h5" for r in range(ranks)]
    with open_store(tmp_path / f"many.part001-of-{ranks:03d}.h5") as s:
        assert s.index().tolist() == list(range(1, size, ranks))  # every ranks-th sample, from its rank
    rows_a, index_a, a = by_index(tmp_path / "one.h5")
    rows_b, index_b, b = by_index(tmp_path / "many.h5")
    assert rows_a == rows_b == size and index_a.tolist() == index_b.tolist() == list(range(size))
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    with open_store(tmp_path / "one.h5") as one, open_store(tmp_path / "many.h5") as many:
        assert many.status == "complete"
        for name in one.layers:
            np.testing.assert_allclose(many.layers[name].attrs["mean"], one.layers[name].attrs["mean"], rtol=1e-6, atol=1e-6)
            assert many.layers[name].attrs["stats_count"] == one.layers[name].attrs["stats_count"]
    # plain h5py, from another directory: the virtual sources are found relative to the top file
    with h5py.File(tmp_path / "many.h5", "r") as f:
        assert f["activations/encoder_blocks.0"].is_virtual and f["index"].shape == (size,)
    ds = ActivationDataset(tmp_path / "many.h5", ["decoder_norm"], ["label"])
    assert len(ds) == size and ds[size - 1]["decoder_norm"].shape == (64, 32)
    out = run("merge", str(tmp_path / "many.h5"), "--out", str(tmp_path / "merged.h5"))
    assert f"copied {size} rows" in out
    _, index_m, m = by_index(tmp_path / "merged.h5")
    assert index_m.tolist() == index_b.tolist() and all(m[k].tobytes() == b[k].tobytes() for k in b)
    with h5py.File(tmp_path / "merged.h5", "r") as f:
        assert not f["activations/encoder_blocks.0"].is_virtual and f.attrs["status"] == b"complete"
    for store in ("one.h5", "many.h5", "merged.h5"):  # the forward's (loss, video_loss, act_loss), in its order
        with h5py.File(tmp_path / store, "r", locking=False) as f:  # as ds, which holds many.h5 open
            assert list(f["outputs"]) == ["row_start", "loss", "loss_1", "loss_2"], store


def test_ranks_share_an_iterable_data_set_by_stream_position(tmp_path):
    run("extract", *MODEL, "--dataset", "marstore.models:synthetic_video_actions", "--dataset-arg", "size=11",
        "--out", str(tmp_path / "map.h5"))
    run("extract", *MODEL, "--dataset", "helpers.streams:synthetic_stream", "--dataset-arg", "size=40",
        "--num-samples", "11", "--out", str(tmp_path / "stream.h5"), ranks=2)
    with open_store(tmp_path / "stream.part001-of-002.h5") as s:
        assert s.index().tolist() == [1, 3, 5, 7, 9]
    rows_a, index_a, a = by_index(tmp_path / "map.h5")
    rows_b, index_b, b = by_index(tmp_path / "stream.h5")
    assert rows_a == rows_b == 11 and index_a.tolist() == index_b.tolist() == list(range(11))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_a_failing_rank_stops_the_job_and_is_named(tmp_path):
    p = marstore("extract", *MODEL, "--dataset", "helpers.failing_data:failing", "--dataset-arg", "fail_at=5",
                 "--targets", "nactions", "--out", str(tmp_path / "s.h5"), ranks=2)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "rank 1 failed: the data set failed on item 5: RuntimeError: sample 5 is unreadable" in err
    assert not os.path.exists(tmp_path / "s.h5")  # no top file over a failed job


def test_killed_job_resumes_per_rank(tmp_path):
    data = ["--dataset", "helpers.failing_data:slow", "--dataset-arg", "size=2000", "--commit-rows", "32"]
    run("extract", *MODEL, *data, "--out", str(tmp_path / "one.h5"))
    out = str(tmp_path / "many.h5")
    p = marstore("extract", *MODEL, *data, "--out", out, ranks=2)
    part = str(tmp_path / "many.part001-of-002.h5")
    deadline = time.time() + 120
    while not os.path.exists(part) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # some commits, not all (each rank needs 3 s for its 1000 rows)
    kill_tree(p.pid)  # torchrun and every rank, mid-way
    p.communicate()
    with open_store(part) as s:
        assert s.status == "incomplete" and 0 < s.rows < 1000
    run("extract", *MODEL, *data, "--out", out, "--resume", ranks=2)
    _, index_a, a = by_index(tmp_path / "one.h5")
    _, index_b, b = by_index(out)
    assert index_a.tolist() == index_b.tolist() == list(range(2000))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("grows", ["all", "even"])
def test_ranks_whose_token_counts_change_late_join_as_one_process_stores_them(tmp_path, grows):
    # items 8-15 have more tokens: each rank meets the change at its fifth item ("all"), or only
    # rank 0 does ("even") and rank 1's part stays dense until the join
    args = ["--model", "test_extract:OneLinear", "--dataset", "test_extract:TokensGrow", "--dataset-arg", f"grows={grows}",
            "--layers", "fc", "--targets", "label", "--batch-size", "1", "--no-progress", "--device", "cpu"]
    run("extract", *args, "--ragged", "fc", "--out", str(tmp_path / "one.h5"))
    run("extract", *args, "--out", str(tmp_path / "many.h5"), ranks=2)
    rows = {}
    for store in ("one.h5", "many.h5"):
        with open_store(tmp_path / store) as s:
            assert s.status == "complete" and s.layers["fc"].layout == "ragged"
            rows[store] = {int(i): (r.tobytes(), int(t)) for i, r, t in zip(s.index(), s.read("fc"), s.target("label"))}
    assert sorted(rows["many.h5"]) == list(range(16)) and rows["many.h5"] == rows["one.h5"]


def test_a_virtual_store_whose_part_is_missing_is_refused_not_read_as_zeros(tmp_path):
    # HDF5 reads the rows of a missing source file as fill values, without an error
    from marstore.scaleout import write_top_file
    from marstore.store import LayerSpec, StoreError, StoreWriter, TargetSpec

    parts = [str(tmp_path / f"a.part{r:03d}-of-002.h5") for r in range(2)]
    for r, part in enumerate(parts):
        with StoreWriter(part, [LayerSpec("x", (2,))], [TargetSpec("y", (), "int64")]) as w:
            w.append({"x": np.full((3, 2), r + 1, np.float16)}, targets={"y": np.arange(3)}, index=np.arange(3))
    top = tmp_path / "a.h5"
    write_top_file(str(top), parts)
    os.rename(parts[1], tmp_path / "elsewhere.h5")
    message = (f"{top} is a virtual store over part files that must sit beside it, and a.part001-of-002.h5 is not in "
               f"{tmp_path}; move the parts with it, or make one self-contained file with `marstore merge` where they are")
    for read in (open_store, lambda p: ActivationDataset(p, "x")):
        with pytest.raises(StoreError) as info:
            read(top)
        assert str(info.value) == message
    os.rename(tmp_path / "elsewhere.h5", parts[1])
    assert ActivationDataset(top, "x").read_all()["x"][:, 0].tolist() == [1] * 3 + [2] * 3


def test_an_incomplete_part_whose_compressed_layer_holds_rows_in_its_tail_is_refused(tmp_path):
    # a virtual dataset maps the part's dataset alone, which lacks the rows kept in the tail
    from marstore.scaleout import write_top_file
    from marstore.store import LayerSpec, StoreError, StoreWriter

    parts = [str(tmp_path / f"a.part{r:03d}-of-002.h5") for r in range(2)]
    for r, part in enumerate(parts):
        w = StoreWriter(part, [LayerSpec("x", (2,), chunk_rows=4, compression="lzf"), LayerSpec("m", (2,))])
        w.append({"x": np.full((6, 2), r + 1, np.float16), "m": np.zeros((6, 2), np.float16)}, index=np.arange(r, 12, 2))
        w.close(complete=r == 0)
    with pytest.raises(StoreError) as info:
        write_top_file(str(tmp_path / "a.h5"), parts)
    assert str(info.value) == (f"{parts[1]} is incomplete, and its compressed layers x hold their last rows apart from "
                               "their datasets until it is finished: resume it first")


def test_parts_that_stored_a_layer_dense_and_ragged_join_as_ragged(tmp_path):
    # each rank decides from its own first batches: one saw a token count vary, the others did not
    from marstore.scaleout import write_top_file
    from marstore.store import LayerSpec, Ragged, StoreWriter

    tokens = np.arange(3 * 9 * 4, dtype=np.float16).reshape(3, 9, 4)  # rank r's rows: 2, 3 and 4 tokens
    parts = [str(tmp_path / f"a.part{r:03d}-of-003.h5") for r in range(3)]
    for r, part in enumerate(parts[:2]):  # dense, each with its own count
        with StoreWriter(part, [LayerSpec("x", (2 + r, 4)), LayerSpec("m", (4,))]) as w:
            w.append({"x": np.repeat(tokens[r : r + 1, : 2 + r], 2, axis=0), "m": np.zeros((2, 4), np.float16)},
                     index=np.arange(r, 6, 3))
    with StoreWriter(parts[2], [LayerSpec("x", (4,), ragged=True), LayerSpec("m", (4,))]) as w:
        w.append({"x": Ragged(np.concatenate([tokens[2, :4], tokens[2, :4]]), [4, 4]), "m": np.zeros((2, 4), np.float16)},
                 index=np.arange(2, 6, 3))
    top = tmp_path / "a.h5"
    assert write_top_file(str(top), parts) == 6
    with open_store(top) as s:
        assert s.layers["x"].layout == "ragged" and s.layers["m"].layout == "dense"
        rows = s.read("x")
        assert [len(r) for r in rows] == [2, 2, 3, 3, 4, 4]
        assert all(rows[2 * r + i].tobytes() == tokens[r, : 2 + r].tobytes() for r in range(3) for i in range(2))


def test_text_targets_and_items_left_out_join_in_the_virtual_store_and_survive_a_merge(tmp_path):
    from marstore.scaleout import merge, write_top_file
    from marstore.store import TEXT, LayerSpec, StoreWriter, TargetSpec

    parts = [str(tmp_path / f"a.part{r:03d}-of-002.h5") for r in range(2)]
    for r, part in enumerate(parts):
        with StoreWriter(part, [LayerSpec("x", (2,))], [TargetSpec("task", (), TEXT)]) as w:
            w.append({"x": np.full((3, 2), r, np.float16)}, targets={"task": [f"rank{r} é{i}" for i in range(3)]},
                     index=np.arange(r, 6, 2), skipped=[(6 + r, f"OSError: item {6 + r}")])
    top = str(tmp_path / "a.h5")
    write_top_file(top, parts)
    want = [f"rank{r} é{i}" for r in range(2) for i in range(3)]
    skipped = [(6, "OSError: item 6"), (7, "OSError: item 7")]
    with open_store(top) as s:
        assert s.target("task").tolist() == want and s.skipped() == skipped
        assert "skipped_at" not in s.file.attrs  # a part's own counts stay in it
    merge(top, str(tmp_path / "m.h5"))
    with open_store(tmp_path / "m.h5") as s:
        assert s.target("task").tolist() == want and s.index().tolist() == [0, 2, 4, 1, 3, 5] and s.skipped() == skipped


def _extraction(out, layers, size=48, **kw):
    import torch

    from marstore.extract import extract_from
    from marstore.models import policy_forward, synthetic_video_actions, video_mar

    torch.manual_seed(0)
    model = video_mar(task_name="t", embed_dim=32, depth=2, decoder_depth=2, num_heads=2, drop_masked=True)
    return extract_from(model, synthetic_video_actions(size=size), str(out), layers, forward=policy_forward,
                        targets=["nactions", "label"], batch_size=8, progress=False, dataset_name="synthetic", **kw)


def test_join_gives_one_store_of_the_layers_of_two_extractions(tmp_path, capsys):
    from marstore.cli import main
    from marstore.probe import ProbeOptions, run_probes
    from marstore.scaleout import join_layers

    folder = tmp_path / "run"
    folder.mkdir()
    _extraction(folder / "enc.h5", ["encoder_blocks.*"])  # ragged: the encoder drops masked tokens
    _extraction(folder / "dec.h5", ["decoder_blocks.1", "decoder_norm"], reduction="mean")
    assert join_layers(str(folder / "all.h5"), [str(folder / "enc.h5"), str(folder / "dec.h5")]) == [
        "encoder_blocks.0", "encoder_blocks.1", "decoder_blocks.1", "decoder_norm"]
    os.rename(folder, tmp_path / "moved")  # the sources are named relative to the joined store
    folder = tmp_path / "moved"
    with open_store(folder / "all.h5") as joined, open_store(folder / "enc.h5") as enc, open_store(folder / "dec.h5") as dec:
        assert (joined.status, joined.rows) == ("complete", 48)
        for source in (enc, dec):
            for name, layer in source.layers.items():
                got, want = joined.read(name), source.read(name)
                assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want)) and len(got) == len(want)
                kept = joined.layers[name].attrs
                assert kept["joined_from"] == os.path.basename(source.path)
                assert np.array_equal(kept["mean"], layer.attrs["mean"]) and kept["reduction"] == layer.attrs["reduction"]
        assert joined.layers["encoder_blocks.0"].layout == "ragged"
        assert np.array_equal(joined.index(), enc.index()) and joined.target("label").tobytes() == dec.target("label").tobytes()
        assert [j["path"] for j in joined.metadata["joined"]] == ["enc.h5", "dec.h5"]
        assert joined.metadata["joined"][1]["run"]["layers"][0]["name"] == "decoder_blocks.1"
        # each layer's extraction: its hooks' options (a probe file records them for LiveProbes)
        assert joined.run_of("decoder_norm") == dec.metadata and joined.run_of("encoder_blocks.1") == enc.metadata
        assert [spec["name"] for spec in joined.metadata["layers"]] == list(joined.layers)
    assert main(["info", str(folder / "all.h5")]) == 0
    assert "(from float32, reduction mean) virtual, in dec.h5;" in capsys.readouterr().out
    report = run_probes(ProbeOptions(store=str(folder / "all.h5"), target="label", out=str(tmp_path / "p"), progress=False,
                                     control=False))
    assert [e["layer"] for e in report["layers"]] == ["encoder_blocks.0", "encoder_blocks.1", "decoder_blocks.1", "decoder_norm"]
    assert main(["merge", str(folder / "all.h5"), "--out", str(tmp_path / "one.h5")]) == 0  # one self-contained file
    with open_store(tmp_path / "one.h5") as one, open_store(folder / "dec.h5") as dec:
        assert one.read("decoder_norm").tobytes() == dec.read("decoder_norm").tobytes()


def test_join_refuses_stores_of_other_samples_or_the_same_layers_in_one_line(tmp_path, capsys):
    from marstore.cli import main
    from marstore.scaleout import join_layers
    from marstore.store import LayerSpec, StoreError, StoreWriter, TargetSpec

    def store(name, layer, index, y=None):
        path = str(tmp_path / name)
        with StoreWriter(path, [LayerSpec(layer, (4,))], [TargetSpec("y", (), "int64")]) as writer:
            n = len(index)
            writer.append({layer: np.ones((n, 4), np.float16)}, targets={"y": np.arange(n) if y is None else y},
                          index=np.asarray(index))
        return path

    a = store("a.h5", "h1", range(10))
    cases = [
        ([a, store("b.h5", "h2", range(12))], r"b\.h5 holds other samples than .*a\.h5 \(12 rows against 10\); join stores "
                                             r"extracted from the same samples in the same order"),
        ([a, store("c.h5", "h2", [0, 1, 2, 3, 4, 5, 6, 9, 8, 7])], r"c\.h5 holds other samples .*\(row 7 is sample 9 against 7\)"),
        ([a, store("d.h5", "h1", range(10))], r"d\.h5 and .*a\.h5 both hold layer 'h1'; join stores of different layers"),
        ([a, store("e.h5", "h2", range(10), y=np.arange(10) % 3)], r"target 'y' differs between .*a\.h5 and .*e\.h5"),
        ([a], r"join: give two or more stores"),
    ]
    for paths, message in cases:
        with pytest.raises(StoreError, match=message):
            join_layers(str(tmp_path / "j.h5"), paths)
    assert not os.path.exists(tmp_path / "j.h5")
    with h5py.File(tmp_path / "a.h5", "r+", locking=False) as f:
        f.attrs["status"] = "incomplete"
    assert main(["join", a, store("f.h5", "h2", range(10)), "--out", str(tmp_path / "j.h5")]) == 2
    assert capsys.readouterr().err == f"marstore join: {a} is incomplete (10 committed rows): finish it (--resume) before joining\n"
