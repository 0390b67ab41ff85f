"""Trained probes as files (load_probe) and on other stores (marstore evaluate)."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from marstore.cli import main
from marstore.evaluate import EvaluateOptions, evaluate_probes
from marstore.probe import ProbeError, ProbeOptions, _metrics, load_probe, run_probes
from marstore.store import TEXT, LayerSpec, Ragged, StoreWriter, TargetSpec, open_store

D = 8


def linear_store(path, n=600, x_seed=0, dataset=None, tokens=None, labels=3):
    """Layer 'h': rows of D features (the means of `tokens` tokens of the raw activations that
    the returned raw holds, when tokens is given); target 'y' = x @ w, the same w in every store;
    'label' the argmax of y (3 classes), with labels=4 a fourth class where y's largest is large."""
    rng = np.random.default_rng(x_seed)
    raw = rng.standard_normal((n, tokens, D) if tokens else (n, D)).astype(np.float32)
    x = (raw.mean(1) if tokens else raw).astype(np.float16)
    w = np.random.default_rng(100).standard_normal((D, 3))  # one relation in every store
    y = (x.astype(np.float64) @ w).astype(np.float32)
    label = np.argmax(y, 1)
    if labels == 4:
        label[y.max(1) > 4] = 3
    metadata = {"dataset": dataset[0], "dataset_args": dataset[1]} if dataset else {}
    spec = LayerSpec("h", (D,), reduction="mean" if tokens else "none", chunk_rows=64)
    with StoreWriter(path, [spec], [TargetSpec("y", (3,), "float32"), TargetSpec("label", (), "int64")], metadata) as writer:
        writer.append({"h": x}, targets={"y": y, "label": label}, index=np.arange(n))
    return raw, x, y, label


def train(tmp_path, store, target="y", **kw):
    return run_probes(ProbeOptions(store=str(store), target=target, out=str(tmp_path / "probes"), progress=False, **kw))


def test_a_probe_file_holds_all_it_needs_and_predicts_as_the_report_scored_it(tmp_path):
    store = tmp_path / "a.h5"
    _, x, y, _ = linear_store(store)
    report = train(tmp_path, store)
    entry = report["layers"][0]
    probe = load_probe(entry["probe"]["weights"])
    assert (probe.layer, probe.target, probe.task, probe.kind, probe.control) == ("h", "y", "regression", "linear", False)
    with open_store(store) as s:
        assert probe.trained_on == {"path": str(store), "status": "complete", "rows": 600, "created": str(s.file.attrs["created"]),
                                    "dataset": [None, None]}  # a store written without recording its data set
    # the 540 training and validation samples, as ranges of source indices: the other 60 are its test samples
    seen = probe.saw(np.arange(600))
    assert seen.sum() == 540 and entry["split_rows"]["test"] == 60
    assert probe.seen_sources.shape[1] == 2 and probe.seen_sources.shape[0] <= 61
    assert not probe.saw([600, 10**9, -1]).any()  # samples its store never held
    held_out = np.flatnonzero(~seen)
    pred = probe.predict(torch.from_numpy(x[held_out].astype(np.float32)))
    assert pred.shape == (60, 3)
    # the same function of the activations as the report's test predictions: the same R², to the bit
    assert _metrics("regression", pred, torch.from_numpy(y[held_out]))["r2"] == entry["probe"]["test"]["r2"]
    # a target of several values a row: each layer's R² at each of them, as a heatmap linked from report.md
    assert entry["target_shape"] == [3] and os.path.getsize(report["plots"]["by_position"]) > 5000
    assert "![test R² of each layer's probe at each position of y](by_position.png)" in open(report["markdown"]).read()
    control = load_probe(entry["control"]["weights"])
    assert control.control and np.array_equal(control.seen_sources, probe.seen_sources)
    labels = train(tmp_path, store, target="label")
    assert "by_position" not in labels["plots"]  # classes have no positions, and each its recall, layer by layer
    assert os.path.getsize(labels["plots"]["by_class"]) > 5000
    assert "![test recall of each class of label, by layer](by_class.png)" in open(labels["markdown"]).read()
    entry = labels["layers"][0]
    probe = load_probe(entry["probe"]["weights"])
    _, _, _, label = linear_store(tmp_path / "again.h5")
    predicted, truth = probe.predict(torch.from_numpy(x[held_out].astype(np.float32))).numpy(), label[held_out]
    assert entry["probe"]["test"]["recall_per_class"] == [round(float((predicted[truth == c] == c).mean()), 6) for c in range(3)]


def test_a_probe_takes_the_capture_before_the_extractions_reduction(tmp_path):
    store = tmp_path / "a.h5"
    raw, x, _, _ = linear_store(store, tokens=6)
    probe = load_probe(train(tmp_path, store)["layers"][0]["probe"]["weights"])
    stored, captured = probe(torch.from_numpy(x[:5].astype(np.float32))), probe(torch.from_numpy(raw[:5]))
    torch.testing.assert_close(captured, stored, atol=2e-2, rtol=0)  # the stored means are float16-rounded
    assert not torch.equal(captured, stored)
    with pytest.raises(ProbeError, match=r"^h: activations of shape \(5, 6, 4\); this probe takes rows of shape \(8,\), as the "
                                         r"store holds them, or the capture that extraction reduced to them \(reduction mean\)$"):
        probe(torch.from_numpy(raw[:5, :, :4]))


def test_frame_means_probed_flat_take_the_capture_too(tmp_path):
    """A store of --reduction mean:2 rows, probed with --tokens flat: the capture is reduced to
    its two group means, then laid side by side."""
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((400, 6, D)).astype(np.float32)
    rows = raw.reshape(400, 2, 3, D).mean(2).astype(np.float16)
    y = (rows[:, 0, 0] - rows[:, 1, 0]).astype(np.float32)  # what differs between the groups
    store = tmp_path / "g.h5"
    with StoreWriter(store, [LayerSpec("h", (2, D), reduction="mean:2")], [TargetSpec("d", (), "float32")]) as writer:
        writer.append({"h": rows}, targets={"d": y}, index=np.arange(400))
    probe = load_probe(train(tmp_path, store, target="d", tokens="flat")["layers"][0]["probe"]["weights"])
    assert probe.predict(torch.from_numpy(raw[:3])).shape == (3,)
    torch.testing.assert_close(probe(torch.from_numpy(raw[:3])), probe(torch.from_numpy(rows[:3].astype(np.float32))),
                               atol=2e-2, rtol=0)


def test_probe_files_that_cannot_be_applied_are_refused_in_one_line(tmp_path):
    torch.save({"weight": torch.zeros(3, D), "bias": torch.zeros(3)}, tmp_path / "old.pt")
    with pytest.raises(ProbeError, match=r"old\.pt holds a bare state dict, as marstore wrote probes before marstore-probe/1: "
                                         r"it lacks the statistics and classes a probe needs to be applied; run `marstore "
                                         r"probe` again$"):
        load_probe(tmp_path / "old.pt")
    torch.save({"format": "marstore-probe/9"}, tmp_path / "new.pt")
    with pytest.raises(ProbeError, match=r"new\.pt is not a marstore probe file \(format 'marstore-probe/9'; this marstore "
                                         r"reads 'marstore-probe/1'\)$"):
        load_probe(tmp_path / "new.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch wrote")
    with pytest.raises(ProbeError, match=r"junk\.pt: not a probe file that loads \("):
        load_probe(tmp_path / "junk.pt")


def test_evaluated_on_its_own_store_it_gives_the_reports_test_metric_and_interval(tmp_path, caplog):
    store = tmp_path / "a.h5"
    linear_store(store)
    report = train(tmp_path, store)
    with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
        same = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(store), out=str(tmp_path / "ev")))
    assert f"rows: the samples the probes were not fitted or chosen on, as {store} is the store the probes were trained on" \
        in caplog.text
    a, b = report["layers"][0], same["layers"][0]
    assert b["split_rows"] == {"test": 60}
    assert b["probe"]["test"] == {k: v for k, v in a["probe"]["test"].items()}  # metric, per-dimension R², interval
    # the control is scored against the true targets here, against shuffled ones in training: both chance
    assert abs(b["control"]["test"]["r2"]) < 0.1 and b["selectivity"] == b["probe"]["test"]["r2"] - b["control"]["test"]["r2"]
    assert same["evaluation"]["rows"] == "held-out" and same["evaluation"]["same_samples"] == "the store the probes were trained on"
    assert json.load(open(tmp_path / "ev" / "report.json"))["layers"][0]["probe"]["test"] == b["probe"]["test"]
    assert (tmp_path / "ev" / "depth.png").stat().st_size > 0
    markdown = (tmp_path / "ev" / "report.md").read_text()
    assert f"unchanged, on `{store}` (complete, 600 rows): the 60 rows of samples the probes were not fitted or chosen on." \
        in markdown
    # what the probes read, as their training report says
    assert (b["features"], b["inputs"]) == (a["features"], a["inputs"])
    assert f"applied the same way. Each probe reads the {a['features']}, {a['inputs']} inputs." in markdown


def test_probes_of_token_means_apply_to_a_store_that_gives_the_same_means(tmp_path, caplog):
    """A store of token means (--reduction mean), of full tokens or of ragged ones gives a probe
    of token means its input alike: the probes trained on one apply to the others, with the
    same predictions; a store that kept one token of each row does not."""
    n = 400
    raw = (np.random.default_rng(0).integers(-8, 9, (n, 4, D)) / 4).astype(np.float16)
    means = raw.astype(np.float32).mean(1).astype(np.float16)  # exact: sixteenths
    y = (means.astype(np.float32) @ np.random.default_rng(1).standard_normal((D, 3))).astype(np.float32)
    forms = {"full": (LayerSpec("h", (4, D)), raw), "means": (LayerSpec("h", (D,), reduction="mean"), means),
             "ragged": (LayerSpec("h", (D,), ragged=True), Ragged(raw.reshape(-1, D), np.full(n, 4))),
             "first": (LayerSpec("h", (D,), reduction="first"), raw[:, 0])}
    for name, (spec, rows) in forms.items():
        with StoreWriter(tmp_path / f"{name}.h5", [spec], [TargetSpec("y", (3,), "float32")]) as writer:
            writer.append({"h": rows}, targets={"y": y}, index=np.arange(n))

    def evaluate(probes, store):
        return evaluate_probes(EvaluateOptions(str(probes), str(tmp_path / f"{store}.h5"), out=str(tmp_path / "e" / store),
                                               rows="all"))["layers"][0]

    for trained_on in ("full", "means"):
        run_probes(ProbeOptions(store=str(tmp_path / f"{trained_on}.h5"), target="y", out=str(tmp_path / trained_on),
                                progress=False))
        with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
            entries = {store: evaluate(tmp_path / trained_on, store) for store in ("full", "means", "ragged")}
        assert entries["full"]["probe"]["test"] == entries["means"]["probe"]["test"] == entries["ragged"]["probe"]["test"]
        assert entries[trained_on]["probe"]["test"]["r2"] > 0.99 and "store_rows" not in entries[trained_on]
        others = {store: entry["store_rows"] for store, entry in entries.items() if store != trained_on}
        assert others == {**({"full": "mean of 4 tokens"} if trained_on == "means" else
                             {"means": "stored row (reduced at extraction: mean)"}),
                          "ragged": "mean of each row's tokens (their count varies)"}
        assert f"h: {tmp_path / 'ragged.h5'} holds ragged rows of tokens of shape (8,), the probe's store held " in caplog.text
        assert (f"On this store the probes of every layer read the {others['ragged']}, which gives them their input all "
                "the same.") in (tmp_path / "e" / "ragged" / "report.md").read_text()
        with pytest.raises(ProbeError, match=rf"^h: {tmp_path / 'first.h5'} holds rows of shape \(8,\) reduced at extraction "
                                             rf"\(first\), the probe was trained on rows of shape \({'4, 8' if trained_on == 'full' else '8,'}\)"
                                             rf"{'' if trained_on == 'full' else ' reduced at extraction [(]mean[)]'}; evaluate on a store "
                                             "of this layer extracted as the probe's was$"):
            evaluate(tmp_path / trained_on, "first")
    # a probe of the tokens side by side needs them
    run_probes(ProbeOptions(store=str(tmp_path / "full.h5"), target="y", out=str(tmp_path / "flat"), tokens="flat",
                            progress=False))
    with pytest.raises(ProbeError, match=r"the probe was trained on rows of shape \(4, 8\); evaluate on a store"):
        evaluate(tmp_path / "flat", "means")


def test_other_samples_are_evaluated_whole_and_the_same_data_set_on_its_held_out_samples(tmp_path, caplog):
    spec = ("mypkg.data:episodes", {"split": "val"})
    linear_store(tmp_path / "a.h5", dataset=spec)
    train(tmp_path, tmp_path / "a.h5")
    probes = str(tmp_path / "probes")
    # other samples (another data set), the same relation: all 500 rows, read as well
    _, x, y, _ = linear_store(tmp_path / "other.h5", n=500, x_seed=5, dataset=("mypkg.data:episodes", {"split": "test"}))
    with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
        other = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "other.h5"), out=str(tmp_path / "e1")))
    # the same callable with other arguments: the probes' store tells by the targets of each source index
    assert (f'rows: all 500 committed rows of {tmp_path / "other.h5"}, an extraction of mypkg.data:episodes with {{"split": '
            '"test"}, the probes\' with {"split": "val"}, whose targets differ from the probes\' store\'s on 500 of the 500 '
            'samples of source indices both hold: other samples') in caplog.text
    assert other["evaluation"]["rows"] == "all" and other["layers"][0]["split_rows"] == {"test": 500}
    assert other["layers"][0]["probe"]["test"]["r2"] > 0.999
    # the same data set through another model (its features permuted): the held-out samples only
    with StoreWriter(tmp_path / "ckpt2.h5", [LayerSpec("h", (D,))], [TargetSpec("y", (3,), "float32")],
                     {"dataset": spec[0], "dataset_args": spec[1]}) as writer:
        _, xa, ya, _ = linear_store(tmp_path / "tmp.h5")
        writer.append({"h": xa[:, ::-1].copy()}, targets={"y": ya}, index=np.arange(600))
    with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
        moved = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "ckpt2.h5"), out=str(tmp_path / "e2")))
    assert ('rows: the samples the probes were not fitted or chosen on, as ' + str(tmp_path / "ckpt2.h5") + ' is an extraction of the same '
            'data set (mypkg.data:episodes {"split": "val"})') in caplog.text
    assert moved["layers"][0]["split_rows"] == {"test": 60} and moved["layers"][0]["probe"]["test"]["r2"] < 0.5
    # the same data set's samples that the probes' store did not hold are unseen too
    with StoreWriter(tmp_path / "more.h5", [LayerSpec("h", (D,))], [TargetSpec("y", (3,), "float32")],
                     {"dataset": spec[0], "dataset_args": spec[1]}) as writer:
        writer.append({"h": np.concatenate([xa, x[:100]])}, targets={"y": np.concatenate([ya, y[:100]])},
                      index=np.arange(700))
    more = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "more.h5"), out=str(tmp_path / "e5")))
    assert more["evaluation"]["rows"] == "held-out" and more["layers"][0]["split_rows"] == {"test": 160}
    # the probe files say which data set they saw: the store they were trained on need not be there
    os.remove(tmp_path / "a.h5")
    again = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "more.h5"), out=str(tmp_path / "e6")))
    assert again["layers"][0]["probe"]["test"] == more["layers"][0]["probe"]["test"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="marstore.evaluate"):
        every = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "ckpt2.h5"), out=str(tmp_path / "e3"), rows="all"))
    assert every["layers"][0]["split_rows"] == {"test": 600}
    assert "includes the samples the probes were fitted and chosen on: the metric is not a test metric" in caplog.text
    # asked for held-out samples of a store that holds none: its rows are all training rows
    seen = load_probe(tmp_path / "probes" / "h.pt").saw(np.arange(600))
    with StoreWriter(tmp_path / "seen.h5", [LayerSpec("h", (D,))], [TargetSpec("y", (3,), "float32")]) as writer:
        writer.append({"h": xa[seen]}, targets={"y": ya[seen]}, index=np.flatnonzero(seen))
    with pytest.raises(ProbeError, match=r"^h: every row of .*seen\.h5 is of a sample the probe was fitted or chosen on; "
                                         r"use --rows all$"):
        evaluate_probes(EvaluateOptions(probes, str(tmp_path / "seen.h5"), out=str(tmp_path / "e4"), rows="held-out"))


def test_labels_the_probe_never_saw_count_as_wrong(tmp_path, caplog):
    linear_store(tmp_path / "a.h5", labels=3)
    train(tmp_path, tmp_path / "a.h5", target="label")
    _, _, _, label = linear_store(tmp_path / "b.h5", n=300, x_seed=3, labels=4)  # class 3 is new
    with caplog.at_level(logging.WARNING, logger="marstore.evaluate"):
        report = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(tmp_path / "b.h5"), out=str(tmp_path / "e")))
    entry = report["layers"][0]
    unseen = int((label == 3).sum())
    assert unseen > 0 and entry["unseen_label_rows"] == unseen and entry["classes"] == [0, 1, 2]
    assert f"h: {unseen} of 300 rows hold a label the probe has no class for (it never saw it in training); they count as wrong" \
        in caplog.text
    probe = load_probe(entry["probe"]["weights"])
    _, x, _, _ = linear_store(tmp_path / "c.h5", n=300, x_seed=3, labels=4)
    right = (probe.predict(torch.from_numpy(x.astype(np.float32))).numpy() == label).sum()
    assert entry["probe"]["test"]["accuracy"] == pytest.approx(right / 300, rel=1e-6) and right / (300 - unseen) > 0.8
    predicted = probe.predict(torch.from_numpy(x.astype(np.float32))).numpy()
    recall = [round(float((predicted[label == c] == c).mean()), 6) for c in range(3)]  # the new class has no recall
    assert entry["probe"]["test"]["recall_per_class"] == recall and "by_class" in report["plots"]


def test_evaluate_refuses_what_does_not_fit_in_one_line(tmp_path, capsys):
    linear_store(tmp_path / "a.h5")
    train(tmp_path, tmp_path / "a.h5")
    probes = str(tmp_path / "probes")
    with StoreWriter(tmp_path / "wide.h5", [LayerSpec("h", (D + 1,))], [TargetSpec("y", (3,), "float32")]) as writer:
        writer.append({"h": np.zeros((10, D + 1), np.float16)}, targets={"y": np.zeros((10, 3), np.float32)}, index=np.arange(10))
    with StoreWriter(tmp_path / "no_y.h5", [LayerSpec("h", (D,))], [TargetSpec("z", (), "float32")]) as writer:
        writer.append({"h": np.zeros((10, D), np.float16)}, targets={"z": np.zeros(10, np.float32)}, index=np.arange(10))
    with StoreWriter(tmp_path / "flat.h5", [LayerSpec("h", (D,))], [TargetSpec("y", (3,), "float32")]) as writer:
        writer.append({"h": np.ones((10, D), np.float16)}, targets={"y": np.tile(np.float32([1, 2, 3]), (10, 1))},
                      index=np.arange(10))
    cases = [
        ([probes, str(tmp_path / "wide.h5")], f"h: {tmp_path / 'wide.h5'} holds rows of shape (9,), the probe was trained on "
                                              "rows of shape (8,); evaluate on a store of this layer extracted as the probe's was"),
        ([probes, str(tmp_path / "no_y.h5")], f"target 'y' is not in {tmp_path / 'no_y.h5'}; its targets are ['z'] (--target "
                                              "names the one to score against, or a layer)"),
        ([probes, str(tmp_path / "no_y.h5"), "--target", "z"], "h: target 'z' has 1 values a row, the probe predicts 3"),
        ([probes, str(tmp_path / "a.h5"), "--layer", "g"], f"--layer 'g': no probe of {probes} is of such a layer; nearest: h"),
        ([probes, str(tmp_path / "flat.h5")], "h: target 'y' is [1.0, 2.0, 3.0] in every evaluated row, where R² is undefined; "
                                              "evaluate on rows where it varies"),
    ]
    for argv, message in cases:
        code = main(["evaluate", *argv, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err.strip().splitlines()
        assert (code, err) == (2, [f"marstore evaluate: {message}"])
    with pytest.raises(ProbeError, match=r"^--rows 'some': use one of auto, all, held-out$"):
        EvaluateOptions(probes, str(tmp_path / "a.h5"), rows="some")
    assert main(["evaluate", probes, str(tmp_path / "a.h5"), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["layer", "r2"] and printed[1].split()[0] == "h"
    assert printed[-2:] == [f"report: {tmp_path / 'e' / 'report.json'}, {tmp_path / 'e' / 'report.md'}",
                            f"plots: {tmp_path / 'e' / 'depth.png'}, {tmp_path / 'e' / 'by_position.png'}"]
    # marstore info of each folder: what was probed, where, and the table
    for folder, line in ((probes, f"{probes}: the probes of 'y' (regression, r2, 1 entries), trained on {tmp_path / 'a.h5'} "
                                  "(complete, 600 rows)"),
                         (str(tmp_path / "e"), f"{tmp_path / 'e'}: the probes of 'y' in {probes} (regression, r2, 1 entries), "
                                               f"evaluated on {tmp_path / 'a.h5'} (complete, 600 rows)")):
        assert main(["info", folder]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == line and out[1].split()[:2] == ["layer", "r2"] and out[2].split()[0] == "h" and len(out) == 3
    # compare takes the evaluation beside the probes' own report
    assert main(["compare", probes, str(tmp_path / "e"), "--label", "trained", "again", "--out", str(tmp_path / "c")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["layer", "trained", "again"] and table[1].split()[1] == table[1].split()[5]


def test_an_mlp_probe_on_a_ragged_layer_is_applied_to_its_tokens(tmp_path):
    """MAR's encoder keeps a varying number of tokens: the probe takes a sample's tokens, however
    many, as the store's rows of that layer are read for it (their mean)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, 500)
    tokens = rng.standard_normal((int(lengths.sum()), D)).astype(np.float16)
    means = np.stack([t.astype(np.float32).mean(0) for t in np.split(tokens, np.cumsum(lengths)[:-1])])
    y = (means[:, 0] * means[:, 1] > 0).astype(np.int64)  # a label no linear probe reads
    store = tmp_path / "r.h5"
    with StoreWriter(store, [LayerSpec("enc", (D,), ragged=True)], [TargetSpec("sign", (), "int64")]) as writer:
        writer.append({"enc": Ragged(tokens, lengths)}, targets={"sign": y}, index=np.arange(500))
    report = train(tmp_path, store, target="sign", kind="mlp", epochs=3, hidden=16)
    probe = load_probe(report["layers"][0]["probe"]["weights"])
    assert probe.ragged and probe.kind == "mlp" and probe.head.mlp[0].out_features == 16
    first = torch.from_numpy(tokens[: lengths[0]].astype(np.float32))[None]
    torch.testing.assert_close(probe(first), probe.head(probe.features(torch.from_numpy(means[:1]))), atol=1e-5, rtol=1e-5)
    assert probe.predict(first).tolist() in ([0], [1])
    with pytest.raises(ProbeError, match=r"^enc: activations of shape \(1, 8\); this probe takes rows shaped "
                                         r"\(rows, tokens, 8\)$"):
        probe(first[0, :1])
    same = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(store), out=str(tmp_path / "e")))
    assert same["layers"][0]["probe"]["test"] == report["layers"][0]["probe"]["test"]


def test_text_labels_are_matched_by_their_strings(tmp_path, capsys):
    from marstore.store import TEXT

    def store(path, names, seed):
        rng = np.random.default_rng(seed)
        which = rng.integers(0, len(names), 300)
        lifted = np.array([["lift", "push", "stack", "pour"].index(name) for name in names])[which]
        x = (rng.standard_normal((300, D)) + 3 * np.eye(D)[lifted]).astype(np.float16)  # each task lifts its feature
        with StoreWriter(path, [LayerSpec("h", (D,))], [TargetSpec("task", (), TEXT), TargetSpec("n", (), "int64")]) as writer:
            writer.append({"h": x}, targets={"task": np.array(names, dtype=object)[which], "n": which}, index=np.arange(300))
        return x, np.array(names, dtype=object)[which]

    store(tmp_path / "a.h5", ["lift", "push", "stack"], 0)
    train(tmp_path, tmp_path / "a.h5", target="task")
    # the same tasks, listed in another order (so with other numbers), and one more
    x, tasks = store(tmp_path / "b.h5", ["stack", "lift", "push", "pour"], 1)
    report = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(tmp_path / "b.h5"), out=str(tmp_path / "e")))
    entry = report["layers"][0]
    assert entry["classes"] == ["lift", "push", "stack"] and entry["unseen_label_rows"] == int((tasks == "pour").sum())
    predicted = np.array(load_probe(entry["probe"]["weights"]).predict(torch.from_numpy(x.astype(np.float32))), dtype=object)
    assert set(predicted) <= {"lift", "push", "stack"}
    assert entry["probe"]["test"]["accuracy"] == pytest.approx((predicted == tasks).mean(), rel=1e-6)
    assert (predicted == tasks)[tasks != "pour"].mean() > 0.9  # the known tasks, read by their names
    assert main(["evaluate", str(tmp_path / "probes"), str(tmp_path / "b.h5"), "--target", "n", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip() == ("marstore evaluate: h: target 'n' holds numbers, and the probe's classes are text "
                                               "(lift, push, stack); score it against a target like the one it was trained for")


def test_tokens_each_gives_a_probe_for_each_step_and_each_applies_alone(tmp_path):
    """A diffusion head's firings stacked (--multi-fire stack): which denoising step holds the target?"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 5, D)).astype(np.float16)
    y = (x[:, 3, :2].astype(np.float64) @ np.array([1.0, -2.0])).astype(np.float32)  # step 3 alone holds it
    conv = rng.standard_normal((600, 3, 2, 2)).astype(np.float16)  # channels first: 4 positions of 3 channels
    z = conv[:, :, 0, 1].astype(np.float64).sum(1).astype(np.float32)  # position (0, 1), flattened 1
    store = tmp_path / "steps.h5"
    with StoreWriter(store, [LayerSpec("head", (5, D)), LayerSpec("conv", (3, 2, 2), channel_axis=0)],
                     [TargetSpec("y", (), "float32"), TargetSpec("z", (), "float32")]) as writer:
        writer.append({"head": x, "conv": conv}, targets={"y": y, "z": z}, index=np.arange(600))
    report = train(tmp_path, store, target="y", layer="head", tokens="each")
    r2 = {entry["layer"]: entry["probe"]["test"]["r2"] for entry in report["layers"]}
    assert list(r2) == [f"head[{i}]" for i in range(5)]
    assert r2["head[3]"] > 0.999 and max(v for k, v in r2.items() if k != "head[3]") < 0.05
    probe = load_probe(report["layers"][3]["probe"]["weights"])
    assert (probe.name, probe.layer, probe.token) == ("head[3]", "head", 3)
    held_out = np.flatnonzero(~probe.saw(np.arange(600)))
    pred = probe.predict(torch.from_numpy(x[held_out].astype(np.float32)))
    assert _metrics("regression", pred[:, None], torch.from_numpy(y[held_out])[:, None])["r2"] == r2["head[3]"]
    same = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(store), out=str(tmp_path / "e"), layer="head"))
    assert [e["probe"]["test"] for e in same["layers"]] == [e["probe"]["test"] for e in report["layers"]]
    flat = run_probes(ProbeOptions(store=str(store), target="z", layer="conv", tokens="each", out=str(tmp_path / "c"),
                                   progress=False))
    best = max(flat["layers"], key=lambda e: e["probe"]["test"]["r2"])
    assert [e["layer"] for e in flat["layers"]] == [f"conv[{i}]" for i in range(4)] and best["layer"] == "conv[1]"
    assert best["probe"]["test"]["r2"] > 0.999


def test_tokens_each_refuses_rows_it_cannot_split(tmp_path):
    rng = np.random.default_rng(0)
    store = tmp_path / "s.h5"
    with StoreWriter(store, [LayerSpec("plain", (D,)), LayerSpec("wide", (300, 2)), LayerSpec("enc", (D,), ragged=True)],
                     [TargetSpec("y", (), "float32")]) as writer:
        writer.append({"plain": rng.standard_normal((50, D)).astype(np.float16),
                       "wide": rng.standard_normal((50, 300, 2)).astype(np.float16),
                       "enc": Ragged(rng.standard_normal((150, D)).astype(np.float16), [3] * 50)},
                      targets={"y": rng.standard_normal(50).astype(np.float32)}, index=np.arange(50))
    for layer, message in [("plain", r"plain: rows of shape \(8,\) have no tokens; --tokens each trains a probe for each of "
                                     r"1 to 256 tokens \(store fewer: --reduction mean:G, or probe --tokens mean\)$"),
                           ("wide", r"wide: rows of shape \(300, 2\) have 300 tokens; --tokens each trains a probe"),
                           ("enc", r"enc is ragged \(its token count varies\): --tokens each needs one count; use --tokens mean \(or aligned\)$")]:
        with pytest.raises(ProbeError, match="^" + message):
            train(tmp_path, store, layer=layer, tokens="each")


def test_info_describes_a_probe_file(tmp_path, capsys):
    store = tmp_path / "a.h5"
    linear_store(store, dataset=("mypkg.data:episodes", {"split": "val"}))
    train(tmp_path, store, target="label")
    path = str(tmp_path / "probes" / "h.pt")
    assert main(["info", path]) == 0
    with open_store(store) as s:
        created = str(s.file.attrs["created"])
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: marstore probe",
        "  h -> label: linear classification, 3 classes from 8 features (rows (8,), extraction reduction none, "
        "standardised)",
        "  classes: 0, 1, 2",
        f"  trained on {store} (complete, 600 rows, created {created}; data set mypkg.data:episodes {{\"split\": \"val\"}})",
        f"  fitted or chosen on 540 samples (source indices in {len(load_probe(path).seen_sources)} ranges)"]
    assert main(["info", str(tmp_path / "probes" / "h-control.pt"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["control"], described["inputs"], described["outputs"], described["seen_samples"]) == (True, 8, 3, 540)
    # a file of the format's development version: without the data set read as not recorded, without
    # the samples it saw refused in one line, not a KeyError
    file = torch.load(path, weights_only=True)
    del file["trained_on"]["dataset"]
    torch.save(file, tmp_path / "older.pt")
    assert load_probe(tmp_path / "older.pt").trained_on["dataset"] == [None, None]
    del file["seen_sources"]
    torch.save(file, tmp_path / "old.pt")
    assert main(["info", str(tmp_path / "old.pt")]) == 2
    assert capsys.readouterr().err.strip() == (f"marstore info: {tmp_path / 'old.pt'} lacks seen_sources, which a "
                                               "marstore-probe/1 file holds; run `marstore probe` again")


def test_the_same_data_set_with_other_arguments_is_told_by_the_probes_store(tmp_path, caplog):
    """size=700 holds the 600 samples of size=600 and 100 more, as the built-in data set does:
    their targets agree by source index, so only the samples the probes never saw are scored.
    Where the probes' store is gone, it cannot be told: every row, with a count of the indices
    the probes saw."""
    linear_store(tmp_path / "a.h5", dataset=("mypkg.data:episodes", {"size": 600}))
    train(tmp_path, tmp_path / "a.h5")
    probes = str(tmp_path / "probes")
    linear_store(tmp_path / "b.h5", n=700, dataset=("mypkg.data:episodes", {"size": 700}))
    with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
        result = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "b.h5"), out=str(tmp_path / "e")))
    assert result["evaluation"]["rows"] == "held-out" and result["layers"][0]["split_rows"] == {"test": 60 + 100}
    assert result["evaluation"]["same_samples"] == ('an extraction of mypkg.data:episodes with {"size": 700}, the probes\' '
                                                    'with {"size": 600}, whose targets agree with the probes\' store\'s on '
                                                    'all 600 samples both hold')
    os.rename(tmp_path / "a.h5", tmp_path / "moved.h5")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="marstore.evaluate"):
        result = evaluate_probes(EvaluateOptions(probes, str(tmp_path / "b.h5"), out=str(tmp_path / "e2")))
    assert result["evaluation"]["rows"] == "all" and result["layers"][0]["split_rows"] == {"test": 700}
    assert (f'rows: all 700 committed rows of {tmp_path / "b.h5"}, an extraction of mypkg.data:episodes with {{"size": 700}}, '
            'the probes\' with {"size": 600}: where a source index is the same sample in both, 540 of them are of samples '
            'the probes were fitted or chosen on (--rows held-out leaves those out)') in caplog.text


def test_a_data_set_recorded_by_its_class_alone_does_not_tell_its_samples(tmp_path, caplog):
    # extract_from records a data set object by its class: two splits of one class are not one data set
    spec = ("<object mypkg.data.Episodes>", {})
    linear_store(tmp_path / "a.h5", dataset=spec)
    train(tmp_path, tmp_path / "a.h5")
    linear_store(tmp_path / "b.h5", n=500, x_seed=5, dataset=spec)
    result = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(tmp_path / "b.h5"), out=str(tmp_path / "e")))
    assert result["evaluation"]["rows"] == "all" and result["layers"][0]["split_rows"] == {"test": 500}
    # named (extract_from's dataset_name), it does
    named = ("libero10/val", {})
    linear_store(tmp_path / "c.h5", dataset=named)
    train(tmp_path / "c", tmp_path / "c.h5")
    linear_store(tmp_path / "d.h5", dataset=named)
    result = evaluate_probes(EvaluateOptions(str(tmp_path / "c" / "probes"), str(tmp_path / "d.h5"), out=str(tmp_path / "e2")))
    assert result["evaluation"]["rows"] == "held-out" and result["layers"][0]["split_rows"] == {"test": 60}


def task_store(path, n=900, flip=False):
    """Layer 'h' (D features); 'task' (text) of each row, 'y' (1 value) = x[0] in task 'push' and
    x[1] in 'pick' (the other way round with flip), 'ok' a boolean and 'ep' an episode number."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, D)).astype(np.float16)
    task = np.array(["push", "pick", "place"])[np.arange(n) % 3]
    y = np.where(task == ("pick" if flip else "push"), x[:, 0], x[:, 1]).astype(np.float32)
    with StoreWriter(path, [LayerSpec("h", (D,))], [TargetSpec("y", (), "float32"), TargetSpec("task", (), TEXT),
                                                     TargetSpec("ok", (), "bool"), TargetSpec("ep", (), "int64"),
                                                     TargetSpec("pair", (2,), "int64")],
                     {"dataset": "mypkg.data:tasks", "dataset_args": {}}) as writer:
        writer.append({"h": x}, targets={"y": y, "task": task, "ok": np.arange(n) % 2 == 0, "ep": np.arange(n) // 30,
                                         "pair": np.zeros((n, 2), np.int64)}, index=np.arange(n))
    return task


def test_rows_where_selects_by_target_values_and_refuses_what_would_select_by_mistake(tmp_path):
    from marstore.dataset import rows_where
    from marstore.store import StoreError

    task = task_store(tmp_path / "t.h5")
    with open_store(tmp_path / "t.h5") as s:
        assert np.array_equal(rows_where(s, "task=push"), np.flatnonzero(task == "push"))
        assert np.array_equal(rows_where(s, ["task!=push", "ok=true"]), np.flatnonzero((task != "push") & (np.arange(900) % 2 == 0)))
        assert np.array_equal(rows_where(s, ["ep=3"], rows=100), np.arange(90, 100))  # of the first 100 rows
        assert np.array_equal(rows_where(s, ["ep=2.0"]), np.arange(60, 90))  # numbers compare as numbers
        y = s.target("y")
        assert y.dtype == np.float32 and np.array_equal(rows_where(s, f"y={y[7]}"), np.flatnonzero(y == y[7]))  # as printed
        for conditions, message in [
            ("task=pusj", r"^--where task=pusj: no row of .*t\.h5 has task = pusj; it holds pick, place, push$"),
            ("ep=99", r"^--where ep=99: no row of .*t\.h5 has ep = 99; it holds 0, 1, 2, .* 11 \.\.\. \(30 values\)$"),
            ("ep=three", r"^--where ep=three: target 'ep' holds numbers, and 'three' is not one$"),
            ("stage=1", r"^--where stage=1: .*t\.h5 has no target 'stage'; it has \['ep', 'ok', 'pair', 'task', 'y'\]$"),
            ("pair=0", r"^--where pair=0: target 'pair' holds \(2,\) values a row; --where compares a target of one value a row \(or, for probe --tokens aligned, one a token\)$"),
            ("task", r"^--where 'task': write TARGET=VALUE or TARGET!=VALUE$"),
            (["task=push", "task=pick"], r"^--where task=push task=pick: no row of .*t\.h5 meets them all$"),
        ]:
            with pytest.raises(StoreError, match=message):
                rows_where(s, conditions)


def test_probes_within_a_subset_and_evaluate_keeps_to_it(tmp_path, capsys):
    task = task_store(tmp_path / "t.h5")
    report = train(tmp_path, tmp_path / "t.h5", where=["task=push"])
    entry = report["layers"][0]
    assert report["selected_rows"] == 300 and sum(entry["split_rows"].values()) == 300
    assert entry["probe"]["test"]["r2"] > 0.99  # within one task y is one feature: read exactly
    everywhere = train(tmp_path / "all", tmp_path / "t.h5")["layers"][0]["probe"]["test"]["r2"]
    assert everywhere < 0.9  # across the tasks it is not one linear function
    probe = load_probe(entry["probe"]["weights"])
    seen = probe.saw(np.arange(900))
    assert seen.sum() == 270 and set(task[seen]) == {"push"}  # fitted and chosen on push rows only
    assert "(complete, 900 rows; the 300 where task=push)" in open(report["markdown"]).read()
    assert probe.where == ["task=push"] and main(["info", entry["probe"]["weights"]]) == 0
    assert ", on the rows where task=push\n" in capsys.readouterr().out
    # evaluated as trained: on its own store, its test rows, and the report's metric exactly
    same = evaluate_probes(EvaluateOptions(str(tmp_path / "probes"), str(tmp_path / "t.h5"), out=str(tmp_path / "e1")))
    assert same["evaluation"]["where"] == ["task=push"] and same["layers"][0]["split_rows"] == {"test": 30}
    assert same["layers"][0]["probe"]["test"]["r2"] == entry["probe"]["test"]["r2"]
    # on another checkpoint's store, where the tasks read other features: the push rows only, unless told
    task_store(tmp_path / "flip.h5", flip=True)
    main(["evaluate", str(tmp_path / "probes"), str(tmp_path / "flip.h5"), "--out", str(tmp_path / "e2"), "--where", "task=pick"])
    picked = json.load(open(tmp_path / "e2" / "report.json"))
    assert picked["layers"][0]["split_rows"] == {"test": 300} and picked["layers"][0]["probe"]["test"]["r2"] > 0.99
    assert "the 300 rows of samples the probes were not fitted or chosen on, where task=pick" in open(tmp_path / "e2" / "report.md").read()
    main(["evaluate", str(tmp_path / "probes"), str(tmp_path / "flip.h5"), "--out", str(tmp_path / "e3"), "--where"])
    assert json.load(open(tmp_path / "e3" / "report.json"))["layers"][0]["split_rows"] == {"test": 630}  # every unseen sample
    assert main(["probe", str(tmp_path / "t.h5"), "--target", "y", "--where", "task=pusj", "--out", str(tmp_path / "p2")]) == 2
    assert capsys.readouterr().err.strip().endswith("no row of " + str(tmp_path / "t.h5") + " has task = pusj; it holds pick, "
                                                    "place, push")


def test_live_probes_read_a_running_model_as_the_store_held_it(tmp_path, capsys):
    from torch.utils.data import default_collate

    from marstore.evaluate import LiveProbes
    from marstore.extract import extract_from
    from marstore.hooks import HookError, hook_count
    from marstore.models import policy_forward, synthetic_video_actions, video_mar

    torch.manual_seed(0)
    model = video_mar(task_name="t", embed_dim=32, depth=2, decoder_depth=2, num_heads=2)
    data = synthetic_video_actions(size=200)
    # UVA's action head runs on B*4 rows: unfolded to (B, 4, D, 4, 4), its positions pooled
    extract_from(model, data, str(tmp_path / "s.h5"), ["encoder_blocks.*", "decoder_norm", "diffactloss.conv"],
                 forward=policy_forward, targets=["nactions", "label"], reduction="mean", unfold_batch=True,
                 channels_first=["diffactloss.conv"], batch_size=20, progress=False, dtype="float32")
    run_probes(ProbeOptions(store=str(tmp_path / "s.h5"), target="nactions", out=str(tmp_path / "p"), progress=False,
                            control=False))
    names = ("encoder_blocks.1", "decoder_norm", "diffactloss.conv")
    paths = [str(tmp_path / "p" / f"{name}.pt") for name in names]
    probes = [load_probe(p) for p in paths]
    assert [p.unfolded for p in probes] == [None, None, 4]
    batch = default_collate([data[i] for i in range(5)])
    with open_store(tmp_path / "s.h5") as s:
        stored = {name: torch.from_numpy(s.read(name, 0, 5).astype(np.float32)) for name in names}
        assert s.layers["diffactloss.conv"].attrs["unfolded"] == 4 and "unfolded" not in s.layers["decoder_norm"].attrs
    assert main(["info", str(tmp_path / "s.h5")]) == 0
    assert "(from float32, reduction mean (channels first), unfolded from 4 rows a sample)" in capsys.readouterr().out
    assert main(["info", paths[2]]) == 0
    assert "extraction reduction mean (channels first), unfolded from 4 rows a sample, standardised)" in capsys.readouterr().out
    with LiveProbes(model, paths) as live:
        assert hook_count(model) == 3
        with torch.inference_mode():
            policy_forward(model, batch)
        read = live.read()
        with pytest.raises(HookError, match=r"^encoder_blocks\.1 did not fire in this batch"):
            live.read()  # nothing ran since
    assert hook_count(model) == 0
    for probe in probes:  # the block's (5, 64, 32) tokens, the head's (20, 32, 4, 4): reduced as extraction reduced them
        want = probe.predict(stored[probe.layer])
        assert read[probe.name].shape == want.shape == (5, 16, 2)
        torch.testing.assert_close(read[probe.name], want, atol=1e-4, rtol=0)  # a batch of 5, not of 20: other roundings
    with pytest.raises(ProbeError, match=r"^probes of one name given twice"):
        LiveProbes(model, [paths[0], probes[0]])


class Looped(torch.nn.Module):
    """A module called three times a forward, as a diffusion head is once a denoising step."""

    def __init__(self):
        super().__init__()
        self.inp, self.step = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(3):
            h = torch.tanh(self.step(h))
        return h.sum()


def probed(tmp_path, model, layer, tokens, **hooked):
    """Stores a layer of a model of 4 inputs over 300 samples (target y: the first input), hooked
    as told, in tmp_path/s.h5, and trains its probes into tmp_path/p; the samples."""
    from marstore.extract import extract_from

    data = [{"x": x, "y": x[0]} for x in torch.randn(300, 4)]
    extract_from(model, data, str(tmp_path / "s.h5"), layer, forward=lambda m, b: m(b["x"]), targets=["y"],
                 dtype="float32", batch_size=50, progress=False, **hooked)
    run_probes(ProbeOptions(store=str(tmp_path / "s.h5"), target="y", out=str(tmp_path / "p"), progress=False,
                            control=False, tokens=tokens))
    return data


def test_live_probes_hook_a_module_as_its_extraction_did(tmp_path, capsys):
    from marstore.evaluate import LiveProbes
    from marstore.hooks import HookError

    torch.manual_seed(0)
    model = Looped()
    data = probed(tmp_path, model, "step", "each", multi_fire="stack")
    probe = load_probe(tmp_path / "p" / "step[2].pt")  # the last step's
    assert (probe.multi_fire, probe.unfolded, probe.row_shape) == ("stack", None, (3, 8))
    assert main(["info", str(tmp_path / "p" / "step[2].pt")]) == 0
    assert "(token 2 of rows (3, 8), extraction reduction none, --multi-fire stack, standardised)" in capsys.readouterr().out
    with open_store(tmp_path / "s.h5") as s:
        stored = torch.from_numpy(s.read("step", 0, 5))
    with LiveProbes(model, [probe]) as live:  # stacked, as the file says
        model(torch.stack([d["x"] for d in data[:5]]))
        torch.testing.assert_close(live.read()["step[2]"], probe.predict(stored), atol=1e-5, rtol=0)
    with LiveProbes(model, [probe], multi_fire="error"), pytest.raises(HookError, match="step fired more than once"):
        model(torch.stack([d["x"] for d in data[:5]]))
    other = load_probe(tmp_path / "p" / "step[0].pt")
    other.multi_fire = "last"  # as if from a store extracted otherwise: one hooking cannot serve both
    with pytest.raises(ProbeError, match=r"^the probes were extracted with different multi_fire policies "
                                         r"\(\{'step\[2\]': 'stack', 'step\[0\]': 'last'\}\)"):
        LiveProbes(model, [probe, other])


class RepeatsTheBatch(torch.nn.Module):
    """A head that runs on 3 shifted copies of the batch, one after another (k b), as MAR's
    diffusion loss runs on x.repeat(4, 1)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.head(torch.cat([h + i for i in range(3)])).sum()


def test_live_probes_unfold_a_module_by_its_recorded_layout(tmp_path, capsys):
    from marstore.evaluate import LiveProbes

    torch.manual_seed(0)
    model = RepeatsTheBatch()
    data = probed(tmp_path, model, "head", "flat", unfold_batch="(k b)")
    probe = load_probe(tmp_path / "p" / "head.pt")
    assert (probe.unfolded, probe.unfold_layout, probe.row_shape) == (3, "(k=3 b)", (3, 8))
    assert main(["info", str(tmp_path / "p" / "head.pt")]) == 0
    assert "extraction reduction none, unfolded from 3 rows a sample as (k=3 b), standardised)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s.h5")]) == 0
    assert ", unfolded from 3 rows a sample as (k=3 b)" in capsys.readouterr().out
    x = torch.stack([d["x"] for d in data[:5]])
    with open_store(tmp_path / "s.h5") as s:
        stored = torch.from_numpy(s.read("head", 0, 5))
    with torch.no_grad():  # sample s's third copy (a batch of 5, not 50: other roundings)
        torch.testing.assert_close(stored[:, 2], model.head(model.inp(x) + 2), atol=1e-6, rtol=0)
    with LiveProbes(model, [probe]) as live:
        model(x)
        torch.testing.assert_close(live.read()["head"], probe.predict(stored), atol=1e-5, rtol=0)
    probe.unfold_layout = "(b k=3)"  # as files written before the layout was recorded read: sample-major
    with LiveProbes(model, [probe]) as live:
        model(x)
        assert not torch.allclose(live.read()["head"], probe.predict(stored), atol=1e-3)
    # a store of the same module unfolded sample-major holds rows of the same shape, of mixed samples
    from marstore.extract import extract_from

    extract_from(model, data, str(tmp_path / "sample_major.h5"), "head", forward=lambda m, b: m(b["x"]), targets=["y"],
                 unfold_batch=True, dtype="float32", batch_size=50, progress=False)
    with pytest.raises(ProbeError) as info:
        evaluate_probes(EvaluateOptions(str(tmp_path / "p"), str(tmp_path / "sample_major.h5"), out=str(tmp_path / "e")))
    assert str(info.value) == (f"head: {tmp_path / 'sample_major.h5'} holds it unfolded as (b k=3), the probe was trained "
                               "on it unfolded as (k=3 b); evaluate on a store of this layer extracted as the probe's was")


@pytest.mark.parametrize("case", ["conv positions", "token list"])
def test_a_probe_takes_the_capture_of_any_recorded_reduction(tmp_path, case):
    """The store records a reduction as text ('mean (channels first)', '[0, 2]'); the probe parses
    it back to reduce the module's own capture as extraction did."""
    from marstore.extract import extract_from
    from marstore.hooks import parse_recorded_reduction, recorded_reduction

    for reduction, channels_first in (("none", False), ("mean", False), ("mean:4", True), ([0, 5, 9], False), ("last", True)):
        assert parse_recorded_reduction(recorded_reduction(reduction, channels_first)) == (reduction, channels_first)
    torch.manual_seed(0)
    if case == "conv positions":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
        inputs = torch.randn(200, 3, 8, 8)
        options = dict(reduction="mean", channels_first=True, layers="0")
    else:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
        inputs = torch.randn(200, 5, 4)
        options = dict(reduction=[0, 2], layers="0")
    model(inputs[:1])
    data = [{"x": x, "y": x.mean()} for x in inputs]
    extract_from(model, data, str(tmp_path / "s.h5"), forward=lambda m, b: m(b["x"]), targets=["y"], dtype="float32",
                 batch_size=50, progress=False, **options)
    run_probes(ProbeOptions(store=str(tmp_path / "s.h5"), target="y", out=str(tmp_path / "p"), progress=False, control=False))
    probe = load_probe(tmp_path / "p" / "0.pt")
    with open_store(tmp_path / "s.h5") as s:
        stored = torch.from_numpy(s.read("0", 0, 6))
    captured = model[0](inputs[:6]).detach()  # the module's own output: (6, 6, 6, 6) or (6, 5, 8)
    torch.testing.assert_close(probe.predict(captured), probe.predict(stored), atol=1e-5, rtol=0)


def test_every_stage_error_is_one_line_from_any_command(monkeypatch, capsys):
    from marstore import probe as probe_module
    from marstore.errors import MarstoreError
    from marstore.extract import ExtractError
    from marstore.hooks import HookError
    from marstore.loading import CheckpointError
    from marstore.store import StoreError

    assert all(issubclass(e, MarstoreError) for e in (StoreError, ExtractError, HookError, CheckpointError, ProbeError))

    def unreadable(*args, **kwargs):  # a store's error where compare had caught only its own
        raise StoreError("r.h5 is not an HDF5 file")

    monkeypatch.setattr(probe_module, "compare_reports", unreadable)
    assert main(["compare", "a", "b"]) == 2
    assert capsys.readouterr().err == "marstore compare: r.h5 is not an HDF5 file\n"


class _Tagged(torch.utils.data.Dataset):
    """PaddedTokens with a tag for each of its 10 token places: the token id's parity."""

    def __init__(self):
        from test_extract import PaddedTokens

        self.items = PaddedTokens()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {**item, "odd": item["tokens"] % 2}


def test_live_probes_label_each_token_of_a_nested_tensor_as_the_stored_rows_are(tmp_path):
    """A probe of each token (--tokens aligned) of a layer that gives nested tensors (stored
    ragged): read live, each sample's first tokens are labelled as its stored tokens are."""
    from torch.utils.data import default_collate

    from marstore.evaluate import LiveProbes
    from marstore.extract import extract_from
    from test_extract import PaddedEncoder

    model, data = PaddedEncoder().eval(), _Tagged()
    extract_from(model, data, str(tmp_path / "s.h5"), ["encoder.layers.0"], targets=["odd"], batch_size=6,
                 dtype="float32", progress=False)
    entry = run_probes(ProbeOptions(store=str(tmp_path / "s.h5"), target="odd", tokens="aligned", out=str(tmp_path / "p"),
                                    progress=False, control=False, val_fraction=0.25, test_fraction=0.25))["layers"][0]
    with open_store(tmp_path / "s.h5") as s:
        rows = [torch.from_numpy(r) for r in s.read("encoder.layers.0", 0, 6)]
    assert entry["layer"] == "encoder.layers.0" and sum(entry["token_rows"].values()) == sum(3 + i % 7 for i in range(24))
    probe = load_probe(entry["probe"]["weights"])
    with LiveProbes(model, [probe]) as live:
        with torch.inference_mode():
            batch = default_collate([data[i] for i in range(6)])
            model(batch["tokens"], batch["padding"])
        read = live.read()["encoder.layers.0"]
    assert read.shape == (6, 8)  # padded to the batch's most tokens
    assert [read[i, :len(r)].tolist() for i, r in enumerate(rows)] == [probe.predict(r[None])[0].tolist() for r in rows]


def test_live_probes_read_a_nested_tensor_each_sample_over_its_own_tokens(tmp_path):
    from torch.utils.data import default_collate

    from marstore.evaluate import LiveProbes
    from marstore.extract import extract_from
    from test_extract import PaddedEncoder, PaddedTokens

    model, data = PaddedEncoder().eval(), PaddedTokens()
    extract_from(model, data, str(tmp_path / "s.h5"), ["encoder.layers.1"], targets=["count"], batch_size=6,
                 dtype="float32", progress=False)
    run_probes(ProbeOptions(store=str(tmp_path / "s.h5"), target="count", out=str(tmp_path / "p"), progress=False,
                            control=False, val_fraction=0.25, test_fraction=0.25))
    probe = load_probe(tmp_path / "p" / "encoder.layers.1.pt")
    batch = default_collate([data[i] for i in range(6)])
    with LiveProbes(model, [probe]) as live:
        with torch.inference_mode():
            model(batch["tokens"], batch["padding"])
        read = live.read()["encoder.layers.1"]
    with open_store(tmp_path / "s.h5") as s:  # the stored rows of 3 to 8 tokens, each read as its token mean
        rows = [torch.from_numpy(r) for r in s.read("encoder.layers.1", 0, 6)]
    assert [len(r) for r in rows] == [3, 4, 5, 6, 7, 8]
    want = torch.cat([probe.predict(r[None]) for r in rows])
    torch.testing.assert_close(read, want, atol=1e-4, rtol=0)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # what a mean over the padding would read
    assert (probe.predict(padded) - want).abs().max() > 0.1
