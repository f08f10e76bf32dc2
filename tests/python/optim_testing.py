"""Helpers shared by the AdamW-vs-torch tests (test_clip_step.py, test_cpu_adam.py): random
parameters and per-step gradients run through tests/optim/adamw_tool, and the torch.optim.AdamW
they are compared with (weight decay on the 2-D parameters only, as ftune groups them)."""
import torch
from safetensors.torch import load_file, save_file

from ftune_testing import run, tool

SHAPES = {"w": (7, 5), "b": (5,), "emb": (11, 3)}
LRS = [1e-2, 3e-3, 5e-2, 1e-3, 2e-2, 1e-2]
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def adamw_tool_run(tmp_path, grad_mult, shapes=SHAPES, **meta):
    """Runs adamw_tool over len(LRS) steps, step i's gradients scaled by grad_mult[i]; `meta`
    (fused, cpu_kernel, max_grad_norm) goes to the tool as strings. Returns (initial params,
    per-step gradients, the tool's output tensors)."""
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=g) * grad_mult[i] for k, s in shapes.items()}
             for i in range(len(LRS))]
    tensors = {f"param.{k}": v for k, v in params.items()}
    for i, gr in enumerate(grads):
        tensors.update({f"grad.{i}.{k}": v for k, v in gr.items()})
    md = {k: repr(v) for k, v in HP.items()}
    md.update(lrs=",".join(repr(x) for x in LRS), **{k: str(v) for k, v in meta.items()})
    save_file(tensors, tmp_path / "in.safetensors", metadata=md)
    run([tool("adamw_tool"), tmp_path / "in.safetensors", tmp_path / "out.safetensors"])
    return params, grads, load_file(tmp_path / "out.safetensors")


def torch_adamw(params, **kw):
    """Leaf copies of `params` and a torch.optim.AdamW over them (kw: fused=True, foreach=False).
    The copies are in adamw_tool's order (by name, as safetensors stores them), so a total norm
    sums the per-tensor norms in the same order."""
    ps = {k: params[k].clone().requires_grad_(True) for k in sorted(params)}
    opt = torch.optim.AdamW([{"params": [p for p in ps.values() if p.dim() >= 2],
                              "weight_decay": HP["weight_decay"]},
                             {"params": [p for p in ps.values() if p.dim() < 2],
                              "weight_decay": 0.0}],
                            lr=LRS[0], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], **kw)
    return ps, opt


def set_step(opt, ps, lr, grads):
    """Sets every group's lr and each parameter's gradient for the next step."""
    for group in opt.param_groups:
        group["lr"] = lr
    for k, p in ps.items():
        p.grad = grads[k].clone()


def compared(got, ps, opt):
    """(name, ftune's tensor, torch's) for every parameter and its exp_avg and exp_avg_sq."""
    for k, p in ps.items():
        st = opt.state[p]
        yield from ((f"param.{k}", got[f"param.{k}"], p.detach()),
                    (f"{k}.exp_avg", got[f"{k}.exp_avg"], st["exp_avg"]),
                    (f"{k}.exp_avg_sq", got[f"{k}.exp_avg_sq"], st["exp_avg_sq"]))
