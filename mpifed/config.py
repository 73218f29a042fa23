"""The run configuration: nested dataclasses with a docstring per field, validated as a whole so that
one error lists every problem. The same configuration drives `mpifed simulate` and `mpifed run`.

Every setting with a fixed set of values is typed with one of the `Literal` aliases below: that alias is
the only list of those values; validation, error messages and the command line's choices read it
(`choices`). Checking a configuration against this machine (site profiles, installed packages, folders
that must exist) is `mpifed.preflight`'s job; reading it from TOML and `--set` is `mpifed.configfile`'s.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mpifed.cadence import longest_lag

Preset = Literal["llama-tiny", "llama-small", "mixtral-tiny", "llama3-8b", "mixtral-8x7b"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
Precision = Literal["fp32", "bf16"]
Schedule = Literal["constant", "cosine"]
InnerState = Literal["keep", "reset"]
InnerOptimizer = Literal["adamw", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
OuterName = Literal["fedavg", "fedavgm", "diloco", "fedadam", "fedyogi"]
Compression = Literal["none", "bf16", "int8", "int4", "int2", "topk"]
Overlap = Literal["none", "delayed"]
EngineName = Literal["replica", "fsdp", "deepspeed"]
ZeroStage = Literal[1, 2, 3]
SplitKind = Literal["iid", "by-source"]
"""`mpifed data prepare --split`: shuffled sequences, or whole sources per partition (non-IID)."""

# What an unknown value of each choice is called in the error that lists the valid ones.
_NOUNS: dict[Any, str] = {Preset: "preset", Attention: "implementation", Precision: "precision",
                          Schedule: "schedule", InnerState: "mode", InnerOptimizer: "optimizer", Device: "device",
                          OuterName: "outer optimizer", Compression: "compression", EngineName: "engine",
                          ZeroStage: "ZeRO stage", Overlap: "overlap mode"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
NAME_RULE = "a letter, then letters, digits, '-' or '_'"
"""What a facility's or a site profile's name may be: it reaches file names and batch scripts."""


def is_name(text: str) -> bool:
    """Whether `text` is a valid name as a whole (`$` would also match before a final line break)."""
    return _NAME.fullmatch(text) is not None


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found, one per '; '."""


def choices(alias: Any) -> tuple:
    """The allowed values of a `Literal` alias, in their documented order."""
    return typing.get_args(alias)


def field_choices(cls: type, name: str) -> tuple:
    """The allowed values of field `name` of section `cls` (empty when it is not a choice)."""
    hint = typing.get_type_hints(cls)[name]
    return choices(hint) if typing.get_origin(hint) is Literal else ()


def check_table(table: typing.Mapping, alias: Any, what: str) -> None:
    """Fail at import when a table keyed by the values of `alias` does not cover exactly those values,
    so that adding a choice in one place and forgetting its implementation cannot go unnoticed."""
    if set(table) != set(choices(alias)):
        raise AssertionError(f"{what} covers {sorted(map(str, table))}, the configuration allows "
                             f"{sorted(map(str, choices(alias)))}")


def _choice_problems(section: Any, where: str) -> list[str]:
    """Every `Literal` field of `section` whose value is not one of its choices."""
    out = []
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        allowed = field_choices(type(section), f.name)
        value = getattr(section, f.name)
        if allowed and value not in allowed:
            alias = hints[f.name]
            what = (f"ZeRO stage {value} does not exist" if alias is ZeroStage
                    else f"unknown {_NOUNS[alias]} {value!r}")
            out.append(f"{where}.{f.name}: {what}; choose one of {', '.join(map(str, allowed))}")
    return out


@dataclass
class ModelConfig:
    """[model]: which architecture to train, from a preset or a local model folder."""

    preset: Preset = "llama-tiny"
    """Built-in architecture: llama-tiny (~0.12M parameters, tests), llama-small (~3M, the demo),
    mixtral-tiny (a 4-expert MoE for tests), llama3-8b or mixtral-8x7b (real runs)."""
    path: str = ""
    """A local Hugging Face model folder (config.json + weights), read with local_files_only; overrides
    the preset. Empty: build the preset."""
    reinit: bool = False
    """With a path: keep the architecture but start from fresh random weights (pre-training)."""
    attention: Attention = "sdpa"
    """Attention implementation: sdpa, eager, or flash_attention_2 (when flash-attn is installed)."""
    dtype: Precision = "fp32"
    """Parameter dtype of the local model: fp32 or bf16. The federation always exchanges fp32."""

    def problems(self) -> list[str]:
        out = _choice_problems(self, "model")
        if self.reinit and not self.path:
            out.append("model.reinit: only applies with model.path (a preset always starts from random weights)")
        return out


@dataclass
class DataConfig:
    """[data]: the corpus (a prepared folder, or the embedded text) and the validation set."""

    path: str = ""
    """A folder made by `mpifed data prepare` (one partition per facility, in facility order); empty: the
    embedded standard-library text. A prepared folder brings its own seq_len, split and tokenizer."""
    seq_len: int = 128
    """Tokens per training sequence of the embedded text (byte-level tokens)."""
    val_fraction: float = 0.05
    """Share of the embedded text's sequences held out for validation, shared by every facility."""
    val_sequences: int = 64
    """At most this many validation sequences are scored at each evaluation (eval.every)."""
    partitions: int = 0
    """How many equal partitions the embedded text is cut into (facility.partition picks one); 0: one per
    facility listed. Separate launches set it to the configuration's count, so that a facility keeps its
    own share of the text whichever others are in (some may not have joined, or have left)."""

    def problems(self) -> list[str]:
        out = []
        if self.partitions < 0:
            out.append(f"data.partitions: must be >= 0 (got {self.partitions})")
        if not 8 <= self.seq_len <= 4096:
            out.append(f"data.seq_len: must be between 8 and 4096 (got {self.seq_len})")
        if not 0.0 < self.val_fraction < 0.5:
            out.append(f"data.val_fraction: must be > 0 and < 0.5 (got {self.val_fraction})")
        if self.val_sequences < 1:
            out.append(f"data.val_sequences: must be >= 1 (got {self.val_sequences})")
        return out


@dataclass
class LoraConfig:
    """[lora]: LoRA adapters on a frozen base; only the adapters train and cross facilities."""

    rank: int = 0
    """LoRA rank r; 0 trains the whole model. With r > 0 only the adapters train and cross facilities."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapter update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapters' input."""
    target_modules: str = "q_proj,v_proj"
    """Comma-separated module names that get adapters (e.g. q_proj,k_proj,v_proj,o_proj)."""

    @property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def problems(self) -> list[str]:
        out = []
        if self.rank < 0:
            out.append(f"lora.rank: must be >= 0 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: must be >= 0 and < 1 (got {self.dropout})")
        if self.rank and not self.modules:
            out.append("lora.target_modules: name at least one module, e.g. q_proj,v_proj")
        return out


@dataclass
class TrainConfig:
    """[train]: the inner loop every facility runs between synchronisations."""

    local_steps: int = 20
    """H: inner optimizer steps each facility takes between two synchronisations."""
    micro_batch: int = 8
    """Sequences per rank per step."""
    grad_accum: int = 1
    """Micro-batches accumulated into each inner optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of the inner optimizer."""
    optimizer: InnerOptimizer = "adamw"
    """The inner optimizer: adamw, or sgd (plain, or with train.momentum)."""
    momentum: float = 0.0
    """SGD's momentum (train.optimizer = sgd; 0: plain SGD). AdamW's is train.beta1."""
    scale_lr: bool = False
    """Multiply lr by the facility's number of ranks (larger facilities take larger steps)."""
    schedule: Schedule = "constant"
    """Inner learning-rate schedule over all rounds x local_steps: constant or cosine (decay to min_lr)."""
    warmup_steps: int = 0
    """Inner steps of linear warmup from 0 to lr at the start of the run."""
    min_lr: float = 0.0
    """The cosine schedule's final learning rate."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2."""
    weight_decay: float = 0.0
    """AdamW weight decay of the inner optimizer."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value before each inner step; 0 turns clipping off."""
    inner_state: InnerState = "keep"
    """keep: the inner AdamW state carries over from round to round (DiLoCo); reset: start it afresh
    every round."""
    device: Device = "auto"
    """auto: a GPU (CUDA or ROCm) where torch sees one, else the CPU; cpu or cuda force it."""
    seed: int = 0
    """Seeds model initialisation, data order and partitions; a CPU run with the same seed repeats."""
    threads: int = 0
    """torch threads per rank; 0 shares the node's cores among the ranks placed on it."""

    def problems(self) -> list[str]:
        out = _choice_problems(self, "train")
        for name in ("local_steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(f"train.{name}: must be >= 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            out.append(f"train.lr: must be a positive number (got {self.lr})")
        for name in ("weight_decay", "grad_clip", "min_lr"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                out.append(f"train.{name}: must be >= 0 (got {getattr(self, name)})")
        if self.min_lr > self.lr:
            out.append(f"train.min_lr: must not exceed train.lr (got {self.min_lr} > {self.lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"train.{name}: must be >= 0 and < 1 (got {getattr(self, name)})")
        if not 0 <= self.momentum < 1:
            out.append(f"train.momentum: must be >= 0 and < 1 (got {self.momentum})")
        elif self.momentum and self.optimizer != "sgd":
            out.append("train.momentum: applies to train.optimizer = sgd (AdamW's momentum is train.beta1)")
        if self.warmup_steps < 0:
            out.append(f"train.warmup_steps: must be >= 0 (got {self.warmup_steps})")
        if self.seed < 0:
            out.append(f"train.seed: must be >= 0 (got {self.seed})")
        if self.threads < 0:
            out.append(f"train.threads: must be >= 0 (got {self.threads})")
        return out

    @property
    def state_arrays(self) -> int:
        """Arrays shaped like the model that the inner optimizer keeps (AdamW's two moments, SGD's
        momentum buffer)."""
        return 2 if self.optimizer == "adamw" else int(self.momentum > 0)


@dataclass
class FederationConfig:
    """[federation]: rounds, the outer optimizer, the exchange between facilities and its deadlines."""

    rounds: int = 5
    """Number of synchronisations (outer steps)."""
    outer: OuterName = "fedavg"
    """Outer optimizer the roots apply to the averaged pseudo-gradient: fedavg, fedavgm, diloco, fedadam,
    fedyogi."""
    outer_lr: float | None = None
    """Outer learning rate; unset: 1.0 (fedavg, fedavgm), 0.7 (diloco), 0.01 (fedadam, fedyogi)."""
    outer_momentum: float | None = None
    """Outer momentum (β1 for fedadam/fedyogi); unset: 0.9 (0 for fedavg)."""
    outer_warmup: int = 0
    """fedavgm, diloco: rounds over which the outer step moves from plain FedAvg (lr 1, no momentum) to
    outer_lr and outer_momentum, linearly; 0: the full step from the first round."""
    outer_beta2: float = 0.99
    """β2 of fedadam/fedyogi."""
    outer_tau: float = 1e-3
    """τ, the adaptivity floor of fedadam/fedyogi."""
    roots: int = 1
    """R: roots per facility; segment r of the model is reduced across facilities by root r."""
    compress: Compression = "none"
    """The cross-facility hop: none (fp32), bf16, int8, int4, int2 (per-block scales), or topk (the
    largest values of each block); every codec but none with error feedback."""
    topk_fraction: float = 1 / 32
    """compress = topk: the fraction of each block of 64 values that is sent (rounded up to whole values)."""
    overlap: Overlap = "none"
    """none: every exchange finishes before training goes on; delayed: an exchange runs in the background
    during the next inner steps and its outer step lands one exchange late (see README, Hiding the link)."""
    fragments: int = 1
    """K: the model is cut into K fragments; fragment j is exchanged every local_steps steps, at offset
    j * local_steps / K, so the bytes of one exchange drop K-fold (with overlap, one fragment in flight)."""
    overlap_steps: int = 0
    """overlap = delayed: τ, the inner steps an exchange runs in the background before it is folded in
    (at most the steps between two sync points: local_steps / fragments); 0: until the next sync point,
    a whole round with one fragment. A smaller τ trains less from a stale global model, but the link must
    carry the exchange in τ steps' time or training waits for it."""
    bucket_mb: float = 64.0
    """Inside a facility the model is streamed to the roots in buckets of this many MiB."""
    sample: float = 1.0
    """Fraction of facilities that train in each round, drawn with the seed; the others wait."""
    min_participants: int = 1
    """A round with fewer facilities left (after sampling and the guard) fails; the job stops."""
    max_norm_ratio: float = 10.0
    """A facility whose update norm exceeds this many times the median of the others' is left out of the
    round (0 turns the check off; NaN/Inf updates are always left out)."""
    timeout_s: float = 600.0
    """Longest wait for another facility in one exchange before the whole job is aborted."""
    rendezvous: str = ""
    """Separate launches (`mpifed run --facility`): a file on a path every site sees, where the hub (the
    first facility) writes the address of its door (HOST:PORT) for the others. Empty: the hub prints it; pass
    it with --port."""
    join_timeout_s: float = 600.0
    """Separate launches: how long the hub waits for the other facilities to join."""
    min_facilities: int = 0
    """Separate launches: go on once the join time is up if at least this many facilities (hub included)
    joined, and let a facility whose job is asked to stop leave while at least this many stay; 0: every
    facility must join, and a stop stops them all."""
    token_file: str = ""
    """Separate launches: a file (mode 0600) holding the shared join token; MPIFED_TOKEN wins over it."""

    @property
    def bucket_values(self) -> int:
        """bucket_mb as a number of fp32 values (at least one)."""
        return max(1, int(self.bucket_mb * 2 ** 20) // 4)

    def problems(self) -> list[str]:
        out = _choice_problems(self, "federation")
        if self.rounds < 1:
            out.append(f"federation.rounds: must be >= 1 (got {self.rounds})")
        if self.roots < 1:
            out.append(f"federation.roots: must be >= 1 (got {self.roots})")
        for name in ("outer_lr", "outer_tau", "bucket_mb"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                out.append(f"federation.{name}: must be a positive number (got {value})")
        for name in ("outer_momentum", "outer_beta2"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                out.append(f"federation.{name}: must be >= 0 and < 1 (got {value})")
        if self.outer_warmup < 0:
            out.append(f"federation.outer_warmup: must be >= 0 (got {self.outer_warmup})")
        elif self.outer_warmup and self.outer not in ("fedavgm", "diloco"):
            out.append(f"federation.outer_warmup: applies to fedavgm and diloco (federation.outer = {self.outer!r} "
                       "has no momentum to warm up); set it to 0")
        if self.fragments < 1:
            out.append(f"federation.fragments: must be >= 1 (got {self.fragments})")
        if self.overlap_steps < 0:
            out.append(f"federation.overlap_steps: must be >= 0 (got {self.overlap_steps})")
        elif self.overlap_steps and self.overlap != "delayed":
            out.append(f"federation.overlap_steps: {self.overlap_steps} applies with federation.overlap = 'delayed' "
                       f"(got {self.overlap!r}); set overlap = 'delayed' or overlap_steps = 0")
        if (self.overlap != "none" or self.fragments > 1) and self.sample < 1:
            out.append(f"federation.sample: {self.sample} with federation.overlap = {self.overlap!r} and "
                       f"federation.fragments = {self.fragments}: a facility that sits a round out would leave a "
                       "streamed exchange without its update; use sample = 1 with overlap or fragments")
        if not 0 < self.topk_fraction <= 1:
            out.append(f"federation.topk_fraction: must be > 0 and <= 1 (got {self.topk_fraction})")
        if not 0 < self.sample <= 1:
            out.append(f"federation.sample: must be > 0 and <= 1 (got {self.sample})")
        if self.min_participants < 1:
            out.append(f"federation.min_participants: must be >= 1 (got {self.min_participants})")
        if not (self.max_norm_ratio == 0 or self.max_norm_ratio > 1):
            out.append(f"federation.max_norm_ratio: must be 0 (off) or > 1 (got {self.max_norm_ratio})")
        for name in ("timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                out.append(f"federation.{name}: must be a positive number of seconds (got {value})")
        if self.min_facilities < 0:
            out.append(f"federation.min_facilities: must be >= 0 (got {self.min_facilities})")
        return out


@dataclass
class CheckpointConfig:
    """[checkpoint]: where and how often the global model and resume state are written."""

    dir: str = "run"
    """Output folder: one HDF5 checkpoint per checkpointed round, the resolved config, metrics."""
    every: int = 1
    """Write a checkpoint every this many rounds (the last round is always written)."""
    keep: int = 0
    """Keep only the newest this many checkpoints; 0 keeps all."""
    fletcher32: bool = False
    """Also store HDF5's fletcher32 checksums (checked by any HDF5 reader; about 4x slower writes)."""

    def problems(self) -> list[str]:
        out = []
        if not self.dir:
            out.append("checkpoint.dir: must name a folder")
        if self.every < 1:
            out.append(f"checkpoint.every: must be >= 1 (got {self.every})")
        if self.keep < 0:
            out.append(f"checkpoint.keep: must be >= 0 (got {self.keep})")
        return out


@dataclass
class EvalConfig:
    """[eval]: when the global model (and each facility's) is scored on the validation set."""

    every: int = 1
    """Score the global model on the shared validation set every this many rounds (and after the last)."""
    facilities: bool = True
    """Also score each facility's local model (before the exchange) on the same set: shows drift."""

    def problems(self) -> list[str]:
        return [f"eval.every: must be >= 1 (got {self.every})"] if self.every < 1 else []


@dataclass
class MetricsConfig:
    """[metrics]: the per-round JSON lines and the optional TensorBoard and wandb sinks."""

    file: str = ""
    """JSON-lines file, one line per round; empty means metrics.jsonl in checkpoint.dir."""
    tensorboard: str = ""
    """Also write TensorBoard events to this folder (needs the tensorboard package); empty: off."""
    wandb: str = ""
    """Also log to this Weights & Biases project (needs wandb; WANDB_MODE=offline works); empty: off."""

    def problems(self) -> list[str]:
        return []


@dataclass
class FsdpConfig:
    """A facility's `fsdp = {...}` table: options of the fsdp engine."""

    replicas: int = 1
    """HSDP: shard inside groups of ranks/replicas ranks and replicate across the replicas groups."""
    mixed_precision: Precision = "fp32"
    """fp32, or bf16 (bf16 compute and all-gathers, fp32 gradient reduction and master weights)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more compute)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory (GPU runs only)."""

    def problems(self, where: str) -> list[str]:
        out = _choice_problems(self, f"{where}.fsdp")
        if self.replicas < 1:
            out.append(f"{where}.fsdp.replicas: must be >= 1 (got {self.replicas})")
        return out


@dataclass
class DeepSpeedConfig:
    """A facility's `deepspeed = {...}` table: options of the deepspeed engine."""

    zero_stage: ZeroStage = 2
    """ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
    config: str = ""
    """A DeepSpeed JSON config file merged over mpifed's defaults (its keys win); empty: defaults only."""

    def problems(self, where: str) -> list[str]:
        return _choice_problems(self, f"{where}.deepspeed")


@dataclass
class FacilityConfig:
    """One `[[facility]]`: a group of ranks with its own engine, site and data partition."""

    name: str = ""
    """Unique name; facilities are ordered as listed."""
    ranks: int = 1
    """MPI ranks (processes) this facility trains with."""
    engine: EngineName = "replica"
    """Local training engine: replica (whole model on every rank, gradients all-reduced), fsdp (PyTorch
    FSDP2) or deepspeed (ZeRO 1/2/3)."""
    site: str = "local"
    """Site profile the facility runs on."""
    partition: int = -1
    """The partition of data.path this facility trains on; -1: its position in the list."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """Settings of the fsdp engine (an inline table: fsdp = { replicas = 2 })."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Settings of the deepspeed engine (an inline table: deepspeed = { zero_stage = 3 })."""

    def problems(self, where: str) -> list[str]:
        out = []
        if not is_name(self.name):
            out.append(f"{where}.name: {self.name!r} is not a valid name ({NAME_RULE})")
        if self.ranks < 1:
            out.append(f"{where}.ranks: must be >= 1 (got {self.ranks})")
        out += _choice_problems(self, where) + self.fsdp.problems(where) + self.deepspeed.problems(where)
        if self.engine == "fsdp" and self.ranks % self.fsdp.replicas:
            out.append(f"{where}.fsdp.replicas: {self.fsdp.replicas} replica groups do not divide {self.ranks} ranks")
        return out


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "metrics": MetricsConfig,
}
ENGINE_SECTIONS: dict[str, type] = {"fsdp": FsdpConfig, "deepspeed": DeepSpeedConfig}


def default_facilities(count: int = 2, ranks: int = 2) -> list[FacilityConfig]:
    """Facilities f0, f1, ... on the local site, as `mpifed simulate` builds them from its flags."""
    return [FacilityConfig(name=f"f{i}", ranks=ranks) for i in range(count)]


@dataclass
class RunConfig:
    """A whole, validated run configuration: every section and the facilities, in order."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    facility: list[FacilityConfig] = field(default_factory=default_facilities)

    def __post_init__(self) -> None:
        problems = [p for name in SECTIONS for p in getattr(self, name).problems()]
        if not self.facility:
            problems.append("facility: at least one [[facility]] is needed")
        for i, fac in enumerate(self.facility):
            problems += fac.problems(f"facility.{fac.name if is_name(fac.name) else i}")
        names = [f.name for f in self.facility]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"facility.name: names must be unique (repeated: {', '.join(dupes)})")
        fed = self.federation
        drawn = max(1, int(fed.sample * len(self.facility) + 0.5))
        if fed.min_participants > drawn:
            problems.append(f"federation.min_participants: {fed.min_participants} can never be met: "
                            f"federation.sample = {fed.sample} draws {drawn} of {len(self.facility)} facilities per round")
        if self.facility and self.federation.roots > min(f.ranks for f in self.facility):
            problems.append(f"federation.roots: {self.federation.roots} roots per facility, but the smallest "
                            f"facility has {min(f.ranks for f in self.facility)} ranks")
        if not self.data.path and not self.data.partitions and any(f.partition >= 0 for f in self.facility):
            problems.append("facility.partition: applies with data.path, or to the embedded text with "
                            "data.partitions (else it is split into one partition per facility, in order)")
        if self.data.partitions and any(f.partition >= self.data.partitions for f in self.facility):
            problems.append(f"facility.partition: the embedded text has data.partitions = {self.data.partitions}; "
                            "a facility's partition must be below it")
        if fed.fragments > self.train.local_steps:
            problems.append(f"federation.fragments: {fed.fragments} fragments need at least as many local steps "
                            f"(train.local_steps = {self.train.local_steps}): each is exchanged at its own step")
        elif fed.overlap_steps > (lag := longest_lag(self.train.local_steps, fed.fragments)):
            problems.append(f"federation.overlap_steps: {fed.overlap_steps} steps in flight, but sync points come "
                            f"every {lag} steps (train.local_steps = {self.train.local_steps}, "
                            f"federation.fragments = {fed.fragments}): one exchange must land before the next "
                            "is posted")
        if self.train.optimizer != "adamw" and any(f.engine == "deepspeed" for f in self.facility):
            problems.append(f"train.optimizer: {self.train.optimizer} runs on the replica and fsdp engines; the "
                            "deepspeed engine runs AdamW (or its deepspeed.config's optimizer)")
        if self.federation.min_facilities > len(self.facility):
            problems.append(f"federation.min_facilities: {self.federation.min_facilities} is more than the "
                            f"{len(self.facility)} facilities listed")
        if problems:
            raise ConfigError("; ".join(problems))

    def partition_of(self, index: int) -> int:
        """The data partition of the facility listed at `index`."""
        return self.facility[index].partition if self.facility[index].partition >= 0 else index

    @property
    def total_ranks(self) -> int:
        return sum(f.ranks for f in self.facility)

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics.file) if self.metrics.file else Path(self.checkpoint.dir) / "metrics.jsonl"
