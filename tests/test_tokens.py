"""TokenStream: every token of a layer once an epoch, shuffled through a bounded buffer."""

import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from marstore.dataset import ActivationDataset, TokenStream
from marstore.store import TEXT, LayerSpec, Ragged, StoreError, StoreWriter, TargetSpec


def token_store(path, n=300, tokens=6, d=4, chunk_rows=32):
    """Layer 'blocks' (n, tokens, d) whose token t of row r holds r + t / 100 in every feature;
    target 'label' r % 5 and 'name' its text."""
    x = (np.arange(n)[:, None, None] + np.arange(tokens)[None, :, None] / 100 + np.zeros((1, 1, d))).astype(np.float16)
    with StoreWriter(path, [LayerSpec("blocks", (tokens, d), chunk_rows=chunk_rows), LayerSpec("pooled", (d,))],
                     [TargetSpec("label", (), "int64"), TargetSpec("name", (), TEXT)]) as writer:
        for a in range(0, n, 50):
            b = min(n, a + 50)
            writer.append({"blocks": x[a:b], "pooled": x[a:b, 0]},
                          targets={"label": np.arange(a, b) % 5, "name": np.array([f"r{i}" for i in range(a, b)], dtype=object)},
                          index=np.arange(a, b))
    return x


def positions_of(batches):
    return [tuple(p) for b in batches for p in b["position"].tolist()]


def test_every_token_once_an_epoch_with_its_rows_targets(tmp_path):
    x = token_store(tmp_path / "s.h5")
    stream = TokenStream(tmp_path / "s.h5", "blocks", ["label", "name"], batch_size=128, buffer_bytes=4096)
    batches = list(stream)
    assert stream.num_tokens == 1800 and [len(b["position"]) for b in batches] == [128] * 14 + [8]
    seen = positions_of(batches)
    assert sorted(seen) == [(r, t) for r in range(300) for t in range(6)]
    for b in batches:
        rows, tokens = b["position"][:, 0], b["position"][:, 1]
        assert torch.equal(b["blocks"], torch.from_numpy(x[rows.numpy(), tokens.numpy()].astype(np.float32)))
        assert b["blocks"].dtype == torch.float32 and b["blocks"].shape[1] == 4
        assert torch.equal(b["label"], rows % 5) and b["name"] == [f"r{r}" for r in rows.tolist()]
    # shuffled across the rows of a buffer, not row by row
    assert len(set(batches[0]["position"][:, 0].tolist())) > 20
    assert positions_of(TokenStream(tmp_path / "s.h5", "blocks", batch_size=128, buffer_bytes=4096)) == seen  # seeded
    stream.set_epoch(1)
    again = positions_of(stream)
    assert again != seen and sorted(again) == sorted(seen)


def test_a_buffer_reads_whole_chunks_and_no_more_than_its_size(tmp_path, monkeypatch):
    token_store(tmp_path / "s.h5", chunk_rows=32)
    reads = []
    original = ActivationDataset.__getitems__
    monkeypatch.setattr(ActivationDataset, "__getitems__", lambda self, p: reads.append(np.asarray(p)) or original(self, p))
    # 6 tokens of 4 float16 features a row (as stored): 48 bytes; 2 chunks of 32 rows fit in 3072 bytes
    stream = TokenStream(tmp_path / "s.h5", "blocks", batch_size=100, buffer_bytes=3072)
    assert stream.buffer_chunks == 2
    list(stream)
    assert sorted(np.concatenate(reads).tolist()) == list(range(300))  # each row read once
    for rows in reads:
        assert len(rows) <= 64 and set(rows // 32) and all(np.diff(rows) > 0)
        assert all(len([r for r in rows if r // 32 == c]) == min(32, 300 - 32 * c) for c in set(rows // 32))  # whole chunks


def test_workers_and_ranks_take_disjoint_buffers(tmp_path):
    token_store(tmp_path / "s.h5")
    everything = sorted((r, t) for r in range(300) for t in range(6))
    loader = DataLoader(TokenStream(tmp_path / "s.h5", "blocks", batch_size=64, buffer_bytes=4096), batch_size=None,
                        num_workers=2)
    assert sorted(positions_of(loader)) == everything
    ranks = [positions_of(TokenStream(tmp_path / "s.h5", "blocks", batch_size=64, buffer_bytes=1024, num_replicas=2, rank=r))
             for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == everything
    assert abs(len(ranks[0]) - len(ranks[1])) <= 32 * 6  # buffers of one chunk each: they differ by a chunk at most
    selected = TokenStream(tmp_path / "s.h5", "blocks", batch_size=32, rows=range(10, 20), drop_last=True)
    got = positions_of(selected)
    assert len(got) == 32 and {r for r, _ in got} <= set(range(10, 20))  # 60 tokens: one full batch, the rest dropped


def test_a_ragged_layers_tokens_each_once(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 120)
    values = rng.standard_normal((int(lengths.sum()), 3)).astype(np.float16)
    with StoreWriter(tmp_path / "r.h5", [LayerSpec("enc", (3,), ragged=True)]) as writer:
        writer.append({"enc": Ragged(values, lengths)}, index=np.arange(120))
    batches = list(TokenStream(tmp_path / "r.h5", "enc", batch_size=50, buffer_bytes=256))
    seen = positions_of(batches)
    assert sorted(seen) == [(r, t) for r in range(120) for t in range(lengths[r])]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for b in batches:
        want = values[[starts[r] + t for r, t in b["position"].tolist()]].astype(np.float32)
        assert torch.equal(b["enc"], torch.from_numpy(want))
    assert collections.Counter(len(b["position"]) for b in batches)[50] == len(seen) // 50


def test_what_cannot_be_streamed_is_refused_in_one_line(tmp_path):
    token_store(tmp_path / "s.h5")
    with pytest.raises(StoreError, match=r"^pooled has rows of shape \(4,\), with no tokens to stream; read its rows with "
                                         r"ActivationDataset$"):
        TokenStream(tmp_path / "s.h5", "pooled")
    with pytest.raises(StoreError, match=r"^batch_size=0, rank=0, num_replicas=1 are not valid$"):
        TokenStream(tmp_path / "s.h5", "blocks", batch_size=0)
    with pytest.raises(StoreError, match=r"has no layer 'block'; nearest: \['blocks'"):
        TokenStream(tmp_path / "s.h5", "block")


def test_a_convolutions_positions_are_its_tokens(tmp_path):
    conv = np.random.default_rng(0).standard_normal((40, 3, 2, 5)).astype(np.float16)  # (C, h, w) a row
    with StoreWriter(tmp_path / "c.h5", [LayerSpec("conv", (3, 2, 5), channel_axis=0)]) as writer:
        writer.append({"conv": conv}, index=np.arange(40))
    batches = list(TokenStream(tmp_path / "c.h5", "conv", batch_size=64))
    assert sorted(positions_of(batches)) == [(r, t) for r in range(40) for t in range(10)]
    for b in batches:
        rows, tokens = b["position"][:, 0].numpy(), b["position"][:, 1].numpy()
        want = conv[rows, :, tokens // 5, tokens % 5]  # position t is (t // w, t % w); its 3 channels the features
        assert torch.equal(b["conv"], torch.from_numpy(want.astype(np.float32)))


def test_a_token_target_gives_each_token_its_own_value(tmp_path):
    """Token ids (a value for each token, laid out as the convolution's (h, w) positions, or a
    text and a pair for each of 6 tokens) come with each token; the row's targets with every token."""
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((40, 3, 2, 5)).astype(np.float16)
    ids = rng.integers(0, 1000, (40, 2, 5))
    words = np.array([[f"w{r}.{t}" for t in range(10)] for r in range(40)], dtype=object)
    with StoreWriter(tmp_path / "c.h5", [LayerSpec("conv", (3, 2, 5), channel_axis=0)],
                     [TargetSpec("ids", (2, 5), "int64"), TargetSpec("words", (10,), TEXT), TargetSpec("row", (), "int64"),
                      TargetSpec("pairs", (10, 2), "float32")]) as writer:
        writer.append({"conv": conv}, targets={"ids": ids, "words": words, "row": np.arange(40),
                                               "pairs": np.arange(800, dtype=np.float32).reshape(40, 10, 2)}, index=range(40))
    stream = TokenStream(tmp_path / "c.h5", "conv", ["row"], batch_size=64, token_targets=["ids", "words", "pairs"])
    for b in stream:
        rows, tokens = b["position"][:, 0].numpy(), b["position"][:, 1].numpy()
        assert b["ids"].tolist() == ids[rows, tokens // 5, tokens % 5].tolist()
        assert b["words"] == [f"w{r}.{t}" for r, t in zip(rows, tokens)]
        assert b["pairs"].tolist() == [[(r * 10 + t) * 2, (r * 10 + t) * 2 + 1] for r, t in zip(rows, tokens)]
        assert b["row"].tolist() == rows.tolist()
    with pytest.raises(StoreError) as info:
        TokenStream(tmp_path / "c.h5", "conv", token_targets=["row"])
    assert str(info.value) == ("token target 'row' holds () a row, not a value for each of conv's 10 tokens; give it as "
                               "a target (each token gets its row's value)")
