"""The public pipeline: capture -> find targets -> insert adapters, and merge back."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn

from .capture import capture, recording_checkpointed_modules
from .graphs import DEFAULT_RECAPTURE_LIMIT, adapt_graphs, input_shapes, prepare_graphs, split_batch_norm
from .distributed import whole_copy, whole_model
from .config import AdapterConfig, SwitchLoRA
from .errors import ConfigError, DynLoRAError, MergeError, TargetError
from .adapter import Adapter, AdapterTree
from .module import DynLoRAModule, unwrap
from .runtime.precision import check_weight_dtype, master_dtype, master_weight, residual_of, update_weight
from .passes import outline_regions, find_regions, find_targets, region_bodies, remove_adapters, repeated_blocks

__all__ = ["transform", "merge", "merge_and_unload"]


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)  # a lone tensor is a common slip for a 1-tuple
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise ConfigError("example_inputs", f"expected a tuple of positional inputs, got {type(example_inputs).__name__}",
                          "pass e.g. (x,) — and keyword inputs as example_kwargs={...}")
    return example_inputs


def transform(model: nn.Module, example_inputs: Any = (), config: AdapterConfig | None = None, *,
              example_kwargs: dict[str, Any] | None = None, checkpoint: str | bool = "auto",
              dynamic_shapes: Any = None, recapture_limit: int = DEFAULT_RECAPTURE_LIMIT) -> DynLoRAModule:
    """Return a copy of ``model`` whose weight-bearing matrix products carry low-rank adapters.

    ``model`` is left untouched. The result computes the same function at step 0, honours
    ``.train()``/``.eval()`` like ``model`` and accepts other batch sizes and sequence lengths
    wherever it does: where ``torch.export`` had to specialise on a size, a call outside it
    captures the model again (a graph per guard set over the same state and adapters), up to
    ``recapture_limit`` graph sets (``gm.recapture_limit`` changes it later).

    ``dynamic_shapes`` is passed to ``torch.export`` as it is, with the meaning it has there (the
    default: ``Dim.AUTO`` on every input dim where the model allows it, else on the batch dims).

    ``checkpoint`` sets activation checkpointing per block: ``"auto"`` recomputes the blocks the
    model itself checkpoints (Hugging Face's ``gradient_checkpointing_enable()``, modules it runs
    under ``torch.utils.checkpoint``), ``True`` every repeated block, ``False`` none.
    """
    config = SwitchLoRA() if config is None else config
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a torch.nn.Module, got {type(model).__name__}",
                          "pass the model object itself")
    if not isinstance(config, AdapterConfig):
        raise ConfigError("config", f"expected dl.SwitchLoRA, dl.LoRA or dl.ReLoRA, got {type(config).__name__}",
                          "pass e.g. dl.SwitchLoRA(rank=64)")
    if hasattr(model, "_orig_mod"):  # a torch.compile wrapper: compiling must come after the rewrite
        raise ConfigError(type(model._orig_mod).__name__, "the model is already compiled (torch.compile wrapper)",
                          "transform the uncompiled model, then compile the result: "
                          "dl.compile(dl.transform(model, example_inputs, config))")
    if any(isinstance(m, DynLoRAModule) for m in model.modules()):
        raise DynLoRAError(type(model).__name__, "the model is already transformed (it contains adapters)",
                           "transform the original model, or call dl.merge(gm) first to get a plain model")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ConfigError("example_kwargs", f"expected a dict, got {type(example_kwargs).__name__}",
                          "pass keyword inputs as a dict, e.g. {'input_ids': ids}")
    if checkpoint not in ("auto", True, False):
        raise ConfigError("checkpoint", f"expected 'auto', True or False, got {checkpoint!r}",
                          "pass checkpoint='auto' (follow the model's own setting), True (every repeated block) "
                          "or False")
    if isinstance(recapture_limit, bool) or not isinstance(recapture_limit, int) or recapture_limit < 1:
        raise ConfigError("recapture_limit", f"expected an int >= 1, got {recapture_limit!r}",
                          f"pass the number of graph sets (guard sets) to allow, e.g. {DEFAULT_RECAPTURE_LIMIT}")
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})

    try:
        work = copy.deepcopy(model)  # never touch the user's model
    except Exception as exc:  # noqa: BLE001 - e.g. a non-leaf tensor left on a module by a hook
        raise DynLoRAError(type(model).__name__, f"the model cannot be copied ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})",
                           "transform the model before running it, or remove what holds a non-leaf tensor (e.g. "
                           "torch.nn.utils.spectral_norm's weight after a train-mode forward: use "
                           "torch.nn.utils.parametrizations.spectral_norm)") from None
    with recording_checkpointed_modules() as own_checkpointed:  # capture sees through the model's own
        cap = capture(work, args, kwargs, dynamic_shapes)
    graphs = prepare_graphs(cap.graphs)

    plan = find_targets(graphs, config)  # every mode's graph: a weight read only in eval mode counts too
    if not plan.targets:
        reasons = "; ".join(f"{s.weight}: {s.reason}" for s in plan.skipped[:8]) or "it has no parameter of >= 2 dims"
        raise TargetError(type(model).__name__, f"no weight can carry an adapter ({reasons})",
                          "check targets/exclude patterns and rank; the model needs a linear, convolution or "
                          "matrix product over a trained parameter")

    gm = DynLoRAModule(work, cap.constants, graphs, cap.method, config, plan)
    gm.recapture_limit, gm.dynamic_shapes = recapture_limit, dynamic_shapes
    gm._graph_sets[0].shapes = input_shapes(graphs["train"], args, kwargs)
    with torch.no_grad():
        for uid, target in enumerate(plan.targets):
            weight = work.get_parameter(target.weight)
            check_weight_dtype(weight, target.weight)
            adapter = Adapter(target, uid, config, weight)
            _register(gm.adapters, target.weight, adapter)
            # so W + s·B·A equals the original W (exactly, in the master dtype: runtime/precision.py)
            update_weight(weight, residual_of(adapter, weight), torch.Tensor.sub_,
                          adapter.delta(master_dtype(weight.dtype)))
            weight.requires_grad_(False)
    adapt_graphs(gm, graphs, regions=False)  # the pipeline every recaptured graph set goes through too
    gm.checkpointed = _checkpoint_blocks(gm, checkpoint, own_checkpointed)
    gm.train(model.training)
    return gm


def _checkpoint_blocks(gm: DynLoRAModule, checkpoint: str | bool, own: set[int]) -> tuple[str, ...]:
    """Run the chosen blocks of the train graph under torch.utils.checkpoint; their names.

    ``"auto"`` keeps every block the model checkpoints or raises: the model asked for that memory
    saving, so losing it silently is not an option. ``True`` is the user's own choice of every repeated
    block: one that cannot be recomputed runs plain, with a warning."""
    if checkpoint is False:
        return ()
    model = gm.model
    if checkpoint == "auto":
        blocks = [name for name, m in model.named_modules() if id(m) in own]
        blocks = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]  # outermost only
    else:
        blocks = repeated_blocks(model)
        if not blocks:
            raise DynLoRAError(type(model).__name__, "checkpoint=True, but the model has no repeated blocks "
                               "(a ModuleList or Sequential of two or more blocks of one type)",
                               "pass checkpoint=False, or keep the blocks to recompute in an nn.ModuleList")
    if not blocks:
        return ()
    train = split_batch_norm(gm._graphs)
    regions = find_regions(train, blocks)
    why = _by_reason(regions.skipped)
    if checkpoint == "auto" and regions.skipped:
        raise DynLoRAError(regions.skipped[0][0], f"the model checkpoints {len(regions.skipped)} block(s) that "
                           f"cannot be recomputed here ({why})",
                           "pass checkpoint=False to train without recomputing any block (more activation memory), "
                           "or checkpoint=True to recompute every repeated block that can be and run these plain "
                           "(a warning); or change the block so its forward writes no state in place")
    if checkpoint is True and not regions.regions:
        raise DynLoRAError(type(model).__name__, f"checkpoint=True, but no block is a region of the graph ({why})",
                           "pass checkpoint=False")
    if regions.skipped:
        warnings.warn(f"dynlora: {len(regions.skipped)} block(s) run without activation checkpointing ({why})",
                      RuntimeWarning, stacklevel=3)
    outline_regions(train, regions, recompute=True)
    return tuple(r.block for r in regions.regions)


def _by_reason(skipped: tuple[tuple[str, str], ...]) -> str:
    """'a, b, c (+2 more): reason; d: other reason' for (block, reason) pairs."""
    groups: dict[str, list[str]] = {}
    for block, reason in skipped:
        groups.setdefault(reason, []).append(block)
    return "; ".join(f"{', '.join(b[:3])}{f' (+{len(b) - 3} more)' if len(b) > 3 else ''}: {reason}"
                     for reason, b in groups.items())


def _register(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, AdapterTree())
        root = getattr(root, part)
    root.add_module(leaf, module)


@torch.no_grad()
def merge(module: nn.Module) -> DynLoRAModule:
    """A copy of a transformed module with every ``s·B·A`` folded into its weight and no adapter
    node or parameter left; same function. Refuses to fold non-finite values.

    A sharded module (``dl.fully_shard``) is gathered whole first: every rank must call this, and
    every rank gets the whole merged module."""
    out = whole_copy(unwrap(module))
    _fold_adapters(out.model, out.iter_adapters())
    for g in out._unique_graphs():
        for body in (g, *region_bodies(g)):
            remove_adapters(body)
            body._modules.pop("adapters", None)  # absent in the regions of a module merged before
    out.adapters = nn.Module()
    out.plan = type(out.plan)((), out.plan.skipped)
    return out


@torch.no_grad()
def merge_and_unload(module: nn.Module) -> nn.Module:
    """The user's own model (a copy, of its original class) with every ``s·B·A`` folded into its
    weight: no graph, no adapter, same function — ready for ``save_pretrained``/``from_pretrained``,
    ``generate``, ``torch.save`` or further training as a plain model. ``module`` is left as it is.
    Refuses to fold non-finite values. Of a sharded module: a collective, as :func:`merge`."""
    model, adapters = whole_model(unwrap(module))
    _fold_adapters(model, adapters)
    return model


def _fold_adapters(model: nn.Module, adapters: list[Adapter]) -> None:
    """W += s·B·A in ``model`` for each adapter (checked finite first); W trains again."""
    for adapter in adapters:
        weight = model.get_parameter(adapter.target.weight)
        dtype = master_dtype(weight.dtype)
        merged = (master_weight(weight, residual_of(adapter, weight, create=False)) + adapter.delta(dtype)).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(adapter.target.weight, "the merged weight would contain NaN or Inf",
                             "inspect training for divergence (lower the learning rate, clip gradients) and "
                             "merge from a finite checkpoint")
        weight.copy_(merged)
        weight.requires_grad_(True)
