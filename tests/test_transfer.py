"""TransferRing: slot reuse, backpressure, layout and errors (CPU; CUDA where present)."""

import threading
import time

import pytest
import torch

from conftest import requires_cuda
from marstore.transfer import SlotTooSmall, TransferRing
from test_ops import as_bytes, expected_counts, random_values


def batch(seed: int, device="cpu") -> dict[str, torch.Tensor]:
    return {
        "encoder_blocks.0": random_values(torch.float32, 4 * 33 * 8, seed).view(4, 33, 8).to(device),
        "decoder_norm": random_values(torch.bfloat16, 4 * 16, seed + 1).view(4, 16).to(device),
    }


def test_ring_copies_exact_bytes_and_counts(cpu_backend):
    with TransferRing(num_slots=2, device="cpu") as ring:
        src = batch(0)
        src["decoder_norm"][1, 3] = float("inf")
        slot = ring.submit(src)
        out = slot.wait()
        assert list(out) == ["encoder_blocks.0", "decoder_norm"]
        for name, t in src.items():
            assert out[name].shape == t.shape and out[name].dtype == torch.float16
            assert as_bytes(out[name]) == as_bytes(t.to(torch.float16))
        assert slot.counts() == {n: tuple(expected_counts(t, torch.float16)) for n, t in src.items()}
        assert slot.counts()["decoder_norm"][0] == 1
        slot.release()


def test_ring_sizes_slots_from_first_batch_and_reuses_them(caplog):
    ring = TransferRing(num_slots=2, device="cpu")
    assert ring.slot_bytes is None
    with caplog.at_level("INFO", logger="marstore.transfer"):
        first = ring.submit(batch(0))
    # 4*33*8 float16 = 2112 bytes -> 2112 (aligned to 64), 4*16 -> 128: 2240 bytes in all
    assert ring.slot_bytes == 2240
    assert caplog.messages == ["transfer ring: 2 slots of 2.2 KiB, the first batch's size (pageable memory)"]
    buffers = {first.buffer.data_ptr()}
    first.release()
    for i in range(5):
        s = ring.submit(batch(i))
        buffers.add(s.buffer.data_ptr())
        s.release()
    assert buffers <= {s.buffer.data_ptr() for s in ring._slots}  # no allocation after the first


def test_per_layer_destination_dtypes():
    src = batch(3)
    with TransferRing(num_slots=1, device="cpu") as ring:
        slot = ring.submit(src, dtype={"encoder_blocks.0": torch.float16, "decoder_norm": torch.bfloat16})
        out = slot.wait()
        assert out["decoder_norm"].dtype == torch.bfloat16
        assert as_bytes(out["decoder_norm"]) == as_bytes(src["decoder_norm"])
        assert as_bytes(out["encoder_blocks.0"]) == as_bytes(src["encoder_blocks.0"].half())


def test_counts_by_name_across_dtype_groups_and_batches(cpu_backend):
    # Rows of the kept counts tensor follow the dtype groups, not the order of the batch.
    with TransferRing(num_slots=1, device="cpu") as ring:
        for bad in (1, 3):
            src = {
                "a": torch.full((4, 8), float("nan")),
                "b": torch.ones(4, 8, dtype=torch.bfloat16),
                "c": torch.ones(4, 8),
            }
            src["c"].view(-1)[:bad] = 1e6
            slot = ring.submit(src, dtype={"a": torch.float16, "b": torch.bfloat16, "c": torch.float16})
            slot.wait()
            assert slot.counts() == {"a": (32, 0), "c": (0, bad), "b": (0, 0)}
            slot.release()


def test_backpressure_blocks_until_a_slot_is_released():
    ring = TransferRing(num_slots=2, slot_bytes=4096, device="cpu")
    held = [ring.submit(batch(0)), ring.submit(batch(1))]
    assert ring.in_flight == 2
    with pytest.raises(TimeoutError, match="no transfer slot was released within 0.05 s"):
        ring.submit(batch(2), timeout=0.05)
    got = []
    producer = threading.Thread(target=lambda: got.append(ring.submit(batch(2))))
    producer.start()
    time.sleep(0.1)
    assert not got  # still waiting: memory stays bounded
    held[0].release()
    producer.join(timeout=5)
    assert got and got[0] is held[0]  # the released slot is the one reused
    assert ring.in_flight == 2


def test_batch_larger_than_slot_is_refused_until_reserved():
    ring = TransferRing(num_slots=2, slot_bytes=1024, device="cpu")
    with pytest.raises(SlotTooSmall, match=r"batch needs 2240 bytes but each slot holds 1024; call ring.reserve\(2240\)"):
        ring.submit(batch(0))
    assert ring.in_flight == 0
    ring.reserve(2240)
    assert ring.slot_bytes == 2240
    ring.submit(batch(0)).release()


def test_release_twice_and_wrong_device_and_closed():
    ring = TransferRing(num_slots=1, device="cpu")
    slot = ring.submit(batch(0))
    slot.release()
    with pytest.raises(RuntimeError, match="slot 0 was released twice"):
        slot.release()
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on cuda:0, but this ring copies from cpu"):
            ring.submit(batch(0, "cuda"))
    ring.close()
    with pytest.raises(RuntimeError, match="this TransferRing is closed"):
        ring.submit(batch(0))


def test_failed_copy_returns_the_slot():
    ring = TransferRing(num_slots=1, slot_bytes=4096, device="cpu")
    with pytest.raises(RuntimeError, match="source dtype torch.int64 is not supported"):
        ring.submit({"x": torch.zeros(3, dtype=torch.int64)})
    assert ring.in_flight == 0


def big_batch(seed: int, device="cpu") -> dict[str, torch.Tensor]:
    """18 MiB of float16 a batch: the staged copy goes in 2 pieces on a second stream."""
    return {**batch(seed, device), "encoder_blocks.1": random_values(torch.float32, 9 << 20, seed + 2).to(device)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", [batch, big_batch], ids=["small", "pieces"])
def test_cuda_ring_overlaps_and_is_exact(backend, make):
    with TransferRing(num_slots=3, device="cuda") as ring:
        expected, slots = [], []
        for i in range(6):
            src = make(i, "cuda")
            expected.append({k: v.half().cpu() for k, v in src.items()})
            slots.append(ring.submit(src))
            del src  # the ring recorded the sources on its stream
            if len(slots) == 3:
                s = slots.pop(0)
                got = s.wait()
                want = expected.pop(0)
                assert all(as_bytes(got[k]) == as_bytes(want[k]) for k in want)
                s.release()
        for s, want in zip(slots, expected):
            got = s.wait()
            assert all(as_bytes(got[k]) == as_bytes(want[k]) for k in want)
            assert s.buffer.is_pinned()
            s.release()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_scalars_travel_with_the_batch(device):
    # the forward's losses: device tensors read only once the slot's copy is done, numbers as given
    with TransferRing(num_slots=1, device=device) as ring:
        src = batch(0, device)
        loss = torch.tensor(0.25, device=device)
        aux = torch.tensor([1.5], device=device, dtype=torch.bfloat16)
        slot = ring.submit(src, scalars={"loss": loss, "step": 3, "aux": aux})
        del loss, aux  # the ring keeps them for its stream
        assert slot.scalars() == {"loss": 0.25, "step": 3.0, "aux": 1.5}
        assert list(slot.scalars()) == ["loss", "step", "aux"]
        slot.release()
        slot = ring.submit(src, scalars={"other": torch.tensor(-2.0, device=device)})  # the same slot, other names
        assert slot.scalars() == {"other": -2.0}
        slot.release()
        slot = ring.submit(src)
        assert slot.scalars() == {}
        slot.release()
