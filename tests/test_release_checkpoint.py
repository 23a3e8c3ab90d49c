"""Checkpoints saved by an earlier release resume on this code and continue exactly as they did there.

``fixtures/release_0_1_0.pt`` holds, for SwitchLoRA (seeded and stored candidates) and ReLoRA
on a tiny LLaMA, the module's and optimizer's ``state_dict()`` after 7 steps of a 40-step run,
as dynlora-fx 0.1.0 saved them, and what that release did over the next 7 steps: the losses,
the switcher's state (step, counters, generator states), every adapter's buffers and the
merged model's output. A change to state-dict keys, buffer layout, optimizer state or switching
decisions shows up here; one that must break it has to convert old checkpoints instead.
"""

import os

import pytest
import torch

import dynlora_fx as dl

from fixtures.make_release_checkpoint import build, train  # tests/ is on sys.path: pytest puts a test file's folder there (no __init__.py)

FIXTURE = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "release_0_1_0.pt"), weights_only=True)


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if exact or not want.is_floating_point():
        return torch.equal(got, want)
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(FIXTURE["cases"]))
def test_release_checkpoint_resumes_exactly(case):
    saved = FIXTURE["cases"][case]
    exact = torch.__version__ == FIXTURE["torch"]  # same kernels: bit for bit; another torch: to rounding
    gm, opt, _, example = build(dl.config_from_json(saved["config"]))
    gm.load_state_dict(saved["checkpoint"]["model"])
    opt.load_state_dict(saved["checkpoint"]["optimizer"])

    losses = train(gm, opt, saved["batches"])
    if exact:
        assert losses == saved["losses"]
    else:
        assert losses == pytest.approx(saved["losses"], rel=1e-5)
    for key, want in saved["switch_state"].items():  # step, counters, generators: exact everywhere
        assert torch.equal(gm.switch_state.state_dict()[key], want), key
    adapters = gm.adapters.state_dict()
    assert adapters.keys() == saved["adapter_state"].keys()
    for key, want in saved["adapter_state"].items():  # in-use candidates, freezes, pointers, A, B
        assert _same(adapters[key], want, exact), key
    merged = dl.merge_and_unload(gm).eval()
    with torch.no_grad():
        assert _same(merged(example), saved["merged_output"], exact)
