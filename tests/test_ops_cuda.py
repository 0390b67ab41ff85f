"""CUDA kernels: exact bytes, both write modes, allocator reuse and stream ordering."""

import pytest
import torch

from marstore import ops
from test_ops import PAIRS, as_bytes, expected_counts, random_values, special_values

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pinned_like(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(src.shape, 3, dtype=dtype).pin_memory()


@pytest.mark.parametrize("mode", ["auto", "direct", "staged"])
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
def test_cuda_bit_exact(backend, mode, src_dtype, dst_dtype):
    for src in (special_values(src_dtype), random_values(src_dtype, 3_000_017)):
        gpu = src.cuda()
        dst = pinned_like(src, dst_dtype)
        counts = ops.cast_copy(gpu, dst, mode=mode)
        torch.cuda.synchronize()
        assert as_bytes(dst) == as_bytes(gpu.to(dst_dtype).cpu())
        assert counts.cpu().tolist() == expected_counts(src, dst_dtype)


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_cuda_many_and_non_contiguous(backend, mode):
    srcs = [random_values(torch.float32, 5000 + i, i).cuda() for i in range(30)]
    srcs += [random_values(torch.bfloat16, 4096, 9).cuda().view(64, 64).t(), torch.empty(0, device="cuda")]
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    dst = torch.zeros(total, dtype=torch.float16).pin_memory()
    counts = ops.cast_copy_many(srcs, dst, offsets, mode=mode)
    torch.cuda.synchronize()
    for s, off in zip(srcs, offsets):
        assert as_bytes(dst[off : off + s.numel()]) == as_bytes(s.to(torch.float16).cpu())
    assert counts.cpu().tolist() == [expected_counts(s.cpu(), torch.float16) for s in srcs]


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_cuda_more_sources_than_one_launch_takes(backend, mode):
    """One launch takes 48 sources; 100 (a model with every module hooked) take three, into one
    destination, with every source's counts in its own row. From 16 MiB of destination a staged
    copy of so many goes in one DMA copy, not in pieces."""
    small = [random_values((torch.float32, torch.bfloat16)[i % 2], 300 + 7 * i, i).cuda() for i in range(99)]
    for big in ([], [random_values(torch.float32, 9_000_001, 5).cuda()]):
        srcs = small[:50] + big + small[50:]
        offsets, total = ops.aligned_offsets(srcs, torch.float16)
        dst = torch.full((total,), 7, dtype=torch.float16).pin_memory()
        counts = ops.cast_copy_many(srcs, dst, offsets, mode=mode)
        torch.cuda.synchronize()
        for s, off in zip(srcs, offsets):
            assert as_bytes(dst[off : off + s.numel()]) == as_bytes(s.to(torch.float16).cpu())
        assert counts.cpu().tolist() == [expected_counts(s.cpu(), torch.float16) for s in srcs]


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_cuda_staged_in_pieces_is_exact_and_done_when_the_callers_stream_is(backend, order):
    """From 16 MiB of destination a staged copy goes in pieces copied on a second stream (when
    the regions ascend; 40 MiB here: 3 pieces): waiting for the caller's stream alone must find
    every piece landed."""
    srcs = [random_values(torch.float32, 12_000_017, 1).cuda(), random_values(torch.bfloat16, 8_000_001, 2).cuda(),
            torch.empty(0, device="cuda"), random_values(torch.float32, 777, 3).cuda()]
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    if order == "descending":  # one DMA copy of the whole span, as below 16 MiB
        offsets, total = ops.aligned_offsets(srcs[::-1], torch.float16)
        offsets = offsets[::-1]
    side = torch.cuda.Stream()
    for mode in ("auto", "staged"):
        dst = torch.full((total,), 7, dtype=torch.float16).pin_memory()
        torch.cuda._sleep(20_000_000)  # the sources' producer is still busy: the copy must wait for it
        side.wait_stream(torch.cuda.current_stream())
        counts = ops.cast_copy_many(srcs, dst, offsets, stream=side, mode=mode)
        side.synchronize()
        for s, off in zip(srcs, offsets):
            assert as_bytes(dst[off : off + s.numel()]) == as_bytes(s.to(torch.float16).cpu())
        assert counts.cpu().tolist() == [expected_counts(s.cpu(), torch.float16) for s in srcs]


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_cuda_counts_into_a_kept_device_tensor(backend, mode):
    srcs = [torch.tensor([1.0, float("nan"), 7e4], device="cuda"), torch.tensor([float("-inf"), 2.0], device="cuda")]
    dst = torch.zeros(8, dtype=torch.float16).pin_memory()
    counts = torch.full((2, 2), -9, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    for _ in range(2):  # overwritten, not added to, on the stream the copy runs on
        side.wait_stream(torch.cuda.current_stream())
        assert ops.cast_copy_many(srcs, dst, [0, 4], counts=counts, stream=side, mode=mode) is counts
        side.synchronize()
        assert counts.cpu().tolist() == [[1, 1], [1, 0]]
    assert as_bytes(dst[:3]) == as_bytes(srcs[0].half().cpu())
    with pytest.raises(RuntimeError, match="counts must be a contiguous torch.int64 tensor of 4 elements .* on cuda:0, got torch.int64 of 4 elements on cpu"):
        ops.cast_copy_many(srcs, dst, [0, 4], counts=torch.empty(4, dtype=torch.int64), mode=mode)


def test_cuda_unpinned_destination_is_refused(backend):
    with pytest.raises(RuntimeError, match="destination is not pinned; a CUDA source needs a pinned host destination"):
        ops.cast_copy(torch.zeros(4, device="cuda"), torch.empty(4, dtype=torch.float16))


def test_cuda_device_destination_is_refused(backend):
    with pytest.raises(RuntimeError, match="destination is on cuda:0; it must be a host"):
        ops.cast_copy(torch.zeros(4, device="cuda"), torch.empty(4, dtype=torch.float16, device="cuda"))


def test_cuda_freed_source_reused_by_allocator(backend):
    """A source freed right after the launch must still be copied correctly."""
    side = torch.cuda.Stream()
    n = 1 << 24
    expected = torch.arange(n, dtype=torch.float32, device="cuda") % 2048
    dst = torch.empty(n, dtype=torch.float16).pin_memory()
    torch.cuda._sleep(1)
    src = expected.clone()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # hold the side stream so that the copy is pending
        src.record_stream(side)
        ops.cast_copy(src, dst)
    del src  # the allocator must not give this memory to the next tensor yet
    clobber = torch.full((n,), -1.0, device="cuda")
    side.synchronize()
    assert as_bytes(dst) == as_bytes(expected.half().cpu())
    del clobber


def test_cuda_copy_ordered_after_default_stream_work(backend):
    side = torch.cuda.Stream()
    x = torch.zeros(1 << 22, device="cuda")
    torch.cuda._sleep(20_000_000)
    x.add_(5.0)  # queued on the default stream behind the sleep
    dst = torch.empty(x.numel(), dtype=torch.float16).pin_memory()
    side.wait_stream(torch.cuda.current_stream())
    ops.cast_copy(x, dst, stream=side)
    side.synchronize()
    assert bool((dst == 5.0).all())
