"""marstore similarity: linear CKA between layers, against Kornblith et al.'s formulas."""

import json
import os

import numpy as np
import pytest

from conftest import requires_cuda

from marstore.cli import main
from marstore.similarity import SimilarityError, SimilarityOptions, layer_similarity
from marstore.store import LayerSpec, Ragged, StoreWriter, TargetSpec, open_store


def reference_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """CKA as Kornblith et al.'s published code computes it: linear Grams of the uncentred
    features, centred (for the unbiased HSIC estimator where debiased), in float64."""
    def center(gram):
        gram, n = gram.copy(), len(gram)
        if debiased:
            np.fill_diagonal(gram, 0)
            means = gram.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
        else:
            means = gram.mean(0)
            means -= means.mean() / 2
        gram -= means[:, None]
        gram -= means[None, :]
        if debiased:
            np.fill_diagonal(gram, 0)
        return gram

    gx, gy = center(x @ x.T), center(y @ y.T)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def write_store(path, layers: dict[str, np.ndarray], index=None, targets: dict[str, np.ndarray] | None = None,
                dtype: str = "float32"):
    n = len(next(iter(layers.values())))
    targets = targets or {}
    specs = [LayerSpec(name, x.shape[1:], dtype=dtype) for name, x in layers.items()]
    target_specs = [TargetSpec(name, t.shape[1:], str(t.dtype)) for name, t in targets.items()]
    with StoreWriter(path, specs, target_specs) as writer:
        writer.append(layers, targets=targets, index=range(n) if index is None else index)


def opts(tmp_path, store, **kw):
    return SimilarityOptions(str(store), out=str(tmp_path / kw.pop("out", "sim")), **kw)


@pytest.fixture
def related(tmp_path):
    """'a'; 'rotated': a rotated, scaled and shifted (CKA 1); 'bent': a nonlinear view of a with
    noise; 'wide': 400 unrelated features for 120 rows, where the plain estimate is biased up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((120, 24))
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    layers = {"a": a, "rotated": 3 * a @ q + 7, "bent": np.tanh(a @ rng.standard_normal((24, 32))) + 0.3 * rng.standard_normal((120, 32)),
              "wide": rng.standard_normal((120, 400))}
    layers = {k: v.astype(np.float32) for k, v in layers.items()}
    path = tmp_path / "s.h5"
    write_store(path, layers, targets={"label": (np.arange(120) % 3).astype(np.int64)})
    return path, layers


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_every_pair_of_layers_is_kornbliths(tmp_path, related, debiased):
    path, layers = related
    result = layer_similarity(opts(tmp_path, path, debiased=debiased))
    names = ["a", "rotated", "bent", "wide"]
    assert result["layers"] == result["against_layers"] == names and result["rows"] == 120
    expected = np.array([[reference_cka(layers[r].astype(np.float64), layers[c].astype(np.float64), debiased)
                          for c in names] for r in names])
    assert np.allclose(np.array(result["cka"]), expected, atol=2e-6, rtol=0)
    assert abs(result["cka"][0][1] - 1) < 2e-6  # a rotation, a scale and a shift
    # the plain estimate sees 400 random features as like a; the unbiased one does not
    assert (result["cka"][0][3] > 0.3) if not debiased else (abs(result["cka"][0][3]) < 0.05)
    saved = json.load(open(result["json"]))
    assert saved["cka"] == result["cka"] and saved["measure"] == ("debiased linear CKA" if debiased else "linear CKA")
    assert os.path.getsize(result["plot"]) > 5000
    # each layer's most similar other layer, never itself
    table = result["table"].splitlines()
    assert table[1].split()[:2] == ["a", "rotated"] and table[2].split()[:2] == ["rotated", "a"]


def test_two_stores_are_matched_by_source_index(tmp_path, related):
    path, layers = related
    # the second store: 90 of the samples, in another order, another layer name
    rng = np.random.default_rng(1)
    sources = rng.permutation(120)[:90]
    other = tmp_path / "other.h5"
    write_store(other, {"b": layers["bent"][sources]}, index=sources,
                targets={"label": (sources % 3).astype(np.int64)})
    result = layer_similarity(opts(tmp_path, path, against=str(other), layer=["a", "bent"], against_layer="b"))
    kept = np.sort(sources)
    assert result["rows"] == 90 and result["against_layers"] == ["b"]
    assert result["cka"][1][0] == pytest.approx(1, abs=2e-6)
    assert result["cka"][0][0] == pytest.approx(reference_cka(layers["a"][kept].astype(float), layers["bent"][kept].astype(float)), abs=2e-6)
    # a seeded sample of the shared rows
    sampled = layer_similarity(opts(tmp_path, path, against=str(other), layer="bent", against_layer="b", rows=40, out="s2"))
    assert (sampled["rows"], sampled["rows_available"]) == (40, 90) and sampled["cka"][0][0] == pytest.approx(1, abs=2e-6)
    assert "40 rows (a seeded sample of 90)" in open(sampled["markdown"]).read()
    # against a store with layers of the same names (another checkpoint), each layer's namesake too
    renamed = tmp_path / "renamed.h5"
    write_store(renamed, {"bent": layers["a"][sources], "a": layers["bent"][sources]}, index=sources)
    swapped = layer_similarity(opts(tmp_path, path, against=str(renamed), layer=["a", "bent"], out="s3"))
    lines = [line.split() for line in swapped["table"].splitlines()]
    assert lines[0] == ["layer", "most", "similar", "linear", "CKA", "same", "layer"]
    assert swapped["against_layers"] == ["a", "bent"]
    assert lines[1] == ["a", "bent", "1.000", f"{swapped['cka'][0][0]:.3f}"] and lines[2][:3] == ["bent", "a", "1.000"]


def test_stores_of_other_samples_and_too_few_rows_are_refused(tmp_path, related):
    path, layers = related
    relabelled = tmp_path / "relabelled.h5"
    write_store(relabelled, {"a": layers["a"]}, targets={"label": ((np.arange(120) + (np.arange(120) >= 7)) % 3).astype(np.int64)})
    with pytest.raises(SimilarityError) as info:
        layer_similarity(opts(tmp_path, path, against=str(relabelled), layer="a"))
    assert str(info.value) == (f"target 'label' differs between {path} and {relabelled} for sample 7 (and 112 more): their "
                               "source indices name other samples; compare extractions of one data set")
    elsewhere = tmp_path / "elsewhere.h5"
    write_store(elsewhere, {"a": layers["a"][:10]}, index=range(500, 510))
    with pytest.raises(SimilarityError) as info:
        layer_similarity(opts(tmp_path, path, against=str(elsewhere), layer="a"))
    assert str(info.value) == (f"{path} and {elsewhere} share no sample (no source index in both); CKA compares "
                               "representations of the same samples: extract both from one data set")
    few = tmp_path / "few.h5"
    write_store(few, {"a": layers["a"][:3]}, index=range(3))
    with pytest.raises(SimilarityError) as info:
        layer_similarity(opts(tmp_path, path, against=str(few), layer="a"))
    assert str(info.value) == "3 rows to compare (shared by the two stores); CKA needs 4 or more"
    with pytest.raises(SimilarityError, match=r"^--rows 3: CKA needs 4 rows or more$"):
        layer_similarity(opts(tmp_path, path, rows=3))
    assert not (tmp_path / "sim").exists()


def test_rows_with_non_finite_values_are_left_out_and_a_constant_layer_is_undefined(tmp_path, caplog):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((40, 8)), rng.standard_normal((40, 8))
    a[5, 2] = np.nan
    b[9, 0] = np.inf
    path = tmp_path / "nan.h5"
    write_store(path, {"a": a.astype(np.float32), "b": b.astype(np.float32), "flat": np.ones((40, 4), np.float32)})
    result = layer_similarity(opts(tmp_path, path))
    keep = np.setdiff1d(np.arange(40), [5, 9])
    assert (result["rows"], result["skipped_rows"]) == (38, 2)
    assert result["cka"][0][1] == pytest.approx(reference_cka(a[keep], b[keep]), abs=2e-6)
    assert result["cka"][2] == [None, None, None] and result["cka"][0][2] is None
    assert "left out 2 of 40 rows: a layer compared holds a non-finite value in them" in caplog.text
    assert "['flat'] hold the same row for every sample compared: their CKA is undefined (NaN)" in caplog.text


def test_the_command_prints_each_layers_nearest_and_writes_the_report(tmp_path, related, capsys):
    path, _ = related
    out = tmp_path / "cmd"
    assert main(["similarity", str(path), "--layer", "a", "rotated", "bent", "--out", str(out), "--where", "label!=2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split() for line in printed[:4]] == [["layer", "most", "similar", "linear", "CKA"],
                                                      ["a", "rotated", "1.000"], ["rotated", "a", "1.000"],
                                                      ["bent", printed[3].split()[1], printed[3].split()[2]]]
    assert printed[-2:] == [f"report: {out / 'similarity.json'}, {out / 'similarity.md'}", f"plot: {out / 'similarity.png'}"]
    saved = json.load(open(out / "similarity.json"))
    assert saved["rows"] == 80 and saved["options"]["where"] == ["label!=2"]
    markdown = open(out / "similarity.md").read().splitlines()
    assert markdown[4:6] == ["| layer | a | rotated | bent |", "| --- | ---: | ---: | ---: |"]
    assert markdown[6].startswith("| a | 1.000 | 1.000 | ")
    assert main(["similarity", str(path), "--layer", "nope"]) == 2
    assert capsys.readouterr().err == f"marstore similarity: {path} has no layer 'nope'; nearest: ['a', 'rotated', 'bent', 'wide']\n"
    with open_store(path) as s:  # the store is read, never written
        assert s.status == "complete" and s.rows == 120


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_the_matrix_is_the_same_on_every_device(tmp_path, related, device):
    path, _ = related
    on_cpu = layer_similarity(opts(tmp_path, path, out="cpu"))
    there = layer_similarity(opts(tmp_path, path, device=device, out=device))
    assert np.allclose(np.array(there["cka"]), np.array(on_cpu["cka"]), atol=1e-6, rtol=0)
    with pytest.raises(SimilarityError, match=r"^--device cuda:99: "):
        layer_similarity(opts(tmp_path, path, device="cuda:99"))


@pytest.fixture
def tokens(tmp_path):
    """30 samples of 8 tokens of 6 features: 'a'; 'rotated', each token rotated (CKA 1 either
    way); 'shuffled', each sample's tokens in another order (the same token means)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 8, 6)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    shuffled = np.stack([x[rng.permutation(8)] for x in a])
    layers = {"a": a, "rotated": (a @ q).astype(np.float32), "shuffled": shuffled, "mean": a.mean(1)}
    path = tmp_path / "tokens.h5"
    write_store(path, layers)
    return path, layers


@pytest.mark.parametrize("debiased", [False, True])
def test_flat_tokens_compare_token_by_token(tmp_path, tokens, debiased):
    path, layers = tokens
    names = ["a", "rotated", "shuffled"]
    flat = {n: layers[n].reshape(-1, 6).astype(np.float64) for n in names}  # sample-major, as the store's rows
    result = layer_similarity(opts(tmp_path, path, layer=names, tokens="flat", debiased=debiased))
    assert (result["rows"], result["rows_available"], result["samples"], result["tokens"]) == (240, 240, 30, "flat")
    expected = [[reference_cka(flat[r], flat[c], debiased) for c in names] for r in names]
    assert np.allclose(np.array(result["cka"]), expected, atol=2e-6, rtol=0)
    assert result["cka"][0][1] == pytest.approx(1, abs=2e-6) and result["cka"][0][2] < 0.9
    # read as token means, shuffling the tokens changes nothing
    means = layer_similarity(opts(tmp_path, path, layer=names, debiased=debiased, out="means"))
    assert means["cka"][0][2] == pytest.approx(1, abs=2e-6) and means["tokens"] == "mean" and "samples" not in means
    # a seeded sample of the tokens: --rows counts token rows
    sampled = layer_similarity(opts(tmp_path, path, layer=["a", "shuffled"], tokens="flat", rows=100, seed=4, out="s"))
    picked = np.sort(np.random.default_rng(4).choice(240, 100, replace=False))
    assert (sampled["rows"], sampled["rows_available"], sampled["samples"]) == (100, 240, len(np.unique(picked // 8)))
    assert sampled["cka"][0][1] == pytest.approx(reference_cka(flat["a"][picked], flat["shuffled"][picked]), abs=2e-6)
    assert f"100 token rows (a seeded sample of 240) from {sampled['samples']} samples. Each row one token of a sample, " \
           "the same token in every layer." in open(sampled["markdown"]).read()
    assert main(["similarity", str(path), "--layer", "a", "shuffled", "--tokens", "flat", "--out", str(tmp_path / "cmd")]) == 0
    # the tokens of a few seeded samples: every token of each (5 x 8 rows), the samples drawn first
    few = layer_similarity(opts(tmp_path, path, layer=["a", "shuffled"], tokens="flat", samples=5, seed=4, out="few"))
    chosen = np.sort(np.random.default_rng(4).choice(30, 5, replace=False))
    rows = (chosen[:, None] * 8 + np.arange(8)).ravel()
    assert (few["rows"], few["rows_available"], few["samples"]) == (40, 40, 5)
    assert few["cka"][0][1] == pytest.approx(reference_cka(flat["a"][rows], flat["shuffled"][rows]), abs=2e-6)
    saved, plain = json.load(open(tmp_path / "cmd" / "similarity.json")), reference_cka(flat["a"], flat["shuffled"])
    assert saved["tokens"] == "flat" and np.allclose(saved["cka"], [[1, plain], [plain, 1]], atol=2e-6, rtol=0)


def test_flat_tokens_need_the_same_tokens_in_every_layer(tmp_path, tokens):
    path, layers = tokens
    with pytest.raises(SimilarityError) as info:
        layer_similarity(opts(tmp_path, path, tokens="flat"))
    assert str(info.value) == (f"--tokens flat: mean of {path} holds rows of shape (6,), one vector a sample (its tokens "
                               "reduced at extraction): compare token means (--tokens mean), or leave it out (--layer)")
    # a ragged layer of the same token counts as another store's dense one, and one of other counts
    rng = np.random.default_rng(5)
    ragged = tmp_path / "ragged.h5"
    counts = [8] * 30
    spec = LayerSpec("r", (6,), dtype="float32", ragged=True)
    with StoreWriter(ragged, [spec], []) as writer:
        writer.append({"r": Ragged(layers["shuffled"].reshape(-1, 6), counts)}, index=range(30))
    result = layer_similarity(opts(tmp_path, path, against=str(ragged), layer="a", against_layer="r", tokens="flat"))
    flat = {n: layers[n].reshape(-1, 6).astype(np.float64) for n in ("a", "shuffled")}
    assert result["cka"][0][0] == pytest.approx(reference_cka(flat["a"], flat["shuffled"]), abs=2e-6)
    uneven = tmp_path / "uneven.h5"
    counts = rng.integers(5, 9, 30)
    with StoreWriter(uneven, [spec], []) as writer:
        writer.append({"r": Ragged(rng.standard_normal((counts.sum(), 6)).astype(np.float32), counts)}, index=range(30))
    with pytest.raises(SimilarityError) as info:
        layer_similarity(opts(tmp_path, path, against=str(uneven), layer="a", against_layer="r", tokens="flat"))
    assert str(info.value) == (f"--tokens flat compares token i of a sample in one layer with token i in another, and a "
                               f"holds 8 tokens a sample where r of {uneven} holds 5-8: compare layers of one token count "
                               "(--layer, --against-layer), or token means (--tokens mean)")
    with pytest.raises(SimilarityError, match=r"^--tokens 'each': use one of mean, flat$"):
        layer_similarity(opts(tmp_path, path, tokens="each"))
    for samples, tokens in ((5, "mean"), (0, "flat")):
        with pytest.raises(SimilarityError, match=rf"^--samples {samples}: the samples whose tokens --tokens flat compares"):
            layer_similarity(opts(tmp_path, path, tokens=tokens, samples=samples))
