"""The switcher: what ``dl.attach`` hooks onto an optimizer.

Around every ``optimizer.step()`` it runs the method's handler (``runtime/handlers.py``: SwitchLoRA
switches vectors, ReLoRA merges and restarts, LoRA does nothing), counts the step and now and
then reports switches skipped on NaN/Inf. It holds no state of its own: the run's state is the
module's (``gm.switch_state``, live on the host while attached: ``switch_state.py``; each adapter's
bookkeeping buffers) and ``dl.AdamW``'s, so whatever checkpoints the module's and the optimizer's
``state_dict()`` resumes switching bit-identically, and a new switcher continues from the state
the module holds. Every decision (counts, slots, candidates) comes from generators that are
identical on every rank, so ranks stay in step.

Seams: ``strategy=`` picks how SwitchLoRA switches ("batched", or the "reference" per-vector
loop), ``precision=`` how ``W`` absorbs updates (``runtime/precision.PrecisionPolicy``), and
``around_hook`` wraps each step hook (benchmarks time them with it).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from ..adapter import Adapter
from ..errors import ConfigError, StateError
from ..distributed import is_fully_sharded
from ..module import DynLoRAModule, unwrap
from ..switch_state import LiveState
from .cohorts import BOOKKEEPING
from .handler import MethodHandler
from .handlers import handler_class
from .precision import EXACT_MASTER, PrecisionPolicy, check_weight_dtype
from .switchlora import STRATEGIES

__all__ = ["Switcher", "attach"]

_CHECK_EVERY = 50  # steps between reads of the non-finite-skip counter (the only sync)


def attach(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, *, strategy: str = "batched",
           precision: PrecisionPolicy = EXACT_MASTER) -> Switcher:
    """Hook the method's runtime onto ``optimizer``: each ``optimizer.step()`` then also switches
    (SwitchLoRA) or merges and restarts (ReLoRA). ``module`` is what ``dl.transform`` returned,
    or a DDP / torch.compile wrapper of it. ``strategy`` (SwitchLoRA): "batched" (default) or
    "reference", the per-vector loop of the paper's code with stored candidates (same decisions,
    for comparison). ``precision``: how W absorbs updates (default: exactly, into an fp32 master)."""
    return Switcher(unwrap(module), optimizer, total_steps, strategy=strategy, precision=precision)


class Switcher:
    """The hooks of one optimizer over one transformed module (see the module docstring).

    ``around_hook``: None, or a function ``phase -> context manager`` that each optimizer-step hook
    runs inside ("pre" before the step, "post" after it); set it to time or trace the hooks."""

    def __init__(self, gm: DynLoRAModule, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 strategy: str = "batched", precision: PrecisionPolicy = EXACT_MASTER):
        if getattr(optimizer, "_dynlora_switcher", None) is not None:
            raise StateError("dl.attach", "this optimizer already has a switcher attached",
                             "attach once per optimizer; keep the Switcher dl.attach returned")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise StateError("dl.attach total_steps", f"expected an int >= 1, got {total_steps!r}",
                             "pass the number of optimizer steps the run will take")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.adapters: list[Adapter] = gm.iter_adapters()
        if not self.adapters:
            raise StateError("dl.attach", "the module has no adapters (was it merged?)",
                             "attach to the module dl.transform returned, before dl.merge")
        for ad in self.adapters:  # the module may have been cast since the transform
            check_weight_dtype(gm.model.get_parameter(ad.target.weight), ad.target.weight)
        missing = [a.target.weight for a in self.adapters if id(a.A) not in held or id(a.B) not in held]
        if missing:
            raise StateError("dl.attach", f"the optimizer does not hold the adapters of {missing[:3]}"
                             f"{' …' if len(missing) > 3 else ''}",
                             "build the optimizer over the transformed module's parameters: dl.AdamW(gm.parameters())"
                             + (", after dl.fully_shard (sharding replaces the parameters)" if is_fully_sharded(gm) else ""))
        self.config = gm.dynlora_config
        handler = handler_class(self.config)
        handler.check_optimizer(optimizer)
        if strategy not in STRATEGIES:
            raise ConfigError(f"dl.attach strategy={strategy!r}", "unknown switching strategy",
                              f"use one of {sorted(STRATEGIES)}")
        handler.check_strategy(strategy, self.config.method)
        self.gm, self.optimizer, self.total_steps, self.precision = gm, optimizer, total_steps, precision
        self.state = gm.switch_state
        self._device = self.adapters[0].A.device
        self.state.start(self._device)  # the module's state: fresh (step 0, the config seed's generators) or loaded
        self.around_hook: Callable[[str], ContextManager] | None = None
        self._warned = False
        self.method: MethodHandler = handler(self, strategy)
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        optimizer._dynlora_switcher = self

    @property
    def live(self) -> LiveState:
        """The run's host-side state (step, seed, ReLoRA round, generators), owned by ``gm.switch_state``."""
        return self.state.start(self._device)

    @property
    def step(self) -> int:
        """Optimizer steps the run has taken (across resumes)."""
        return self.live.step

    @step.setter
    def step(self, value: int) -> None:  # the speed benchmark times a switch at chosen points of the run
        self.live.step = value

    # -- hooks -----------------------------------------------------------------------
    def _around(self, phase: str) -> ContextManager:
        return contextlib.nullcontext() if self.around_hook is None else self.around_hook(phase)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with self._around("pre"):
            self.method.before_step(optimizer)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with self._around("post"):
            self.method.after_step(optimizer)
            live = self.live
            live.step += 1
            if live.step % _CHECK_EVERY == 0:
                self._warn_skips()

    # -- reporting, state ------------------------------------------------------------------
    def num_switched(self) -> tuple[int, int]:
        """(rows of A, columns of B) switched so far (reads the device: not for the hot path)."""
        a, b = self.state.switched.tolist()
        return a, b

    def _warn_skips(self) -> None:
        skipped = int(self.state.skipped)
        if not self._warned and skipped > 0:
            self._warned = True
            warnings.warn(f"dynlora: {skipped} switches were skipped because the adapter vectors to "
                          "switch held NaN/Inf; W absorbed none of them. Lower the learning rate or clip gradients.",
                          RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """The run's state as one dict, read from the module's (a convenience: ``gm.state_dict()``
        carries the same)."""
        self._warn_skips()
        live = self.live
        return {
            "version": 1, "method": self.config.method, "step": live.step, "seed": live.seed,
            "total_steps": self.total_steps, "relora_round": live.relora_round,
            "counts_generator": live.counts.get_state(), "device_generator": live.device.get_state(),
            "switched": self.state.switched.clone(), "skipped": self.state.skipped.clone(),
            "adapters": {ad.target.weight: {k: getattr(ad, k).clone() for k in BOOKKEEPING} for ad in self.adapters},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"version", "method", "step", "seed", "total_steps", "relora_round", "counts_generator",
                    "device_generator", "switched", "skipped", "adapters"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise StateError("Switcher.load_state_dict", f"not a switcher state (keys {got})",
                             "pass what Switcher.state_dict() returned")
        if state["method"] != self.config.method:
            raise StateError("Switcher.load_state_dict", f"state is for {state['method']}, this run uses "
                             f"{self.config.method}", "resume with the same method")
        mine = {ad.target.weight: ad for ad in self.adapters}
        if set(state["adapters"]) != set(mine):
            diff = sorted(set(state["adapters"]) ^ set(mine))[:3]
            raise StateError("Switcher.load_state_dict", f"adapters differ from this model's (e.g. {diff})",
                             "load the state into the same model, transformed with the same targets and rank")
        for name, entry in state["adapters"].items():
            for key in BOOKKEEPING:
                if key not in entry or entry[key].shape != getattr(mine[name], key).shape:
                    raise StateError(f"Switcher.load_state_dict adapters[{name!r}]", f"{key} is missing or misshapen",
                                     "pass an unmodified Switcher.state_dict() for this model")
        live = self.live
        live.step, live.seed, live.relora_round = state["step"], state["seed"], state["relora_round"]
        self.total_steps = state["total_steps"]
        live.counts.set_state(state["counts_generator"])
        live.device.set_state(state["device_generator"])
        self.state.switched.copy_(state["switched"])
        self.state.skipped.copy_(state["skipped"])
        for name, entry in state["adapters"].items():  # candidates follow the new seed at the next step
            for key in BOOKKEEPING:
                getattr(mine[name], key).copy_(entry[key])

    def detach(self) -> None:
        """Remove the hooks: the optimizer steps like a plain one again. The module keeps the state."""
        for h in self._hooks:
            h.remove()
        self.optimizer._dynlora_switcher = None
        self.state.stop()
