"""The round loop: H inner steps in every facility, the federated reduction, validation of the new global
model, its checkpoint, and the metrics line. `Trainer` owns the engine, data, outer optimizer and
metrics of one rank; it receives its communicators in a `Topology`.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch
from mpi4py import MPI

from mpifed import checkpoint, data, state, wire
from mpifed.config import RunConfig
from mpifed.engines import FlatLayout, make_engine
from mpifed.federation.reduce import Federation, FederationError, RoundExchange, sampled
from mpifed.metrics import MetricsLog, RoundMetrics
from mpifed.model import build_model
from mpifed.topology import Topology, local_ranks_on_node, start_process_group, stop_process_group
from mpifed.watchdog import deadline


def _broadcast_tokens(world: MPI.Intracomm) -> np.ndarray:
    """The embedded corpus, built (or read from cache) once by world rank 0 and sent to every rank, so
    that all facilities train on exactly the same text."""
    return wire.bcast_array(world, data.stdlib_tokens() if world.rank == 0 else None, np.uint8)


class Trainer:
    def __init__(self, cfg: RunConfig, topo: Topology, resume: str = "") -> None:
        """Build everything for one rank; `resume` is "", "auto" or a checkpoint file or folder."""
        self.cfg, self.topo = cfg, topo
        threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // local_ranks_on_node(topo.world))
        torch.set_num_threads(threads)
        start_process_group(topo.facility, "gloo", cfg.federation.timeout_s)

        self._load_data()
        model = build_model(cfg.model.preset, cfg.data.seq_len, cfg.train.seed)
        self.layout = FlatLayout.of(model)
        self._check_same_layout()
        self._start_from_rank_zero(model)  # before any engine shards the model
        self.engine = make_engine(cfg.facility[topo.facility_index].engine, model, lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
        self.federation = Federation(topo, cfg.federation, self.layout.numel, self.engine.owned(), self.engine.held())
        self.tokens_total = 0
        self.resumed_from = self._resume(resume) if resume else None
        self.start_round = self.resumed_from.round + 1 if self.resumed_from else 1
        self.log = MetricsLog(cfg.metrics_path, after_round=self.start_round - 1) if topo.is_global_root else None

    def _load_data(self) -> None:
        """This rank's sampler over its facility's partition, and the shared validation set."""
        cfg, topo = self.cfg, self.topo
        split = data.split(data.pack(_broadcast_tokens(topo.world), cfg.data.seq_len), topo.n_facilities,
                           cfg.data.val_fraction, cfg.train.seed)
        self.sampler = data.Sampler(split.partitions[topo.facility_index], topo.facility.rank, topo.facility.size,
                                    cfg.train.micro_batch, seed=(cfg.train.seed, topo.facility_index, topo.facility.rank))
        self.validation = split.validation[:cfg.data.val_sequences]

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

    @torch.no_grad()
    def _start_from_rank_zero(self, model: torch.nn.Module) -> None:
        """The global model starts as world rank 0's initialisation, on every rank (whole, unsharded)."""
        params = dict(model.named_parameters())
        initial = np.empty(self.layout.numel, dtype=np.float32)
        views = self.layout.unflatten(initial)
        if self.topo.world.rank == 0:
            for name, values in views.items():
                values[...] = params[name].numpy()
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
        facilities = ", ".join(f"{f.name} ({f.ranks} x {f.engine})" for f in cfg.facility)
        print(f"mpifed: {topo.n_facilities} facilities: {facilities}; model {cfg.model.preset} "
              f"({self.layout.numel / 1e6:.2f}M parameters); {cfg.federation.rounds} rounds x "
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

    def _inner(self) -> tuple[float, int]:
        """H local steps; (sum of facility-mean step losses, tokens this rank trained)."""
        loss_sum, tokens = 0.0, 0
        for _ in range(self.cfg.train.local_steps):
            batch = torch.from_numpy(self.sampler.next_batch())
            loss_sum += self.engine.train_step(batch)
            tokens += batch.numel()
        return loss_sum, tokens

    @torch.no_grad()
    def _validate(self) -> float:
        """Mean loss of the global model on the validation set: facility f scores every F-th sequence,
        all its ranks in lockstep (a sharded model's forward needs all of them), its leader counts."""
        model = self.engine.model()
        model.eval()
        rows = self.validation[self.topo.facility_index::self.topo.n_facilities]
        total = sum(float(model(input_ids=torch.from_numpy(rows[i:i + 8]), labels=torch.from_numpy(rows[i:i + 8])).loss)
                    * len(rows[i:i + 8]) for i in range(0, len(rows), 8))
        leader = self.topo.facility.rank == 0
        with self.across("validation"):
            total, count = wire.allreduce(self.topo.world, [total if leader else 0.0, len(rows) if leader else 0])
        return float(total / count)

    def round(self, round_: int) -> None:
        """H inner steps, the exchange, validation, checkpoint, metrics."""
        fed = self.cfg.federation
        participate = sampled(self.topo.n_facilities, fed.sample, self.cfg.train.seed, round_)[self.topo.facility_index]
        start = time.perf_counter()
        loss_sum, tokens = self._inner() if participate else (0.0, 0)
        inner_s = time.perf_counter() - start
        try:
            exchange = self.federation.round(self.engine.owned(), self.engine.held(), tokens, participate)
        except FederationError as exc:
            raise FederationError(f"round {round_}: {exc}") from None
        if self.topo.is_global_root:
            for reason in exchange.left_out:
                print(f"mpifed: warning: round {round_}: left out {reason}", flush=True)
        summary = self._summarise(loss_sum, exchange, inner_s, time.perf_counter() - start - inner_s)
        val_loss = self._validate()
        self.tokens_total += summary["tokens"]
        ckpt_s, publish = 0.0, None
        if round_ % self.cfg.checkpoint.every == 0 or round_ == self.cfg.federation.rounds:
            t0 = time.perf_counter()
            publish = state.save(self, round_)
            ckpt_s = time.perf_counter() - t0
        if self.log is not None:
            metrics = RoundMetrics(round=round_, val_loss=val_loss, tokens_total=self.tokens_total, ckpt_s=ckpt_s,
                                   wall_s=time.perf_counter() - start, **summary)
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

    def model_digest(self) -> str:
        """sha256 of this rank's model parameters as the engine holds them (for consistency checks)."""
        digest = hashlib.sha256()
        for _, tensor in self.engine.model().named_parameters():
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        stop_process_group()
