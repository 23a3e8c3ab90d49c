"""The fuzzer in CI: a fixed seeded set of random models, every invariant of dynlora_fx/testing/fuzz_models.py.

Longer campaigns: ``python benchmarks/fuzz.py --count N --start S --shrink`` (JSON in
benchmarks/results/). A failure printed here reproduces with
``fuzz_models.check_spec(fuzz_models.draw_spec(seed))``; shrink it with ``fuzz_models.shrink``
and add the minimal model to tests/test_capture_regressions.py.
"""

import json
import warnings

import pytest
import torch

import dynlora_fx.capture as capture_mod
import dynlora_fx.passes.functionalize as functionalize_mod
from dynlora_fx.testing import fuzz_models as fm

CI_SEEDS = range(240)  # ~0.25 s a model on 2 idle cores (~1 min in all); every block kind and raw op appears


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's advice about the generated models
        yield


@pytest.mark.parametrize("seed", CI_SEEDS, ids=lambda s: f"seed={s}")
def test_fuzz_model(seed):
    spec = fm.draw_spec(seed)
    res = fm.check_spec(spec)
    assert res["outcome"] != "fail", (
        f"fuzz seed {seed} ({', '.join(fm.features(spec))}) failed:\n"
        + "\n".join(f"  [{f['check']}] {f['detail']}" for f in res["failures"])
        + f"\nspec: {json.dumps(spec)}")


def test_ci_set_covers_every_kind():
    specs = [fm.draw_spec(s) for s in CI_SEEDS]
    kinds = {b["kind"] for s in specs for b in s["blocks"]}
    ops = {op for s in specs for b in s["blocks"] for op in b.get("ops", ())}
    assert kinds == set(fm.BLOCKS), f"missing block kinds: {set(fm.BLOCKS) - kinds}"
    assert ops == set(fm.RAW_OPS), f"missing raw ops: {set(fm.RAW_OPS) - ops}"
    feats = {f for s in specs for f in fm.features(s)}
    for needed in ("float64", "output:namedtuple", "output:dict", "output:tuple", "input:img", "input:ids",
                   "method:relora", "method:lora", "form:activation", "form:weight", "conv_transpose",
                   "stem:Conv3d", "stem:ConvTranspose2d", "tied_embedding_head", "grouped_conv"):
        assert needed in feats, needed


def test_specs_and_models_are_reproducible():
    a, b = fm.draw_spec(7), fm.draw_spec(7)
    assert a == b and json.loads(json.dumps(a)) == a  # a spec is plain JSON data
    (ma, xa), (mb, xb) = fm.build(a), fm.build(b)
    assert all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))


def _spec(blocks, **over):
    """A hand-made spec: vector input, tensor output, float32, SwitchLoRA."""
    base = {**fm.draw_spec(0), "input": "vec", "stem": None, "head": True, "pool": False, "output": "tensor",
            "dtype": "float32", "batch": 3, "blocks": blocks}
    base["config"] = {"method": "switchlora", "rank": 2, "form": "auto", "init": None, "tokens_per_step": 16}
    return {**base, **over}


def _drop_hook_guards(monkeypatch):
    monkeypatch.setattr(capture_mod, "_FORWARD_HOOKS", ())
    monkeypatch.setattr(capture_mod, "_verify", lambda *a, **k: "")
    monkeypatch.setattr(functionalize_mod, "_has_forward_hooks", lambda mod: False)


def test_fuzzer_catches_dropped_hooks(monkeypatch):
    """The checker must fail when capture loses module semantics: drop the hook guards and the
    verification, as before issue 13, and the hooked model must be reported."""
    spec = _spec([{"kind": "hook", "hooks": "both", "conv": False}])
    assert fm.check_spec(spec)["outcome"] == "ok"
    _drop_hook_guards(monkeypatch)
    res = fm.check_spec(spec)
    assert res["outcome"] == "fail" and {f["check"] for f in res["failures"]} >= {"equal"}


def test_fuzzer_catches_dropped_no_grad(monkeypatch):
    """Gradients, not only outputs: with the grad-mode guard and the verification gone, a
    ``torch.no_grad`` region traced by fx gives the same outputs and different gradients."""
    spec = _spec([{"kind": "no_grad", "raw": False}])
    assert fm.check_spec(spec)["outcome"] == "ok"
    monkeypatch.setattr(capture_mod._Tracer, "create_node", capture_mod.fx.Tracer.create_node)
    monkeypatch.setattr(capture_mod, "_verify", lambda *a, **k: "")
    res = fm.check_spec(spec)
    checks = {f["check"] for f in res["failures"]}
    assert res["outcome"] == "fail" and "grads" in checks and "equal" not in checks


def test_shrink_reduces_a_failing_spec(monkeypatch):
    _drop_hook_guards(monkeypatch)
    spec = _spec([{"kind": "linear", "bias": True, "act": "relu"},
                  {"kind": "hook", "hooks": "forward", "conv": False},
                  {"kind": "norm", "cls": "LayerNorm"}], output="dict", dtype="float64")
    small = fm.shrink(spec, {"equal"}, budget=12)
    assert [b["kind"] for b in small["blocks"]] == ["hook"]
    assert small["output"] == "tensor" and small["dtype"] == "float32"
