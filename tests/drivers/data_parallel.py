"""Run under `deepspeed --num_gpus N`, or alone for the reference: a tiny DMD2 run (GAN head, EMA, ZeRO-1, the
demo's layout) whose global batch of 4 is split over the N ranks, each rank taking every N-th sample.

Every random draw of the method (noise, timesteps) is taken from one stream that all ranks share, for the global
batch, and each rank keeps its own samples of it (the loader's interleaved slice), so that N ranks see exactly the
numbers one rank sees: then data parallelism must give one rank's weights, up to the order of float sums.

argv: OUT RANKS. Writes OUT/rank{r}.json: the student's first weights, and the student's, critic's and EMA's last,
as sums of squares by parameter.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from tiny import LatentDataset, tiny_config  # noqa: E402

from distill.training.distributed import shutdown_distributed  # noqa: E402
from distill.training.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 4


def config(out: str, ranks: int):
    return tiny_config(
        out, model={"preset": "tiny"},
        method_config={"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                       "generator_update_interval": 2, "real_score_guidance_scale": 2.0, "ema_decay": 0.9,
                       "ema_start_step": 1, "gan_critic_weight": 0.5, "gan_generator_weight": 0.5},
        training={"max_steps": 4, "batch_size": GLOBAL_BATCH // ranks, "learning_rate": 1e-3,
                  "fake_score_learning_rate": 1e-3, "log_every": 1, "progress_bar": False},
        validation={"every": 0},
        data={"shards": "unused: the driver gives the data set", "num_frames": 1, "height": 16, "width": 16},
        deepspeed={"zero_optimization": {"stage": 1}})


def share_the_draws(method, rank: int, ranks: int) -> None:
    """The method's noise and timesteps from streams common to all ranks, drawn for the global batch; this rank
    keeps samples rank, rank + ranks, ... (the positions of its samples in one rank's batch)."""
    noise = torch.Generator().manual_seed(1234)
    method.local_rng = torch.Generator().manual_seed(5678)  # the timesteps' stream, now the same on every rank

    def randn_like(x):
        return torch.randn((x.shape[0] * ranks, *x.shape[1:]), generator=noise)[rank::ranks].to(x)

    def per_rank(draw):
        return lambda batch_size, *args, **kwargs: draw(batch_size * ranks, *args, **kwargs)[rank::ranks]

    method.randn_like = randn_like
    method.sample_timesteps = per_rank(method.sample_timesteps)
    method.gan_timesteps = per_rank(method.gan_timesteps)


def sums_of_squares(modules: dict) -> dict[str, float]:
    return {f"{key}.{n}": float(p.detach().double().pow(2).sum())
            for key, module in modules.items() for n, p in module.named_parameters()}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, ranks = args[0], int(args[1])
    trainer = Trainer(config(out, ranks), dataset=LatentDataset("pixels", (3, 1, 16, 16), n=8))
    assert trainer.dist.world_size == ranks
    share_the_draws(trainer.method, trainer.dist.rank, ranks)
    initial = sums_of_squares(trainer.roles["student"].modules)
    trainer.train()
    weights = {"student": sums_of_squares(trainer.roles["student"].modules),
               "critic": sums_of_squares(trainer.roles["critic"].modules),  # the GAN head with it
               "ema": sums_of_squares(trainer.method.ema.modules)}
    (Path(out) / f"rank{trainer.dist.rank}.json").write_text(json.dumps({"initial": initial, "weights": weights}))
    shutdown_distributed()
