"""`mpifed plan`: what a run configuration will need, worked out before asking for an allocation and
without allocating the model (its layout comes from a build on the meta device).

Per facility and engine it gives the bytes one rank holds (weights, gradients, optimizer state,
mpifed's own buffers), its peak at start, in training, at a checkpoint and at a resume, the bytes a
round moves inside the facility and between sites and the time the latter take at a given bandwidth,
whether the ranks fit the site profile's memory, and the disk its checkpoints take at each site. The
figures for the busiest rank (a root) are what benchmarks/memory.py measures; the rules follow what the engines and mpifed allocate:

  weights, gradients   replica and ZeRO-1 whole (ZeRO-2: gradients 1/n), fsdp and ZeRO-3 1/n; DeepSpeed
                       adds its fp32 master copy of 1/n
  optimizer            AdamW's two moments (SGD's momentum, or nothing), 1/n of the model (replica: all)
  transient            fsdp gathers one unit (a decoder layer, or the rest of the model: embeddings
                       and the head) with its gradients and its reduce-scatter's input; DeepSpeed its
                       reduction bucket and (ZeRO-3) its live parameters with their gradients and its
                       prefetch bucket, kept from the first step on; activations of one micro-batch
  mpifed               on a root its segment of the global model, the outer state, the update and
                       receive buffers and the error feedback; with overlap the anchors of what a rank
                       owns and what it has in flight; buckets
  checkpoint, resume   one bucket more on the writer, and a copy of the rank's own optimizer state
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mpifed import configfile
from mpifed.config import ConfigError, FacilityConfig, RunConfig
from mpifed.deploy import sites
from mpifed.federation.compress import RESIDUALS, make_codec
from mpifed.federation.outer import OUTER
from mpifed.layout import FlatLayout
from mpifed.preflight import RUNTIME_GB, this_machine

GB = 1e9


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds, by what for, and its peaks."""

    weights: float
    gradients: float
    optimizer: float
    mpifed: float
    transient: float
    runtime: float
    start: float
    train: float
    checkpoint: float
    resume: float

    @property
    def peak(self) -> float:
        return max(self.start, self.train, self.checkpoint, self.resume)


@dataclass(frozen=True)
class FacilityPlan:
    """One facility's plan: its busiest rank (a root), what a round moves, and whether it fits."""

    facility: FacilityConfig
    params: int
    rank: RankMemory
    intra_bytes: float
    """Bytes a round moves inside the facility (gather to the roots and back)."""
    inter_bytes: float
    """Bytes its roots send to other facilities in a round (both phases of the exchange)."""
    inter_s: float
    """Seconds `inter_bytes` take at the bandwidth asked for."""
    device_capacity: float
    """One GPU's memory on GPU sites (what the engine's state must fit in; 0: a CPU site or unknown)."""
    host_capacity: float
    """The node's memory over the ranks it runs (0: unknown)."""
    disk_round: float = 0.0
    """Bytes a checkpointed round writes at the facility's site: its part and, at the hub, the main file."""
    disk_kept: float = 0.0
    """Bytes of the rounds its site keeps at once (checkpoint.keep; 0: every checkpointed round)."""

    @property
    def device_bytes(self) -> float:
        """On a GPU site, what the engine keeps on the device: weights, gradients, optimizer, transient."""
        r = self.rank
        return r.weights + r.gradients + r.optimizer + r.transient if self.device_capacity else 0.0

    @property
    def host_bytes(self) -> float:
        """What the rank keeps in host memory at its peak (all of it on a CPU site; mpifed's buffers, the
        runtime and the checkpoint's copies where a GPU holds the engine's state)."""
        return self.rank.peak - self.device_bytes

    def problems(self) -> list[str]:
        """Why the busiest rank does not fit its site ([] if it does)."""
        out = []
        if self.device_capacity and self.device_bytes > self.device_capacity:
            out.append(f"a rank's engine state needs {self.device_bytes / GB:.1f} GB, more than the "
                       f"{self.device_capacity / GB:.1f} GB of a GPU")
        if self.host_capacity and self.host_bytes > self.host_capacity:
            out.append(f"a rank needs {self.host_bytes / GB:.1f} GB of host memory, more than the "
                       f"{self.host_capacity / GB:.1f} GB it has of a node")
        return out


def _units(layout: FlatLayout) -> int:
    """Values of the largest unit fsdp and ZeRO-3 gather at once: a decoder layer or the rest."""
    layers: dict[str, int] = {}
    for slot in layout.slots:
        parts = slot.name.split(".")
        key = ".".join(parts[:parts.index("layers") + 2]) if "layers" in parts else "rest"
        layers[key] = layers.get(key, 0) + slot.numel
    return max(layers.values(), default=0)


def _activations(cfg: RunConfig, fac: FacilityConfig, hidden: int, layers: int, vocab: int, seq_len: int) -> float:
    """Bytes of one micro-batch's activations kept for the backward pass at facility `fac` (fp32; a rough
    count of a LLaMA block's tensors, with the logits and their gradient). The fsdp engine's activation
    checkpointing keeps none of a block's."""
    tokens = cfg.train.micro_batch * seq_len
    per_layer = 0 if fac.engine == "fsdp" and fac.fsdp.activation_checkpointing else 18 * hidden
    return 4.0 * tokens * (layers * per_layer + 3 * vocab)


def plan_facility(cfg: RunConfig, index: int, layout: FlatLayout, shape: tuple[int, int, int, int],
                  bandwidth_bps: float) -> FacilityPlan:
    """The plan of facility `index`; `shape` is (hidden size, layers, vocabulary, sequence length)."""
    fac, fed = cfg.facility[index], cfg.federation
    n, p, roots, f_count = fac.ranks, layout.numel, fed.roots, len(cfg.facility)
    engine = fac.engine if fac.engine != "deepspeed" else f"zero{fac.deepspeed.zero_stage}"
    whole, share = 4.0 * p, 4.0 * p / n
    weights = {"replica": whole, "fsdp": share, "zero1": whole + share, "zero2": whole + share,
               "zero3": 2 * share}[engine]
    gradients = {"replica": whole, "fsdp": share, "zero1": whole, "zero2": share, "zero3": share}[engine]
    optimizer = cfg.train.state_arrays * (whole if engine == "replica" else share)
    unit = 4.0 * _units(layout)
    # fsdp gathers a unit's parameters and makes their gradients and the reduce-scatter's input
    transient = (3 * unit if engine == "fsdp" else 0.0) + _activations(cfg, fac, *shape)
    # DeepSpeed makes its buffers at the first step and keeps them: a checkpoint comes on top of them
    kept = _deepspeed_buffers(fac, p) if fac.engine == "deepspeed" else 0.0
    transient += kept
    segment = whole / roots
    codec = make_codec(fed.compress, fed.topk_fraction)
    payload = segment if codec is None else codec.payload_bytes(p // roots)
    bucket = 4.0 * fed.bucket_values
    delayed = fed.overlap == "delayed"
    # held throughout: a root's segment of θ with the outer state, the codec's error feedback; with
    # overlap every rank's anchors and what it has in flight of its owned ranges, and a root's buffer of
    # what was learned meanwhile. One exchange's buffers (the update, the receive buffer where it sends
    # anything, a bucket) are held only while it runs, unless it runs in the background
    sends = codec is not None or f_count > 1
    exchange = segment + (payload if sends else 0) + bucket
    resident = segment * (1 + len(OUTER[fed.outer].state)) + (2 * segment if codec is not None else 0) \
        + (2 * share + segment + exchange if delayed else 0)
    mpifed = resident + (0 if delayed else exchange)
    held = weights + gradients + optimizer + resident
    holds = whole if engine in ("replica", "zero1", "zero2") else share  # what a rank holds of the model
    # ZeRO 1/2 build the whole model before DeepSpeed takes its share; fsdp and replica build it empty;
    # ZeRO-3 builds it partitioned (zero.Init), and its initialize makes the optimizer's state and a
    # second copy of the rank's partitions (it defragments them); it reserves its reduction bucket then
    # too, but fills it only from the first step on
    made = {"zero1": whole, "zero2": whole, "zero3": optimizer + share}.get(engine, 0.0)
    start = RUNTIME_GB * GB + made + weights + gradients + (share if delayed else 0) + segment + bucket
    train = RUNTIME_GB * GB + held + max(transient, 0 if delayed else exchange)
    # an engine hands its optimizer state over as arrays of what it holds, then of what it owns
    checkpoint = RUNTIME_GB * GB + held + kept + 2 * (holds + share) + 2 * bucket
    resume = RUNTIME_GB * GB + held + 2 * holds + 2 * bucket
    rank = RankMemory(weights, gradients, optimizer, mpifed, transient, RUNTIME_GB * GB, start, train, checkpoint,
                      resume)
    intra = (whole - share) if engine in ("replica", "zero1", "zero2") else 0.0
    intra += segment * (n - 1) / n * roots if engine in ("fsdp", "zero3") else 0.0
    inter = 2.0 * (f_count - 1) / f_count * payload * roots if f_count > 1 else 0.0
    disk_round, disk_kept = _disk(cfg, index, p, codec is not None, delayed)
    return FacilityPlan(fac, p, rank, intra, inter, inter * 8 / bandwidth_bps if bandwidth_bps else 0.0,
                        *_capacity(fac), disk_round, disk_kept)


KINDS = ("engine", "roots", "checkpointing", "micro_batch", "ranks")
"""The kinds of change `fixes` tries, in the order it combines them."""


def _candidates(cfg: RunConfig, index: int) -> dict[str, list[tuple[str, ...]]]:
    """Kind (of KINDS) -> the changes of that kind that lower what a rank of facility `index` needs, each
    a tuple of settings (as `--set` writes them), from the least change to the most; a kind that does
    not apply to this configuration is absent."""
    fac, fed = cfg.facility[index], cfg.federation
    at = f"facility.{fac.name}"
    kinds: dict[str, list[tuple[str, ...]]] = {}
    if fac.engine == "replica":
        kinds["engine"] = [(f"{at}.engine=fsdp",)]
    elif fac.engine == "deepspeed" and fac.deepspeed.zero_stage < 3:
        kinds["engine"] = [(f"{at}.deepspeed.zero_stage=3",)]
    # more roots: each holds a smaller segment of the global model with its outer state and codec buffers
    kinds["roots"] = [(f"federation.roots={r}",) for r in range(fed.roots + 1, min(f.ranks for f in cfg.facility) + 1)]
    if fac.engine == "fsdp" and not fac.fsdp.activation_checkpointing:
        kinds["checkpointing"] = [(f"{at}.fsdp.activation_checkpointing=true",)]
    mb, accum = cfg.train.micro_batch, cfg.train.grad_accum  # the same tokens per step, fewer at once
    kinds["micro_batch"] = [(f"train.micro_batch={mb // k}", f"train.grad_accum={accum * k}") for k in (2, 4, 8, 16)
                            if mb % k == 0]
    if fac.engine != "replica":
        kinds["ranks"] = [(f"{at}.ranks={fac.ranks * k}",) for k in (2, 4, 8)]
    return kinds


def _replanned(cfg: RunConfig, sets: tuple[str, ...], index: int, layout: FlatLayout,
               shape: tuple[int, int, int, int]) -> tuple[RunConfig, FacilityPlan] | None:
    try:
        changed = configfile.with_sets(cfg, list(sets))
    except ConfigError:
        return None  # e.g. more roots than a facility has ranks
    return changed, plan_facility(changed, index, layout, shape, 0.0)


def _peak(plan: FacilityPlan) -> str:
    """A fitting plan's peak a rank, against what its site gives."""
    host = f"{plan.host_bytes / GB:.1f} of {plan.host_capacity / GB:.1f} GB host memory"
    if plan.device_capacity:
        return f"peak a rank {plan.device_bytes / GB:.1f} of {plan.device_capacity / GB:.1f} GB on its GPU, {host}"
    return f"peak a rank {host}"


def fixes(cfg: RunConfig, index: int, layout: FlatLayout, shape: tuple[int, int, int, int]) -> list[str]:
    """For facility `index` when its ranks do not fit their site: each change of settings that alone
    makes them fit, as `--set` writes it with the peak it gives (re-planned, not guessed). Where none
    does alone, one combination: kind after kind, the least change of each that fits, else the one
    that lowers the peak most, until it fits. [] if not even that fits."""
    out = []
    for kind in _candidates(cfg, index).values():
        for sets in kind:
            replanned = _replanned(cfg, sets, index, layout, shape)
            if replanned and not replanned[1].problems():
                out.append(f"{' and '.join(sets)} ({_peak(replanned[1])})")
                break
    if out:
        return out
    chosen: list[str] = []
    current, peak = cfg, plan_facility(cfg, index, layout, shape, 0.0).rank.peak
    for name in KINDS:  # each kind asked of the configuration as changed so far (a new engine brings new kinds)
        tried = [(sets, r) for sets in _candidates(current, index).get(name, [])
                 if (r := _replanned(current, sets, index, layout, shape))]
        fitting = [(sets, r) for sets, r in tried if not r[1].problems()]
        sets, (changed, plan) = fitting[0] if fitting else min(tried, key=lambda t: t[1][1].rank.peak,
                                                               default=((), (current, None)))
        if plan is None or (not fitting and plan.rank.peak >= peak):
            continue  # nothing of this kind lowers the peak: leave it as it is
        chosen += sets
        current, peak = changed, plan.rank.peak
        if fitting:
            return [f"all of {', '.join(chosen)} ({_peak(plan)})"]
    return []


def checkpointed_rounds(cfg: RunConfig) -> int:
    """How many rounds a run writes a checkpoint of: every checkpoint.every-th, and the last."""
    rounds, every = cfg.federation.rounds, cfg.checkpoint.every
    return len({r for r in range(1, rounds + 1) if r % every == 0} | {rounds})


def _disk(cfg: RunConfig, index: int, p: int, compressed: bool, delayed: bool) -> tuple[float, float]:
    """(bytes a checkpointed round writes at facility `index`'s site, bytes its site keeps at once). A
    facility's part holds, over the whole layout, the inner optimizer's state arrays, its local model
    where it may differ from the global one (fragments, overlap) and the codec's RESIDUALS; the
    hub's site also holds the main file (or its segments): the model and the outer state. A site of
    parts alone keeps one part more than checkpoint.keep (its newest main file may be unpublished)."""
    fed = cfg.federation
    arrays = cfg.train.state_arrays + (1 if fed.fragments > 1 or delayed else 0) \
        + (len(RESIDUALS) if compressed else 0)
    part = 4.0 * p * arrays
    main = 4.0 * p * (1 + len(OUTER[fed.outer].state)) if index == 0 else 0.0
    written = checkpointed_rounds(cfg)
    kept = min(written, cfg.checkpoint.keep + (index > 0)) if cfg.checkpoint.keep else written
    return part + main, (part + main) * kept


def disk_problems(cfg: RunConfig, plans: list[FacilityPlan], free: float) -> list[str]:
    """Facilities whose kept rounds would not fit in the `free` bytes of checkpoint.dir (on this machine),
    each with the checkpoint.keep that fits, or the fix when not even one round does."""
    out = []
    for plan in plans:
        if plan.disk_kept <= free:
            continue
        # a site of parts alone keeps one part more than checkpoint.keep
        keep = int(free // plan.disk_round) - (plan.facility is not cfg.facility[0]) if plan.disk_round else 0
        fix = (f"set checkpoint.keep = {keep} or less" if keep >= 1
               else "make room, or give it a checkpoint.dir on a larger filesystem (the rounds it must keep do "
                    "not fit)")
        out.append(f"facility {plan.facility.name}: its site keeps {_size(plan.disk_kept)} of checkpoints "
                   f"({_size(plan.disk_round)} a round), and checkpoint.dir {cfg.checkpoint.dir} has "
                   f"{_size(free)} free here: {fix}")
    return out


DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
                      "stage3_prefetch_bucket_size": 5e7}
"""DeepSpeed's own defaults for the zero_optimization keys that size its buffers (values, not bytes)."""


def _deepspeed_buffers(fac: FacilityConfig, p: int) -> float:
    """Bytes of DeepSpeed's own working buffers on a rank: its gradient reduction bucket and, with ZeRO-3,
    the parameters it keeps gathered (up to stage3_max_live_parameters) with their gradients and its
    prefetch bucket; the sizes from the facility's DeepSpeed JSON where it sets them (checked against
    benchmarks/memory.py's measurement, where a checkpoint's peak shows that they stay allocated)."""
    keys = dict(DEEPSPEED_DEFAULTS)
    if fac.deepspeed.config:
        try:
            zero = json.loads(Path(fac.deepspeed.config).read_text()).get("zero_optimization", {})
            keys.update({k: float(zero[k]) for k in keys if k in zero})
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # preflight names an unreadable JSON; the plan keeps the defaults
    buffers = 4.0 * min(p, keys["reduce_bucket_size"])
    if fac.deepspeed.zero_stage == 3:
        buffers += 2 * 4.0 * min(p, keys["stage3_max_live_parameters"]) + 4.0 * min(p, keys["stage3_prefetch_bucket_size"])
    return buffers


def _capacity(fac: FacilityConfig) -> tuple[float, float]:
    """(one GPU's memory on GPU sites, else 0; the node's memory over the ranks it runs, 0 if unknown)."""
    site = sites.get(fac.site)
    gpu = site.accelerator != "cpu"
    device = site.scheduler.gpu_memory_gb * GB if gpu else 0.0
    memory = site.scheduler.memory_gb * GB or this_machine()
    per_node = min(fac.ranks, site.scheduler.ranks_per_node) if gpu or site.scheduler.memory_gb else fac.ranks
    return device, memory / max(1, per_node)


def render(plans: list[FacilityPlan], bandwidth: str, advice: dict[int, list[str]] | None = None) -> str:
    """The plan as a table, one facility a block, with a line per problem found and, from `advice`
    (facility index -> `fixes`), the settings that would fix it."""
    out = []
    for index, plan in enumerate(plans):
        r, fac = plan.rank, plan.facility
        label = fac.engine if fac.engine != "deepspeed" else f"deepspeed ZeRO-{fac.deepspeed.zero_stage}"
        out.append(f"facility {fac.name}: {fac.ranks} ranks x {label} on site {fac.site}, "
                   f"{plan.params / 1e6:,.1f}M parameters")
        out.append(f"  per rank (a root)  weights {r.weights / GB:7.2f} GB  gradients {r.gradients / GB:7.2f} GB  "
                   f"optimizer {r.optimizer / GB:7.2f} GB  mpifed {r.mpifed / GB:6.2f} GB  transient "
                   f"{r.transient / GB:6.2f} GB  runtime {r.runtime / GB:.2f} GB")
        out.append(f"  peak per rank      start {r.start / GB:7.2f} GB  train {r.train / GB:7.2f} GB  checkpoint "
                   f"{r.checkpoint / GB:7.2f} GB  resume {r.resume / GB:7.2f} GB  -> {r.peak / GB:.2f} GB")
        if plan.device_capacity:
            out.append(f"  of which           {plan.device_bytes / GB:.2f} GB on its GPU "
                       f"(of {plan.device_capacity / GB:.1f} GB), {plan.host_bytes / GB:.2f} GB in host memory "
                       f"(of {plan.host_capacity / GB:.1f} GB)")
        out.append(f"  checkpoints        {_size(plan.disk_round)} a round at its site"
                   + (" (its part and the main file)" if plan.facility is plans[0].facility else " (its part)")
                   + f", {_size(plan.disk_kept)} for the rounds it keeps")
        out.append(f"  a round moves      {plan.intra_bytes / 1e6:,.1f} MB inside the facility, "
                   f"{plan.inter_bytes / 1e6:,.1f} MB to other sites"
                   + (f" ({plan.inter_s:,.1f} s at {bandwidth})" if plan.inter_s else ""))
        for problem in plan.problems():
            out.append(f"  warning: {problem} (site {fac.site})")
        if plan.problems():
            found = (advice or {}).get(index, [])
            if found and found[0].startswith("all of "):
                out.append(f"  fits with {found[0]}")
            elif found:
                out += [f"  fits with any one of  {fix}" if i == 0 else f"                        {fix}"
                        for i, fix in enumerate(found)]
            else:
                out.append("  no change of engine, roots, activation checkpointing, micro-batch or ranks makes it "
                           "fit: choose a smaller model or a site with more memory")
    return "\n".join(out)


def _size(n: float) -> str:
    """Bytes as people read them: 812.4 kB, 58.0 GB."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:,.1f} {unit}"
    return f"{n:,.0f} bytes"


def parse_bandwidth(text: str) -> float:
    """'10gbit', '100mbit', '1.5gbps' -> bits per second; ValueError for anything else."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
    text = text.strip().lower()
    for unit, factor in units.items():
        if text.endswith(unit):
            value = float(text[:-len(unit)])
            if value > 0 and math.isfinite(value):
                return value * factor
    raise ValueError(f"{text!r}: give a rate such as 100mbit or 10gbit")
