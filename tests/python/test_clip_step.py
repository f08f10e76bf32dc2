"""AdamW::clip_and_step against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW(fused=True),
on the same parameters and gradients (tests/optim/adamw_tool). ftune folds the clip factor c into
the fused kernel's grad_scale (g / (1 / c) instead of g * c) and skips scaling when the norm is
within max_grad_norm, so: the norms equal torch's exactly, and so do parameters and state while no
step clipped; once steps clip they agree to rounding (measured max relative 1.0e-7; bound 1e-6).
The unfused AdamW clips with clip_grads_with_norm as torch does: bit for bit."""
import pytest
import torch

from ftune_testing import rel_err
from optim_testing import LRS, adamw_tool_run, compared, set_step, torch_adamw


def _run(tmp_path, fused, grad_mult, max_norm=1.0):
    params, grads, got = adamw_tool_run(tmp_path, grad_mult, fused=int(fused),
                                        max_grad_norm=repr(max_norm))
    ps, opt = torch_adamw(params, **({"fused": True} if fused else {"foreach": False}))
    norms = []
    for lr, gr in zip(LRS, grads):
        set_step(opt, ps, lr, gr)
        norms.append(torch.nn.utils.clip_grad_norm_(list(ps.values()), max_norm).item())
        opt.step()
    return got, ps, opt, norms


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clips", [False, True])
def test_clip_and_step_matches_torch(tmp_path, fused, clips):
    mult = [10.0, 0.01, 3.0, 0.02, 5.0, 0.01] if clips else [0.1, 0.01, 0.05, 0.02, 0.1, 0.01]
    got, ps, opt, norms = _run(tmp_path, fused, mult)
    assert (sum(n > 1.0 for n in norms) >= 3) == clips, norms
    assert got["norms"].tolist() == norms  # same ops in the same order
    worst = 0.0
    for k, mine, theirs in compared(got, ps, opt):
        if clips and fused:
            worst = max(worst, rel_err(mine, theirs))
        else:
            assert torch.equal(mine, theirs), (k, (mine - theirs).abs().max())
    print(f"worst relative difference: {worst:.2e}")
    assert worst < 1e-6
