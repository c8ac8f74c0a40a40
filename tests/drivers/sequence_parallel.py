"""Run under `deepspeed --num_gpus N`, or alone for the reference: a tiny DMD2 run whose ranks split each video's
tokens (parallel.sequence_parallel_size = argv[2]; 1 = the single-rank reference).

argv: OUT SIZE PRESET [--gan]. Writes OUT/rank{r}.json: the logged losses, and the student's final weights' sum of squares by parameter.
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


def config(out: str, sequence_parallel_size: int, preset: str, gan: bool = False):
    gan_terms = {"gan_critic_weight": 0.5, "gan_generator_weight": 0.5} if gan else {}  # strong: it must show
    return tiny_config(
        out, model={"preset": preset}, parallel={"sequence_parallel_size": sequence_parallel_size},
        method_config={"rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                       "generator_update_interval": 2, "real_score_guidance_scale": 3.5, "ema_decay": 0.9,
                       **gan_terms},
        training={"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "fake_score_learning_rate": 1e-3,
                  "log_every": 1, "progress_bar": False},
        validation={"every": 4, "prompts": ["a red circle moving left"], "seeds": [0], "video_format": "gif"},
        data={"shards": "unused: the driver gives the data set", "num_frames": 1, "height": 16, "width": 16},
        deepspeed={"zero_optimization": {"stage": 2}})


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, size, preset, gan = args[0], int(args[1]), args[2], "--gan" in args
    # real videos for the GAN head's real side (and, without it, the same prompts as the inline ones)
    trainer = Trainer(config(out, size, preset, gan), dataset=LatentDataset("pixels", (3, 1, 16, 16)))
    history = trainer.train()
    student = trainer.roles["student"].modules["transformer"]
    weights = {n: float(p.detach().double().pow(2).sum()) for n, p in student.named_parameters()}
    (Path(out) / f"rank{trainer.dist.rank}.json").write_text(json.dumps({"history": history, "weights": weights}))
    shutdown_distributed()
