"""What one optimization step holds in memory, and the plan that fits it to the device.

An update holds, until its backward: the chain's activations (T DDIM steps of B items, or,
checkpointed, only each step's inputs and one step recomputed at a time), the K loss
decodes (or, checkpointed, one recomputed at a time), and the classifier graphs of the
views that are in the objective at once. `plan_memory` chooses the cheapest plan that
fits a share of the device's free memory: every view in one pass without checkpointing,
else fewer views a pass (smaller classifier batches cost little), else the checkpointed
chain (a second UNet forward a step), with as many views a pass as then fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import torch


def _is_activation(tensor: torch.Tensor) -> bool:
    """A saved tensor that is part of the graph. Those that need no gradient are weights,
    buffers and constants (or views and autocast copies of them): there anyway, and not
    freed with the graph."""
    return tensor.requires_grad


def saved_activation_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the activations autograd keeps for backward while `forward` runs (each
    storage once; see _is_activation)."""
    sizes: dict[int, int] = {}  # storage address -> bytes

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if _is_activation(tensor):
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(sizes.values())


class SavedTensorMeter:
    """The bytes of the activations autograd holds for backward at any moment while the
    meter is open, and their peak: each storage counted once while some graph still holds
    it (see _is_activation). Tensors saved inside a checkpointed region are the
    checkpoint's to drop and recompute, so they are not held and not counted."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, holders]
        self.current = 0
        self.peak = 0

    def _hold(self, address: int, nbytes: int) -> None:
        entry = self.live.setdefault(address, [nbytes, 0])
        if entry[1] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    @contextmanager
    def measure(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: _Held(self, tensor), lambda held: held.tensor):
            yield self


class _Held:
    """One saved tensor as the meter sees it: counted from packing until the graph drops it."""

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.meter = meter if _is_activation(tensor) else None
        if self.meter is not None:
            storage = tensor.untyped_storage()
            self.address = storage.data_ptr()
            self.meter._hold(self.address, storage.nbytes())

    def __del__(self) -> None:
        if self.meter is not None:
            self.meter._release(self.address)


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: on CUDA the driver's free memory plus what PyTorch's
    allocator has reserved and does not use (it hands that out first; the driver counts it
    as taken); on the CPU the system's MemAvailable (Linux); 4 GiB where neither can be read."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            pass
    return 4 * 2**30


@dataclass(frozen=True)
class StepFootprint:
    """Saved-activation bytes of the parts of one update."""

    ddim_step: int  # one DDIM step of the whole batch (both guidance halves)
    decode: int  # one item's VAE decode
    view: int  # one pass of the objective with one view of each item of the batch


@dataclass(frozen=True)
class MemoryPlan:
    checkpoint: bool  # recompute every DDIM step (and the loss decodes) in backward
    views_per_pass: int  # each item's views that go through the objective at once


def held_bytes(footprint: StepFootprint, plan: MemoryPlan, batch: int, num_steps: int, loss_steps: int,
               checkpoint_decode: bool) -> int:  # fmt: skip
    """What an update holds at most under `plan` (the parts added up: an upper bound)."""
    if plan.checkpoint:
        chain = footprint.ddim_step  # one step recomputed at a time
        decodes = footprint.decode * batch * (1 if checkpoint_decode else loss_steps)
    else:
        chain = footprint.ddim_step * num_steps
        decodes = footprint.decode * batch * loss_steps
    return chain + decodes + footprint.view * plan.views_per_pass


def plan_memory(footprint: StepFootprint, budget: float, batch: int, num_steps: int, loss_steps: int, num_views: int,
                checkpoint: bool | None = None, checkpoint_decode: bool = True,
                fixed_views: bool = False) -> MemoryPlan:  # fmt: skip
    """The cheapest plan whose held bytes fit `budget`: all `num_views` a pass without
    checkpointing, else fewer a pass, else checkpointed with as many as fit. `checkpoint`
    given fixes that choice, `fixed_views` the views a pass. Where nothing fits, the
    least the update can hold (checkpointed, one view a pass)."""
    for use_checkpoint in (False, True) if checkpoint is None else (checkpoint,):
        fixed = held_bytes(footprint, MemoryPlan(use_checkpoint, 0), batch, num_steps, loss_steps, checkpoint_decode)
        room = budget - fixed
        if room >= footprint.view * num_views:
            return MemoryPlan(use_checkpoint, num_views)
        if not fixed_views and room >= footprint.view > 0:
            return MemoryPlan(use_checkpoint, int(room // footprint.view))
    return MemoryPlan(True if checkpoint is None else checkpoint, num_views if fixed_views else 1)
