"""The store: format, dtypes, ragged layers, validation, kills, resume, concurrent reads, disk errors."""

import dataclasses
import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import torch

from helpers.store_worker import BATCH_ROWS, COMMIT_ROWS, LAYERS, TARGETS, make_batch
import marstore.store
from marstore import ops
from marstore.dataset import ActivationDataset
from marstore.store import COMMITTED_LAYER_KEYS, LayerSpec, Ragged, _Moments, _WriterLock, StoreError, as_ragged, convert_to_ragged, check_not_being_written, StoreWriteError, StoreWriter, TargetSpec, TEXT, open_store

TESTS = os.path.dirname(__file__)


def worker(path, *args, **popen):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.path.dirname(TESTS)]))
    return subprocess.Popen([sys.executable, "-m", "helpers.store_worker", str(path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def expected_rows(rows: int) -> dict:
    """What the first `rows` rows of a store written by store_worker must hold."""
    acts, targets, index = {}, {}, []
    # at least one batch, cut to none where a kill came before the first commit (empty arrays of its shapes)
    parts = [make_batch(i) for i in range(max(1, -(-rows // BATCH_ROWS)))]
    for name in ("encoder_blocks.0", "encoder_blocks.1", "proj"):
        acts[name] = np.concatenate([p[0][name] for p in parts])[:rows]
    ragged = [np.split(p[0]["encoder_norm"].values, np.cumsum(p[0]["encoder_norm"].lengths)[:-1]) for p in parts]
    acts["encoder_norm"] = [x for r in ragged for x in r][:rows]
    for name in ("action", "label"):
        targets[name] = np.concatenate([p[1][name] for p in parts])[:rows]
    index = np.concatenate([p[2] for p in parts])[:rows]
    return {"acts": acts, "targets": targets, "index": index}


def assert_store_holds(path, rows):
    exp = expected_rows(rows)
    with open_store(path) as s:
        assert s.rows == rows
        for name in ("encoder_blocks.0", "encoder_blocks.1", "proj"):
            assert s.read(name).tobytes() == exp["acts"][name].tobytes()
        got = s.read("encoder_norm")
        assert len(got) == rows and all(a.tobytes() == b.tobytes() for a, b in zip(got, exp["acts"]["encoder_norm"]))
        for name in ("action", "label"):
            assert s.target(name).tobytes() == exp["targets"][name].astype(s.targets[name].dtype).tobytes()
        assert s.index().tolist() == exp["index"].tolist()


def write_all(path, batches=12, **kw):
    with StoreWriter(path, LAYERS, TARGETS, {"model": "tests.helpers.store_worker", "command": "test"},
                     commit_rows=COMMIT_ROWS, **kw) as w:
        for i in range(batches):
            acts, targets, index = make_batch(i)
            w.append(acts, targets=targets, index=index)


def test_expected_rows_bound_the_chunks_and_the_store_grows_past_them(tmp_path):
    # 100 rows expected, 128 written: the chunks that hold rows (not token rows) are 100 long
    write_all(tmp_path / "s.h5", batches=4, expected_rows=100)
    assert_store_holds(tmp_path / "s.h5", 128)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        chunks = {name: f[name].chunks for name in ("activations/encoder_blocks.0", "activations/encoder_blocks.1",
                                                    "activations/proj", "activations/encoder_norm/values",
                                                    "activations/encoder_norm/offsets", "targets/action",
                                                    "targets/label", "index")}
    assert chunks == {
        "activations/encoder_blocks.0": (64, 48),  # chunk_rows given: kept
        "activations/encoder_blocks.1": (20, 6, 8),
        "activations/proj": (100, 8),  # 1 MiB would be 65536 rows
        "activations/encoder_norm/values": (100, 16),  # token rows: chunk_rows given
        "activations/encoder_norm/offsets": (101,),
        "targets/action": (100, 4, 2),
        "targets/label": (100,),
        "index": (100,),
    }
    write_all(tmp_path / "big.h5", batches=4)
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert (f["activations/proj"].chunks, f["index"].chunks, f["targets/label"].chunks) == ((65536, 8), (65536,), (131072,))


def test_format_read_back_with_plain_h5py(tmp_path):
    path = tmp_path / "s.h5"
    write_all(path, batches=4)
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert (a["format"], a["format_version"], a["status"], a["rows"]) == ("marstore", 1, b"complete", 128)
        # the strings that commits rewrite are fixed-length, which h5py reads as bytes
        assert a.get_id("status").dtype == "S10" and a.get_id("committed_at").dtype == "S32"
        assert a["committed_at"].decode().endswith("+00:00")
        assert f["layer_state/encoder_blocks.0"].shape == (2, 1 + 2 + 3 * 48) and f["layer_state/encoder_blocks.0"][0, 0] == 128
        assert json.loads(a["run"]) == {"command": "test", "model": "tests.helpers.store_worker"}
        assert [layer["name"] for layer in json.loads(a["layers"])] == [s.name for s in LAYERS]
        assert a["torch_version"] == str(torch.__version__)
        dense = f["activations/encoder_blocks.0"]
        assert dense.dtype == np.float16 and dense.shape == (128, 48) and dense.chunks == (64, 48)
        assert dense.maxshape == (None, 48)
        assert dense.attrs["layout"] == "dense" and dense.attrs["nonfinite"] == 1  # one inf, in batch 0
        assert f["activations/encoder_blocks.1"].dtype == np.float32
        bits = f["activations/proj"]
        assert bits.dtype == np.uint16 and bits.attrs["encoding"] == "bfloat16-bits"
        ragged = f["activations/encoder_norm"]
        assert ragged.attrs["layout"] == "ragged" and ragged["offsets"][0] == 0
        assert ragged["offsets"].shape == (129,) and ragged["values"].shape == (ragged["offsets"][128], 16)
        assert f["targets/label"].dtype == np.int64 and f["targets/action"].shape == (128, 4, 2)
        assert f["index"][:5].tolist() == [0, 7, 14, 21, 28]
        assert not any(isinstance(v, np.void) for v in a.values())  # nothing pickled or opaque
    assert_store_holds(path, 128)
    raw = path.read_bytes()
    # the earliest superblock (version 0: nothing marks the file open for writing), HDF5 1.10's
    # objects: version 2 headers and extensible-array chunk indexes, whose entries never move
    assert raw[8] == 0 and b"OHDR" in raw and b"EAHD" in raw


def test_statistics_per_channel_over_finite_values(tmp_path):
    path = tmp_path / "s.h5"
    write_all(path, batches=5)
    exp = expected_rows(160)["acts"]["encoder_blocks.0"].astype(np.float64)
    exp[~np.isfinite(exp)] = np.nan
    with h5py.File(path, "r") as f:
        a = f["activations/encoder_blocks.0"].attrs
        # float32 partial sums within a batch: agreement to about 1e-7 of the values' scale (3)
        np.testing.assert_allclose(a["mean"], np.nanmean(exp, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["std"], np.nanstd(exp, 0), rtol=1e-6)
        assert a["stats_count"].tolist()[0] == 159 and a["stats_count"].tolist()[1] == 160


def test_dtypes_from_torch_tensors(tmp_path):
    path = tmp_path / "s.h5"
    x = torch.randn(10, 4, dtype=torch.bfloat16)
    specs = [LayerSpec("bf", (4,), dtype="bfloat16"), LayerSpec("f32", (4,), dtype="float32"), LayerSpec("f16", (4,))]
    targets = [TargetSpec(n, (), n) for n in ("int8", "uint8", "int32", "float64", "bool")]
    f32 = x.float()
    kept = f32.clone()
    with StoreWriter(path, specs, targets) as w:
        w.append({"bf": x, "f32": f32, "f16": x.half()},
                 targets={t.name: np.arange(10).astype(t.name) for t in targets}, index=range(10))
    assert torch.equal(f32, kept)  # the caller's buffers are read, never changed
    with open_store(path) as s:
        assert s.read("bf").tobytes() == x.view(torch.int16).numpy().tobytes()
        assert torch.equal(torch.from_numpy(s.read("bf").view(np.int16)).view(torch.bfloat16), x)
        assert s.read("f32").tobytes() == x.float().numpy().tobytes()
        assert {n: s.targets[n].dtype for n in s.targets} == {t.name: np.dtype(t.name) for t in targets}


def test_text_targets_hold_strings_of_any_length_and_refuse_anything_else(tmp_path):
    path = tmp_path / "s.h5"
    text = ["push", "", "place the cup é中", "x" * 5000]
    with StoreWriter(path, [LayerSpec("a", (2,))], [TargetSpec("task", (), TEXT), TargetSpec("words", (2,), TEXT)]) as w:
        w.append({"a": np.zeros((4, 2), np.float16)}, index=range(4),
                 targets={"task": text, "words": np.array([["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]])})
        with pytest.raises(StoreError) as info:
            w.append({"a": np.zeros((2, 2), np.float16)}, index=[4, 5], targets={"task": ["ok", 3], "words": [["a", "b"]] * 2})
    assert str(info.value) == "target 'task' holds text, and this batch has a int (3) among its strings"
    with open_store(path) as s:
        assert s.rows == 4 and s.target("task").tolist() == text
        assert s.target("words").tolist() == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    with pytest.raises(StoreError) as info:
        TargetSpec("z", (), "complex64")
    assert str(info.value) == "target 'z': dtype 'complex64' is neither numeric nor 'str'"


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression(tmp_path, compression):
    path = tmp_path / "s.h5"
    x = np.zeros((300, 64), np.float16)
    with StoreWriter(path, [LayerSpec("a", (64,), compression=compression)]) as w:
        w.append({"a": x}, index=range(300))
    with open_store(path) as s:
        assert s.layers["a"].compression == compression and s.read("a").tobytes() == x.tobytes()


def test_ragged_from_equal_token_batches(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path, [LayerSpec("enc", (3,), ragged=True)]) as w:
        for t in (5, 2, 0, 7):  # MAR's encoder: a token count per batch
            w.append({"enc": np.full((4, t, 3), t, np.float16)}, index=range(4))
        # a nested tensor's samples, padded to the most tokens: each sample's first tokens are kept
        padded = np.arange(4 * 6 * 3, dtype=np.float16).reshape(4, 6, 3)
        w.append({"enc": padded}, index=range(4, 8), lengths={"enc": [6, 0, 2, 5]})
    with open_store(path) as s:
        rows = s.read("enc")
        assert [r.shape[0] for r in rows] == [5] * 4 + [2] * 4 + [0] * 4 + [7] * 4 + [6, 0, 2, 5]
        assert all((r == r.shape[0]).all() for r in rows[:16])
        assert [r.tobytes() for r in rows[16:]] == [padded[i, :n].tobytes() for i, n in enumerate([6, 0, 2, 5])]
        assert [r.shape[0] for r in s.read("enc", 3, 6)] == [5, 2, 2]
        assert s.file["activations/enc/offsets"][-5:].tolist() == [56, 62, 62, 64, 69]


BAD_APPENDS = [
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16)}, index=[0, 1]),
     "batch layers do not match the store: missing ['r'], unexpected []"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 1, 4), np.float16), "x": 1}, index=[0, 1]),
     "unexpected ['x']"),
    (lambda w: w.append({"a": np.zeros((2, 9), np.float16), "r": np.zeros((2, 1, 4), np.float16)}, index=[0, 1]),
     "layer 'a': batch shape (2, 9), expected (2, 8)"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float32), "r": np.zeros((2, 1, 4), np.float16)}, index=[0, 1]),
     "layer 'a': batch dtype float32, the store keeps float16"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": Ragged(np.zeros((3, 4), np.float16), [1, 1, 1])}, index=[0, 1]),
     "layer 'r': 3 samples, but index has 2"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 1, 4), np.float16)}),
     "append() needs the source index of every row"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 3, 4), np.float16)}, index=[0, 1],
                        lengths={"r": [1, 4]}),
     "ragged layer 'r': token counts [1, 4] for a padded batch of shape (2, 3, 4) (one count a sample, 0 to 3)"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 3, 4), np.float16)}, index=[0, 1],
                        lengths={"r": [1]}),
     "ragged layer 'r': token counts [1] for a padded batch of shape (2, 3, 4) (one count a sample, 0 to 3)"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 3, 4), np.float16)}, index=[0, 1],
                        lengths={"a": [1, 1]}),
     "layer 'a' is dense; per-sample token counts need a layer made with ragged=True"),
    (lambda w: w.append({"a": np.zeros((2, 8), np.float16), "r": np.zeros((2, 3, 4), np.float16)}, index=[0, 1],
                        lengths={"x": [1, 1]}),
     "token counts for layers not in the batch: ['x']"),
]


def test_a_target_whose_length_changes_between_batches_is_refused_with_the_fix(tmp_path):
    """Labels padded to each batch's longest sentence: the layers' tokens become ragged, the
    target cannot; the error says so and what to do, and the rows before it stay."""
    with StoreWriter(tmp_path / "s.h5", [LayerSpec("a", (8,))], [TargetSpec("labels", (11,), "int64")]) as w:
        w.append({"a": np.ones((2, 8), np.float16)}, targets={"labels": np.zeros((2, 11), np.int64)}, index=[0, 1])
        with pytest.raises(StoreError) as info:
            w.append({"a": np.ones((2, 8), np.float16)}, targets={"labels": np.zeros((2, 10), np.int64)}, index=[2, 3])
    assert str(info.value) == (
        "target 'labels': rows of shape (10,) in this batch, (11,) in the store; a target keeps one shape a row (a batch "
        "padded to its longest item has another length each time): pad it to one length (in --collate, or the "
        "tokenizer's max_length), or leave it out of --targets")
    with open_store(tmp_path / "s.h5") as s:
        assert s.rows == 2


@pytest.mark.parametrize("call,message", BAD_APPENDS, ids=[m[:30] for _, m in BAD_APPENDS])
def test_bad_batches_are_refused_in_the_callers_thread(tmp_path, call, message):
    with StoreWriter(tmp_path / "s.h5", [LayerSpec("a", (8,)), LayerSpec("r", (4,), ragged=True)]) as w:
        with pytest.raises(StoreError) as info:
            call(w)
        assert message in str(info.value)
        w.append({"a": np.ones((2, 8), np.float16), "r": np.ones((2, 1, 4), np.float16)}, index=[5, 6])
    with open_store(tmp_path / "s.h5") as s:  # nothing of the refused batches was written
        assert s.rows == 2 and s.index().tolist() == [5, 6]


def test_varying_token_count_in_a_dense_layer_says_ragged(tmp_path):
    with StoreWriter(tmp_path / "s.h5", [LayerSpec("enc", (70, 8))]) as w:
        with pytest.raises(StoreError, match=r"batch shape \(2, 64, 8\), expected \(2, 70, 8\); if this layer's token count varies"):
            w.append({"enc": np.zeros((2, 64, 8), np.float16)}, index=[0, 1])


def test_existing_file_needs_resume_and_matching_layers(tmp_path):
    path = tmp_path / "s.h5"
    write_all(path, batches=1)
    with pytest.raises(StoreError, match="exists; pass resume=True"):
        StoreWriter(path, LAYERS, TARGETS)
    with pytest.raises(StoreError, match=r"written with other layers than this writer's; recorded \['encoder_blocks.0', "
                                         r"'encoder_blocks.1', 'proj', 'encoder_norm'\], asked \['encoder_blocks.0', 'encoder_blocks.1'\]$"):
        StoreWriter(path, LAYERS[:2], TARGETS, resume=True)
    other = [LAYERS[0], dataclasses.replace(LAYERS[1], dtype="float16", channel_axis=0), *LAYERS[2:]]
    with pytest.raises(StoreError, match=r"written with other layers than this writer's; encoder_blocks.1: channel_axis "
                                         r"recorded None, asked 0, dtype recorded 'float32', asked 'float16'$"):
        StoreWriter(path, other, TARGETS, resume=True)


def test_a_resume_that_fails_lets_go_of_the_store(tmp_path, monkeypatch):
    """A resume that failed after it opened the file (in dropping the rows past the last commit)
    kept the file open and its lock held, and every later resume in the process was refused as
    'being written by another process'."""
    path = tmp_path / "s.h5"
    write_all(path, batches=1)

    def fail(self):
        raise OSError("Unable to synchronously change a dataset's dimensions")

    monkeypatch.setattr(StoreWriter, "_restore_state", fail)
    with pytest.raises(OSError, match="change a dataset's dimensions"):
        StoreWriter(path, LAYERS, TARGETS, resume=True)
    monkeypatch.undo()
    check_not_being_written(path)
    with StoreWriter(path, LAYERS, TARGETS, resume=True, background=False) as w:
        assert w.committed == BATCH_ROWS


def test_a_store_in_a_folder_that_is_not_there_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "gone" / "s.h5")
    with pytest.raises(StoreError) as info:
        StoreWriter(path, LAYERS, TARGETS)
    assert str(info.value) == f"{path}: cannot create it for writing (No such file or directory)"

def test_an_unknown_layer_or_target_is_named_in_one_line(tmp_path):
    path = tmp_path / "s.h5"
    write_all(path, batches=1)
    with open_store(path) as s:
        with pytest.raises(StoreError) as info:
            s.target("actions")
        assert str(info.value) == f"{path} has no target 'actions'; it has ['action', 'label']"
        with pytest.raises(StoreError, match=r"has no layer 'proj2'; it has \['encoder_blocks.0', "):
            s.read("proj2")

def test_a_store_that_cannot_be_made_leaves_no_file(tmp_path, monkeypatch):
    """A duplicate target used to fail halfway through creating the file and leave one that no
    tool would open as a store."""
    path = tmp_path / "s.h5"
    with pytest.raises(StoreError) as info:
        StoreWriter(path, LAYERS, TARGETS + [TargetSpec("label", (), "int64")])
    assert str(info.value) == "target names must be unique; ['label'] given more than once"
    import marstore.store as store

    def broken(*args):
        raise OSError("no room for the layer (simulated)")

    monkeypatch.setattr(store, "_create_layer", broken)
    with pytest.raises(OSError, match="simulated"):
        StoreWriter(path, LAYERS, TARGETS)
    assert os.listdir(tmp_path) == []


def test_writer_thread_error_reaches_the_caller(tmp_path, monkeypatch):
    w = StoreWriter(tmp_path / "s.h5", [LayerSpec("a", (8,))], commit_rows=2)

    def broken(*args):
        raise OSError("[Errno 28] No space left on device")

    w.append({"a": np.ones((2, 8), np.float16)}, index=[0, 1])
    w.flush()
    monkeypatch.setattr(w, "_write_rows", broken)
    w.append({"a": np.ones((2, 8), np.float16)}, index=[2, 3])
    with pytest.raises(StoreWriteError, match=r"writing .*s\.h5 failed while storing a batch of 32 bytes: \[Errno 28\] No space left"):
        for _ in range(50):
            w.append({"a": np.ones((2, 8), np.float16)}, index=[2, 3])
            time.sleep(0.01)
    with pytest.raises(StoreWriteError):
        w.close()
    with open_store(tmp_path / "s.h5") as s:
        assert s.rows == 2 and s.status == "incomplete"


def test_a_batch_appended_as_the_writer_fails_gives_its_error_once(tmp_path, monkeypatch, caplog):
    """The writer thread fails and closes the file between append()'s first check and its
    queueing (a CI run met this window): append() read a target's shape from a dataset of the
    closed file (RuntimeError from HDF5), and with the queue full close() waited for ever."""
    path = tmp_path / "s.h5"
    batch = {"a": np.ones((2, 8), np.float16)}
    w = StoreWriter(path, [LayerSpec("a", (8,))], [TargetSpec("y", (3,))], commit_rows=2, queue_batches=1)
    w.append(batch, targets={"y": np.zeros((2, 3))}, index=[0, 1])
    w.flush()

    def disk_full(*args):
        raise StoreError("disk full")

    monkeypatch.setattr(w, "_ensure_room", disk_full)
    w.append(batch, targets={"y": np.zeros((2, 3))}, index=[2, 3])
    w._thread.join(timeout=30)  # failed, drained its queue, closed the file
    real_check = w._raise_if_failed
    monkeypatch.setattr(w, "_raise_if_failed", lambda: None)  # append() checked before the writer failed
    w.append(batch, targets={"y": np.zeros((2, 3))}, index=[4, 5])  # fills the queue that nobody reads
    monkeypatch.setattr(w, "_raise_if_failed", real_check)
    caplog.clear()
    raised = []

    def close():
        try:
            w.close()
        except StoreWriteError as exc:
            raised.append(str(exc))

    closing = threading.Thread(target=close)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive() and raised == ["disk full"]
    with pytest.raises(StoreWriteError, match="^disk full$"):
        with StoreWriter(tmp_path / "t.h5", [LayerSpec("a", (8,))], commit_rows=2) as w:
            monkeypatch.setattr(w, "_ensure_room", disk_full)
            for i in range(100):
                w.append(batch, index=[2 * i, 2 * i + 1])
                time.sleep(0.01)
    assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == [f"store {w.path}: disk full"]
    with open_store(path) as s:
        assert (s.rows, s.status) == (2, "incomplete")


def test_exception_in_with_block_keeps_committed_rows_incomplete(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(path, [LayerSpec("a", (8,))]) as w:
            w.append({"a": np.ones((3, 8), np.float16)}, index=[0, 1, 2])
            raise KeyboardInterrupt
    with open_store(path) as s:
        assert (s.status, s.rows) == ("incomplete", 3)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_statistics_of_a_channel_without_finite_values_until_a_later_batch(dtype):
    rng = np.random.default_rng(7)
    batches = [rng.normal(3.0, 2.0, (64, 4)).astype(np.float32) for _ in range(4)]
    batches[0][:, 1] = np.nan  # channel 1: nothing finite in the first two batches
    batches[1][:, 1] = np.inf
    batches[2][5, 3] = -np.inf

    def stored(x):  # as the writer hands them over: float16, or bfloat16 as its uint16 bits
        if dtype == "bfloat16":
            return torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
        return x.astype(np.float16)

    def as_float(x):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).double().numpy() if dtype == "bfloat16" else x.astype(np.float64)

    moments = _Moments(4)
    nonfinite = [moments.update(stored(b)) for b in batches]
    assert nonfinite == [64, 64, 1, 0]
    values = np.concatenate([as_float(stored(b)) for b in batches])
    values[~np.isfinite(values)] = np.nan
    assert moments.count.tolist() == [256, 128, 256, 255]
    np.testing.assert_allclose(moments.mean, np.nanmean(values, 0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(moments.std(), np.nanstd(values, 0), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_small_batches_wait_to_be_summed_and_each_commit_records_exactly_its_rows(tmp_path, dtype):
    """Batches of (8, 6) are summed together later (each sum's bookkeeping costs more than
    such a batch); a commit sums what waits, so the committed statistics and non-finite counts
    cover exactly the committed rows, mid-run and at the end."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(0.5, 2.0, (8, 6)).astype(np.float32) for _ in range(7)]
    batches[2][1, 4] = np.inf
    batches[5][0, 0], batches[5][3, 0], batches[6][7, 5] = np.nan, -np.inf, np.nan
    stored = np.concatenate([torch.from_numpy(b).to(getattr(torch, dtype)).double().numpy() for b in batches])
    path = tmp_path / "s.h5"

    def check(rows):
        with open_store(path) as s:
            assert s.rows == rows
            a = s.layers["a"].attrs
            values = stored[:rows].copy()
            values[~np.isfinite(values)] = np.nan
            assert a["nonfinite"] == np.isnan(values).sum()
            assert list(a["stats_count"]) == (~np.isnan(values)).sum(0).tolist()
            np.testing.assert_allclose(a["mean"], np.nanmean(values, 0), rtol=0, atol=1e-6)
            np.testing.assert_allclose(a["std"], np.nanstd(values, 0), rtol=1e-6)

    with StoreWriter(path, [LayerSpec("a", (6,), dtype=dtype)], commit_rows=24, background=False) as w:
        for i, b in enumerate(batches):
            w.append({"a": torch.from_numpy(b).to(getattr(torch, dtype))}, index=range(8 * i, 8 * i + 8))
            if i == 3:
                check(24)  # committed after the third batch, which held the first non-finite value
    check(56)


def test_a_non_finite_value_leaves_the_other_channels_statistics_bit_identical():
    """The common case (every sum finite) and the recomputing one agree to the bit."""
    rng = np.random.default_rng(8)
    batches = [rng.normal(0.5, 1.0, (32, 6)).astype(np.float16) for _ in range(3)]
    clean, spoiled = _Moments(6), _Moments(6)
    for i, b in enumerate(batches):
        clean.update(b)
        b = b.copy()
        if i == 1:
            b[7, 2] = np.nan
        spoiled.update(b)
    keep = [0, 1, 3, 4, 5]
    for a, b in ((clean.count, spoiled.count), (clean.mean, spoiled.mean), (clean.m2, spoiled.m2)):
        assert a[keep].tobytes() == b[keep].tobytes()
    assert spoiled.count[2] == 95


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32])
def test_one_call_statistics_update_gives_the_numpy_paths_bits(monkeypatch, dtype):
    """ops.moments_update (the extension's one call) and the numpy combination, from the same
    sums: identical count, mean and M2, through a batch that only the numpy path can take."""
    if ops._C is None:
        pytest.skip("extension not built")
    rng = np.random.default_rng(11)
    batches = [rng.normal(2.0, 3.0, (rows, 16)).astype(np.float32) for rows in rng.integers(1, 300, 40)]
    batches[2][4, 9] = np.nan

    def stored(x):
        if dtype == "bfloat16":
            return torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
        return x.astype(dtype)

    def run() -> _Moments:
        moments = _Moments(16)
        assert [moments.update(stored(b)) for b in batches] == [0, 0, 1] + [0] * 37
        return moments

    one_call = run()
    calls = []
    monkeypatch.setattr(ops, "moments_update", lambda *args: calls.append(1) or False)
    numpy_only = run()
    assert len(calls) == 39  # every batch after the first (which has no running mean to shift by)
    for a, b in ((one_call.count, numpy_only.count), (one_call.mean, numpy_only.mean), (one_call.m2, numpy_only.m2)):
        assert a.tobytes() == b.tobytes()
    rows = sum(len(b) for b in batches)
    assert one_call.count.tolist() == [rows] * 9 + [rows - 1] + [rows] * 6


def test_a_layer_whose_hdf5_object_is_damaged_is_named(tmp_path):
    """A kill during a flush can leave a layer's link to an object that HDF5 cannot open (seen
    once in the kill test below): the error named no layer ("'NoneType' object has no attribute
    'attrs'")."""
    path = tmp_path / "s.h5"
    write_all(path, batches=3)
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["activations/encoder_blocks.1"].id).addr
    with open(path, "r+b") as f:  # its object header, zeroed
        f.seek(header)
        f.write(bytes(64))
    with pytest.raises(StoreError) as info:
        open_store(path, retries=0)
    assert str(info.value) == (f"{path}: activations 'encoder_blocks.1' cannot be opened (the file's HDF5 objects are "
                               "damaged: a writer killed while it flushed?)")


def test_killed_writer_leaves_committed_rows_and_resumes_identically(tmp_path):
    """SIGKILL at 12 seeded random moments; every time the file opens (marstore and plain
    h5py), shows 'incomplete', holds exactly its committed rows; resuming finishes a store
    identical, dataset by dataset, to an uninterrupted one."""
    batches = 60
    reference = tmp_path / "reference.h5"
    p = worker(reference, "--batches", str(batches))
    assert p.wait(timeout=120) == 0, p.stderr.read()
    path = tmp_path / "killed.h5"
    rng = random.Random(20261126)
    seen_rows = []
    for kill in range(12):
        # 20 ms a batch: the writer alone finishes the 60 batches well inside the 0.25 s kill
        # window, and the kills would then mostly land after the end instead of mid-run
        p = worker(path, "--batches", str(batches), "--sleep", "0.02", *(["--resume"] if kill else []))
        assert p.stdout.readline().startswith("ready"), p.stderr.read()
        time.sleep(rng.uniform(0.0, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
        with h5py.File(path, "r") as f:  # plain h5py, no repair tool
            rows = int(f.attrs["rows"])
            assert f.attrs["status"] in (b"incomplete", b"complete")
        assert rows % COMMIT_ROWS == 0 or rows == batches * BATCH_ROWS
        assert_store_holds(path, rows)
        if rows < batches * BATCH_ROWS:
            assert open_store(path).status == "incomplete"
        seen_rows.append(rows)
    p = worker(path, "--batches", str(batches), "--resume")
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert len(set(seen_rows)) > 3, seen_rows  # the kills landed at different moments
    with h5py.File(reference, "r") as a, h5py.File(path, "r") as b:
        names = []
        a.visit(names.append)
        other = []
        b.visit(other.append)
        assert names == other
        for name in names:
            if isinstance(a[name], h5py.Dataset):
                assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
                assert a[name][()].tobytes() == b[name][()].tobytes(), name
            skip = {"created", "committed_at"}
            assert {k: np.asarray(v).tolist() for k, v in a[name].attrs.items() if k not in skip} == \
                   {k: np.asarray(v).tolist() for k, v in b[name].attrs.items() if k not in skip}, name
        assert b.attrs["status"] == b"complete" and b.attrs["rows"] == batches * BATCH_ROWS


def test_a_kill_between_the_statistics_and_the_row_count_resumes_identically(tmp_path):
    """HDF5 writes a flush's attributes one by one: a kill in a commit's second flush can leave
    the layers' statistics of the new rows on disk and the root's row count old. A resume that
    reloaded those statistics counted the rows after the old count twice (seen once in twelve
    runs of the kill test above, under load)."""
    from helpers.store_worker import METADATA

    reference = tmp_path / "reference.h5"
    assert worker(reference, "--batches", "12").wait(timeout=120) == 0
    path = tmp_path / "killed.h5"
    w = StoreWriter(path, LAYERS, TARGETS, METADATA, commit_rows=COMMIT_ROWS, background=False)
    for i in range(6):  # commits at 96 and 192 rows
        acts, targets, index = make_batch(i)
        w.append(acts, targets=targets, index=index)
    assert w.committed == 2 * COMMIT_ROWS
    w._file.attrs["rows"] = COMMIT_ROWS  # the second commit's count never reached the disk
    w._file.close()  # the process dies
    w._lock.release()
    # a reader (marstore info, the training set's normalisation) sees the statistics of the
    # committed rows, as a store of those rows alone holds them
    first = tmp_path / "first.h5"
    assert worker(first, "--batches", "3").wait(timeout=120) == 0
    with open_store(path) as torn, h5py.File(first, "r") as f:
        assert torn.rows == COMMIT_ROWS
        for name in LAYERS:
            got = {k: torn.layers[name.name].attrs[k] for k in COMMITTED_LAYER_KEYS}
            assert got == {k: np.asarray(f["activations"][name.name].attrs[k]).tolist() for k in COMMITTED_LAYER_KEYS}
            assert got["mean"] != torn.file["activations"][name.name].attrs["mean"].tolist()  # a commit ahead
    assert worker(path, "--batches", "12", "--resume").wait(timeout=120) == 0
    with h5py.File(reference, "r") as a, h5py.File(path, "r") as b:
        for name in LAYERS:
            attrs = [{k: np.asarray(v).tolist() for k, v in f["activations"][name.name].attrs.items()} for f in (a, b)]
            assert attrs[0] == attrs[1], name.name


class _WriteLog(io.RawIOBase):
    """A file that HDF5 writes through (h5py's file-object driver), keeping each write in order."""

    def __init__(self, path, mode, writes):
        self.file, self.writes = open(path, mode), writes

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def readinto(self, b):
        return self.file.readinto(b)

    def write(self, b):
        self.writes.append((self.file.tell(), bytes(b)))
        return self.file.write(b)

    def truncate(self, size=None):
        size = self.file.tell() if size is None else size
        self.writes.append((size, None))
        return self.file.truncate(size)


def recording_opens(path, writes, flushes=None):
    """h5py.File that logs the writes of a writer's opens of path ("w", then "r+") in writes, and
    the number of writes at each of its flushes in flushes."""
    real_file = h5py.File

    def open_file(name, mode="r", **kw):
        if os.fspath(name) != os.fspath(path) or mode not in ("w", "r+"):
            return real_file(name, mode, **kw)
        kw.pop("locking")

        class Flushes(real_file):
            def flush(self):
                super().flush()
                if flushes is not None:
                    flushes.append(len(writes))

        return Flushes(_WriteLog(name, "w+b" if mode == "w" else "r+b", writes), mode, **kw)

    return open_file


def committed_layer_bytes(store):
    """Each layer's committed rows as bytes (a ragged layer's samples one after another)."""
    return {n: b"".join(r.tobytes() for r in store.read(n, 0, store.rows)) if store.layers[n].layout == "ragged"
            else store.read(n, 0, store.rows).tobytes() for n in store.layers}


def torn_files(writes, torn, image=b""):
    """Writes each prefix of writes, applied to the file image, to the path torn, in turn, and
    yields the number of writes it holds: the files a kill at each write leaves."""
    image = bytearray(image)
    for n, (offset, data) in enumerate(writes, 1):
        if data is None:
            del image[offset:]
        else:
            image[len(image) : offset + len(data)] = bytes(max(0, offset + len(data) - len(image)))
            image[offset : offset + len(data)] = data
        torn.write_bytes(image)
        yield n


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_a_kill_at_any_write_leaves_a_store_that_opens_with_its_committed_rows(tmp_path, monkeypatch, caplog, compression):
    """A killed process leaves the writes it made, in their order (the page cache keeps them), and
    no other: every prefix of a writer's writes, from its first flush on, must open as a store
    holding exactly its committed rows, attributes and statistics readable, and resume to the
    same store. HDF5 writes a flush's metadata in address order, not in the order it depends on;
    commits that added or replaced attributes, rewrote strings or made objects left about half of
    these prefixes unopenable (a layer's header pointing at a block not yet written). Each prefix
    is resumed: it writes the superblock last, and 4 prefixes of 265 refused the resume's writes
    past the end of allocation it recorded; an output first seen after the first commit left 15
    whose /outputs did not read. Compressed layers left 114 of 269 prefixes whose committed rows
    did not read (HDF5 moved their part-filled chunk at each commit): see LAYER_TAIL. HDF5 grows
    the heap of a text target's strings where it ends the file, so a kill in that flush can leave
    them past the end the superblock records (4 of 273 prefixes here, with lzf): a killed
    writer's store is read through a view that moves that end (open_for_reading), and the
    resume mends the file."""
    path = tmp_path / "recorded.h5"
    writes, flushes = [], []
    targets = TARGETS + [TargetSpec("caption", (), TEXT)]
    batches = []
    for i in range(10):
        acts, target, index = make_batch(i)
        target["caption"] = np.array([f"item {j} " * (j % 5) for j in index], dtype=object)
        # "extra" first seen after the first commit, and missing from some batches after
        outputs = {"loss": float(i), **({"extra": 1.0} if i in (5, 9) else {})}
        batches.append((acts, target, index, outputs, [(10**6 + i, f"OSError: {i}")] if i % 4 == 2 else []))

    layers = [dataclasses.replace(layer, compression=compression) for layer in LAYERS]

    def write(to, resume=False):
        with StoreWriter(to, layers, targets, {"model": "test"}, commit_rows=COMMIT_ROWS, background=False, resume=resume) as w:
            for acts, target, index, outputs, skipped in batches[w.committed // BATCH_ROWS :]:
                w.append(acts, targets=target, index=index, outputs=outputs, skipped=skipped)

    with monkeypatch.context() as m:
        m.setattr(h5py, "File", recording_opens(path, writes, flushes))
        write(path)
    created = flushes[0]
    # created; each output's dataset made (two); 3 commits; the last, then "complete"
    assert len(writes) > 150 and len(flushes) == 1 + 2 + 2 * 3 + 3

    def contents(store, rows=None):
        rows = store.rows if rows is None else rows
        layers = {n: [x.tobytes() for x in store.read(n, 0, rows)] if store.layers[n].layout == "ragged"
                  else store.read(n, 0, rows).tobytes() for n in store.layers}
        attrs = {n: {k: np.asarray(v).tolist() for k, v in store.layers[n].attrs.items()} for n in store.layers}
        return (layers, {n: store.target(n, 0, rows).tolist() for n in store.targets}, store.index(0, rows).tolist(),
                {k: v.tobytes() for k, v in store.outputs().items() if not np.isnan(v).all()}, store.skipped(), attrs)

    with open_store(path) as full:
        assert full.rows == 320 and full.skipped() == [(10**6 + 2, "OSError: 2"), (10**6 + 6, "OSError: 6")]
        expected = contents(full)
    seen, viewed, strings_past_end = {}, 0, 0
    torn = tmp_path / "torn.h5"
    for n in torn_files(writes, torn):
        if n < created:
            continue
        caplog.clear()
        marstore.store._VIEWED.clear()  # said once a process: each prefix says it
        with open_store(torn, retries=0) as store:
            rows, got = store.rows, contents(store)
        if "read through a view that moves that end" in caplog.text:
            viewed += 1
            with h5py.File(torn, "r", locking=False) as f:  # what a plain open reads
                try:
                    f["targets/caption"].asstr()[:rows]
                    plain_reads = True
                except OSError as exc:
                    assert "exceeds EOA" in str(exc)
                    plain_reads = False
            if not plain_reads:
                strings_past_end += 1
                training = ActivationDataset(torn, "proj", "caption")  # its own handle, per process
                assert [training[i]["caption"] for i in range(rows)] == [f"item {7 * r} " * (7 * r % 5) for r in range(rows)]
                held = _WriterLock(str(torn), create=False)  # as a running writer, mid-flush, leaves it
                try:
                    with open_store(torn, retries=0) as store, pytest.raises(StoreError) as info:
                        store.target("caption")
                    assert str(info.value) == (f"{torn}: the strings of target 'caption' lie past the end the file "
                                               "records, as its writer leaves them while it flushes; open the store again")
                finally:
                    held.release()
        assert rows % COMMIT_ROWS == 0 or rows == 320, (n, rows)
        # the statistics of exactly the committed rows, which a store of those rows alone holds
        if rows not in seen:
            shorter = tmp_path / f"rows{rows}.h5"
            batches_kept, batches[rows // BATCH_ROWS :] = batches[rows // BATCH_ROWS :], []
            write(shorter)
            batches.extend(batches_kept)
            with open_store(shorter) as store:
                seen[rows] = contents(store)
        assert got == seen[rows], (n, rows)
        write(torn, resume=True)  # HDF5 writes the superblock last in a flush: see _raise_end_of_allocation
        with open_store(torn) as store:
            assert store.status == "complete" and contents(store) == expected, n
    assert sorted(seen) == [0, 96, 192, 288, 320]
    # a kill inside most flushes leaves the recorded end short; with lzf, in four the strings lie past it
    assert viewed > 100 and strings_past_end == (4 if compression else 0), (viewed, strings_past_end)


def test_a_rewrite_to_ragged_leaves_the_store_as_it_was_until_one_rename_and_its_resume_is_kill_safe(tmp_path, monkeypatch):
    """convert_to_ragged writes the converted store as a new file and renames it over the store:
    a kill at any point before the rename leaves the store's bytes as they were (an in-place
    rewrite, replayed, left 9 of 109 prefixes that did not open). The new file must also be laid
    out as a writer leaves it (chunk indexes and tails made with their layers, the fixed-length
    attributes that commits modify in place): every prefix of a resume's writes on it opens with
    its committed rows and resumes (a converted compressed layer given its tail at the resume
    left 5 of 131 that did not)."""
    layers = [dataclasses.replace(layer, compression="lzf") for layer in LAYERS]
    path = tmp_path / "s.h5"
    w = StoreWriter(path, layers, TARGETS, commit_rows=COMMIT_ROWS, background=False)
    for i in range(4):
        acts, targets, index = make_batch(i)
        w.append(acts, targets=targets, index=index)
    w._file.close()  # the process dies after the commit at 96 rows
    w._lock.release()
    before = path.read_bytes()
    with open_store(path) as s:
        dense = s.read("encoder_blocks.1")
        others = {n: s.read(n, 0, s.rows) for n in ("encoder_blocks.0", "proj")}
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # a conversion that fails halfway: its new file goes, the store stays
        m.setattr(marstore.store, "_write_ragged_copy", disk_full)
        with pytest.raises(OSError, match="No space left"):
            convert_to_ragged(path, ["encoder_blocks.1"])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.h5"]
    real_replace, renamed = os.replace, []

    def replace(src, dst):  # the store is untouched until this one step
        renamed.append((os.path.basename(src), path.read_bytes() == before))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    convert_to_ragged(path, ["encoder_blocks.1"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert renamed == [("s.h5.rewrite", True)] and os.listdir(tmp_path) == ["s.h5"]
    with open_store(path) as s:
        assert s.rows == 96 and s.layers["encoder_blocks.1"].layout == "ragged"
        assert b"".join(r.tobytes() for r in s.read("encoder_blocks.1")) == dense.tobytes()
        assert all(s.read(n, 0, 96).tobytes() == rows.tobytes() for n, rows in others.items())

    ragged = [LayerSpec(**as_ragged(dataclasses.asdict(layer))) if layer.name == "encoder_blocks.1" else layer
              for layer in layers]

    def resume(to):
        with StoreWriter(to, ragged, TARGETS, commit_rows=COMMIT_ROWS, background=False, resume=True) as w:
            for i in range(w.committed // BATCH_ROWS, 10):
                acts, targets, index = make_batch(i)
                acts["encoder_blocks.1"] = Ragged(acts["encoder_blocks.1"].reshape(-1, 8), [6] * BATCH_ROWS)
                w.append(acts, targets=targets, index=index)

    def contents(store_path):
        with open_store(store_path, retries=0) as s:
            return s.rows, committed_layer_bytes(s)

    converted, writes = path.read_bytes(), []
    (tmp_path / "s.h5.rewrite").write_bytes(b"what a conversion killed before its rename leaves")
    with monkeypatch.context() as m:
        m.setattr(h5py, "File", recording_opens(path, writes))
        resume(path)
    assert os.listdir(tmp_path) == ["s.h5"]  # the resume removed it
    rows, expected = contents(path)
    assert rows == 320 and len(writes) > 100
    torn = tmp_path / "torn.h5"
    for n in torn_files(writes, torn, converted):
        rows, got = contents(torn)
        assert (rows % COMMIT_ROWS == 0 or rows == 320) and all(expected[k].startswith(v) for k, v in got.items()), n
        resume(torn)
        assert contents(torn) == (320, expected), n


@pytest.mark.parametrize("earlier", ["no tails", "commit layout"])
def test_a_store_of_an_earlier_version_is_brought_to_this_layout_by_a_rewrite_and_its_resume_is_kill_safe(
        tmp_path, monkeypatch, earlier):
    """A resume gives a store of an earlier version the places this version's commits write in
    place (tails, state slots, fixed-length strings): in place, a kill in those flushes left 20
    of 146 (no tails) and 34 of 152 (the earlier commit layout) prefixes that did not open. It is
    written anew instead (_rewrite), the store untouched until the rename, and every prefix of the
    resume's writes on the new file opens with its committed rows and resumes to the same store."""
    layers = [dataclasses.replace(layer, compression="lzf") for layer in LAYERS] if earlier == "no tails" else LAYERS
    path = tmp_path / "s.h5"

    def write(to, resume=False):
        with StoreWriter(to, layers, TARGETS, commit_rows=COMMIT_ROWS, background=False, resume=resume) as w:
            for i in range(w.committed // BATCH_ROWS, 10):
                acts, targets, index = make_batch(i)
                w.append(acts, targets=targets, index=index, skipped=[(10**6 + i, "OSError: x")] if i == 1 else [])

    def contents(store_path):
        with open_store(store_path, retries=0) as s:
            return s.rows, committed_layer_bytes(s), s.skipped()

    w = StoreWriter(path, layers, TARGETS, commit_rows=COMMIT_ROWS, background=False)
    for i in range(7):
        acts, targets, index = make_batch(i)
        w.append(acts, targets=targets, index=index, skipped=[(10**6 + i, "OSError: x")] if i == 1 else [])
    w._file.close()  # the process dies after the commit at 192 rows
    w._lock.release()
    with h5py.File(path, "r+") as f:  # as an earlier version left it
        a, rows = f.attrs, int(f.attrs["rows"])
        if earlier == "no tails":  # every committed row in the dataset
            for name in list(f["layer_tail"]):
                kept = marstore.store.committed_values(f, name, rows)[:]
                values = marstore.store._values(f["activations"][name])
                values.resize(kept.shape)
                values[:] = kept
            del f["layer_tail"]
        else:  # state_at_row_N and skipped_at_row_N attributes, variable-length strings
            for name in f["layer_state"]:
                for slot in f["layer_state"][name][()]:
                    f["activations"][name].attrs[f"state_at_row_{int(slot[0])}"] = slot[1:]
            a["skipped_at_row_192"], a["skipped_at_row_96"] = 1, 1
            a["status"], a["committed_at"] = "incomplete", "2026-01-01T00:00:00+00:00"
            for key in ("layer_state", "outputs"):
                del f[key]
            del a["skipped_at"]
    before, committed = path.read_bytes(), contents(path)
    real_replace, renamed, writes = os.replace, [], []

    def replace(src, dst):  # the store's bytes as they were until this one step
        renamed.append((len(writes), path.read_bytes() == before, pathlib.Path(src).read_bytes()))
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        m.setattr(h5py, "File", recording_opens(path, writes))
        write(path, resume=True)
    (opened, unchanged, rewritten), = renamed
    rows, expected, skipped = contents(path)
    assert unchanged and rows == 320 and skipped == committed[2] == [(10**6 + 1, "OSError: x")]
    assert all(expected[k].startswith(v) for k, v in committed[1].items())
    torn = tmp_path / "torn.h5"
    for n in torn_files(writes[opened:], torn, rewritten):  # from the rename on (before it, the check rewrote equal bytes)
        rows, got, _ = contents(torn)
        assert rows in (192, 288, 320) and all(expected[k].startswith(v) for k, v in got.items()), n
        write(torn, resume=True)
        assert contents(torn)[:2] == (320, expected), n


def test_a_store_with_no_committed_rows_is_begun_again_as_a_new_file(tmp_path, monkeypatch):
    """A resume of a store killed before its first commit writes it again from the start. In place
    (the file truncated and remade), a kill in that remaking left a file that was no store ("no
    format='marstore' attribute") or did not open in 73 of 182 replayed prefixes of the resume's
    writes, and the next resume had nothing to go on; as a new file renamed over it (_rewrite),
    every prefix opens and resumes (107 here)."""
    path = tmp_path / "s.h5"
    w = StoreWriter(path, LAYERS, TARGETS, commit_rows=COMMIT_ROWS, background=False)
    acts, targets, index = make_batch(0)
    w.append(acts, targets=targets, index=index)  # 32 rows, none committed
    w._file.close()  # the process dies
    w._lock.release()
    before, renamed, writes = path.read_bytes(), [], []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append((len(writes), path.read_bytes() == before, pathlib.Path(src).read_bytes()))
        real_replace(src, dst)

    def resume(to):
        with StoreWriter(to, LAYERS, TARGETS, commit_rows=COMMIT_ROWS, background=False, resume=True) as w:
            for i in range(w.committed // BATCH_ROWS, 4):
                acts, targets, index = make_batch(i)
                w.append(acts, targets=targets, index=index)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        m.setattr(h5py, "File", recording_opens(path, writes))
        resume(path)
    (opened, unchanged, remade), = renamed
    assert unchanged and opened == 0
    assert_store_holds(path, 128)
    torn = tmp_path / "torn.h5"
    for n in torn_files(writes, torn, remade):
        with open_store(torn, retries=0) as s:
            assert s.rows in (0, 96, 128), n
        resume(torn)
        assert_store_holds(torn, 128)


def test_complete_reaches_the_disk_only_after_the_final_row_count(tmp_path, monkeypatch):
    """The closing commit flushes 'complete' after the row count, in a flush of its own: a kill
    in the count's flush cannot leave a store that says complete over fewer rows."""
    flushed = []
    real_sync = StoreWriter._sync

    def sync(self):  # what each flush of a commit put on disk
        flushed.append((int(self._file.attrs["rows"]), self._file.attrs["status"].decode()))
        real_sync(self)

    monkeypatch.setattr(StoreWriter, "_sync", sync)
    with StoreWriter(tmp_path / "s.h5", LAYERS, TARGETS, commit_rows=COMMIT_ROWS, background=False) as w:
        for i in range(4):
            acts, targets, index = make_batch(i)
            w.append(acts, targets=targets, index=index)
    assert flushed == [(0, "incomplete"), (96, "incomplete"), (96, "incomplete"), (128, "incomplete"),
                       (128, "complete")]


def test_reader_sees_committed_rows_while_writer_runs(tmp_path):
    path = tmp_path / "live.h5"
    p = worker(path, "--batches", "30", "--sleep", "0.05")
    assert p.stdout.readline().startswith("ready")
    seen = []
    while p.poll() is None:
        with open_store(path) as s:
            seen.append(s.rows)
            if s.rows:
                assert_store_holds(path, s.rows)
        time.sleep(0.05)
    assert p.returncode == 0
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen  # growing, commit by commit
    assert all(r % COMMIT_ROWS == 0 for r in seen)
    with open_store(path) as s:
        assert (s.status, s.rows) == ("complete", 30 * BATCH_ROWS)


def test_reads_from_the_end_count_from_the_last_committed_row(tmp_path):
    """A writer grows its datasets before it commits their rows: row -1 is the last committed."""
    path = tmp_path / "s.h5"
    with StoreWriter(path, [LayerSpec("a", (2,), chunk_rows=2), LayerSpec("r", (1,), ragged=True)],
                     [TargetSpec("y", (), "int64")], commit_rows=4, background=False) as w:  # rows land in append()
        def add(first, n):
            w.append({"a": np.arange(2 * first, 2 * (first + n), dtype=np.float16).reshape(n, 2),
                      "r": Ragged(np.arange(first, first + n, dtype=np.float16)[:, None], [1] * n)},
                     targets={"y": np.arange(first, first + n)}, index=range(first, first + n))
        add(0, 4)
        w.flush()
        add(4, 3)  # not committed; a's dataset already holds rows 4 and 5
        with open_store(path) as s:
            assert (s.rows, s.file["activations"]["a"].shape[0]) == (4, 6)
            assert s.read("a", -1).tolist() == [[6, 7]] and s.target("y", -2).tolist() == [2, 3]
            assert s.index(-3, -1).tolist() == [1, 2] and s.read("a", 3, 1).shape == (0, 2)
            assert [r.tolist() for r in s.read("r", -2)] == [[[2]], [[3]]] and s.read("r", 9) == []


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    """An extraction resumed while the first still runs used to interleave its rows with the
    first's and mark the store complete; HDF5's file lock now refuses the second."""
    from helpers.store_worker import METADATA

    path = tmp_path / "busy.h5"
    p = worker(path, "--batches", "30", "--sleep", "0.05")
    assert p.stdout.readline().startswith("ready")
    with pytest.raises(StoreError) as info:
        StoreWriter(path, LAYERS, TARGETS, METADATA, commit_rows=COMMIT_ROWS, resume=True)
    assert str(info.value) == (f"{path} is being written by another process (it holds the file's lock); let that "
                               "extraction finish, or stop it and resume")
    with pytest.raises(StoreError, match="is being written by another process"):
        check_not_being_written(path)  # what `extract --resume` asks before it loads the model
    with open_store(path) as s:  # readers read on
        assert s.status == "incomplete"
    assert p.wait(timeout=60) == 0, p.stderr.read()
    assert_store_holds(path, 30 * BATCH_ROWS)
    check_not_being_written(path)
    with StoreWriter(path, LAYERS, TARGETS, METADATA, commit_rows=COMMIT_ROWS, resume=True) as w:  # free again
        assert w.committed == 30 * BATCH_ROWS


def test_file_size_limit_stops_the_writer_with_a_clear_message(tmp_path):
    path = tmp_path / "full.h5"
    p = worker(path, "--batches", "400", "--fsize-limit", str(6_000_000))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, (out, err)
    message = out.strip().splitlines()[-1]
    assert message.startswith(f"StoreError: writing {path} stopped: the next batch needs up to ")
    assert "bytes, but only" in message and "left under the file size limit of 6000000 bytes" in message
    with open_store(path) as s:
        rows = s.rows
        assert s.status == "incomplete" and rows > 0 and rows % COMMIT_ROWS == 0
    assert_store_holds(path, rows)


def test_invalid_files_give_one_clear_error(tmp_path):
    good = tmp_path / "good.h5"
    write_all(good, batches=3)
    cases = {}
    cases["missing"] = (tmp_path / "nope.h5", "no such file")
    (tmp_path / "text.h5").write_text("hello")
    cases["not hdf5"] = (tmp_path / "text.h5", "is not an HDF5 file, so not a marstore store (is it truncated, or another format?)")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    cases["a checkpoint"] = (tmp_path / "model.pt", "is not an HDF5 file, so not a marstore store (it looks like a checkpoint, "
                             "as torch.save writes: `marstore extract --checkpoint` reads those and writes the .h5 store)")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    cases["other hdf5"] = (tmp_path / "other.h5", "is an HDF5 file but not a marstore store")
    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "truncated.h5", "truncated or corrupted")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 2
    cases["newer"] = (newer, "has format version 2, newer than this marstore reads (1); upgrade marstore")
    past = tmp_path / "past.h5"
    past.write_bytes(data)
    with h5py.File(past, "r+") as f:
        f.attrs["rows"] = 1000
    cases["rows past data"] = (past, "says 1000 rows are committed but /index holds 96")
    for name, (path, message) in cases.items():
        with pytest.raises(StoreError) as info:
            open_store(path)
        text = str(info.value)
        assert message in text and "\n" not in text, (name, text)


def test_info_describes_a_store(tmp_path, capsys, monkeypatch):
    from marstore.cli import main

    path = tmp_path / "s.h5"
    write_all(path, batches=2)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["status"], info["rows"], info["format_version"]) == ("complete", 64, 1)
    assert info["layers"]["encoder_blocks.0"]["shape"] == [64, 48]
    assert info["layers"]["encoder_blocks.0"]["dtype"] == "float16"
    assert info["layers"]["encoder_blocks.0"]["nonfinite"] == 1
    assert info["layers"]["encoder_norm"]["layout"] == "ragged"
    with open_store(path) as s:
        counts = [len(r) for r in s.read("encoder_norm")]
    tokens = {"total": sum(counts), "fewest": min(counts), "most": max(counts)}
    assert info["layers"]["encoder_norm"]["tokens"] == tokens and "tokens" not in info["layers"]["encoder_blocks.0"]
    with open_store(path) as s:
        action, label = s.target("action"), s.target("label")
    values, counts = np.unique(label, return_counts=True)
    by_count = sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: -vc[1])  # the most frequent first
    assert info["targets"] == {
        "action": {"shape": [64, 4, 2], "dtype": "float32",
                   "summary": {"mean": float(action.mean()), "std": float(action.std()), "min": float(action.min()),
                               "max": float(action.max()), "nonfinite": 0}},
        "label": {"shape": [64], "dtype": "int64", "summary": {"counts": {str(v): c for v, c in by_count}}}}
    assert info["run"]["model"] == "tests.helpers.store_worker"
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "64 committed rows" in text and "encoder_blocks.1" in text and "nonfinite 1" in text
    ragged_line = next(line for line in text.splitlines() if line.startswith("    encoder_norm "))
    assert ragged_line.split()[1:3] == ["ragged", f"64x({tokens['fewest']}-{tokens['most']})x16"]
    label_line = next(line for line in text.splitlines() if line.startswith("    label "))
    assert label_line.split()[1:4] == ["64", "int64", f"{len(values)}"]
    assert f"{by_count[0][0]} ({by_count[0][1]})" in label_line
    import marstore.cli

    monkeypatch.setattr(marstore.cli, "SUMMARY_MAX_BYTES", 100)
    assert main(["info", str(path)]) == 0
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("    action ")).endswith(
        "(not read: too large)")


def test_info_counts_the_labels_of_a_target_of_a_label_for_each_token(tmp_path, capsys):
    from marstore.cli import main

    path = tmp_path / "s.h5"
    labels = np.array([[0, 2, -100], [1, -100, -100], [2, 2, 2], [0, 1, -100]], np.int64)
    with StoreWriter(path, [LayerSpec("a", (3, 4))], [TargetSpec("labels", (3,), "int64")]) as w:
        w.append({"a": np.zeros((4, 3, 4), np.float16)}, targets={"labels": labels}, index=range(4))
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"]["labels"]["summary"] == {
        "counts": {"-100": 4, "2": 4, "0": 2, "1": 2}, "entries": 12}
    assert main(["info", str(path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("    labels "))
    assert line.split(None, 3)[3] == "4 values over its 12 entries: -100 (4), 2 (4), 0 (2), 1 (2)"


def test_info_into_a_closed_pipe_stops_quietly(tmp_path):
    """`marstore info s.h5 | head -1`: the reader leaves early; no traceback, status 141."""
    path = tmp_path / "s.h5"
    write_all(path, batches=2)
    p = subprocess.Popen([sys.executable, "-m", "marstore", "info", str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before the child writes a byte
    assert p.wait(timeout=60) == 141
    assert p.stderr.read() == b""


def test_ctrl_c_outside_marstores_loops_is_one_line(monkeypatch, capsys):
    from marstore import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert cli.main(["info", "any.h5"]) == 130
    assert capsys.readouterr().err == "marstore info: interrupted\n"


def test_info_on_a_bad_file_is_one_line(tmp_path, capsys):
    from marstore.cli import main

    (tmp_path / "x.h5").write_bytes(b"\0" * 100)
    assert main(["info", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "is not an HDF5 file" in err


@pytest.mark.parametrize("background", [True, False], ids=["thread", "inline"])
@pytest.mark.parametrize("compression", [None, "lzf"])
def test_batches_smaller_than_a_chunk_commit_and_resume_mid_chunk(tmp_path, compression, background):
    # Rows are gathered per chunk (8 rows here) and written whole; a commit writes the
    # part-filled chunks; a resume continues in the middle of one without losing its rows.
    path = str(tmp_path / "small.h5")
    spec = [LayerSpec("enc", (3,), chunk_rows=8, compression=compression)]
    rows = np.arange(40 * 3, dtype=np.float16).reshape(40, 3)
    with StoreWriter(path, spec, commit_rows=12, background=background) as w:
        for b in range(0, 15, 5):  # 15 rows: committed at 15 (>= 12), one part-filled chunk
            w.append({"enc": rows[b : b + 5]}, index=np.arange(b, b + 5))
        w.flush()
        with h5py.File(path, "r", locking=False) as f:  # a plain reader sees every committed row
            assert f.attrs["rows"] == 15
            if compression:  # the whole chunk in the dataset, the rows of the part-filled one in its tail
                assert f["activations/enc"].shape == (8, 3) and np.array_equal(f["activations/enc"][:], rows[:8])
                slot = int(np.flatnonzero(f["layer_state/enc"][:, 0] == 15)[0])
                assert np.array_equal(f["layer_tail/enc"][slot, :7], rows[8:15])
            else:
                assert np.array_equal(f["activations/enc"][:15], rows[:15])
        with open_store(path) as store:
            assert store.read("enc").tobytes() == rows[:15].tobytes()
        w.close(complete=False)
    with StoreWriter(path, spec, resume=True, commit_rows=12, background=background) as w:
        assert w.committed == 15
        for b in range(15, 40, 5):
            w.append({"enc": rows[b : b + 5]}, index=np.arange(b, b + 5))
    with open_store(path) as store:
        assert store.rows == 40 and store.status == "complete"
        assert store.read("enc").tobytes() == rows.tobytes()
        assert store.index().tolist() == list(range(40))
    with h5py.File(path, "r", locking=False) as f:  # complete: every row in the dataset
        assert f["activations/enc"][:].tobytes() == rows.tobytes()


def test_inline_writer_reports_a_failed_batch_and_keeps_committed_rows(tmp_path):
    path = str(tmp_path / "inline.h5")
    w = StoreWriter(path, [LayerSpec("enc", (2,))], commit_rows=2, background=False)
    w.append({"enc": np.ones((2, 2), np.float16)}, index=[0, 1])  # committed at once (commit_rows=2)
    with pytest.raises(StoreError, match="batch layers do not match the store: missing \\['enc'\\], unexpected \\['dec'\\]"):
        w.append({"dec": np.ones((2, 2), np.float16)}, index=[2, 3])
    w.close(complete=False)
    with open_store(path) as store:
        assert store.rows == 2 and store.read("enc").tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("background", [True, False], ids=["thread", "inline"])
def test_outputs_per_batch_across_a_resume_and_a_late_output(tmp_path, background):
    path = str(tmp_path / "outputs.h5")
    spec = [LayerSpec("enc", (2,))]
    rows = np.zeros((2, 2), np.float16)
    with StoreWriter(path, spec, commit_rows=4, background=background) as w:
        for b in range(3):  # committed after the second batch (4 rows); the third is not
            w.append({"enc": rows}, index=[2 * b, 2 * b + 1], outputs={"loss": float(b)})
        w.flush()
        w.close(complete=False)
    with StoreWriter(path, spec, resume=True, commit_rows=4, background=background) as w:
        for b in range(3, 5):  # "aux" appears only now: NaN for the batches before
            w.append({"enc": rows}, index=[2 * b, 2 * b + 1], outputs={"loss": float(b), "aux": 10.0 + b})
    with open_store(path) as store:
        out = store.file["outputs"]
        assert list(out) == ["row_start", "loss", "aux"]  # in the order they first came, not by name
        assert out["row_start"][:].tolist() == [0, 2, 4, 6, 8]
        assert out["loss"][:].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert np.array_equal(out["aux"][:], [np.nan, np.nan, np.nan, 13.0, 14.0], equal_nan=True)
        assert {k: v.tobytes() for k, v in store.outputs().items()} == {k: v[:].tobytes() for k, v in out.items()}


@pytest.mark.parametrize("background", [True, False], ids=["thread", "inline"])
def test_items_left_out_are_committed_with_the_rows_after_them_and_resume(tmp_path, background, monkeypatch, capsys):
    path = str(tmp_path / "skipped.h5")
    spec = [LayerSpec("enc", (2,))]
    rows = np.zeros((2, 2), np.float16)
    w = StoreWriter(path, spec, commit_rows=4, background=background)
    w.append({"enc": rows}, index=[0, 2], skipped=[(1, "OSError: bad 1")])
    w.append({"enc": rows}, index=[3, 4])  # committed here (4 rows), with item 1
    w.flush()
    w.close(complete=False)
    with h5py.File(path, "r+", locking=False) as f:  # what a kill between the two steps of a commit leaves
        assert f.attrs["skipped"] == 1
        for name, value in (("index", 99), ("error", "junk")):
            f["skipped"][name].resize((2,))
            f["skipped"][name][1] = value
    with StoreWriter(path, spec, commit_rows=4, background=background, resume=True) as w:
        assert w.skipped_committed == 1
        w.append({"enc": rows}, index=[5, 6])
        w.skip([(7, "RuntimeError: bad 7")])  # after the last rows: recorded at the closing commit
    with open_store(path) as store:
        assert store.rows == 6 and store.index().tolist() == [0, 2, 3, 4, 5, 6]
        assert store.skipped() == [(1, "OSError: bad 1"), (7, "RuntimeError: bad 7")]
    with h5py.File(path, "r", locking=False) as f:
        assert f["skipped/index"][:].tolist() == [1, 7]
    from marstore import cli

    monkeypatch.setattr(cli, "SKIPPED_SHOWN", 1)
    assert cli.main(["info", path]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("  left out (--skip-failed): 2 items the data set failed to give:")
    assert out[at + 1 : at + 3] == ["    item 1: OSError: bad 1", "    ... and 1 more (marstore info --json lists every one)"]
    assert cli.main(["info", "--json", path]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [{"index": 1, "error": "OSError: bad 1"},
                                                             {"index": 7, "error": "RuntimeError: bad 7"}]


@pytest.mark.parametrize("torn", ["count old, skipped new", "count new, skipped old"])
def test_a_kill_between_the_skipped_count_and_the_row_count_resumes_identically(tmp_path, torn):
    """The root's 'skipped' and 'rows' reach the disk one by one in a commit's last flush: a kill
    between them used to record the items left out before the new rows twice (a resume redoes
    those rows) or lose them. The skipped_at slots, written before, go with the row count."""
    spec = [LayerSpec("enc", (2,))]

    def run(path, stop_after=None, resume=False):
        batches = [([0, 2], [(1, "OSError: bad 1")]), ([3, 4], []), ([6, 7], [(5, "OSError: bad 5")]), ([8, 9], [])]
        w = StoreWriter(path, spec, commit_rows=4, background=False, resume=resume)
        for index, skipped in batches[w.committed // 2 :]:
            w.append({"enc": np.full((2, 2), index[0], np.float16)}, index=index, skipped=skipped)
            if w.committed == stop_after:
                return w  # open, as a killed process leaves it
        w.close()

    reference, path = str(tmp_path / "reference.h5"), str(tmp_path / "torn.h5")
    run(reference)
    w = run(path, stop_after=8)
    assert w._file.attrs["skipped"] == 2 and w._file.attrs["rows"] == 8
    if torn == "count old, skipped new":
        w._file.attrs["rows"] = 4  # the second commit's count never reached the disk
    else:
        w._file.attrs["skipped"] = 1
    w._file.close()  # the process dies
    w._lock.release()
    with open_store(path) as store:  # a reader of the torn file sees the items of its committed rows
        assert store.skipped() == [(1, "OSError: bad 1")] + [(5, "OSError: bad 5")] * (store.rows == 8)
    run(path, resume=True)
    with open_store(reference) as a, open_store(path) as b:
        assert a.skipped() == b.skipped() == [(1, "OSError: bad 1"), (5, "OSError: bad 5")]
        assert a.index().tolist() == b.index().tolist() == [0, 2, 3, 4, 6, 7, 8, 9]
        assert b.file.attrs["skipped"] == 2
        for f in (a.file, b.file):  # the closing commit added no rows: both slots hold its count
            assert f.attrs["skipped_at"].tolist() == [[8, 2], [8, 2]]
        assert b.file["skipped/index"][:].tolist() == [1, 5]


def test_outputs_read_back_are_those_of_committed_batches(tmp_path, capsys):
    from marstore.cli import main

    path = str(tmp_path / "outputs.h5")
    with StoreWriter(path, [LayerSpec("enc", (2,))], commit_rows=4, background=False) as w:
        for b in range(3):  # committed after the second batch; the third's output is not
            w.append({"enc": np.zeros((2, 2), np.float16)}, index=[2 * b, 2 * b + 1],
                     outputs={"loss": [1.0, np.inf, 5.0][b], "aux": float(b)})
            if b == 2:
                with open_store(path) as store:
                    assert store.rows == 4
                    assert {k: v.tolist() for k, v in store.outputs().items()} == {
                        "row_start": [0, 2], "loss": [1.0, np.inf], "aux": [0.0, 1.0]}
    assert main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == {
        "loss": {"batches": 3, "mean": 3.0, "nonfinite": 1}, "aux": {"batches": 3, "mean": 1.0, "nonfinite": 0}}
    assert main(["info", path]) == 0
    assert "  output loss: mean 3 over 3 batches, 1 non-finite\n  output aux: mean 1 over 3 batches, 0 non-finite\n" \
        in capsys.readouterr().out


def test_statistics_with_several_stats_threads_are_bit_identical_to_inline(tmp_path, monkeypatch):
    monkeypatch.setattr("marstore.store._stats_threads", lambda: 3)
    monkeypatch.setattr("marstore.store._STATS_SHARE_BYTES", 1)  # these small batches go to the threads too
    monkeypatch.setattr("marstore.store._STATS_DIRECT_SIZE", 1)  # ... and are summed there at once
    write_all(tmp_path / "threads.h5", batches=6)
    write_all(tmp_path / "inline.h5", batches=6, background=False)
    with h5py.File(tmp_path / "threads.h5", "r") as a, h5py.File(tmp_path / "inline.h5", "r") as b:
        for name in ("encoder_blocks.0", "encoder_blocks.1", "proj", "encoder_norm"):
            for key in ("mean", "std", "stats_m2", "stats_count", "nonfinite", "overflow"):
                assert np.asarray(a["activations"][name].attrs[key]).tobytes() == \
                    np.asarray(b["activations"][name].attrs[key]).tobytes(), (name, key)


def test_shares_balance_layers_by_bytes():
    from marstore.store import _shares

    parts = {name: (np.zeros(size, np.float16), None) for name, size in [("a", 10), ("b", 40), ("c", 30), ("d", 20)]}
    assert [sorted(s) for s in _shares(parts, 2)] == [["a", "b"], ["c", "d"]]
    assert [sorted(s) for s in _shares(parts, 8)] == [["b"], ["c"], ["d"], ["a"]]
    assert [sorted(s) for s in _shares(parts, 1)] == [["a", "b", "c", "d"]]
    assert _shares(parts, 0) == [] and _shares({}, 4) == []


def test_a_failing_stats_thread_reaches_the_caller_and_keeps_committed_rows(tmp_path, monkeypatch):
    monkeypatch.setattr("marstore.store._stats_threads", lambda: 2)
    monkeypatch.setattr("marstore.store._STATS_SHARE_BYTES", 1)
    monkeypatch.setattr("marstore.store._STATS_DIRECT_SIZE", 1)
    w = StoreWriter(tmp_path / "s.h5", [LayerSpec("a", (8,)), LayerSpec("b", (8,))], commit_rows=2)
    w.append({"a": np.ones((2, 8), np.float16), "b": np.ones((2, 8), np.float16)}, index=[0, 1])
    w.flush()

    def broken(x):
        raise MemoryError("stats of layer b")

    monkeypatch.setattr(w._layers["b"].moments, "update", broken)
    w.append({"a": np.ones((2, 8), np.float16), "b": np.ones((2, 8), np.float16)}, index=[2, 3])
    with pytest.raises(StoreWriteError, match="stats of layer b"):
        w.close()
    with open_store(tmp_path / "s.h5") as s:
        assert s.rows == 2 and s.status == "incomplete"


def test_a_store_of_many_layers_reads_each_layers_attributes_when_asked(tmp_path, monkeypatch):
    """A store of thousands of layers (`--layers '**'`) took seconds to open, reading every
    attribute of every layer, and the probe opens it once per layer."""
    path = tmp_path / "many.h5"
    names = [f"blocks.{i}" for i in range(40)]
    with StoreWriter(path, [LayerSpec(n, (3,)) for n in names]) as w:
        w.append({n: np.full((2, 3), i, np.float16) for i, n in enumerate(names)}, index=[0, 1])
    reads = []
    getitem = h5py.AttributeManager.__getitem__
    monkeypatch.setattr(h5py.AttributeManager, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    with open_store(path) as s:
        opened = len(reads)
        assert list(s.layers) == names
        attrs = s.layers["blocks.7"].attrs
        assert attrs["mean"] == [7.0, 7.0, 7.0] and attrs.get("channel_axis") is None and "nonfinite" in attrs
        with h5py.File(path, "r", locking=False) as f:
            on_file = f["activations/blocks.7"].attrs
            assert dict(attrs) == {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in on_file.items()}
    assert opened <= 3 * len(names) + 10  # the layout and dtype of each (and the root's), not a dozen of each
    # read after the store closed, an attribute was "absent" (.get gave its default, quietly wrong)
    assert attrs["mean"] == [7.0, 7.0, 7.0]  # read while open: kept
    with pytest.raises(StoreError, match=r"^attribute 'reduction' of <Closed HDF5 dataset> asked for after its store was closed$"):
        s.layers["blocks.8"].attrs.get("reduction", "none")


def test_a_layer_wider_than_an_attribute_keeps_its_statistics_in_its_state_slots(tmp_path):
    """A commit's state of 8192 channels (196 KiB) failed the store at its first commit ("object
    header message is too large"); the statistics of more than 7680 channels are now kept in
    /layer_state only, and read from there."""
    path = tmp_path / "wide.h5"
    rows = np.random.default_rng(0).standard_normal((12, 8192)).astype(np.float16)
    with StoreWriter(path, [LayerSpec("fc1", (8192,))], commit_rows=4, background=False) as w:
        for i in range(3):
            w.append({"fc1": rows[4 * i : 4 * i + 4]}, index=np.arange(4 * i, 4 * i + 4))
    with open_store(path) as s:
        attrs = s.layers["fc1"].attrs
        assert "mean" in attrs and "mean" not in s.file["activations/fc1"].attrs
        assert np.allclose(attrs["mean"], rows.astype(np.float64).mean(0), atol=1e-6)
        assert np.allclose(attrs["std"], rows.astype(np.float64).std(0), atol=1e-6)
        assert attrs["stats_count"] == [12.0] * 8192 and s.read("fc1").tobytes() == rows.tobytes()


TAILED = [LayerSpec("enc", (3,), chunk_rows=8, compression="lzf"),
          LayerSpec("tok", (2,), ragged=True, chunk_rows=8, compression="gzip")]


def tailed_batch(i):
    """Batch i of 3 rows for TAILED: enc rows of 3 values, tok rows of 1 to 3 tokens."""
    enc = (np.arange(9, dtype=np.float16) + 9 * i).reshape(3, 3)
    counts = [1 + (i + j) % 3 for j in range(3)]
    tok = np.arange(2 * sum(counts), dtype=np.float16).reshape(-1, 2) + 100 * i
    return {"enc": enc, "tok": Ragged(tok, counts)}, [3 * i, 3 * i + 1, 3 * i + 2]


def write_tailed(path, stop, resume=False, complete=True):
    w = StoreWriter(path, TAILED, commit_rows=6, background=False, resume=resume)
    for i in range(w.committed // 3, stop):
        acts, index = tailed_batch(i)
        w.append(acts, index=index)
    w.close(complete=complete)


def test_an_incomplete_store_reads_its_compressed_layers_last_rows_from_their_tails(tmp_path):
    """15 rows committed, the store not complete: enc's dataset holds its one whole chunk (8
    rows) and its tail the 7 rows after; every reader gives the 15 rows as they were written."""
    from marstore.dataset import ActivationDataset

    path, reference = tmp_path / "s.h5", tmp_path / "reference.h5"
    write_tailed(path, 5, complete=False)
    write_tailed(reference, 4)
    with h5py.File(path, "r", locking=False) as f:
        assert int(f.attrs["rows"]) == 15 and f["activations/enc"].shape == (8, 3)
        assert f["layer_tail/enc"].shape == (2, 8, 3) and f["layer_tail/tok"].shape == (2, 8, 2)
        assert f["activations/enc"].compression == "lzf" and f["layer_tail/enc"].compression is None
    write_tailed(path, 4, resume=True, complete=False)  # nothing appended: its 15 rows stay committed
    with open_store(path) as store, open_store(reference) as ref:
        assert store.rows == 15 and store.status == "incomplete"
        expected = np.concatenate([ref.read("enc"), tailed_batch(4)[0]["enc"]])
        assert store.read("enc").tobytes() == expected.tobytes()
        assert store.read("enc", 7, 10).tobytes() == expected[7:10].tobytes()  # across the whole chunk's end
        tokens = ref.read("tok") + [tailed_batch(4)[0]["tok"].values[a:b] for a, b in [(0, 2), (2, 5), (5, 6)]]
        assert [t.tobytes() for t in store.read("tok")] == [t.tobytes() for t in tokens]
    data = ActivationDataset(path, ["enc", "tok"])
    items = data.__getitems__(list(range(15)))
    assert torch.equal(items.columns["enc"], torch.from_numpy(expected.astype(np.float32)))
    assert all(torch.equal(a, torch.from_numpy(b.astype(np.float32))) for a, b in zip(items.columns["tok"], tokens))
    with h5py.File(path, "r", locking=False) as f:  # as docs/FORMAT.md reads it without marstore
        rows, name = int(f.attrs["rows"]), "enc"
        x = f[f"activations/{name}"][:rows]
        start = rows - rows % f[f"activations/{name}"].chunks[0]
        slot = int(np.flatnonzero(f[f"layer_state/{name}"][:, 0] == rows)[0])
        x = np.concatenate([x[:start], f[f"layer_tail/{name}"][slot, : rows - start]])
        assert x.tobytes() == expected.tobytes()


def test_a_compressed_layer_without_a_tail_gets_one_on_resume(tmp_path, caplog):
    """A store of an earlier version kept a compressed layer's part-filled chunk in its dataset
    and had no tails: a resume moves those rows to a tail and ends as a store written in one go."""
    path, reference = tmp_path / "old.h5", tmp_path / "reference.h5"
    write_tailed(reference, 9)
    write_tailed(path, 5)
    with h5py.File(path, "r+") as f:  # its datasets hold every row (the final commit wrote them)
        del f["layer_tail"]
        f.attrs.modify("status", np.bytes_("incomplete"))
    with caplog.at_level("INFO", logger="marstore.store"):
        write_tailed(path, 9, resume=True)
    assert sum("given a tail for its part-filled chunk" in r.message for r in caplog.records) == 2
    with h5py.File(path, "r") as f, h5py.File(reference, "r") as g:
        assert f.attrs["status"] == b"complete" and int(f.attrs["rows"]) == 27
        for name in ("activations/enc", "activations/tok/values", "activations/tok/offsets"):
            assert f[name][:].tobytes() == g[name][:].tobytes(), name


def test_a_store_of_the_earlier_commit_layout_resumes_identically(tmp_path):
    """A store whose commits kept their state in state_at_row_N and skipped_at_row_N attributes
    and variable-length strings (the earlier layout) gets the state slots and fixed-length strings
    on resume, from its recorded state, and ends as a store written in one go."""
    spec = [LayerSpec("enc", (3,))]
    batches = [(np.full((2, 3), i, np.float16) + np.arange(3, dtype=np.float16), [2 * i, 2 * i + 1]) for i in range(6)]

    def run(path, stop=6, resume=False):
        with StoreWriter(path, spec, commit_rows=4, background=False, resume=resume) as w:
            for rows, index in batches[w.committed // 2 : stop]:
                w.append({"enc": rows}, index=index, skipped=[(100 + index[0], "OSError: x")] if index[0] == 2 else [])

    reference, old = tmp_path / "reference.h5", tmp_path / "old.h5"
    run(reference)
    run(old, stop=4)
    with h5py.File(old, "r+") as f:  # as an earlier version wrote it
        a, layer = f.attrs, f["activations/enc"].attrs
        slots = f["layer_state/enc"][()]
        for slot in slots:
            layer[f"state_at_row_{int(slot[0])}"] = slot[1:]
        layer["mean"] = np.zeros(3)  # a commit ahead of the recorded state, as a kill can leave it
        a["skipped_at_row_8"], a["skipped_at_row_4"] = 1, 1
        a["status"], a["committed_at"] = "incomplete", "2026-01-01T00:00:00+00:00"
        for key in ("layer_state", "outputs"):
            del f[key]
        del a["skipped_at"]
    run(old, resume=True)
    with open_store(reference) as r, open_store(old) as o:
        assert o.status == "complete" and o.read("enc").tobytes() == r.read("enc").tobytes()
        assert dict(o.layers["enc"].attrs) == dict(r.layers["enc"].attrs) and o.skipped() == r.skipped() == [(102, "OSError: x")]
        assert o.file.attrs.get_id("status").dtype == "S10" and o.file.attrs["skipped_at"].tolist() == [[12, 1], [12, 1]]
        assert not [k for k in o.file["activations/enc"].attrs if k.startswith("state_at_row_")]


def test_a_reader_opened_before_two_commits_is_told_to_open_again_for_the_statistics(tmp_path):
    """A layer's state slots hold the last two commits: a reader that opened the store before
    the writer committed twice more, and asks for its statistics only then, cannot have them."""
    path = tmp_path / "live.h5"
    w = StoreWriter(path, [LayerSpec("enc", (2,))], commit_rows=2, background=False)
    w.append({"enc": np.ones((2, 2), np.float16)}, index=[0, 1])
    reader = open_store(path)
    for i in (1, 2):
        w.append({"enc": np.ones((2, 2), np.float16)}, index=[2 * i, 2 * i + 1])
    with pytest.raises(StoreError, match=r"holds the state at rows \[4, 6\], not at the 2 committed when it was opened: "
                                         r"a writer has committed since \(open it again\), or the file is damaged"):
        reader.layers["enc"].attrs["mean"]
    reader.close()
    w.close()
    with open_store(path) as s:
        assert s.rows == 6 and s.layers["enc"].attrs["mean"] == [1.0, 1.0]


def test_a_reader_opened_before_two_commits_is_told_to_open_again_for_a_compressed_layers_last_rows(tmp_path):
    """The rows of a compressed layer's part-filled chunk are in the tail slot of their commit,
    which the writer overwrites two commits on: read after that, they would be other rows."""
    path = tmp_path / "live.h5"
    w = StoreWriter(path, [LayerSpec("enc", (2,), chunk_rows=8, compression="lzf")], commit_rows=2, background=False)
    w.append({"enc": np.zeros((2, 2), np.float16)}, index=[0, 1])
    reader, early = open_store(path), open_store(path)
    assert early.read("enc").tolist() == [[0, 0], [0, 0]]  # read now, and kept
    for i in (1, 2):
        w.append({"enc": np.full((2, 2), i, np.float16)}, index=[2 * i, 2 * i + 1])
    with pytest.raises(StoreError, match=r"holds the state at rows \[4, 6\], not at the 2 committed when it was opened: "
                                         r"a writer has committed since \(open it again\)"):
        reader.read("enc")
    assert early.read("enc", 1).tolist() == [[0, 0]]
    reader.close()
    early.close()
    w.close()
    with open_store(path) as s:
        assert s.read("enc").tolist() == [[0, 0]] * 2 + [[1, 1]] * 2 + [[2, 2]] * 2
