"""Training throughput of any method: seconds per iteration by kind, samples/s, MFU, peak memory.

Model FLOPs: one forward of each named module of the roles (the denoiser `transformer`, and any
head or second expert) is counted once with torch's FlopCounterMode on a real training input;
every call of that module in a timed iteration then counts one forward, and with grad one more
for the input gradients plus one for the weight gradients in proportion to the parameters that
take them: three for a trainable role, two through frozen weights (a LoRA role's base, a role
frozen for another's loss). Modules of the same name in different roles share an
architecture (roles start from one another). Activation recomputation is not counted, as
model-FLOPs utilisation requires. The peak is a bf16 (GPU) or fp32 (CPU) matrix product
measured in the same process.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: torch.device, repeats: int = 10) -> float:
    """Measured FLOP/s of a large matrix product: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallCounter:
    """Counts calls of every role's named modules (with or without grad, and each call's batch size); keeps each
    name's first input."""

    def __init__(self, roles):
        self.calls: list[tuple[str, float, int]] = []
        self.examples: dict[str, tuple] = {}
        self.hooks = [module.register_forward_hook(self._hook(name), with_kwargs=True)
                      for handle in roles for name, module in handle.modules.items()]

    def _hook(self, name: str):
        def record(module, args, kwargs, output):
            self.calls.append((name, _forwards(module), _batch_size(args, kwargs)))
            if name not in self.examples:
                self.examples[name] = (module, _detached(args), _detached(kwargs))
        return record

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _forwards(module: torch.nn.Module) -> float:
    """A call's cost in forwards: 1 without grad; with grad 2 (forward, input gradients) plus the share of the
    module's parameters that take weight gradients (1 for a trainable role, about 0 under a LoRA adapter)."""
    if not torch.is_grad_enabled():
        return 1.0
    sizes = [(p.numel(), p.requires_grad) for p in module.parameters()]
    return 2.0 + sum(n for n, grad in sizes if grad) / max(1, sum(n for n, _ in sizes))


def _detached(values):
    if isinstance(values, dict):
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()}
    return tuple(v.detach() if torch.is_tensor(v) else v for v in values)


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The leading size of a call's first tensor argument (or of the first tensor in a list of them), else 1."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)) and value and torch.is_tensor(value[0]):
            value = value[0]
        if torch.is_tensor(value) and value.ndim:
            return value.shape[0]
    return 1


def forward_flops(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (model.compile: a block's graph per role and mode)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(trainer, iterations: int, warmup: int = 2) -> dict:
    """Run `warmup` + `iterations` iterations of `trainer`; return throughput figures. A timed row that
    compiled graphs (`compiled_graphs` > 0) includes compile time: give more warm-up iterations."""
    device = trainer.device
    counter = CallCounter(trainer.roles)
    rows, warmup_seconds = [], []
    try:
        for i in range(warmup + iterations):
            counter.calls.clear()
            if device.type == "cuda" and i == warmup:
                torch.cuda.reset_peak_memory_stats(device)
            kind = trainer.method.iteration_kind(trainer.iteration)
            graphs = compiled_graphs()
            _sync(device)
            start = time.perf_counter()
            trainer.train_iteration()
            _sync(device)
            seconds = time.perf_counter() - start
            if i < warmup:
                warmup_seconds.append(seconds)
            else:
                rows.append({"seconds": seconds, "kind": kind, "calls": list(counter.calls),
                             "compiled_graphs": compiled_graphs() - graphs})
        flops = {name: forward_flops(*example) for name, example in counter.examples.items()}
        # A module's calls need not all have the batch of its first (batched CFG doubles the teacher's).
        example_batch = {name: _batch_size(*example[1:]) for name, example in counter.examples.items()}
    finally:
        counter.remove()
    peak = matmul_peak(device)
    for r in rows:
        calls = r.pop("calls")
        r["calls_with_grad"] = sum(forwards > 1 for _, forwards, _ in calls)
        r["calls_no_grad"] = len(calls) - r["calls_with_grad"]
        r["model_flops"] = sum(flops[name] * batch / example_batch[name] * forwards for name, forwards, batch in calls)
        r["mfu"] = r["model_flops"] / r["seconds"] / peak
    samples = trainer.cfg.training.batch_size * trainer.cfg.training.gradient_accumulation_steps * trainer.dist.data_world_size
    mean_seconds = statistics.fmean(r["seconds"] for r in rows)

    def median(key, kind):
        vals = [r[key] for r in rows if r["kind"] == kind]
        return statistics.median(vals) if vals else None

    kinds = trainer.method.update_kinds
    return {
        "iterations": len(rows),
        **{f"{kind}_seconds": median("seconds", kind) for kind in kinds},
        "mean_seconds_per_iteration": mean_seconds,
        "samples_per_second": samples / mean_seconds,
        "seconds_per_sample": mean_seconds / samples,
        "forward_flops": flops.get(trainer.plugin.denoiser_key),
        "forward_flops_by_module": flops,
        "matmul_peak_flops": peak,
        "mfu": sum(r["model_flops"] for r in rows) / sum(r["seconds"] for r in rows) / peak,
        **{f"{kind}_mfu": median("mfu", kind) for kind in kinds},
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "warmup_seconds": warmup_seconds,
        "rows": rows,
    }


def profile_kinds(trainer, out_dir, top: int = 15) -> dict:
    """torch.profiler over one iteration of each of the method's update kinds (DMD2: a student update and a
    critic-only one), run after `measure`. Writes `trace-<kind>.json.gz` (Chrome / Perfetto) into `out_dir`
    and returns each kind's top operators by self time on the device (the CPU without one), and on a device
    `busy`: the operators' device time over the iteration's wall time (below 1: idle gaps, e.g. launch-bound)."""
    import time
    from pathlib import Path

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = trainer.device
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    self_us = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for kind in trainer.method.update_kinds:
        for _ in range(64):  # run up to the next iteration of this kind (DMD2: within generator_update_interval)
            if trainer.method.iteration_kind(trainer.iteration) == kind:
                break
            trainer.train_iteration()
        else:
            raise RuntimeError(f"no {kind} iteration within 64 iterations")
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            trainer.train_iteration()
            _sync(device)
            wall_us = (time.perf_counter() - start) * 1e6
        prof.export_chrome_trace(str(out_dir / f"trace-{kind}.json.gz"))
        # Operators only: each kernel (and runtime event) is listed too, with the time its operator already has.
        ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and not e.is_user_annotation]
        total = sum(self_us(e) for e in ops) or 1.0
        result[kind] = {
            "clock": "device" if on_device else "cpu",
            "total_ms": total / 1e3,
            "wall_ms": wall_us / 1e3,
            **({"busy": total / wall_us} if on_device else {}),
            "top": [{"name": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
                    for e in sorted(ops, key=self_us, reverse=True)[:top]],
        }
    return result


def throughput_trainer(cfg):
    """A Trainer of `cfg` for timing only: fresh weights, a temporary output folder, no validation."""
    import tempfile

    from distill.training.trainer import Trainer

    cfg.run.output = tempfile.mkdtemp(prefix="distill-bench-train-")
    cfg.validation.every = 0
    return Trainer(cfg)


def main(argv: list[str] | None = None) -> None:
    """`python -m distill.bench.training CONFIG`: throughput of a run config (fresh weights), as JSON."""
    import json

    from distill.arguments import Parser, at_least
    from distill.config import ConfigError, load_config
    from distill.errors import InputError

    p = Parser(prog="python -m distill.bench.training", description=main.__doc__)
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--iterations", type=at_least(1), default=20, help="timed iterations (after 2 warm-up ones)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of 3 iterations")
    p.add_argument("--json", default=None, help="also write the figures, per iteration, to this file")
    args = p.parse_args(argv)
    try:
        trainer = throughput_trainer(load_config(args.config, args.set))
    except InputError as err:
        p.exit(2, f"{p.prog}: {'config' if isinstance(err, ConfigError) else 'input'} error: {err}\n")
    result = measure(trainer, iterations=args.iterations)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                trainer.train_iteration()
            _sync(trainer.device)
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if trainer.device.type == "cuda" else []):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=50))


if __name__ == "__main__":
    main()
