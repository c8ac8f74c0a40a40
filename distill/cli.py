"""`distill` command line: train, preprocess, shapes, check-config.

    distill shapes OUT --count 1000            a shapes-world data set (videos + captions.csv)
    distill export CHECKPOINT OUT_DIR          the student as a stock diffusers folder
    distill reshard CHECKPOINT                 make a checkpoint resumable on any number of ranks
    distill bench CHECKPOINT / compare REPORT...  benchmarks and their comparison
    distill preprocess CONFIG                  data.videos -> data.shards
    distill train CONFIG [--set key.path=value ...] [--resume [CHECKPOINT] | --overwrite]
    distill check-config CONFIG [--set ...]    every check train makes before building models

Several ranks: `deepspeed --num_gpus 2 $(which distill) train CONFIG` (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import argparse
import sys

from distill.arguments import Parser, add_overrides, at_least, endpoint_url, number_in
from distill.config import ConfigError, load_config
from distill.errors import InputError
from distill.validation import MAX_GUIDANCE_SCALE


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distill", description="Distil video diffusion models into few-step students.")
    # The deepspeed launcher passes --local_rank before the subcommand; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a run from a YAML config")
    train.add_argument("config", help="run config (YAML)")
    add_overrides(train)
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the run's latest checkpoint, or from the one named (step-000500)")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run.output that holds an earlier run (its files are deleted once the "
                            "models are built); without it or --resume, run.output must be empty")
    train.add_argument("--force", action="store_true",
                       help="with --resume of an older checkpoint: drop the run's newer checkpoints (refused otherwise)")
    prep = sub.add_parser("preprocess", help="encode data.videos (or prompts) into the shards of data.shards")
    prep.add_argument("config", help="run config (YAML): its model and data sections")
    add_overrides(prep)
    exp = sub.add_parser("export", help="write a checkpoint's student as a stock diffusers WanPipeline folder")
    exp.add_argument("checkpoint", help="a checkpoint folder: path or s3://bucket/run/checkpoints/step-000500 "
                                        "(or <output>/checkpoints/latest)")
    exp.add_argument("out_dir", help="the folder to write (new or empty, unless --overwrite)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (its files are deleted)")
    exp.add_argument("--fuse", action="store_true",
                     help="a LoRA student: merge its adapter into the base weights and write a whole pipeline folder "
                          "(without: the adapter as a diffusers LoRA file and the scheduler)")
    exp.add_argument("--endpoint-url", type=endpoint_url, default=None,
                     help="S3-compatible endpoint for an s3:// checkpoint")
    reshard = sub.add_parser("reshard", help="add DeepSpeed universal engine states to a checkpoint, so that "
                                             "`train --resume` continues it on any number of ranks")
    reshard.add_argument("checkpoint", help="<output>/checkpoints/step-000500 or .../latest (a path or s3:// URI)")
    reshard.add_argument("--endpoint-url", type=endpoint_url, default=None,
                         help="S3-compatible endpoint for an s3:// checkpoint")
    bench = sub.add_parser("bench", help="benchmark a checkpoint: latency and quality of student and teacher")
    bench.add_argument("checkpoint", help="<output>/checkpoints/step-000500 or .../latest (a path or s3:// URI)")
    bench.add_argument("--out", default=None,
                       help="report folder (default <output>/bench/<checkpoint>); an earlier report there is replaced")
    bench.add_argument("--prompts", type=at_least(1), default=8, help="prompts, drawn (seeded) from the run's captions")
    bench.add_argument("--seeds", type=at_least(1), default=4, help="videos per prompt")
    bench.add_argument("--teacher-steps", type=at_least(1), default=50,
                       help="steps of the reference teacher (ode, with CFG)")
    bench.add_argument("--no-teacher", action="store_true",
                       help="skip the teacher's rows (another report of the same teacher, prompts and seeds has them)")
    bench.add_argument("--teacher-guidance", type=number_in(0.0, MAX_GUIDANCE_SCALE), default=None,
                       help="standard CFG scale of the teacher (default: the run's)")
    bench.add_argument("--real-videos", type=at_least(0), default=64,
                       help="real videos for the Fréchet distance and coverage")
    bench.add_argument("--metric", type=metric_spec, action="append", default=[], metavar="NAME=PATH",
                       help="plug-in metric with local weights, e.g. clip=/models/clip (repeatable)")
    bench.add_argument("--training-iterations", type=at_least(0), default=0,
                       help="also measure training throughput over this many iterations")
    bench.add_argument("--video-format", choices=["mp4", "gif"], default="mp4",
                       help="format of the sampled videos kept beside the report")
    bench.add_argument("--endpoint-url", type=endpoint_url, default=None,
                       help="S3-compatible endpoint for an s3:// checkpoint")
    compare = sub.add_parser("compare", help="put benchmark reports side by side, with deltas and regressions")
    compare.add_argument("reports", nargs="+", help="report folders (or report.parquet files), oldest first")
    compare.add_argument("--out", default=None,
                         help="folder for compare.md/.parquet/.csv; an earlier comparison there is replaced")
    compare.add_argument("--tolerance", type=number_in(0.0), default=0.02,
                         help="worse by more than this is a regression (absolute for fractions, else relative)")
    sub.add_parser("shapes", help="write a shapes-world data set (distill shapes OUT --count N ...; see its --help)")
    check = sub.add_parser("check-config", help="load and check a config and the inputs it names, as train does "
                                                "before building models; print the resolved config")
    check.add_argument("config")
    add_overrides(check)
    return parser


def metric_spec(text: str) -> str:
    """argparse type of --metric NAME=PATH: a known metric and a local weights folder."""
    from distill.bench.quality import check_metric

    try:
        check_metric(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--metric ")) from None
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["shapes"]:  # its own options: see distill/data/shapes.py
        from distill.data.shapes import main as shapes_main

        return shapes_main(argv[1:], prog="distill shapes")
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            from distill.config import StorageConfig
            from distill.export import export

            record = export(args.checkpoint, args.out_dir, StorageConfig(endpoint_url=args.endpoint_url),
                            overwrite=args.overwrite, fuse=args.fuse)
            call = ", ".join(f"{k}={v!r}" for k, v in record["call"].items() if k != "output_type")
            load = "".join(f", {k}={v!r}" for k, v in record["load"].items())
            said = f"exported {record['role']} of {args.checkpoint} (step {record['step']}) to {args.out_dir}; "
            if "lora" in record:
                loads = "".join(f"pipe.load_lora_weights({args.out_dir!r}"
                                + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + "); "
                                for kwargs in record["lora"]["load_lora_weights"])
                print(said + f"sample with pipe = WanPipeline.from_pretrained(<the base: "
                      f"{record['lora']['base']['weights']}>{load}); {loads}"
                      f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained({args.out_dir!r}, "
                      f"subfolder='scheduler'); pipe(prompt, {call})")
            else:
                print(said + f"sample with WanPipeline.from_pretrained({args.out_dir!r}{load})(prompt, {call})")
            return 0
        if args.command == "reshard":
            from distill.config import StorageConfig
            from distill.training.reshard import reshard

            print(reshard(args.checkpoint, StorageConfig(endpoint_url=args.endpoint_url)))
            return 0
        if args.command == "bench":
            from distill.bench.inference import BenchSpec
            from distill.bench.run import bench_checkpoint
            from distill.config import StorageConfig

            spec = BenchSpec(prompts=args.prompts, seeds=args.seeds, teacher_steps=args.teacher_steps,
                             teacher_rows=not args.no_teacher,
                             teacher_guidance=args.teacher_guidance, real_videos=args.real_videos, metrics=args.metric,
                             video_format=args.video_format)
            report = bench_checkpoint(args.checkpoint, spec, out=args.out, storage=StorageConfig(endpoint_url=args.endpoint_url),
                                      training_iterations=args.training_iterations)
            print(f"report: {report}")
            return 0
        if args.command == "compare":
            from distill.bench.compare import compare as compare_reports

            _, markdown = compare_reports(args.reports, args.out, args.tolerance)
            print(markdown)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            import yaml

            from distill.config import to_dict
            from distill.preflight import check_inputs

            check_inputs(cfg)
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.command == "preprocess":
            from distill.data.preprocess import preprocess

            manifest = preprocess(cfg)
            print(f"shards ready: {manifest}")
            return 0
        from distill.training.trainer import Trainer

        if args.force and args.resume is None:
            raise ConfigError("--force: only with --resume (it drops the checkpoints newer than the one resumed from)")
        trainer = Trainer(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
        if trainer.dist.is_main and trainer.dropped:
            print(f"--force: dropped the newer checkpoints {', '.join(trainer.dropped)}", file=sys.stderr)
        history = trainer.train()
    except InputError as err:
        kind = "config error" if isinstance(err, ConfigError) else "input error"
        print(f"distill: {kind}: {err}", file=sys.stderr)
        return 2
    if trainer.dist.is_main and history:
        last = history[-1]
        print(f"trained {trainer.iteration} iterations; run folder: {trainer.folder.store.uri}; last: "
              + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step" and v == v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
