"""The round loop: H inner steps in every facility, the federated reduction, validation of the new global
model, its checkpoint, and the metrics line. `Trainer` owns the engine, data, federation and metrics of
one rank; it receives its communicators in a `Topology` and hands its state to the checkpoint manager
as explicit parts.
"""
from __future__ import annotations

import os
import signal
import time
from functools import partial
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
from mpi4py import MPI

from mpifed.cadence import fold_steps, sync_offsets
from mpifed.checkpoint.manager import CheckpointManager, Parts, ResumePoint
from mpifed.comm import control, pieces, watchdog
from mpifed.comm.across import spread
from mpifed.comm.arrival import Arrival
from mpifed.comm.seal import CIPHER
from mpifed.comm.topology import Topology, local_ranks_on_node, start_process_group, stop_process_group
from mpifed.comm.watchdog import deadline
from mpifed.config import FacilityConfig, RunConfig
from mpifed.configfile import to_dict
from mpifed.data.corpus import EMBEDDED_LIMIT, Sampler, open_corpus
from mpifed.engines import EngineSettings, make_engine
from mpifed.federation.reduce import Federation, FederationError, RoundExchange, sampled
from mpifed.layout import FlatLayout
from mpifed.logs import LOG
from mpifed.model import InitialModel, ModelError, base_digest, model_for
from mpifed.run import stop
from mpifed.run.memory import Peaks
from mpifed.run.metrics import MetricsLog, RoundMetrics, inner_steps, live_view_wanted
from mpifed.run.elastic import Elastic
from mpifed.run.schedule import inner_lr

if TYPE_CHECKING:
    from mpifed.comm.door import Door


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


def _links(topo: Topology) -> str:
    """What the announcement says of the links between facilities' gateways (none with one facility)."""
    if topo.n_facilities == 1:
        return ""
    return f"links sealed ({CIPHER}); " if topo.token is not None else "links not sealed (no token given); "


class Trainer(Elastic):
    """One rank's part of a federated run: its facility's engine over the facility's process group, its
    sampler over the facility's partition, its share of the federation, and (on the global root) the
    metrics log. `run` trains every round; every method that talks to other ranks is collective."""

    def __init__(self, cfg: RunConfig, topo: Topology, resume: str = "", elastic: bool = False,
                 returning: bool = False) -> None:
        """Build everything for one rank; `resume` is "", "auto" or a checkpoint file or folder. `elastic`:
        the facilities were launched separately, so one may leave while the others go on, and come back
        (`regroup`). `returning`: this facility comes back to a running federation; `topo` is its own
        job alone, and the trainer holds what its own checkpoint part gives (`own`) until it is
        admitted (`train_ahead`, then `regroup` as the newcomer)."""
        self.elastic = elastic
        self.door: "Door | None" = None
        """On the global root, where facilities may come back: the door that admits them
        (mpifed/comm/rejoin.py)."""
        self.admitting = False
        """Whether a facility that came back enters after the round just trained."""
        self.pending_tokens = 0
        """Tokens trained ahead while coming back (`train_ahead`): they count in the first exchange."""
        self.ahead: list[np.ndarray] | None = None
        """While coming back, once it trained ahead: a copy of the held views as kept (the global model it
        left at)."""
        self.memory = Peaks(topo.world.rank)
        with self.memory.phase("start", since_start=True):
            self._build(cfg, topo, returning)
        with self.memory.phase("resume"):
            self.resumed_from = self._resume(resume) if resume and not returning else None
            self.own = self.checkpoints.restore_own_part(self.parts) if returning else None
            """A facility coming back: what it restored from its own part."""
        self.start_round = self.resumed_from.round + 1 if self.resumed_from else self.round + 1
        self.stopped_after: int | None = None
        """The round after which a planned stop ended the run early (see mpifed/run/stop.py)."""
        self.leaving: tuple[str, ...] = ()
        """The facilities that leave after the round just trained while the others go on (elastic)."""
        hub = topo.is_global_root and not returning  # a facility coming back is alone in its world, not the hub
        self.log = MetricsLog(cfg.metrics_path, after_round=self.start_round - 1, tensorboard=cfg.metrics.tensorboard,
                              wandb=cfg.metrics.wandb, run_config=to_dict(cfg)) if hub else None
        self.live_view = hub and live_view_wanted()

    def _build(self, cfg: RunConfig, topo: Topology, returning: bool = False) -> None:
        """The engine, data, federation and checkpoints of this rank, started from the initial model (or,
        `returning`, from zeros: its own part, or the running federation, gives it the model)."""
        self.cfg, self.topo = cfg, topo
        self.round = 0  # the round being trained, for the names of its waits
        sharing = local_ranks_on_node(topo.world)  # collective: called whether or not train.threads is set
        self.threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // sharing)
        torch.set_num_threads(self.threads)
        facility = cfg.facility[topo.facility_index]
        gpu = uses_gpu(cfg.train.device)
        if facility.engine == "deepspeed" and not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
        group, local_rank = start_process_group(topo.facility, "nccl" if gpu else "gloo", cfg.federation.timeout_s)
        self.device, self.group = choose_device(gpu, local_rank), group

        self._load_data()
        # Every engine gets the model built empty and allocates only what it holds (DeepSpeed's ZeRO-3
        # builds it under zero.Init, partitioned as it is made); LoRA needs its frozen base's real weights.
        empty = not cfg.lora.rank
        model = model_for(cfg, self.corpus.seq_len, self.corpus.vocab_size, empty=empty)
        self.layout = FlatLayout.of(model)
        self._check_same_layout()
        digest = self._check_same_base(base_digest(model)) if cfg.lora.rank else ""
        initial = self._initial_model(model) if not returning else None
        settings = EngineSettings(group=group, device=self.device, optimizer=cfg.train.optimizer,
                                  betas=(cfg.train.beta1, cfg.train.beta2), momentum=cfg.train.momentum,
                                  weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                                  grad_accum=cfg.train.grad_accum, fsdp=facility.fsdp, deepspeed=facility.deepspeed)
        self.engine = make_engine(facility.engine, model, settings, cfg.train.micro_batch)
        if returning:
            self._zero()
        else:
            self._start(initial)
        self.federation = Federation(topo, cfg.federation, self.layout.numel, self.engine.owned(), self.engine.held(),
                                     self.threads)
        self.arrival = Arrival(topo)
        self.checkpoints = CheckpointManager(cfg, topo, self.layout, model.config.to_json_string(), digest)
        self.parts = Parts(self.engine, self.sampler, self.federation, tokens_total=0)

    def _load_data(self, comm: MPI.Intracomm | None = None) -> None:
        """This rank's sampler over its facility's partition, and the shared validation set, from the
        corpus world rank 0 opens, sent over the leaders' links (or over `comm`, from its rank 0: see
        `_share_corpus`)."""
        cfg, topo = self.cfg, self.topo
        if comm is None:
            builds, share = topo.world.rank == 0, partial(topo.across.bcast_bytes, limit=EMBEDDED_LIMIT)
        else:
            builds, share = comm.rank == 0, partial(control.bcast_array, comm, dtype=np.uint8)
        with self.world_deadline("start: sharing the corpus"):
            self.corpus = open_corpus(cfg.data, cfg.data.partitions or topo.n_facilities, cfg.train.seed, builds,
                                      share)
        self.validation = self.corpus.validation(cfg.data.val_sequences)
        self.sampler = Sampler(self.corpus.partition(cfg.partition_of(topo.facility_index)), topo.facility.rank,
                               topo.facility.size, cfg.train.micro_batch,
                               seed=(cfg.train.seed, topo.facility_index, topo.facility.rank))

    def _resume(self, target: str) -> ResumePoint | None:
        """Restore every rank from the checkpoint `target` names ("auto" means the output folder)."""
        point = self.checkpoints.choose(target, self.parts)
        if point is not None:
            self.checkpoints.restore(point, self.parts)
            self._post_held_back(f"resume: posting round {point.round}'s exchange")  # as the run did next
        elif self.topo.is_global_root:
            LOG.info(f"--resume {target}: no checkpoint found; starting from round 1")
        return point

    def _check_same_layout(self) -> None:
        """Refuse to exchange anything between ranks whose models differ in names, shapes or dtypes."""
        with self.world_deadline("layout check: comparing every facility's model"):
            prints = self.topo.across.allgather_str(self.layout.fingerprint)
        names = [name for name, size in zip(self.topo.facility_names, self.topo.facility_sizes) for _ in range(size)]
        differing = sorted({name for name, fingerprint in zip(names, prints) if fingerprint != prints[0]})
        if differing:
            raise RuntimeError(f"facilities {', '.join(differing)} built a model whose layout fingerprint differs "
                               f"from {names[0]}'s; every facility must train the same architecture")

    def _check_same_base(self, digest: str) -> str:
        """Under LoRA only the adapters are exchanged: refuse to train if any rank's frozen base differs
        (`digest`: this rank's, mpifed.model.base_digest). Returns world rank 0's (kept in checkpoints)."""
        with self.world_deadline("layout check: comparing the LoRA base models"):
            digests = self.topo.across.allgather_str(digest)
        if len(set(digests)) > 1:
            raise ModelError("the frozen base model differs between ranks (a different model.path copy or "
                               "build): LoRA needs the same base everywhere")
        return digests[0]

    def _initial_model(self, model: torch.nn.Module) -> Callable[[int, int], np.ndarray] | None:
        """On world rank 0: where the initial global model's values come from (None elsewhere). A fresh
        model is drawn parameter by parameter from the seed, a model folder read by range (see
        mpifed.model.InitialModel); LoRA adapters are world rank 0's own initialisation."""
        if self.topo.world.rank != 0:
            return None
        if not self.cfg.lora.rank:
            return InitialModel(model, self.layout, self.cfg)
        initial = np.empty(self.layout.numel, dtype=np.float32)  # the adapters alone: small
        params = dict(model.named_parameters())
        for name, values in self.layout.unflatten(initial).items():
            values[...] = params[name].detach().float().numpy()
        return lambda lo, hi: initial[lo:hi]

    def _start(self, initial: Callable[[int, int], np.ndarray] | None) -> None:
        """Every rank's held pieces of the initial global model, streamed from world rank 0 bucket by
        bucket, over the leaders' links to the other facilities (comm/across.py): nobody holds more of the
        model than its engine does, plus one bucket."""
        held = self.engine.held()
        self.engine.before_exchange()
        with self.world_deadline("initial model: sending world rank 0's weights"):
            spread(self.topo.facility, self.topo.across.mesh, pieces.ranges_of(held), initial,
                   pieces.into_views(held), 0, self.layout.numel, self.cfg.federation.bucket_values)
        self.engine.after_exchange()

    def _zero(self) -> None:
        """Zeros in every held view: a returning facility's engine before anything gives it a model."""
        self.engine.before_exchange()
        for _, values in self.engine.held():
            values[:] = 0
        self.engine.after_exchange()

    def world_deadline(self, what: str) -> ContextManager[None]:
        """A deadline of federation.timeout_s on a wait that involves other facilities."""
        return deadline(self.topo.world, self.cfg.federation.timeout_s, what)

    def announce(self) -> None:
        if not self.topo.is_global_root:
            return
        cfg, topo = self.cfg, self.topo
        facilities = ", ".join(f"{f.name} ({f.ranks} x {_engine_label(f)})" for f in cfg.facility)
        size = (f"LoRA r={cfg.lora.rank}: {self.layout.numel:,} adapter parameters train and cross facilities"
                if cfg.lora.rank else f"{self.layout.numel / 1e6:.2f}M parameters")
        LOG.info(f"{topo.n_facilities} facilities: {facilities}; model {cfg.model.path or cfg.model.preset} "
                 f"({size}); {self.corpus.description}; {cfg.federation.rounds} rounds x "
                 f"{cfg.train.local_steps} local steps; outer {cfg.federation.outer}; {_links(topo)}"
                 f"checkpoints in {cfg.checkpoint.dir}")
        if self.resumed_from is not None:
            LOG.info(f"resuming from {self.resumed_from.path} (round {self.resumed_from.round}, "
                     f"{self.resumed_from.tokens:,} tokens)")

    def run(self) -> None:
        """Train from `start_round` on, until the last round, a planned stop, or a boundary where the
        facilities change (`leaving`, `admitting`: then `regroup` and run again)."""
        if self.round == 0:  # a fresh start or a resume, not a regroup (nor a facility coming back)
            self.announce()
        for round_ in range(self.start_round, self.cfg.federation.rounds + 1):
            self.train_round(round_)
            if self.stopped_after is not None or self.leaving or self.admitting:
                return
        if self.topo.is_global_root:
            LOG.info(f"done; checkpoints in {self.cfg.checkpoint.dir}, metrics in {self.cfg.metrics_path}")

    def _inner(self, round_: int, sync_after: dict[int, int], land_after: set[int]) -> tuple[float, int, float]:
        """H local steps; (sum of facility-mean step losses, tokens this rank trained since the last
        sync point, seconds spent in the mid-round sync points). After step s, fragment
        `sync_after[s]` syncs (federation.fragments > 1); after the steps in `land_after` the exchange in
        flight lands (federation.overlap_steps)."""
        train = self.cfg.train
        if train.inner_state == "reset":
            self.engine.reset_optimizer()
        loss_sum, tokens, sync_s = 0.0, self.pending_tokens, 0.0  # what it trained ahead counts here
        self.pending_tokens = 0
        ranks = self.topo.facility.size
        for k in inner_steps(train.local_steps, round_, self.cfg.federation.rounds, self.live_view):
            loss, trained = self._train_step((round_ - 1) * train.local_steps + k, ranks)
            loss_sum, tokens = loss_sum + loss, tokens + trained
            if k + 1 in sync_after:
                start = time.perf_counter()
                exchange = self._sync(sync_after[k + 1], tokens, True, f"round {round_}: fragment {sync_after[k + 1]}")
                self.round_exchanges.append(exchange)
                self._post(sync_after[k + 1], f"round {round_}: fragment {sync_after[k + 1]}")
                sync_s += time.perf_counter() - start
                tokens = 0
            elif k + 1 in land_after and self.federation.in_flight is not None:
                start = time.perf_counter()
                self.round_exchanges.append(self._at_exchange(f"round {round_}: step {k + 1}", self.federation.fold))
                sync_s += time.perf_counter() - start
        return loss_sum, tokens, sync_s

    def _train_step(self, step: int, ranks: int) -> tuple[float, int]:
        """One inner step, the run's `step`-th (for the learning rate) over the facility's `ranks`: (its
        loss, the tokens this rank trained). No MPI (see `train_ahead`)."""
        train = self.cfg.train
        batches = [_tensors(self.sampler.next_batch()) for _ in range(train.grad_accum)]
        lr = inner_lr(train, step, self.cfg.federation.rounds * train.local_steps, ranks)
        return self.engine.train_step(batches, lr), sum(ids.numel() for ids, _ in batches)

    def _sync(self, fragment: int, tokens: int, participate: bool, phase: str) -> RoundExchange:
        """A sync point of `fragment`."""
        return self._at_exchange(phase, lambda owned, held, phase: self.federation.synchronise(
            fragment, owned, held, tokens, participate, phase))

    def _at_exchange(self, phase: str, call: Callable[..., RoundExchange]) -> RoundExchange:
        """`call(owned, held, phase)` of the federation, the engine's views made current before and loaded
        after; a FederationError names the round."""
        self.engine.before_exchange()
        try:
            exchange = call(self.engine.owned(), self.engine.held(), phase)
        except FederationError as exc:
            raise FederationError(f"{phase.split(':')[0]}: {exc}") from None
        self.engine.after_exchange()
        return exchange

    def _post(self, fragment: int, phase: str) -> None:
        """federation.overlap = delayed: start the fragment's exchange in the background."""
        if self.federation.delayed:
            self.federation.post(fragment, self.engine.owned(), phase)

    def _post_held_back(self, phase: str) -> None:
        """The post that a round boundary held back (a planned stop, a change of facilities), once training
        goes on from it: nothing after the last round, or after a flush."""
        if self.round != self.cfg.federation.rounds and not self.federation.flushed:
            self._post(0, phase)

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
        leader = self.topo.is_leader
        with self.world_deadline(f"round {self.round}: validation"):
            total, count = self.topo.across.allreduce([total if leader else 0.0, rows if leader else 0])
        return float(total / count)

    def _validate_global(self) -> float:
        """`_validate` of the global model (with fragments or overlap the local one differs from it)."""
        if not self.federation.local_differs:
            return self._validate()
        self.engine.before_exchange()
        with self.federation.global_model(self.engine.held()):
            self.engine.after_exchange()
            loss = self._validate()
            self.engine.before_exchange()  # an engine may keep what the forward gathered: drop it first
        self.engine.after_exchange()
        return loss

    def _validate_facilities(self) -> dict[str, float]:
        """Every facility's local model (before the exchange) on the whole validation set."""
        total, rows = self._score(slice(None))
        mine = total / rows
        losses = np.zeros(self.topo.n_facilities)
        if self.topo.is_leader:
            losses[self.topo.facility_index] = mine
        with self.world_deadline(f"round {self.round}: validation of the facilities' models"):
            losses = self.topo.across.allreduce(losses)
        return dict(zip(self.topo.facility_names, map(float, losses)))

    def train_round(self, round_: int) -> None:
        """H inner steps (with the mid-round fragments' sync points), the exchange, validation,
        checkpoint, metrics."""
        fed = self.cfg.federation
        self.round = round_
        if self.door is not None:
            self.door.at_round(round_)
        watchdog.set_phase(f"round {round_}: inner steps")
        start = time.perf_counter()
        self.round_exchanges: list[RoundExchange] = []
        with self.memory.phase("train"):
            summary, val_loss, local_losses = self._train_and_exchange(round_, start)
        asked, back = summary.pop("stop_asked"), summary.pop("back")
        stopping = bool(asked) and round_ != fed.rounds  # every facility, or those that asked, stop here
        self.admitting = bool(back) and not stopping and round_ != fed.rounds  # one that came back enters
        ckpt_s, publish = 0.0, None
        if round_ % self.cfg.checkpoint.every == 0 or round_ == fed.rounds or stopping:
            t0 = time.perf_counter()
            with self.memory.phase("checkpoint"):  # a facility that leaves keeps the global model in its part
                publish = self.checkpoints.save(round_, self.parts, stopping and self.leaves_after(asked))
            ckpt_s = time.perf_counter() - t0
        if round_ != fed.rounds and not stopping and not self.admitting:  # a resume or regroup posts it
            self._post(0, f"round {round_}: exchange")
        if self.log is not None:
            metrics = RoundMetrics(round=round_, val_loss=val_loss, tokens_total=self.parts.tokens_total, ckpt_s=ckpt_s,
                                   wall_s=time.perf_counter() - start, facility_val_loss=local_losses, **summary)
            self.log.write(metrics)
            LOG.info(metrics.line(self.cfg.federation.rounds), extra={"bare": True})  # the progress line
        if publish is not None:  # after the metrics line: a run killed in between resumes before this round
            publish()
        if stopping:
            self._stop_or_leave(round_, asked)

    def _train_and_exchange(self, round_: int, start: float) -> tuple[dict, float | None, dict[str, float]]:
        """The round's inner steps, its exchanges and validation: (the round's world-wide numbers, the
        global model's validation loss, each facility's local one)."""
        fed = self.cfg.federation
        trained = sampled(self.topo.n_facilities, fed.sample, self.cfg.train.seed, round_)
        participate = trained[self.topo.facility_index]
        evaluate = round_ % self.cfg.eval.every == 0 or round_ == fed.rounds
        last = round_ == fed.rounds
        offsets = sync_offsets(self.cfg.train.local_steps, fed.fragments)
        lands = fold_steps(self.cfg.train.local_steps, fed.fragments, fed.overlap_steps)  # none without overlap
        if not participate:  # what it trained ahead is overwritten by the global model: it counts nowhere
            self.pending_tokens = 0
        loss_sum, tokens, mid_sync_s = self._inner(round_, {step: j for j, step in enumerate(offsets) if j}, lands) \
            if participate else (0.0, 0, 0.0)
        inner_s = time.perf_counter() - start - mid_sync_s
        idle_s = self.arrival.wait(trained, fed.timeout_s, f"round {round_}: waiting for the other facilities")
        local_losses = self._validate_facilities() if evaluate and self.cfg.eval.facilities else {}
        exchange_start = time.perf_counter()
        self.round_exchanges.append(self._sync(0, tokens, participate, f"round {round_}: exchange"))
        if last:  # what every fragment learned since its last exchange: into the final global model
            self.engine.before_exchange()
            self.round_exchanges.append(self.federation.flush(self.engine.owned(), self.engine.held(),
                                                              f"round {round_}: exchange"))
            self.engine.after_exchange()
        if self.topo.is_global_root:
            for reason in (r for e in self.round_exchanges for r in e.left_out):
                LOG.warning(f"round {round_}: left out {reason}")
        summary = self._summarise(loss_sum, inner_s, idle_s, time.perf_counter() - exchange_start + mid_sync_s)
        val_loss = self._validate_global() if evaluate else None
        self.parts.tokens_total += summary["tokens"]
        return summary, val_loss, local_losses

    def _summarise(self, loss_sum: float, inner_s: float, idle_s: float, sync_s: float) -> dict:
        """World-wide sums and extremes of one round's exchanges (`round_exchanges`), and which facilities
        asked for a planned stop (name -> signal); every rank gets them."""
        leader = self.topo.is_leader  # leaders speak for their facility's loss and tokens
        facility_tokens = sum(e.facility_tokens for e in self.round_exchanges) if leader else 0
        sent = sum(e.bytes_inter for e in self.round_exchanges)
        mean_loss = loss_sum / self.cfg.train.local_steps  # 0 where the facility sat this round out
        # A planned stop travels with the maxima: each facility's slot holds the number of the signal
        # that asked one of its ranks to stop (0: none), so every rank learns who asked in this reduction.
        asked = np.zeros(self.topo.n_facilities)
        asked[self.topo.facility_index] = stop.requested()
        back = self.door.waiting() if self.door is not None else 0  # facilities waiting to come back
        with self.world_deadline(f"round {self.round}: collecting the metrics"):
            weighted_loss, tokens, bytes_inter = self.topo.across.allreduce(
                [mean_loss * facility_tokens, facility_tokens, sent])
            # Every rank starts the exchange together (after `Arrival.wait`): the fastest one's sync time
            # is the exchange itself; the longest wait there was a faster facility's for a slower one.
            slowest_inner, longest_idle, neg_fastest_sync, back, *asked = self.topo.across.allreduce(
                [inner_s, idle_s, -sync_s, back, *asked], op=MPI.MAX)
        return dict(train_loss=weighted_loss / tokens, tokens=int(tokens), inner_s=slowest_inner,
                    sync_s=-neg_fastest_sync, idle_s=longest_idle, bytes_inter=int(bytes_inter), back=int(back),
                    stop_asked={name: signal.Signals(int(number)).name
                                for name, number in zip(self.topo.facility_names, asked) if number})

    def model_flat(self) -> np.ndarray:
        """The facility's whole model as the engine holds it, flat fp32 on every rank (collective over
        the facility: a sharded engine's ranks each contribute their pieces)."""
        self.engine.before_exchange()
        return control.gather_pieces(self.topo.facility, self.engine.owned(), self.layout.numel)

    def close(self) -> None:
        self.memory.write()
        self.federation.close()
        self.arrival.close()
        if self.log is not None:
            self.log.close()
        stop_process_group()


def _tensors(batch: "np.ndarray | tuple[np.ndarray, np.ndarray]") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) tensors of a batch (the same tensor twice where the labels are the ids)."""
    ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
    ids_t = torch.from_numpy(ids)
    return ids_t, ids_t if labels is ids else torch.from_numpy(labels)


def _engine_label(facility: FacilityConfig) -> str:
    if facility.engine == "deepspeed":
        return f"deepspeed ZeRO-{facility.deepspeed.zero_stage}"
    if facility.engine == "fsdp" and facility.fsdp.replicas > 1:
        return f"fsdp ({facility.fsdp.replicas} replicas)"
    return facility.engine
