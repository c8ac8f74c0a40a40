"""Benchmark: one DMD2 iteration with three Wan roles, timed by kind (student-update vs critic-only).

    python -m distill.bench.dmd2_step --preset wan2.1-1.3b --frames 81 --height 480 --width 832
    python -m distill.bench.dmd2_step --set model.compile=true --warmup 4   # one lever of issue 14
    python -m distill.bench.dmd2_step --preset wan2.1-14b --lora 64          # LoRA student and critic, shared base

Builds teacher (frozen, bf16), student and critic (ZeRO-2 bf16 DeepSpeed engines, activation
checkpointing; with --lora, LoRA adapters of that rank over the teacher's base, held once) from an
in-code preset with random weights, feeds random text embeddings
(no text encoder needed), runs the real Trainer iterations, and prints seconds per
iteration of each kind (median after warm-up), model FLOPs utilisation against a bf16 matmul
peak measured in the same run, and the peak GPU memory. `--set KEY=VALUE` overrides any key of
the config it builds, as `distill train --set` does; the overrides and the resolved model section
are in the output. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import Dataset

from distill.arguments import Parser, add_overrides, at_least
from distill.bench.inference import card, versions
from distill.config import apply_overrides, build_config, to_dict
from distill.errors import InputError


class RandomEmbeddings(Dataset):
    """Precomputed-looking text embeddings (and, for the GAN's real samples, latents): what shards give
    the trainer at scale."""

    def __init__(self, n: int, length: int, dim: int, seed: int = 0, latent_shape: tuple | None = None):
        g = torch.Generator().manual_seed(seed)
        self.embeds = torch.randn(n, length, dim, generator=g) * 0.1
        self.negative = torch.randn(length, dim, generator=g) * 0.1
        self.latents = None if latent_shape is None else torch.randn(n, *latent_shape, generator=g)
        self.fields = ("prompt_embeds", "negative_prompt_embeds") + (("vae_latent",) if latent_shape else ())

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, i: int) -> dict:
        item = {"prompt_embeds": self.embeds[i], "negative_prompt_embeds": self.negative}
        if self.latents is not None:
            item["vae_latent"] = self.latents[i]
        return item


def bench_config(args) -> dict:
    lora = {"lora": {"rank": args.lora}, "share_base": True} if args.lora else {}
    return {
        "run": {"name": "bench-dmd2-step", "output": args.output, "seed": 0},
        "model": {"family": "wan", "preset": args.preset, "pixel_space": False, "flow_shift": 3.0,
                  "max_text_length": args.text_length, "gradient_checkpointing": not args.no_checkpointing},
        "roles": {"teacher": {"trainable": False},
                  "student": {"init_from": "teacher", "trainable": True, **lora},
                  "critic": {"init_from": "teacher", "trainable": True, **lora}},
        "method": "dmd2",
        "method_config": {"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                          "warp_denoising_step": True, "generator_update_interval": args.interval,
                          "real_score_guidance_scale": 3.5,
                          **({"gan_critic_weight": 1e-2, "gan_generator_weight": 5e-3} if args.gan else {}),
                          **({"ema_decay": 0.99} if args.ema else {})},
        # a profile runs past the timed iterations up to the next one of each kind: at most two intervals
        "training": {"max_steps": args.iterations + (2 * args.interval if args.profile else 0), "batch_size": 1,
                     "learning_rate": 2e-6, "betas": [0.0, 0.999],
                     "fake_score_learning_rate": 8e-6, "progress_bar": False, "log_every": 1},
        "data": {"prompts": ["unused: embeddings are given"], "num_frames": args.frames,
                 "height": args.height, "width": args.width,
                 **({"shards": "unused: embeddings and latents are given"} if args.gan else {})},
        "deepspeed": {"zero_optimization": {"stage": args.zero_stage}},
    }


def main(argv=None) -> dict:
    p = Parser(prog="python -m distill.bench.dmd2_step", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-length", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--iterations", type=int, default=12, help="iterations in all, warm-up included")
    p.add_argument("--warmup", type=at_least(1), default=2,
                   help="untimed iterations first (with model.compile, enough to compile every role and mode)")
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--gan", action="store_true", help="with DMD2's GAN term (SDXL recipe weights)")
    p.add_argument("--ema", action="store_true", help="with an EMA of the student")
    p.add_argument("--lora", type=at_least(1), default=None, metavar="RANK",
                   help="student and critic as LoRA adapters of this rank over the teacher's base (share_base)")
    p.add_argument("--output", default="runs/bench-dmd2-step")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile one student-update and one critic-only iteration: Chrome traces "
                        "into DIR, their top operators into the result")
    add_overrides(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = p.parse_args(argv)
    if args.iterations <= args.warmup:
        p.error(f"--iterations ({args.iterations}) must exceed --warmup ({args.warmup})")

    from distill.bench.training import measure
    from distill.training.trainer import Trainer

    t0 = time.perf_counter()
    latent_shape = None
    if args.gan:  # the preset VAE's latent grid of this video size (Wan 2.1: 16 channels, time stride 4, space 8)
        from distill.models.wan import PRESETS

        vae = PRESETS[args.preset]["vae"]
        space, time_ = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        latent_shape = (vae.get("z_dim", 16), (args.frames - 1) // time_ + 1, args.height // space, args.width // space)
    try:
        cfg = build_config(apply_overrides(bench_config(args), args.overrides))
        # overwrite: the bench's folder holds nothing worth keeping, and the next lever measured goes there too
        trainer = Trainer(cfg, dataset=RandomEmbeddings(4, args.text_length, args.text_dim, latent_shape=latent_shape),
                          overwrite=True)
    except InputError as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    build_seconds = time.perf_counter() - t0
    figures = measure(trainer, iterations=args.iterations - args.warmup, warmup=args.warmup)
    if args.profile:
        from distill.bench.training import profile_kinds

        figures["profile"] = profile_kinds(trainer, args.profile)
    if not trainer.dist.is_main:  # under the launcher every rank times its share; the first one reports
        return figures
    for row in figures["rows"]:
        print(json.dumps(row), flush=True)
    result = {
        "card": card(trainer.device),
        "versions": versions(),
        "shape": {"frames": args.frames, "height": args.height, "width": args.width, "batch": 1},
        "preset": args.preset,
        "zero_stage": args.zero_stage,
        "ranks": trainer.dist.world_size,
        "sequence_parallel_size": trainer.dist.sequence_parallel_size,
        "activation_checkpointing": cfg.model.gradient_checkpointing,
        "overrides": args.overrides,
        "model": to_dict(cfg)["model"],
        "gan": args.gan,
        "ema": args.ema,
        "lora_rank": args.lora,
        "build_seconds": round(build_seconds, 2),
        **figures,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
