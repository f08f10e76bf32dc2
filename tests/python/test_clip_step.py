"""AdamW::clip_and_step against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW(fused=True),
on the same parameters and gradients (tests/optim/adamw_tool). ftune folds the clip factor c into
the fused kernel's grad_scale (g / (1 / c) instead of g * c) and skips scaling when the norm is
within max_grad_norm, so: the norms equal torch's exactly, and so do parameters and state while no
step clipped; once steps clip they agree to rounding (measured max relative 1.0e-7; bound 1e-6).
The unfused AdamW clips with clip_grads_with_norm as torch does: bit for bit."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from ftune_testing import rel_err, run, tool


def _run(tmp_path, fused, grad_mult, max_norm=1.0):
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (7, 5), "b": (5,), "emb": (11, 3)}
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    lrs = [1e-2, 3e-3, 5e-2, 1e-3, 2e-2, 1e-2]
    grads = [{k: torch.randn(s, generator=g) * grad_mult[i] for k, s in shapes.items()}
             for i in range(len(lrs))]
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    tensors = {f"param.{k}": v for k, v in params.items()}
    for i, gr in enumerate(grads):
        tensors.update({f"grad.{i}.{k}": v for k, v in gr.items()})
    meta = {k: repr(v) for k, v in hp.items()}
    meta.update(lrs=",".join(repr(x) for x in lrs), fused="1" if fused else "0",
                max_grad_norm=repr(max_norm))
    save_file(tensors, tmp_path / "in.safetensors", metadata=meta)
    run([tool("adamw_tool"), tmp_path / "in.safetensors", tmp_path / "out.safetensors"])
    got = load_file(tmp_path / "out.safetensors")

    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [p for p in ps.values() if p.dim() >= 2],
                              "weight_decay": hp["weight_decay"]},
                             {"params": [p for p in ps.values() if p.dim() < 2],
                              "weight_decay": 0.0}],
                            lr=lrs[0], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            **({"fused": True} if fused else {"foreach": False}))
    norms = []
    for lr, gr in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in ps.items():
            p.grad = gr[k].clone()
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
    for k, p in ps.items():
        st = opt.state[p]
        for mine, theirs in ((got[f"param.{k}"], p.detach()), (got[f"{k}.exp_avg"], st["exp_avg"]),
                             (got[f"{k}.exp_avg_sq"], st["exp_avg_sq"])):
            if clips and fused:
                worst = max(worst, rel_err(mine, theirs))
            else:
                assert torch.equal(mine, theirs), (k, (mine - theirs).abs().max())
    print(f"worst relative difference: {worst:.2e}")
    assert worst < 1e-6
