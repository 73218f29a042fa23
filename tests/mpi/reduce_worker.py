"""Under mpiexec: ROUNDS federated rounds on known values, written out for an independent numpy check.

θ_global starts as normal(seed=7). Training is simulated, in one of two ways (`train=`):
  shift  (default) once per round, facility f's model moves by -Δ(f, t), Δ(f, t) = 0.01·normal(seed=[f, t]);
         rank r of facility f trained (10(f+1) + r)(t+1) tokens in round t;
  pull   every one of `steps=H` inner steps moves the model 2(f+1)% of the way to facility f's own
         target c_f = normal(seed=[f, 99]); rank r trains 10(f+1) + r tokens per step. Facilities pulling
         at different rates make where each round starts from matter, which is what tests overlap
         (federation.overlap) and fragments.
Fragment j (federation.fragments) syncs after inner step j·H/K, fragment 0 at the round's end; with
overlap each sync point is followed by a post, and after the last round by a flush; with
federation.overlap_steps = τ the exchange in flight lands τ steps after its post.
Ownership is `replica` (each rank owns a contiguous 1/n of the model and holds all of it) or `sharded`
(rank r owns and holds every n-th chunk of 37 values). `poison=F:nan|F:big` makes facility F's update
NaN or 1000x larger in every round. `sealed=1` seals the roots' links under a token made for the run. Facilities not sampled in a round (federation.sample) leave their
model untouched. Each rank writes OUT/rank-N.npy (its held values, NaN elsewhere), OUT/rank-N.json and,
on roots with compression, OUT/rank-N-exchange.npy (the sum of its error-feedback residuals, zero
outside its segment); rank-N.json has what it reported of each round and `retained_bytes`, what the
federation keeps between exchanges beyond θ and the outer and error-feedback state.

    mpiexec -n 6 python tests/mpi/reduce_worker.py 1,2,3 OUT replica ROUNDS NUMEL [federation.key=value ...]
"""
import json
import secrets
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpifed import configfile
from mpifed.comm import control, topology
from mpifed.comm.watchdog import abort_on_error
from mpifed.cadence import fold_steps, sync_offsets
from mpifed.federation.reduce import Federation, sampled

sizes = [int(s) for s in sys.argv[1].split(",")]
out, mode, rounds, numel = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
settings = dict(arg.split("=", 1) for arg in sys.argv[6:])
poison = settings.pop("poison", None)
training, steps = settings.pop("train", "shift"), int(settings.pop("steps", "1"))
sealed = settings.pop("sealed", "") == "1"  # the roots' links sealed under a token made here
fed = configfile.from_dict(configfile.apply_sets({"facility": [{"name": f"fac{i}", "ranks": s} for i, s in enumerate(sizes)]},
                                         [f"federation.{k}={v}" for k, v in settings.items()])).federation
comm = MPI.COMM_WORLD
with abort_on_error(comm):
    indices = topology.facility_of_ranks(sizes, control.allgather_int(comm, comm.Get_attr(MPI.APPNUM) or 0))
    token = control.bcast_str(comm, secrets.token_urlsafe(32) if comm.rank == 0 else None).encode() if sealed else None
    topo = topology.build(comm, indices[comm.rank], [f"fac{i}" for i in range(len(sizes))], fed.roots, token)
    f, r, n = topo.facility_index, topo.facility.rank, topo.facility.size
    model = np.random.default_rng(7).standard_normal(numel).astype(np.float32)
    if mode == "replica":
        start, stop = numel * r // n, numel * (r + 1) // n
        owned = [(start, model[start:stop])]
        held = [(0, model)]
    else:
        # handed over last chunk first: engines need not list their views in offset order
        owned = [(a, model[a:min(a + 37, numel)]) for a in range(37 * r, numel, 37 * n)][::-1]
        held = owned
    federation = Federation(topo, fed, numel, owned, held)
    target = np.random.default_rng([f, 99]).standard_normal(numel).astype(np.float32)
    sync_after = {step: j for j, step in enumerate(sync_offsets(steps, fed.fragments))}
    land_after = fold_steps(steps, fed.fragments, fed.overlap_steps)
    report = {"facility": f, "bytes_inter": [], "bytes_received": [], "left_out": [], "facility_tokens": []}

    def note(exchange, new_round):
        if new_round:
            for key in ("bytes_inter", "bytes_received", "left_out", "facility_tokens"):
                report[key].append([] if key == "left_out" else 0)
        report["bytes_inter"][-1] += exchange.bytes_inter
        report["bytes_received"][-1] += exchange.bytes_received
        report["left_out"][-1] += list(exchange.left_out)
        report["facility_tokens"][-1] += exchange.facility_tokens

    for t in range(rounds):
        train = sampled(len(sizes), fed.sample, 0, t + 1)[f]
        tokens, first = 0, True
        for step in range(1, steps + 1):
            if training == "shift":
                delta = 0.01 * np.random.default_rng([f, t]).standard_normal(numel).astype(np.float32)
                if poison and int(poison.split(":")[0]) == f:
                    delta = delta * np.float32(np.nan if poison.endswith("nan") else 1000)
                tokens += (10 * (f + 1) + r) * (t + 1) if train else 0
            else:
                tokens += 10 * (f + 1) + r
            for offset, values in held:
                if training == "shift" and train:
                    values -= delta[offset:offset + len(values)]
                elif training == "pull":
                    values -= np.float32(0.02 * (f + 1)) * (values - target[offset:offset + len(values)])
            if step in sync_after:
                note(federation.synchronise(sync_after[step], owned, held, tokens, train), first)
                first, tokens = False, 0
                if step == steps and t == rounds - 1:
                    note(federation.flush(owned, held), False)
                elif federation.delayed:
                    federation.post(sync_after[step], owned)
            elif step in land_after:
                note(federation.fold(owned, held), first)
                first = False
    mine = np.full(numel, np.nan, np.float32)
    for offset, values in held:
        mine[offset:offset + len(values)] = values
    np.save(out / f"rank-{comm.rank}.npy", mine)
    if topo.root_index is not None and federation.exchange_state_names:
        kept = np.zeros(numel, np.float32)
        start, stop = federation.segments[topo.root_index]
        kept[start:stop] = sum(federation.exchange_state().values())
        np.save(out / f"rank-{comm.rank}-exchange.npy", kept)
    # what the federation keeps between exchanges beyond θ and the outer and error-feedback state
    links = [link for link in federation.exchange.mesh.links if link is not None] if federation.exchange else []
    kept = [*(federation.anchor or ()), *(federation.posted or ()), *federation._kept.values(),
            *(federation.combiner._buffers.values() if federation.combiner else ()),
            *(buffer for link in links for buffer in link._buffers.values())]
    report["retained_bytes"] = sum(a.nbytes for a in kept)
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(report))
    federation.close()
    topo.close()
