"""Run under `deepspeed --num_gpus 2`: train a tiny DMD2 run, write what each rank saw.

Writes OUT/rank{r}.json (the rollout index k of every micro-batch) and OUT/rank{r}.pt (the
student's weights at the end).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from tiny import tiny_config  # noqa: E402

from distill.training.distributed import shutdown_distributed  # noqa: E402
from distill.training.trainer import Trainer  # noqa: E402

out, stage, *flags = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
cfg = tiny_config(out, training={"max_steps": 6, "batch_size": 1},
                  method_config={"generator_update_interval": 2},
                  deepspeed={"zero_optimization": {"stage": int(stage)}},
                  overrides=["roles.teacher.shard=true"] if "--shard-teacher" in flags else [])
trainer = Trainer(cfg)
ks = []
pick = trainer.method.pick_rollout_index
trainer.method.pick_rollout_index = lambda: ks.append(pick()) or ks[-1]
prompts = []


class Recording:
    """The trainer's loader, noting each batch's prompts."""

    def __init__(self, loader):
        self.loader = loader

    def __next__(self):
        batch = next(self.loader)
        prompts.append(batch["prompt"])
        return batch

    def state_dict(self):
        return self.loader.state_dict()


trainer.batches = Recording(trainer.batches)
trainer.train()

rank = trainer.dist.rank
state = {k: v.detach().cpu().clone() for k, v in trainer.roles["student"].modules["transformer"].state_dict().items()}
torch.save(state, Path(out) / f"rank{rank}.pt")
teacher = trainer.roles["teacher"].modules["transformer"].parameters()
(Path(out) / f"rank{rank}.json").write_text(json.dumps({"k": ks, "prompts": prompts, "world_size": trainer.dist.world_size,
                                                        "teacher_partitioned": all(hasattr(p, "ds_id") for p in teacher)}))
shutdown_distributed()
