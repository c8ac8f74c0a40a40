"""`distill` command line: `distill train CONFIG [--set key.path=value ...]`.

Under the deepspeed launcher: `deepspeed --num_gpus 2 -m distill.cli train CONFIG`
(on CPU: `deepspeed --num_gpus 2 --bind_cores_to_rank ...` is not needed; ranks use gloo).
"""

from __future__ import annotations

import argparse
import sys

from distill.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distil video diffusion models into few-step students.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a run from a YAML config")
    train.add_argument("config", help="run config (YAML)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    check = sub.add_parser("check-config", help="load and check a config, print the resolved version")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            import yaml

            from distill.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from distill.training.trainer import Trainer

        trainer = Trainer(cfg)
        history = trainer.train()
    except ConfigError as err:
        print(f"distill: config error: {err}", file=sys.stderr)
        return 2
    if trainer.dist.is_main and history:
        last = history[-1]
        print(f"trained {trainer.iteration} iterations; run folder: {trainer.run_dir}; last: "
              + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step" and v == v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
