"""The `roles` section of the run config: each role's weights, whether it trains, and how (full weights or a LoRA
adapter over a shared base). A module of its own, like the model section; loading it imports no model library."""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import ConfigError
from distill.strict import positive


@dataclass(kw_only=True)
class LoraSettings:
    """A role trained as a LoRA adapter (peft) over frozen base weights: only the adapter has gradients and
    optimizer state, and its checkpoints and exports hold the adapter alone."""

    rank: int = 16
    """Rank r of each adapted linear's update B·A."""
    alpha: float | None = None
    """Scale numerator: the update is scaled by alpha / rank; unset = rank (scale 1)."""
    target_modules: list[str] | None = None
    """Linears to adapt, by name or name suffix (peft's matching, e.g. `to_q`, `ffn.net.2`); unset = the model
    family's default (Wan: the attention projections and the feed-forward linears of every block)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""

    def validate(self, path: str) -> None:
        positive(self, path, "rank", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            if not self.target_modules or not all(self.target_modules):
                raise ConfigError(f"{path}.target_modules: list at least one module name (or leave it unset)")
            if len(set(self.target_modules)) != len(self.target_modules):
                raise ConfigError(f"{path}.target_modules: {self.target_modules} names a module twice")


@dataclass(kw_only=True)
class RoleConfig:
    init_from: str | None = None
    """Another role's name (copy its weights); a diffusers transformer folder or a checkpoint (a path, or s3://);
    `hub:<org>/<name>`; or unset (the model's weights)."""
    trainable: bool = False
    """Whether the role gets an optimizer and a DeepSpeed engine; frozen roles are eval-mode, bf16 on GPU."""
    lora: LoraSettings | None = None
    """Train a LoRA adapter over the role's weights (frozen) instead of the weights themselves; trainable roles only."""
    share_base: bool = False
    """With lora: the adapter applies to the weights of the frozen role named by init_from, held once in memory
    (the teacher's), instead of to a copy of them."""
    shard: bool = False
    """A frozen role: its weights partitioned over the ranks (ZeRO-3 inference: each forward gathers a block's
    weights as it runs) instead of replicated on each; needs deepspeed.zero_optimization.stage 3."""
    experts: list[str] | None = None
    """A trainable role of a two-expert model (Wan 2.2 A14B): the experts it trains, by module name (`transformer`:
    high noise, `transformer_2`: low noise); the others stay frozen. Unset = all."""

    def validate(self, path: str) -> None:
        if self.experts is not None:
            if not self.trainable:
                raise ConfigError(f"{path}.experts: names what a trainable role trains; this role is frozen")
            if not self.experts or len(set(self.experts)) != len(self.experts):
                raise ConfigError(f"{path}.experts: list each expert to train once (or leave it unset), got "
                                  f"{self.experts}")


def check_lora(name: str, role: RoleConfig, roles: dict[str, RoleConfig], zero_stage: int) -> None:
    """The LoRA keys of role `name` against the other roles and the ZeRO stage."""
    path = f"roles.{name}"
    if role.lora is not None and not role.trainable:
        raise ConfigError(f"{path}.lora: a frozen role's adapter would never train; set {path}.trainable: true "
                          f"or remove {path}.lora")
    if role.lora is not None and zero_stage == 3:
        raise ConfigError(f"{path}.lora: LoRA roles train under deepspeed.zero_optimization.stage 0-2 (stage 3 "
                          f"would partition the frozen base weights); a LoRA role's optimizer state is small anyway")
    if not role.share_base:
        return
    if role.lora is None:
        raise ConfigError(f"{path}.share_base: only a LoRA role can share its base weights; set {path}.lora")
    base = roles.get(role.init_from) if role.init_from is not None else None
    if base is None or base.trainable or base.lora is not None:
        raise ConfigError(f"{path}.share_base: the shared base is the frozen role that {path}.init_from names, "
                          f"but init_from is {role.init_from!r}; set it to a frozen role (e.g. teacher)")


def check_shard(name: str, role: RoleConfig, zero_stage: int) -> None:
    path = f"roles.{name}.shard"
    if role.shard and role.trainable:
        raise ConfigError(f"{path}: a trainable role's weights are partitioned by its engine's ZeRO stage; shard is "
                          f"for frozen roles")
    if role.shard and zero_stage != 3:
        raise ConfigError(f"{path}: partitions a frozen role's weights with ZeRO-3, which needs "
                          f"deepspeed.zero_optimization.stage 3 (now {zero_stage})")


def init_order(roles: dict) -> list[str]:
    """Roles ordered so that each comes after the role it starts from; cycles are errors."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"roles.{name}.init_from: roles start from each other in a cycle")
        visiting.add(name)
        source = roles[name].init_from
        if source in roles:
            visit(source)
        order.append(name)

    for name in roles:
        visit(name)
    return order
