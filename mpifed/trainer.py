"""The round loop: H inner steps in every facility, the federated reduction, validation of the new global
model, its checkpoint, and the metrics line. `Trainer` owns the engine, data, outer optimizer and
metrics of one rank; it receives its communicators in a `Topology`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time

import numpy as np
import torch
from mpi4py import MPI

from mpifed import checkpoint, data, state, wire
from mpifed.config import RunConfig, TrainConfig
from mpifed.configfile import to_dict
from mpifed.engines import EngineSettings, FlatLayout, make_engine
from mpifed.federation.reduce import Federation, FederationError, RoundExchange, sampled
from mpifed.metrics import MetricsLog, RoundMetrics
from mpifed.model import ModelError, apply_lora, base_digest, build_model
from mpifed.topology import Topology, local_ranks_on_node, start_process_group, stop_process_group
from mpifed.watchdog import deadline


def inner_lr(train: TrainConfig, step: int, total_steps: int, ranks: int = 1) -> float:
    """The inner learning rate at 0-based global inner step `step` of `total_steps`: linear warmup,
    then constant or cosine decay to train.min_lr; times the facility's ranks with train.scale_lr."""
    peak = train.lr * (ranks if train.scale_lr else 1)
    floor = train.min_lr * (ranks if train.scale_lr else 1)
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return peak
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps - 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def uses_gpu(wanted: str) -> bool:
    """train.device: whether this rank trains on a GPU (torch.cuda covers CUDA and ROCm)."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = cuda, but torch sees no GPU on this node (a CPU-only torch build, or "
                           "no GPUs allocated to the job)")
    return wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())


def choose_device(gpu: bool, local_rank: int) -> torch.device:
    """The CPU, or the GPU of this node that the local rank picks (made the current one)."""
    if not gpu:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _broadcast_tokens(world: MPI.Intracomm) -> np.ndarray:
    """The embedded corpus, built (or read from cache) once by world rank 0 and sent to every rank, so
    that all facilities train on exactly the same text."""
    return wire.bcast_array(world, data.stdlib_tokens() if world.rank == 0 else None, np.uint8)


def model_for(cfg: RunConfig, prepared: "data.Prepared | None", weights: bool = True) -> torch.nn.Module:
    """The model for the data: a preset sized to its vocabulary and sequence length, or the model
    folder (checked to cover the vocabulary); with lora.rank, the adapters on top. `weights=False`
    builds the same architecture without reading a model folder's weights (for its layout)."""
    seq_len = prepared.seq_len if prepared else cfg.data.seq_len
    vocab = prepared.vocab_size if prepared else data.VOCAB_SIZE
    model_cfg = cfg.model if weights or not cfg.model.path else dataclasses.replace(cfg.model, reinit=True)
    model = build_model(model_cfg, seq_len, cfg.train.seed, vocab_size=vocab)
    if model.config.vocab_size < vocab:
        raise ModelError(f"model.path {cfg.model.path}: its vocabulary of {model.config.vocab_size} tokens is smaller "
                         f"than the {vocab} of data.path {cfg.data.path}; prepare the data with the model's tokenizer")
    return apply_lora(model, cfg.lora, cfg.train.seed) if cfg.lora.rank else model


def planned_layout(cfg: RunConfig) -> FlatLayout:
    """The flat layout a run of `cfg` will exchange, from a model built on the meta device (no memory,
    no weights read): what separately launched facilities compare before they join."""
    with torch.device("meta"):
        return FlatLayout.of(model_for(cfg, data.Prepared(cfg.data.path) if cfg.data.path else None, weights=False))


class Trainer:
    def __init__(self, cfg: RunConfig, topo: Topology, resume: str = "") -> None:
        """Build everything for one rank; `resume` is "", "auto" or a checkpoint file or folder."""
        self.cfg, self.topo = cfg, topo
        threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // local_ranks_on_node(topo.world))
        torch.set_num_threads(threads)
        facility = cfg.facility[topo.facility_index]
        gpu = uses_gpu(cfg.train.device)
        if facility.engine == "deepspeed" and not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
        local_rank = start_process_group(topo.facility, "nccl" if gpu else "gloo", cfg.federation.timeout_s)
        self.device = choose_device(gpu, local_rank)

        self._load_data()
        model = model_for(cfg, self.prepared)
        self.model_config = model.config
        self.layout = FlatLayout.of(model)
        self._check_same_layout()
        self.base_digest = self._check_same_base(model) if cfg.lora.rank else ""
        self._start_from_rank_zero(model)  # before any engine shards the model
        settings = EngineSettings(device=self.device, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                                  grad_accum=cfg.train.grad_accum, fsdp=facility.fsdp, deepspeed=facility.deepspeed)
        self.engine = make_engine(facility.engine, model, settings, cfg.train.micro_batch)
        self.federation = Federation(topo, cfg.federation, self.layout.numel, self.engine.owned(), self.engine.held())
        self.tokens_total = 0
        self.resumed_from = self._resume(resume) if resume else None
        self.start_round = self.resumed_from.round + 1 if self.resumed_from else 1
        self.log = MetricsLog(cfg.metrics_path, after_round=self.start_round - 1, tensorboard=cfg.metrics.tensorboard,
                              wandb=cfg.metrics.wandb, run_config=to_dict(cfg)) if topo.is_global_root else None

    def _load_data(self) -> None:
        """This rank's sampler over its facility's partition, and the shared validation set: from the
        prepared folder data.path (memory-mapped), or else the embedded text."""
        cfg, topo = self.cfg, self.topo
        self.prepared = data.Prepared(cfg.data.path) if cfg.data.path else None
        if self.prepared is not None:
            partition = self.prepared.partition(cfg.partition_of(topo.facility_index))
            self.validation = self.prepared.validation(cfg.data.val_sequences)
        else:
            split = data.split(data.pack(_broadcast_tokens(topo.world), cfg.data.seq_len), topo.n_facilities,
                               cfg.data.val_fraction, cfg.train.seed)
            partition = split.partitions[topo.facility_index]
            rows = split.validation[:cfg.data.val_sequences]
            self.validation = (rows, rows)
        self.sampler = data.Sampler(partition, topo.facility.rank, topo.facility.size, cfg.train.micro_batch,
                                    seed=(cfg.train.seed, topo.facility_index, topo.facility.rank))

    def _resume(self, target: str) -> "checkpoint.Summary | None":
        """Restore every rank from the checkpoint `target` names ("auto" means the output folder)."""
        summary = state.choose(self.topo.world, target)
        if summary is not None:
            state.restore(self, summary)
        elif self.topo.is_global_root:
            print(f"mpifed: --resume {target}: no checkpoint found; starting from round 1", flush=True)
        return summary

    def _check_same_layout(self) -> None:
        """Refuse to exchange anything between ranks whose models differ in names, shapes or dtypes."""
        prints = wire.allgather_str(self.topo.world, self.layout.fingerprint)
        names = [name for name, size in zip(self.topo.facility_names, self.topo.facility_sizes) for _ in range(size)]
        differing = sorted({name for name, fingerprint in zip(names, prints) if fingerprint != prints[0]})
        if differing:
            raise RuntimeError(f"facilities {', '.join(differing)} built a model whose layout fingerprint differs "
                               f"from {names[0]}'s; every facility must train the same architecture")

    def _check_same_base(self, model: torch.nn.Module) -> str:
        """Under LoRA only the adapters are exchanged: refuse to train if any rank's frozen base differs.
        Returns the base's digest (kept in checkpoints)."""
        digests = wire.allgather_str(self.topo.world, base_digest(model))
        if len(set(digests)) > 1:
            raise ModelError("the frozen base model differs between ranks (a different model.path copy or "
                               "build): LoRA needs the same base everywhere")
        return digests[0]

    @torch.no_grad()
    def _start_from_rank_zero(self, model: torch.nn.Module) -> None:
        """The global model starts as world rank 0's initialisation, on every rank (whole, unsharded)."""
        params = dict(model.named_parameters())
        initial = np.empty(self.layout.numel, dtype=np.float32)
        views = self.layout.unflatten(initial)
        if self.topo.world.rank == 0:
            for name, values in views.items():
                values[...] = params[name].float().numpy()
        with self.across("sending the initial model"):
            self.topo.world.Bcast(initial, root=0)
        for name, values in views.items():
            params[name].copy_(torch.from_numpy(values))

    def across(self, what: str):
        return deadline(self.topo.world, self.cfg.federation.timeout_s, what)

    def announce(self) -> None:
        if not self.topo.is_global_root:
            return
        cfg, topo = self.cfg, self.topo
        facilities = ", ".join(f"{f.name} ({f.ranks} x {_engine_label(f)})" for f in cfg.facility)
        size = (f"LoRA r={cfg.lora.rank}: {self.layout.numel:,} adapter parameters train and cross facilities"
                if cfg.lora.rank else f"{self.layout.numel / 1e6:.2f}M parameters")
        source = (f"{self.prepared.kind} data {cfg.data.path} ({self.prepared.manifest['total_tokens']:,} tokens)"
                  if self.prepared else "the embedded text")
        print(f"mpifed: {topo.n_facilities} facilities: {facilities}; model {cfg.model.path or cfg.model.preset} "
              f"({size}); {source}; {cfg.federation.rounds} rounds x "
              f"{cfg.train.local_steps} local steps; outer {cfg.federation.outer}; "
              f"checkpoints in {cfg.checkpoint.dir}", flush=True)
        if self.resumed_from is not None:
            print(f"mpifed: resuming from {self.resumed_from.path} (round {self.resumed_from.round}, "
                  f"{self.resumed_from.tokens:,} tokens)", flush=True)

    def run(self) -> None:
        self.announce()
        for round_ in range(self.start_round, self.cfg.federation.rounds + 1):
            self.round(round_)
        if self.topo.is_global_root:
            print(f"mpifed: done; checkpoints in {self.cfg.checkpoint.dir}, metrics in {self.cfg.metrics_path}",
                  flush=True)

    def _inner(self, round_: int) -> tuple[float, int]:
        """H local steps; (sum of facility-mean step losses, tokens this rank trained)."""
        train = self.cfg.train
        if train.inner_state == "reset":
            self.engine.reset_optimizer()
        loss_sum, tokens = 0.0, 0
        total = self.cfg.federation.rounds * train.local_steps
        for k in range(train.local_steps):
            batches = [_tensors(self.sampler.next_batch()) for _ in range(train.grad_accum)]
            lr = inner_lr(train, (round_ - 1) * train.local_steps + k, total, self.topo.facility.size)
            loss_sum += self.engine.train_step(batches, lr)
            tokens += sum(ids.numel() for ids, _ in batches)
        return loss_sum, tokens

    def _score(self, rows: slice) -> tuple[float, int]:
        """(Sum of the mean losses of validation `rows` in batches of 8, each weighted by its size; rows
        scored). All ranks of the facility in lockstep: a sharded model's forward needs all of them."""
        ids, labels = (part[rows] for part in self.validation)
        total = sum(self.engine.loss(_tensors((ids[i:i + 8], labels[i:i + 8]))) * len(ids[i:i + 8])
                    for i in range(0, len(ids), 8))
        return total, len(ids)

    def _validate(self) -> float:
        """Mean loss of the global model on the validation set: facility f scores every F-th sequence,
        its leader counts."""
        total, rows = self._score(slice(self.topo.facility_index, None, self.topo.n_facilities))
        leader = self.topo.facility.rank == 0
        with self.across("validation"):
            total, count = wire.allreduce(self.topo.world, [total if leader else 0.0, rows if leader else 0])
        return float(total / count)

    def _validate_facilities(self) -> dict[str, float]:
        """Every facility's local model (before the exchange) on the whole validation set."""
        total, rows = self._score(slice(None))
        mine = total / rows
        losses = np.zeros(self.topo.n_facilities)
        if self.topo.facility.rank == 0:
            losses[self.topo.facility_index] = mine
        with self.across("validation of the facilities' models"):
            self.topo.world.Allreduce(MPI.IN_PLACE, losses)
        return dict(zip(self.topo.facility_names, map(float, losses)))

    def round(self, round_: int) -> None:
        """H inner steps, the exchange, validation, checkpoint, metrics."""
        fed = self.cfg.federation
        participate = sampled(self.topo.n_facilities, fed.sample, self.cfg.train.seed, round_)[self.topo.facility_index]
        evaluate = round_ % self.cfg.eval.every == 0 or round_ == fed.rounds
        start = time.perf_counter()
        loss_sum, tokens = self._inner(round_) if participate else (0.0, 0)
        inner_s = time.perf_counter() - start
        local_losses = self._validate_facilities() if evaluate and self.cfg.eval.facilities else {}
        exchange_start = time.perf_counter()
        self.engine.before_exchange()
        try:
            exchange = self.federation.round(self.engine.owned(), self.engine.held(), tokens, participate)
        except FederationError as exc:
            raise FederationError(f"round {round_}: {exc}") from None
        self.engine.after_exchange()
        if self.topo.is_global_root:
            for reason in exchange.left_out:
                print(f"mpifed: warning: round {round_}: left out {reason}", flush=True)
        summary = self._summarise(loss_sum, exchange, inner_s, time.perf_counter() - exchange_start)
        val_loss = self._validate() if evaluate else None
        self.tokens_total += summary["tokens"]
        ckpt_s, publish = 0.0, None
        if round_ % self.cfg.checkpoint.every == 0 or round_ == self.cfg.federation.rounds:
            t0 = time.perf_counter()
            publish = state.save(self, round_)
            ckpt_s = time.perf_counter() - t0
        if self.log is not None:
            metrics = RoundMetrics(round=round_, val_loss=val_loss, tokens_total=self.tokens_total, ckpt_s=ckpt_s,
                                   wall_s=time.perf_counter() - start, facility_val_loss=local_losses, **summary)
            self.log.write(metrics)
            print(metrics.line(self.cfg.federation.rounds), flush=True)
        if publish is not None:  # after the metrics line: a run killed in between resumes before this round
            publish()

    def _summarise(self, loss_sum: float, exchange: RoundExchange, inner_s: float, sync_s: float) -> dict:
        """World-wide sums and extremes of one round (every rank gets them)."""
        leader = self.topo.facility.rank == 0  # leaders speak for their facility's loss and tokens
        facility_tokens = exchange.facility_tokens if leader else 0
        mean_loss = loss_sum / self.cfg.train.local_steps  # 0 where the facility sat this round out
        with self.across("collecting round metrics"):
            weighted_loss, tokens, bytes_inter = wire.allreduce(
                self.topo.world, [mean_loss * facility_tokens, facility_tokens, exchange.bytes_inter])
            # The last rank to arrive waits least: its sync time is the exchange itself; what others
            # spend beyond it is idle time of faster facilities waiting for slower ones.
            slowest_inner, slowest_sync, neg_fastest_sync = wire.allreduce(
                self.topo.world, [inner_s, sync_s, -sync_s], op=MPI.MAX)
        return dict(train_loss=weighted_loss / tokens, tokens=int(tokens), inner_s=slowest_inner,
                    sync_s=-neg_fastest_sync, idle_s=slowest_sync + neg_fastest_sync, bytes_inter=int(bytes_inter))

    def model_flat(self) -> np.ndarray:
        """The facility's whole model as the engine holds it, flat fp32 on every rank (collective over
        the facility: a sharded engine's ranks each contribute their pieces)."""
        self.engine.before_exchange()
        return wire.gather_pieces(self.topo.facility, self.engine.owned(), self.layout.numel)

    def model_digest(self) -> str:
        """sha256 of `model_flat()` (for consistency checks across ranks, facilities and engines)."""
        return hashlib.sha256(self.model_flat().tobytes()).hexdigest()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        stop_process_group()


def _tensors(batch: "data.Batch") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) tensors of a batch (the same tensor twice where the labels are the ids)."""
    ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
    ids_t = torch.from_numpy(ids)
    return ids_t, ids_t if labels is ids else torch.from_numpy(labels)


def _engine_label(facility) -> str:
    if facility.engine == "deepspeed":
        return f"deepspeed ZeRO-{facility.deepspeed.zero_stage}"
    if facility.engine == "fsdp" and facility.fsdp.replicas > 1:
        return f"fsdp ({facility.fsdp.replicas} replicas)"
    return facility.engine
