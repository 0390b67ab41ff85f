"""cast_copy / cast_copy_many: exact bytes and counts against torch, on both backends."""

import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from marstore import _extension, ops

PAIRS = [
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]

# float32 bit patterns around every edge of the float16 conversion.
SPECIAL_F32_BITS = [
    0x00000000, 0x80000000,  # signed zeros
    0x00000001, 0x807fffff,  # float32 subnormals (flush to signed zero in float16)
    0x33000000, 0x33000001, 0xb3800000,  # around float16's smallest subnormal 2^-24
    0x387fc000, 0x38800000, 0x387fe000,  # float16 subnormal/normal boundary, ties
    0x3f800000, 0x3f801000, 0x3f803000,  # 1.0 and round-to-even ties
    0x477fe000, 0x477fefff, 0x477ff000, 0x477fffff, 0x47800000,  # 65504, just below/at 65520, 65536
    0xc77ff000, 0x7f7fffff, 0xff7fffff,  # -65520, float32 max
    0x7f800000, 0xff800000,  # infinities
    0x7fc00000, 0xffc00000, 0x7f800001, 0x7fbfffff, 0x7fc01234, 0xff812345,  # NaNs with payloads
]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    f32 = torch.from_numpy(np.array(SPECIAL_F32_BITS, dtype=np.uint32).view(np.float32).copy())
    if dtype == torch.float32:
        return f32
    # For 16-bit sources, the upper halves of the patterns and all 65536 bit patterns.
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return torch.cat([every, torch.from_numpy((np.array(SPECIAL_F32_BITS, np.uint32) >> 16).astype(np.uint16).view(np.int16)).view(dtype)])


def random_values(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-8, 6, n).roll(n // 3)
    return x.to(dtype)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def reference(src: torch.Tensor, dst_dtype: torch.dtype) -> torch.Tensor:
    """torch's own conversion. Widening float16 NaNs on the CPU, torch gives F16C's quiet NaN
    (sign and payload kept) in its vector body but 0x7fffffff in its scalar tail; marstore
    gives the former everywhere (documented in marstore.ops)."""
    out = src.to(dst_dtype)
    if src.dtype == torch.float16 and dst_dtype == torch.float32 and not src.is_cuda:
        bits = src.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        nan = torch.isnan(src).reshape(bits.shape)
        quiet = ((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x3FF) << 13)
        out = torch.where(nan, quiet.view(torch.float32), out.reshape(bits.shape)).view(src.shape)
    return out


def expected_counts(src: torch.Tensor, dst_dtype: torch.dtype) -> list[int]:
    x = src.double().flatten().numpy()
    finite = np.isfinite(x)
    overflow = finite & (np.abs(x) >= 65520.0) if dst_dtype == torch.float16 else np.zeros_like(finite)
    return [int((~finite).sum()), int(overflow.sum())]


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
@pytest.mark.parametrize("kind", ["special", "random"])
def test_single_matches_torch_bytes_and_counts(cpu_backend, src_dtype, dst_dtype, kind):
    src = special_values(src_dtype) if kind == "special" else random_values(src_dtype, 100_003)
    dst = torch.full(src.shape, 7, dtype=dst_dtype)
    counts = ops.cast_copy(src, dst)
    assert as_bytes(dst) == as_bytes(reference(src, dst_dtype))
    assert counts.dtype == torch.int64 and counts.tolist() == expected_counts(src, dst_dtype)


def test_counts_of_known_values(cpu_backend):
    src = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 65519.0, 65520.0, -7e4, 3e38])
    counts = ops.cast_copy(src, torch.empty(8, dtype=torch.float16))
    assert counts.tolist() == [3, 3]
    counts = ops.cast_copy(src, torch.empty(8, dtype=torch.float32))
    assert counts.tolist() == [3, 0]


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.view(64, 96).t(),  # transposed
        lambda x: x.view(64, 96)[::2, 5:70],  # sliced with steps
        lambda x: x[:96].view(1, 96).expand(40, 96),  # expanded (stride 0)
        lambda x: x[:0],  # zero-size
        lambda x: x.view(2, 3, 32, 32).permute(3, 1, 0, 2),
    ],
    ids=["transposed", "sliced", "expanded", "empty", "permuted"],
)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_sources(cpu_backend, make, src_dtype):
    src = make(random_values(src_dtype, 64 * 96, seed=3))
    dst = torch.empty(src.shape, dtype=torch.float16)
    counts = ops.cast_copy(src, dst)
    assert as_bytes(dst) == as_bytes(src.to(torch.float16))
    assert counts.tolist() == expected_counts(src, torch.float16)


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_uses_every_path(cpu_backend, src_dtype):
    # Past the streaming-store (and source prefetch) threshold, with an odd length and an unaligned start.
    src = random_values(src_dtype, 5_000_011, seed=5)[1:]
    src[123] = float("nan")
    src[4_999_000] = 1e6
    dst = torch.empty(src.numel() + 3, dtype=torch.float16)[3:]
    counts = ops.cast_copy(src, dst)
    assert as_bytes(dst) == as_bytes(src.to(torch.float16))
    assert counts.tolist() == expected_counts(src, torch.float16)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_work_split_does_not_change_bytes_or_counts(cpu_backend, threads):
    # The CPU pass cuts the sources, end to end, into one share per thread, splitting a source
    # where a share ends, and each share into halving items; the counts of every item must add up.
    srcs = [
        random_values(torch.float32, 70_001, seed=9),
        torch.empty(0),
        random_values(torch.float32, 7, seed=12),
        random_values(torch.bfloat16, 40_000, seed=10),
    ]
    srcs[0][[5, 35_000, 70_000]] = torch.tensor([float("inf"), 7e4, float("nan")])
    srcs[3][39_999] = float("-inf")
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    dst = torch.empty(total, dtype=torch.float16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts = ops.cast_copy_many(srcs, dst, offsets)
    finally:
        torch.set_num_threads(previous)
    for s, off in zip(srcs, offsets):
        assert as_bytes(dst[off : off + s.numel()]) == as_bytes(s.to(torch.float16))
    assert counts.tolist() == [expected_counts(s, torch.float16) for s in srcs]


def test_cpu_kernel_sets_are_chosen_by_name_and_refused_where_not_run():
    if ops._C is None:
        pytest.skip("extension not built")
    available = ops._C.cpu_kernels_available()
    assert available[0] == "scalar" and set(available) <= {"scalar", "avx2", "avx512"}
    assert ops._C.cpu_kernels() == available[-1]  # the best, unless a test chose another
    try:
        for name in reversed(available):  # scalar last
            ops._C.set_cpu_kernels(name)
            assert ops._C.cpu_kernels() == name
        with pytest.raises(ValueError, match=re.escape(
                f"set_cpu_kernels: 'avx9' is not a kernel set this processor runs; it runs {', '.join(available)}")):
            ops._C.set_cpu_kernels("avx9")
        assert ops._C.cpu_kernels() == available[0]  # a refused name changes nothing
    finally:
        ops._C.set_cpu_kernels(available[-1])


def test_direct_entries_match_the_registered_operators():
    if ops._C is None:
        pytest.skip("extension not built")
    src = torch.randn(10_000, generator=torch.Generator().manual_seed(11)).requires_grad_()
    with torch.no_grad():
        src[7] = 1e5
    a, b = torch.empty(10_000, dtype=torch.float16), torch.empty(10_000, dtype=torch.float16)
    direct = ops._C.cast_copy(src, a, 0)
    registered = torch.ops.marstore.cast_copy(src.detach(), b, 0)
    assert as_bytes(a) == as_bytes(b) and direct.tolist() == registered.tolist() == [0, 1]
    assert not direct.requires_grad


def test_counts_into_a_kept_tensor(cpu_backend):
    # The ring's form: the counts land in a tensor the caller keeps, overwritten every call.
    srcs = [torch.tensor([1.0, float("nan"), 7e4]), torch.tensor([float("-inf"), 2.0])]
    counts = torch.full((2, 2), -9, dtype=torch.int64)
    dst = torch.empty(8, dtype=torch.float16)
    for _ in range(2):
        assert ops.cast_copy_many(srcs, dst, [0, 4], counts=counts) is counts
        assert counts.tolist() == [[1, 1], [1, 0]]
    assert as_bytes(dst[:3]) == as_bytes(srcs[0].half()) and as_bytes(dst[4:6]) == as_bytes(srcs[1].half())
    one = torch.full((2,), -9, dtype=torch.int64)
    assert ops.cast_copy(srcs[0], dst[:3], counts=one) is one and one.tolist() == [1, 1]


def test_many_fills_regions_and_leaves_gaps(cpu_backend):
    srcs = [
        random_values(torch.float32, 1000, 1),
        random_values(torch.bfloat16, 17, 2).view(17, 1),
        torch.empty(0),
        random_values(torch.float16, 4096, 3).view(64, 64).t(),
        torch.tensor([float("inf"), 7e4, float("nan")]),
    ]
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    assert offsets == [0, 1024, 1056, 1056, 5152] and total == 5184
    dst = torch.full((total + 10,), -2.0, dtype=torch.float16)
    counts = ops.cast_copy_many(srcs, dst, offsets)
    flat = dst.view(-1)
    covered = torch.zeros(dst.numel(), dtype=torch.bool)
    for s, off in zip(srcs, offsets):
        assert as_bytes(flat[off : off + s.numel()]) == as_bytes(s.to(torch.float16))
        covered[off : off + s.numel()] = True
    assert (flat[~covered] == -2.0).all()  # padding and tail untouched
    assert counts.tolist() == [expected_counts(s, torch.float16) for s in srcs]


def test_many_with_48_plus_tensors(cpu_backend):
    srcs = [random_values(torch.float32, 256 + i, seed=i) for i in range(60)]
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    dst = torch.empty(total, dtype=torch.float16)
    counts = ops.cast_copy_many(srcs, dst, offsets)
    for s, off in zip(srcs, offsets):
        assert as_bytes(dst[off : off + s.numel()]) == as_bytes(s.to(torch.float16))
    assert counts.shape == (60, 2)


ERRORS = [
    (lambda: ops.cast_copy(torch.zeros(4, dtype=torch.int32), torch.empty(4, dtype=torch.float16)),
     "cast_copy_many: source dtype torch.int32 is not supported; accepted: torch.float32, torch.bfloat16, torch.float16"),
    (lambda: ops.cast_copy(torch.zeros(4, dtype=torch.complex64), torch.empty(4, dtype=torch.float16)),
     "source dtype torch.complex64 is not supported"),
    (lambda: ops.cast_copy(torch.zeros(4, dtype=torch.float64), torch.empty(4, dtype=torch.float16)),
     "source dtype torch.float64 is not supported; accepted: torch.float32, torch.bfloat16, torch.float16 (cast float64 with .float() first)"),
    (lambda: ops.cast_copy(torch.zeros(4), torch.empty(5, dtype=torch.float16)),
     "cast_copy: destination has 5 elements but the source has 4; they must match"),
    (lambda: ops.cast_copy(torch.zeros(4), torch.empty(4, dtype=torch.int16)),
     "destination dtype torch.int16 is not supported; accepted: torch.float16, torch.float32, torch.bfloat16"),
    (lambda: ops.cast_copy(torch.zeros(4), torch.empty(4, dtype=torch.bfloat16)),
     "a torch.bfloat16 destination takes only torch.bfloat16 sources (a plain copy), got torch.float32"),
    (lambda: ops.cast_copy(torch.zeros(4), torch.empty(2, 4, dtype=torch.float16)[:, 0].view(2).expand(2)),
     "cast_copy: destination has 2 elements"),
    (lambda: ops.cast_copy(torch.zeros(8), torch.empty(4, 2, dtype=torch.float16).t()),
     "cast_copy_many: destination must be contiguous"),
    (lambda: ops.cast_copy_many([torch.zeros(4), torch.zeros(4)], torch.empty(8, dtype=torch.float16), [0]),
     "cast_copy_many: got 2 sources and 1 offsets; give one offset per source"),
    (lambda: ops.cast_copy_many([torch.zeros(4)], torch.empty(8, dtype=torch.float16), [6]),
     "cast_copy_many: region 0 [6, 10) lies outside the destination's 8 elements"),
    (lambda: ops.cast_copy_many([torch.zeros(4)], torch.empty(8, dtype=torch.float16), [-1]),
     "cast_copy_many: region 0 [-1, 3) lies outside the destination's 8 elements"),
    (lambda: ops.cast_copy_many([torch.zeros(4), torch.zeros(4)], torch.empty(8, dtype=torch.float16), [0, 3]),
     "cast_copy_many: region 1 starting at 3 overlaps region 0 [0, 4)"),
]


ERRORS += [
    (lambda: ops.cast_copy(torch.zeros(4), torch.empty(4, dtype=torch.float16), counts=torch.empty(2, dtype=torch.int32)),
     "cast_copy_many: counts must be a contiguous torch.int64 tensor of 2 elements (2 per source) on cpu, got "
     "torch.int32 of 2 elements on cpu"),
    (lambda: ops.cast_copy_many([torch.zeros(4)] * 3, torch.empty(12, dtype=torch.float16), [0, 4, 8],
                                counts=torch.empty(4, dtype=torch.int64)),
     "cast_copy_many: counts must be a contiguous torch.int64 tensor of 6 elements (2 per source) on cpu, got "
     "torch.int64 of 4 elements on cpu"),
    (lambda: ops.cast_copy_many([torch.zeros(4)] * 2, torch.empty(8, dtype=torch.float16), [0, 4],
                                counts=torch.empty(2, 4, dtype=torch.int64)[:, :2]),
     "cast_copy_many: counts must be a contiguous torch.int64 tensor of 4 elements"),
]


@pytest.mark.parametrize("call,message", ERRORS, ids=[f"err{i}" for i in range(len(ERRORS))])
def test_errors_name_the_input_and_the_fix(backend, call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.parametrize("offsets,bad", [([0, 4.0], "4.0 is a float"), ((0, 4.0), "4.0 is a float"),
                                         (np.array([0.0, 4.0]), "0.0 is a float64")])
def test_a_float_offset_is_refused_not_truncated(backend, offsets, bad):
    with pytest.raises(TypeError, match=rf"^cast_copy_many: offset {bad}, not an integer$"):
        ops.cast_copy_many([torch.zeros(4), torch.zeros(4)], torch.empty(8, dtype=torch.float16), offsets)


@pytest.mark.parametrize("offsets", [[0, np.int64(4)], (0, 4), np.array([0, 4]), torch.tensor([0, 4]), [0, torch.tensor(4)]])
def test_integer_offsets_of_any_kind_are_taken(backend, offsets):
    dst = torch.zeros(8, dtype=torch.float16)
    ops.cast_copy_many([torch.ones(4), torch.full((4,), 2.0)], dst, offsets)
    assert dst.tolist() == [1.0] * 4 + [2.0] * 4


def test_unknown_mode_is_refused(backend):
    with pytest.raises(ValueError, match=r"mode 'fast': use one of \['auto', 'direct', 'staged'\]"):
        ops.cast_copy(torch.zeros(2), torch.empty(2, dtype=torch.float16), mode="fast")


def test_fallback_when_extension_is_missing():
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    with pytest.warns(RuntimeWarning, match=r"marstore._C is not importable .*pure-torch path .*pip install --no-build-isolation -e \."):
        module, status = _extension.load(missing)
    assert module is None and status.startswith("marstore._C is not importable")


def test_fallback_when_extension_was_built_for_another_torch():
    stale = SimpleNamespace(torch_version="1.0.0", with_cuda=False)
    with pytest.warns(RuntimeWarning, match=re.escape(f"built for torch 1.0.0, but torch {torch.__version__} is running")):
        module, _ = _extension.load(lambda name: stale)
    assert module is None


def test_fallback_when_extension_was_built_from_older_sources():
    older = SimpleNamespace(torch_version=torch.__version__, cast_copy=None, cast_copy_many=None)
    lacks = "cast_copy_into, cast_copy_many_into, channel_moments, moments_update"
    with pytest.warns(RuntimeWarning, match=re.escape(f"built from older sources (it lacks {lacks}); using the pure-torch path")):
        module, status = _extension.load(lambda name: older)
    assert module is None and status == f"marstore._C was built from older sources (it lacks {lacks})"


def test_matching_extension_loads_without_warning():
    current = SimpleNamespace(torch_version=torch.__version__, **{name: None for name in _extension.REQUIRED_ENTRIES})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module, status = _extension.load(lambda name: current)
    assert module is current and status == f"loaded, built for torch {torch.__version__}"


def test_direct_operator_checks_inputs_too():
    if ops._C is None:
        pytest.skip("extension not built")
    with pytest.raises(RuntimeError, match="source dtype torch.int64 is not supported"):
        torch.ops.marstore.cast_copy(torch.zeros(3, dtype=torch.int64), torch.empty(3, dtype=torch.float16), 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, channels", [(1, 3), (7, 8), (600, 37), (1029, 256)])
def test_channel_moments_match_float64(backend, dtype, rows, channels):
    g = torch.Generator().manual_seed(rows + channels)
    x = (torch.randn(rows, channels, generator=g) * 3 + 100).to(dtype)
    shift = x[0].float()
    s, q = ops.channel_moments(x, shift)
    d = x.double() - shift.double()
    assert s.dtype == q.dtype == torch.float64 and s.shape == q.shape == (channels,)
    # float32 sums of values shifted near their mean: float32 rounding, relative to the scale
    torch.testing.assert_close(s, d.sum(0), rtol=1e-5, atol=1e-5 * rows * 3)
    torch.testing.assert_close(q, (d * d).sum(0), rtol=1e-5, atol=1e-5 * rows * 9)


def test_channel_moments_flag_non_finite_channels(backend):
    x = torch.ones(300, 20, dtype=torch.float16)
    x[5, 3], x[299, 17], x[100, 9] = float("nan"), float("-inf"), 60000.0
    s, q = ops.channel_moments(x.float() * 1e19, torch.zeros(20))  # squares past float32's range
    assert (~torch.isfinite(q)).sum() == 20 and not torch.isfinite(s[3])
    s, q = ops.channel_moments(x, torch.zeros(20))
    bad = (~torch.isfinite(s) | ~torch.isfinite(q)).nonzero().flatten().tolist()
    assert bad == [3, 17]
    assert s[9].item() == 299 + 60000.0  # exact in float32
    assert q[9].item() == pytest.approx(299 + 60000.0**2, rel=1e-7)  # 3.6e9 has a float32 step of 256


@pytest.mark.parametrize(
    "x, shift, message",
    [
        (torch.zeros(4), torch.zeros(4), "channel_moments: x must be 2-D (rows, channels), got 1 dimensions"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4), "channel_moments: x dtype torch.float64 is not supported"),
        (torch.zeros(2, 4), torch.zeros(3), "channel_moments: shift must be float32 of shape (4,)"),
    ],
)
def test_channel_moments_errors(backend, x, shift, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.channel_moments(x, shift)


def _moments_state(channels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    count = torch.full((channels,), 640.0, dtype=torch.float64)
    mean = torch.randn(channels, generator=g, dtype=torch.float64) * 4
    m2 = torch.rand(channels, generator=g, dtype=torch.float64) * 640
    return [count, mean, m2, mean.float()]


def test_moments_update_combines_in_place_or_changes_nothing(backend):
    count, mean, m2, shift = state = _moments_state(5, 0)
    x = (torch.randn(300, 5, generator=torch.Generator().manual_seed(1)) * 2 + 3).to(torch.float16)
    before = [t.clone() for t in state]
    spoiled = x.clone()
    spoiled[7, 2] = float("inf")
    assert ops.moments_update(spoiled, *state) is False  # a non-finite sum: the caller's exact path
    assert ops.moments_update(x.float() * 1e20, *state) is False  # squares past float32's range
    assert ops.moments_update(x[:0], *state) is (backend == "extension")  # no rows: nothing to add
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    done = ops.moments_update(x, *state)
    if backend == "torch":  # no one-call path: the caller's numpy combination does it
        assert done is False and all(torch.equal(a, b) for a, b in zip(state, before))
        return
    assert done is True
    values = x.double()
    assert count.tolist() == [940.0] * 5
    # to the float32 rounding of the batch's sums (300 values, a few units from the shift)
    torch.testing.assert_close(mean, (before[1] * 640 + values.sum(0)) / 940, rtol=0, atol=1e-4)
    # Chan's M2 of the union: the old M2, the batch's, and the shift of the means
    batch_m2 = ((values - values.mean(0)) ** 2).sum(0)
    delta = values.mean(0) - before[1]
    torch.testing.assert_close(m2, before[2] + batch_m2 + delta * delta * 640 * 300 / 940, rtol=1e-5, atol=0)
    assert torch.equal(shift, mean.float())


@pytest.mark.parametrize(
    "bad, message",
    [
        (1, "moments_update: count must be contiguous float64 of shape (4,), got torch.float32 of shape [4]"),
        (2, "moments_update: mean must be contiguous float64 of shape (4,), got torch.float64 of shape [3]"),
        (3, "moments_update: m2 must be contiguous float64 of shape (4,), got torch.float64 of shape [4], not contiguous"),
        (4, "channel_moments: shift must be float32 of shape (4,)"),
    ],
)
def test_moments_update_errors(bad, message):
    if ops._C is None:
        pytest.skip("extension not built")
    state = _moments_state(4, 2)
    wrong = {1: state[0].float(), 2: state[1][:3], 3: torch.zeros(8, dtype=torch.float64)[::2], 4: state[3][:3]}
    state[bad - 1] = wrong[bad]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.moments_update(torch.zeros(2, 4), *state)


@pytest.mark.parametrize("disabled", [False, True])
def test_doctor_says_what_it_found_and_exits_non_zero_without_the_extension(disabled):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MARSTORE_NO_EXTENSION"}
    if disabled:
        env["MARSTORE_NO_EXTENSION"] = "1"
    p = subprocess.run([sys.executable, "-m", "marstore", "doctor"], capture_output=True, text=True, env=env)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in p.stdout.splitlines()[:-1])
    assert rows["torch"].startswith(torch.__version__) and "h5py / HDF5" in rows and "safetensors" in rows
    if disabled:
        assert (p.returncode, rows["marstore._C"], rows["operators use"]) == (1, "disabled by MARSTORE_NO_EXTENSION", "torch")
        assert p.stdout.splitlines()[-1] == "NOT OK: the extension is not usable (see above)"
    else:
        assert (p.returncode, rows["marstore._C"], p.stdout.splitlines()[-1]) == (0, f"loaded, built for torch {torch.__version__}", "ok")
        available = ops._C.cpu_kernels_available()
        assert rows["CPU kernels"] == f"{available[-1]} (this processor runs: {', '.join(available)})"
