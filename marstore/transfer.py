"""The transfer ring: hooked activations -> reusable pinned host slots, off the model's path.

    with TransferRing(num_slots=4, device="cuda") as ring:
        slot = ring.submit({"encoder_blocks.0": h0, "decoder_norm": h1})  # returns at once
        host = slot.wait()          # {name: CPU tensor view into the slot}
        ...write host somewhere...
        slot.release()              # the slot can be filled again

A ring owns K slots, each one pinned host buffer allocated once, a side CUDA stream and one
event per slot. submit() makes the side stream wait for the producer's stream, records the
sources on the side stream (so the caching allocator cannot reuse their memory before the copy
is done), and launches one cast_copy_many per destination dtype (into bfloat16, other sources
are converted on their device first: the kernels only copy into it). When every slot is in flight,
submit() blocks until one is released: host memory stays bounded. CPU sources use the same
interface with synchronous copies. A batch may carry named scalars (the forward's losses):
they travel in the slot too, so that reading a loss on the GPU never makes the model wait.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Mapping

import torch

from marstore import ops
from marstore.report import human_bytes

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes; every region starts on a cache line


def resolve_device(name: str | None) -> torch.device:
    """A --device value, checked: a GPU that is not there fails here, in one line (ValueError),
    not inside the model. None: the GPU where there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # the transfer engine's kernels are the CPU's and CUDA's
        raise ValueError(f"--device {name}: marstore runs on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cpu" and device.index is not None:  # tensors put there are on 'cpu', and would not match
        raise ValueError(f"--device {name}: the CPU takes no index; use --device cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no GPU is usable here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


class SlotTooSmall(ValueError):
    """A batch needs more bytes than a slot holds; call TransferRing.reserve() first."""


class Slot:
    """One pinned host buffer, and the layout of the batch that was copied into it."""

    def __init__(self, ring: "TransferRing", index: int, nbytes: int, pin: bool):
        self.ring = ring
        self.index = index
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.event = torch.cuda.Event() if ring.device.type == "cuda" else None
        self.layout: dict[str, tuple[int, torch.Size, torch.dtype]] = {}
        # Counts of the last copy, one row per name, kept from batch to batch (the operators
        # write into them); on the device first for CUDA sources, then copied to pinned memory.
        self._counts_host = torch.empty(0, 2, dtype=torch.int64)
        self._counts_device: torch.Tensor | None = None
        self._counts_names: list[str] = []
        # Scalars of the batch: device values copied behind the tensors (pinned), the rest as given.
        self._copied_values = torch.empty(0, dtype=torch.float64)
        self._copied_names: list[str] = []
        self._given_scalars: dict[str, float] = {}
        self._scalar_order: list[str] = []
        self.in_flight = False

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def wait(self) -> dict[str, torch.Tensor]:
        """Blocks until the copy has landed; returns {name: host tensor view into the slot}."""
        if self.event is not None:
            self.event.synchronize()
        return {
            name: self.buffer[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, (off, shape, dtype) in self.layout.items()
        }

    def counts(self) -> dict[str, tuple[int, int]]:
        """{name: (nonfinite, overflow)} of the last copy; call after wait()."""
        if self.event is not None:
            self.event.synchronize()
        rows = self._counts_host.tolist()
        return {name: (row[0], row[1]) for name, row in zip(self._counts_names, rows)}

    def scalars(self) -> dict[str, float]:
        """{name: value} of the scalars submitted with the batch, in their order; after wait()."""
        if self.event is not None:
            self.event.synchronize()
        values = {**self._given_scalars, **dict(zip(self._copied_names, self._copied_values.tolist()))}
        return {name: values[name] for name in self._scalar_order}

    def release(self) -> None:
        """Returns the slot to the ring; its views must no longer be used."""
        self.ring._release(self)


class TransferRing:
    """K reusable pinned host slots fed by cast_copy_many on a side stream (see module doc)."""

    def __init__(
        self,
        num_slots: int = 4,
        slot_bytes: int | None = None,
        *,
        budget_bytes: int | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
    ):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots}: a ring needs at least 1 slot")
        if slot_bytes is not None and budget_bytes is not None:
            raise ValueError("give slot_bytes or budget_bytes, not both")
        if budget_bytes is not None:
            slot_bytes = budget_bytes // num_slots
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.num_slots = num_slots
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._cond = threading.Condition()
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._closed = False
        if slot_bytes is not None:
            self._allocate(slot_bytes, "as given")

    @property
    def slot_bytes(self) -> int | None:
        return self._slots[0].nbytes if self._slots else None

    def _allocate(self, slot_bytes: int, sized: str) -> None:
        slot_bytes = -(-int(slot_bytes) // _ALIGN) * _ALIGN
        self._slots = [Slot(self, i, slot_bytes, self.pin_memory) for i in range(self.num_slots)]
        self._free = list(reversed(self._slots))
        log.info("transfer ring: %d slots of %s, %s (%s memory)", self.num_slots, human_bytes(slot_bytes), sized,
                 "pinned" if self.pin_memory else "pageable")

    def reserve(self, slot_bytes: int) -> None:
        """Re-allocates every slot with slot_bytes (waits until all are released)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) == len(self._slots))
            if self.slot_bytes is None or slot_bytes > self.slot_bytes:
                self._allocate(slot_bytes, "as reserved")

    def layout(self, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> tuple[dict, int]:
        """Byte layout of a batch in a slot: {name: (offset, shape, dtype)} and the bytes needed."""
        layout, cursor = {}, 0
        for name, t in tensors.items():
            dtype = dtypes[name]
            layout[name] = (cursor, t.shape, dtype)
            cursor += -(-t.numel() * dtype.itemsize // _ALIGN) * _ALIGN
        return layout, cursor

    def submit(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float16,
        timeout: float | None = None,
        scalars: Mapping[str, torch.Tensor | float] | None = None,
    ) -> Slot:
        """Starts copying tensors into a free slot and returns it (blocks while none is free).
        scalars: named one-element tensors (on the ring's device) or numbers; Slot.scalars()
        gives them as floats."""
        if self._closed:
            raise RuntimeError("this TransferRing is closed")
        dtypes = {name: dtype for name in tensors} if isinstance(dtype, torch.dtype) else dict(dtype)
        for name, t in tensors.items():
            if t.device != self.device:
                raise ValueError(f"tensor {name!r} is on {t.device}, but this ring copies from {self.device}")
        layout, need = self.layout(tensors, dtypes)
        if self.slot_bytes is None:
            self._allocate(need, "the first batch's size")
        if need > self.slot_bytes:
            raise SlotTooSmall(
                f"batch needs {need} bytes but each slot holds {self.slot_bytes}; call ring.reserve({need}) "
                "or give slot_bytes/budget_bytes big enough for the largest batch"
            )
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                raise TimeoutError(f"no transfer slot was released within {timeout} s")
            slot = self._free.pop()
            slot.in_flight = True
        try:
            self._launch(slot, tensors, layout, dict(scalars or {}))
        except BaseException:
            self._release(slot)
            raise
        return slot

    def _launch(self, slot: Slot, tensors: Mapping[str, torch.Tensor], layout: dict, scalars: dict) -> None:
        slot.layout = layout
        slot._scalar_order = list(scalars)
        on_device = {} if self.stream is None else {  # on the CPU a tensor's value is at hand
            n: v for n, v in scalars.items() if isinstance(v, torch.Tensor) and v.device == self.device}
        slot._given_scalars = {n: float(v) for n, v in scalars.items() if n not in on_device}
        slot._copied_names = list(on_device)
        groups: dict[torch.dtype, list[str]] = {}
        for name in tensors:
            groups.setdefault(layout[name][2], []).append(name)
        slot._counts_names = [name for names in groups.values() for name in names]  # rows in group order
        rows = len(slot._counts_names)
        if slot._counts_host.shape[0] != rows:
            slot._counts_host = torch.empty(rows, 2, dtype=torch.int64, pin_memory=self.stream is not None)
        if self.stream is None:
            self._copy_groups(slot, tensors, groups, slot._counts_host)
            return
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            for t in tensors.values():
                t.record_stream(self.stream)
            if slot._counts_device is None or slot._counts_device.shape[0] != rows:
                slot._counts_device = torch.empty(rows, 2, dtype=torch.int64, device=self.device)
            self._copy_groups(slot, tensors, groups, slot._counts_device)
            slot._counts_host.copy_(slot._counts_device, non_blocking=True)
            if on_device:
                for v in on_device.values():
                    v.record_stream(self.stream)
                values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in on_device.values()])
                if slot._copied_values.numel() != len(on_device):
                    slot._copied_values = torch.empty(len(on_device), dtype=torch.float64, pin_memory=True)
                slot._copied_values.copy_(values, non_blocking=True)
            slot.event.record(self.stream)

    def _copy_groups(self, slot: Slot, tensors, groups, counts: torch.Tensor) -> None:
        """One cast_copy_many per destination dtype, each writing its rows of counts."""
        first = 0
        for dtype, names in groups.items():
            item = dtype.itemsize
            dst = slot.buffer[: slot.nbytes // item * item].view(dtype)
            offsets = [slot.layout[n][0] // item for n in names]
            rows = counts[first : first + len(names)]
            sources = [tensors[n] for n in names]
            if dtype == torch.bfloat16:
                # The kernels convert into float16 (or float32); into bfloat16 they only copy, so
                # other sources are converted on their device first. A float32 value past
                # bfloat16's range (above 3.39e38) then counts as non-finite, not as an overflow.
                sources = [s if s.dtype == torch.bfloat16 else s.to(torch.bfloat16) for s in sources]
            ops.cast_copy_many(sources, dst, offsets, counts=rows)
            first += len(names)

    def _release(self, slot: Slot) -> None:
        with self._cond:
            if not slot.in_flight:
                raise RuntimeError(f"slot {slot.index} was released twice")
            slot.in_flight = False
            if slot in self._slots:  # a slot from before reserve() is simply dropped
                self._free.append(slot)
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._slots) - len(self._free)

    def close(self) -> None:
        """Waits for pending copies; the ring cannot be used afterwards."""
        if self.stream is not None:
            self.stream.synchronize()
        self._closed = True

    def __enter__(self) -> "TransferRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


