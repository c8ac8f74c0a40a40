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

from distill.training.trainer import Trainer  # noqa: E402

out, stage = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
cfg = tiny_config(out, training={"max_steps": 6, "batch_size": 1},
                  method_config={"generator_update_interval": 2},
                  deepspeed={"zero_optimization": {"stage": int(stage)}})
trainer = Trainer(cfg)
ks = []
pick = trainer.method.pick_rollout_index
trainer.method.pick_rollout_index = lambda: ks.append(pick()) or ks[-1]
prompts = []
stream = trainer.batches
trainer.batches = (prompts.append(b["prompt"]) or b for b in stream)
trainer.train()

rank = trainer.dist.rank
state = {k: v.detach().cpu().clone() for k, v in trainer.roles["student"].modules["transformer"].state_dict().items()}
torch.save(state, Path(out) / f"rank{rank}.pt")
(Path(out) / f"rank{rank}.json").write_text(json.dumps({"k": ks, "prompts": prompts, "world_size": trainer.dist.world_size}))
