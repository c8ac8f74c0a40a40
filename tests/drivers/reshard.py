"""A tiny DMD2 run (EMA and GAN head unless ZeRO-3) that saves a checkpoint, or resumes from its latest one, on as
many ranks as it is started with (`deepspeed --num_gpus N`, or alone for one).

argv: OUT STAGE STEPS [--resume] [--endpoint URL] [--lora]. The run's output is OUT/run, or with an S3 endpoint
s3://distill-test/<OUT's name>; --lora: student and critic train LoRA adapters. Trains to STEPS (a checkpoint at
the end). Writes OUT/saved.pt (a save) or OUT/resumed.pt (a resume, before its first iteration): each trainable
parameter's whole fp32 weights and Adam moments, the module's own weights, the EMA, the Adam step counts, the
schedules' steps, the loop's iteration and the data position; and, after training, OUT/{saved,resumed}.json: the
logged rows and the ranks. A checkpoint refused: its message on stderr, exit status 3.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from tiny import LatentDataset, tiny_config  # noqa: E402

from distill.run_layout import CheckpointError  # noqa: E402
from distill.training.distributed import shutdown_distributed  # noqa: E402
from distill.training.trainer import Trainer  # noqa: E402


def config(out: Path, stage: int, steps: int, endpoint: str | None = None, lora: bool = False):
    extras = {} if stage == 3 else {"ema_decay": 0.9, "gan_critic_weight": 0.5, "gan_generator_weight": 0.5}
    run = f"s3://distill-test/{out.name}" if endpoint else str(out / "run")
    storage = {"storage": {"endpoint_url": endpoint, "local_dir": str(out / "work")}} if endpoint else {}
    adapters = ["roles.student.lora={rank: 4, alpha: 8}", "roles.critic.lora={rank: 4}"] if lora else []
    return tiny_config(run, **storage, overrides=adapters, method_config={"generator_update_interval": 2, **extras},
                       training={"max_steps": steps, "batch_size": 1, "log_every": 1, "keep_checkpoints": 5},
                       data={"shards": "unused: the driver gives the data set", "num_frames": 1, "height": 16,
                             "width": 16},
                       deepspeed={"zero_optimization": {"stage": stage}})


def full(engine, param, key: str | None) -> torch.Tensor:
    """A parameter's whole fp32 weights (key None) or optimizer state, however the engine partitions it (a
    collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # stage 0: the plain torch optimizer holds it
        value = param if key is None else engine.optimizer.state[param][key]
    return value.detach().float().cpu().clone()


def snapshot(trainer: Trainer) -> dict:
    state = {"iteration": trainer.iteration, "loader": trainer.batches.state_dict(), "weights": {}, "module": {},
             "adam_steps": {}, "schedules": {}}
    for handle in trainer.roles.trainable():
        engine = handle.engine
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:  # a LoRA role's base: not the engine's state
                continue
            key = f"{handle.name}.{name}"
            state["weights"][key] = {k: full(engine, p, None if k == "fp32" else k)
                                     for k in ("fp32", "exp_avg", "exp_avg_sq")}
            if not hasattr(p, "ds_id"):  # what the forward reads (ZeRO-3 holds a partition)
                state["module"][key] = p.detach().float().cpu().clone()
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        state["adam_steps"][handle.name] = sorted({float(s["step"]) for s in optimizer.state.values()})
        state["schedules"][handle.name] = engine.lr_scheduler.state_dict()["last_epoch"]
    if trainer.method.ema is not None:
        ema = trainer.method.ema.modules["transformer"]
        state["ema"] = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    return state


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, stage, steps = Path(args[0]), int(args[1]), int(args[2])
    endpoint = args[args.index("--endpoint") + 1] if "--endpoint" in args else None
    kind = "resumed" if "--resume" in args else "saved"
    try:
        trainer = Trainer(config(out, stage, steps, endpoint, "--lora" in args),
                          dataset=LatentDataset("pixels", (3, 1, 16, 16)),
                          resume="latest" if kind == "resumed" else None)
    except CheckpointError as err:  # what `distill train` would say
        print(f"refused: {err}", file=sys.stderr)
        sys.exit(3)
    before = snapshot(trainer) if kind == "resumed" else None
    history = trainer.train()
    after = snapshot(trainer)  # every rank: a collective under ZeRO-3
    if trainer.dist.is_main:
        torch.save(before or after, out / f"{kind}.pt")
        (out / f"{kind}.json").write_text(json.dumps({"history": history, "ranks": trainer.dist.world_size}))
    shutdown_distributed()
