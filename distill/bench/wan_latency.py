"""Benchmark: a few-step student against the N-step CFG teacher, end to end, at a real Wan size.

    python -m distill.bench.wan_latency --preset wan2.1-1.3b --frames 81 --height 480 --width 832

Random weights (latency does not depend on them): one transformer serves both samplers, and
text embeddings are random, so UMT5-XXL is never built. Everything else is the product's own
path: the Wan validator, WanPipeline, the bf16 VAE decode. Prints the median of one
transformer forward, of a VAE decode, and of each sampler end to end and denoising alone,
then the speed-ups and the student's denoising against k forwards. `--set KEY=VALUE` overrides any
key of the config it builds (`--set model.attention_backend=_native_cudnn`), as `distill train
--set` does; the overrides and the resolved model section are in the output. With `--against-stock`,
the student's video of seed 1 is also sampled with the runtime keys among the overrides left out
(`model_config.RUNTIME_KEYS`: compile, attention backend, batched CFG, the VAE's, ...), and the largest
difference of their 8-bit frames is reported: what a fast path changes in what a user sees. Asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from distill.arguments import Parser, add_overrides
from distill.bench.inference import card, versions
from distill.config import apply_overrides, build_config, to_dict
from distill.errors import InputError
from distill.model_config import RUNTIME_KEYS
from distill.validation import SamplingSpec, ValidationRequest


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = Parser(prog="python -m distill.bench.wan_latency", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 750, 500, 250], help="the student's DMD steps")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--against-stock", action="store_true",
                   help="also sample the student without the speed settings and report the largest frame difference")
    add_overrides(p)
    args = p.parse_args(argv)

    from distill import registry

    size = {"num_frames": args.frames, "height": args.height, "width": args.width}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def build(overrides: list[str]):
        cfg = build_config(apply_overrides({
            "model": {"family": "wan", "preset": args.preset, "flow_shift": 3.0},
            "roles": {"teacher": {"trainable": False}, "student": {"init_from": "teacher", "trainable": True},
                      "critic": {"init_from": "teacher", "trainable": True}},
            "method": "dmd2", "method_config": {"dmd_denoising_steps": args.steps, "warp_denoising_step": True},
            "data": {"prompts": ["a red panda eating bamboo"], **size},
        }, overrides))
        return cfg, registry.get_model("wan")(cfg, device=device, frozen_dtype=dtype)

    try:
        cfg, plugin = build(args.overrides)
    except InputError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    model = plugin.build_roles(["teacher"])["teacher"]
    text_dim = model.modules["transformer"].config.text_dim
    for prompt in ("a red panda eating bamboo", ""):  # random embeddings in place of UMT5-XXL
        plugin._embeds[prompt] = torch.randn(cfg.model.max_text_length, text_dim, device=device) * 0.1
    # The DMD2 student's own steps (warped through this scheduler), as its method declares them.
    student = registry.get_method("dmd2").cls(cfg, None, plugin).sampling()
    k = student.num_steps

    shape = plugin.video_latent_shape(**size)
    x = torch.randn(1, *shape, device=device, dtype=dtype)
    embeds = plugin._embeds["a red panda eating bamboo"][None].to(dtype)
    transformer = model.modules["transformer"]
    with torch.no_grad():
        def call():
            return transformer(hidden_states=x, timestep=torch.tensor([500.0], device=device),
                               encoder_hidden_states=embeds, return_dict=False)

        first_forward = timed(call, repeats=1, warmup=0)  # with model.compile, the blocks compile in this call
        forward = timed(call, args.repeats)
        def decode_call():
            return plugin.vae.decode(x.to(plugin.vae.dtype), return_dict=False)

        first_decode = timed(decode_call, repeats=1, warmup=0)  # with model.vae_compile, the decoder compiles here
        decode = timed(decode_call, args.repeats)

    def sample(how: SamplingSpec, seeds: list[int], plugin=plugin, model=model):
        request = ValidationRequest(sample_handle=model, prompts=["a red panda eating bamboo"], seeds=seeds,
                                    output_dir=None, sampling=how, **size)
        return plugin.validator().run(request)

    rows = {}
    for name, how in (("student", student),
                      ("teacher", SamplingSpec(sampler_kind="ode", num_inference_steps=args.teacher_steps,
                                               guidance_scale=args.guidance))):
        sample(how, [0])  # warm-up
        result = sample(how, list(range(1, 1 + args.repeats)))
        rows[name] = {"seconds": statistics.median(result.seconds_per_video),
                      "denoising_seconds": statistics.median(result.denoising_seconds_per_video),
                      "nfe": result.function_evaluations_per_video, "timesteps": result.timesteps}
    s, t = rows["student"], rows["teacher"]
    stock_difference = None
    if args.against_stock:
        fast_frames = sample(student, [1]).frames[0]
        _, stock_plugin = build([o for o in args.overrides if o.split("=", 1)[0].strip() not in RUNTIME_KEYS])
        stock_plugin._embeds.update(plugin._embeds)  # the same random prompt embeddings; the same seeded weights
        stock_frames = sample(student, [1], plugin=stock_plugin,
                              model=stock_plugin.build_roles(["teacher"])["teacher"]).frames[0]
        diff = (torch.as_tensor(fast_frames).int() - torch.as_tensor(stock_frames).int()).abs()
        stock_difference = {"max_grey_levels": int(diff.max()), "mean_grey_levels": float(diff.float().mean())}
    result = {
        "card": card(device), "versions": versions(), "preset": args.preset, "size": size,
        "tokens": shape[1] * shape[2] * shape[3] // 4,
        "overrides": args.overrides, "model": to_dict(cfg)["model"], "first_forward_seconds": first_forward,
        "forward_seconds": forward, "first_vae_decode_seconds": first_decode, "vae_decode_seconds": decode,
        "student": s, "teacher": t,
        "speedup_end_to_end": t["seconds"] / s["seconds"],
        "speedup_denoising": t["denoising_seconds"] / s["denoising_seconds"],
        "student_denoising_over_k_forwards": s["denoising_seconds"] / (k * forward),
        "ceiling_end_to_end": (t["denoising_seconds"] + decode) / (k * forward + decode),
        "student_video_against_stock": stock_difference,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
