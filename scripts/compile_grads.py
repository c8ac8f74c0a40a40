"""Does `model.compile` give the transformer's gradients? One Wan denoiser, eager against distill's compiled set-up.

    PYTHONPATH=. python3 scripts/compile_grads.py                          # wan2.1-1.3b, 480p x 81f, on the GPU
    PYTHONPATH=. python3 scripts/compile_grads.py --set model.checkpoint_every=2

Random weights and inputs (bf16; the tiny preset in fp32 on a CPU), two identical forward + backward calls of each:
prints the loss, the gradient norm of each call and the largest relative gradient difference of any parameter
against eager. A sound compile gives the eager loss, the same norm on both calls and a small difference; on an H200
with torch 2.11 diffusers' checkpointing around compiled blocks gave norms of 1.9 and 2.5 against eager's 1.28
(docs/PERFORMANCE.md). Prints numbers; exits 1 when a gradient is not finite or the two calls differ.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.config import apply_overrides, build_config
from distill.models.wan import WanPlugin


def config(preset: str, frames: int, height: int, width: int, overrides: list[str]):
    raw = {"run": {"name": "compile-grads", "output": "runs/compile-grads"},
           "model": {"family": "wan", "preset": preset, "gradient_checkpointing": True},
           "roles": {"student": {"trainable": True}}, "method": "flow_matching",
           "method_config": {"role": "student"},
           "data": {"prompts": ["unused"], "num_frames": frames, "height": height, "width": width}}
    return build_config(apply_overrides(raw, overrides))


def calls(plugin: WanPlugin, inputs: tuple, dtype: torch.dtype, label: str) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    module = plugin.new_denoiser().to(plugin.device, dtype).train().requires_grad_(True)
    plugin.set_up_denoiser(module, trainable=True)
    x, t, text, target = inputs
    norms = []
    for i in range(2):
        start = time.perf_counter()
        module.zero_grad(set_to_none=True)
        loss = (module(x, t, text, return_dict=False)[0].float() - target.float()).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None}
        finite = all(torch.isfinite(g).all() for g in grads.values())
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item())
        print(f"{label} call {i}: {time.perf_counter() - start:.1f} s, loss {loss.item():.6f}, gradient norm "
              f"{norms[-1]:.4f}, finite {finite}", flush=True)
    return norms, {n: g.clone() for n, g in grads.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model key")
    p.add_argument("--compiled-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the compiled build only (model.compile_backend=aot_eager)")
    p.add_argument("--video", type=int, nargs=3, default=None, metavar=("FRAMES", "HEIGHT", "WIDTH"),
                   help="the video size on the GPU (default 81 480 832; smaller for the math attention backend)")
    p.add_argument("--no-donated-buffers", action="store_true",
                   help="AOT autograd's donated_buffer off (the backward may not reuse saved tensors' memory)")
    args = p.parse_args()
    if args.no_donated_buffers:
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
    gpu = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    shape = ("wan2.1-1.3b", *(args.video or (81, 480, 832))) if gpu else ("tiny", 5, 32, 32)
    eager = WanPlugin(config(*shape, args.set), device=device)
    compiled = WanPlugin(config(*shape, [*args.set, "model.compile=true", *args.compiled_set]), device=device)
    g = torch.Generator(device).manual_seed(0)
    latent = (1, eager.latent_channels, *eager.latent_shape[1:])
    text_dim = eager._preset("transformer")["text_dim"]
    inputs = (torch.randn(latent, generator=g, device=device, dtype=dtype), torch.tensor([700.0], device=device),
              torch.randn(1, 512 if gpu else 8, text_dim, generator=g, device=device, dtype=dtype),
              torch.randn(latent, generator=g, device=device, dtype=dtype))
    _, want = calls(eager, inputs, dtype, "eager")
    norms, got = calls(compiled, inputs, dtype, "compiled")
    relative = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item() for n in want}
    worst = max(relative.values())
    print(f"largest relative gradient difference, compiled against eager: {worst:.4f}")
    for n in sorted(relative, key=relative.get, reverse=True)[:5]:  # which parameters: where the fault is
        print(f"  {n}: {relative[n]:.4g} (eager's largest |gradient| {want[n].abs().max().item():.3g})")
    ok = all(torch.isfinite(v).all() for v in got.values()) and abs(norms[0] - norms[1]) <= 1e-3 * norms[0]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
