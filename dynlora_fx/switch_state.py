"""The switcher's run state, with one owner: the module's ``switch_state``.

Its buffers carry it through ``state_dict()``: the step, the run's seed, the ReLoRA round, both
generators' states (``uint8``) and the switched/skipped counters. (Per-adapter bookkeeping — in-use
candidates, freezes, pointers — lives on the adapters.)

While a switcher runs, the step, seed, round and generators advance on the host every step, and
reading device buffers there would synchronise; so ``SwitchState`` keeps them as its own live
values (:class:`LiveState`) from :meth:`SwitchState.start` to :meth:`SwitchState.stop`, writes
them into the buffers when it is saved (or copied) and reads them back when it is loaded. The
switcher reads and writes this object; nothing else holds a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .candidates import project_generator
from .errors import StateError

__all__ = ["SwitchState", "LiveState", "counts_generator", "device_seed"]

_GENERATORS = ("counts_generator", "device_generator")


def counts_generator(seed: int) -> torch.Generator:
    """The CPU generator of a run's per-step switch counts (identical on every rank)."""
    return project_generator(seed, 0xC0117)


def device_seed(seed: int) -> int:
    """Seed of a run's device generator (slots and candidates)."""
    return int(torch.randint(0, 2**62, (1,), generator=project_generator(seed, 0xDE1)))


@dataclass
class LiveState:
    """The host-side values of a running switch state (advanced every step without a device read)."""

    step: int  # optimizer steps taken by the run
    seed: int  # the run's seed: candidates and ReLoRA re-initialisations derive from it
    relora_round: int  # ReLoRA resets done
    counts: torch.Generator  # CPU: how many vectors each adapter switches per step
    device: torch.Generator  # on the adapters' device: slots and candidates


class SwitchState(nn.Module):
    """The switcher's state as buffers (see the module docstring), live on the host while switching."""

    def __init__(self, seed: int, device: torch.device | None = None):
        super().__init__()
        long = {"dtype": torch.long, "device": device}
        self.register_buffer("step", torch.zeros((), **long))
        self.register_buffer("seed", torch.tensor(seed, **long))
        self.register_buffer("relora_round", torch.zeros((), **long))
        self.register_buffer("switched", torch.zeros(2, **long))  # rows of A, columns of B
        self.register_buffer("skipped", torch.zeros((), **long))  # switches skipped on NaN/Inf
        self.register_buffer("counts_generator", counts_generator(seed).get_state().to(device))
        self.register_buffer("device_generator",
                             torch.Generator().manual_seed(device_seed(seed)).get_state().to(device))
        self.live: LiveState | None = None  # set while a switcher runs (start .. stop)

    @property
    def attached(self) -> bool:
        """Whether a switcher is running on this state."""
        return self.live is not None

    def start(self, device: torch.device) -> LiveState:
        """The live values for switching on ``device``: taken from the buffers, unless already live there."""
        if self.live is not None and self.live.device.device == device:
            return self.live
        self.stop()
        live = LiveState(0, 0, 0, torch.Generator(), torch.Generator(device=device))
        self._read_buffers(live)  # raises, leaving the state as it was, if the buffers cannot run on device
        self.live = live
        return live

    @torch.no_grad()
    def stop(self) -> None:
        """Write the live values into the buffers and stop being live (a switcher detached)."""
        if self.live is not None:
            self._write_buffers(self.live)
            self.live = None

    def _read_buffers(self, live: LiveState) -> None:
        step, seed = int(self.step), int(self.seed)
        live.counts.set_state(self.counts_generator.cpu())
        device_state = self.device_generator.cpu()
        if device_state.numel() == live.device.get_state().numel():
            live.device.set_state(device_state)
        elif step == 0:  # transformed on one device type, switching on another: a fresh generator there
            live.device.manual_seed(device_seed(seed))
        else:
            raise StateError("switch_state.device_generator", f"the state was saved by a switcher on another "
                             f"device type than {live.device.device.type} (its generator state has "
                             f"{device_state.numel()} bytes)",
                             "resume on the device type the checkpoint was written on")
        live.step, live.seed, live.relora_round = step, seed, int(self.relora_round)

    @torch.no_grad()
    def _write_buffers(self, live: LiveState) -> None:
        self.step.fill_(live.step)
        self.seed.fill_(live.seed)
        self.relora_round.fill_(live.relora_round)
        self._set_generator("counts_generator", live.counts.get_state())
        self._set_generator("device_generator", live.device.get_state())

    def _set_generator(self, name: str, state: torch.Tensor) -> None:
        buf = getattr(self, name)
        if buf.shape == state.shape:
            buf.copy_(state)
        else:  # another device type's generator (CPU: 5056 bytes, CUDA: 16)
            setattr(self, name, state.to(buf.device))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.live is not None:
            self._write_buffers(self.live)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for name in _GENERATORS:  # a generator state's size depends on the device type that wrote it
            new = state_dict.get(prefix + name)
            if isinstance(new, torch.Tensor) and new.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(new, device=getattr(self, name).device))
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.live is not None and len(error_msgs) == errors and all(prefix + k in state_dict for k in self._buffers):
            self._read_buffers(self.live)  # in place: the running switcher continues from what was loaded

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) holds the current values in its buffers and runs no switcher."""
        if self.live is not None:
            self._write_buffers(self.live)
        return {**self.__dict__, "live": None}
