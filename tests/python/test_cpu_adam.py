"""AdamW with cpu_kernel (optim::cpu_adamw_step for every CPU fp32 tensor) against
torch.optim.AdamW on the same parameters and gradients (tests/optim/adamw_tool), with clipping to
max norm 1.0 on steps whose norm is above it or not at all:
- fused=True, the clip factor c handed to torch's kernel as ftune hands it to its own (grad_scale
  1 / c, the hook torch's GradScaler uses): bit for bit, norms included;
- foreach=False (the op-by-op reference) with clip_grad_norm_: to fp32 rounding, bound 1e-6
  relative (the fused arithmetic rounds differently)."""
import pytest
import torch

from ftune_testing import rel_err
from optim_testing import LRS, SHAPES, adamw_tool_run, compared, set_step, torch_adamw

# A tensor big enough to be split between 2 threads, and odd sizes for the vector tails.
BIG_SHAPES = {**SHAPES, "big": (257, 263)}
# Gradient scale per step: norms (about 260 x the scale here) above 1.0 on half the steps or none.
MULT = {True: [10.0, 1e-3, 3.0, 2e-3, 5.0, 1e-3], False: [1e-3, 1e-4, 5e-4, 2e-4, 1e-3, 1e-4]}


def _ftune(tmp_path, clips):
    return adamw_tool_run(tmp_path, MULT[clips], BIG_SHAPES, fused=1, cpu_kernel=1,
                          max_grad_norm="1.0")


@pytest.mark.parametrize("clips", [False, True])
def test_bit_identical_to_fused_torch(tmp_path, clips):
    params, grads, got = _ftune(tmp_path, clips)
    ps, opt = torch_adamw(params, fused=True)
    norms = []
    for lr, gr in zip(LRS, grads):
        set_step(opt, ps, lr, gr)
        norm = torch.nn.utils.get_total_norm([p.grad for p in ps.values()])
        coef = torch.clamp((norm + 1e-6).reciprocal() * 1.0, None, 1.0)  # as AdamW computes it
        opt.grad_scale = coef.reciprocal() if coef.item() < 1.0 else None
        opt.step()
        norms.append(norm.item())
    assert (sum(n > 1.0 for n in norms) >= 3) == clips, norms
    assert got["norms"].tolist() == norms
    for k, mine, theirs in compared(got, ps, opt):
        assert torch.equal(mine, theirs), (k, (mine != theirs).sum(), (mine - theirs).abs().max())


@pytest.mark.parametrize("clips", [False, True])
def test_close_to_single_tensor_torch(tmp_path, clips):
    params, grads, got = _ftune(tmp_path, clips)
    ps, opt = torch_adamw(params, foreach=False)
    for lr, gr in zip(LRS, grads):
        set_step(opt, ps, lr, gr)
        torch.nn.utils.clip_grad_norm_(list(ps.values()), 1.0)
        opt.step()
    worst = max(rel_err(mine, theirs) for _, mine, theirs in compared(got, ps, opt))
    print(f"worst relative difference: {worst:.2e}")
    assert worst < 1e-6
