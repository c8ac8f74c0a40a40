"""Run under `deepspeed --num_gpus 2`: rank 1's critic loss turns NaN at iteration 2; write how each rank ended.

Writes OUT/rank{r}.txt: the error each rank stopped with (or "finished").
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from tiny import tiny_config  # noqa: E402

from distill.training.distributed import shutdown_distributed  # noqa: E402
from distill.training.trainer import Trainer  # noqa: E402

out = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
cfg = tiny_config(out, training={"max_steps": 4, "batch_size": 1}, deepspeed={"zero_optimization": {"stage": 2}})
trainer = Trainer(cfg)
critic_loss = trainer.method.critic_loss


def poisoned(x0, batch):
    loss = critic_loss(x0, batch)
    return loss * float("nan") if trainer.dist.rank == 1 and trainer.iteration == 2 else loss


trainer.method.critic_loss = poisoned
try:
    trainer.train()
    outcome = "finished"
except FloatingPointError as err:
    outcome = str(err)
(Path(out) / f"rank{trainer.dist.rank}.txt").write_text(outcome)
shutdown_distributed()
