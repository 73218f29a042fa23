"""A reference loop (issue 35): plain PyTorch in one process, no MPI, no mpifed engine or federation, that
takes mpifed's initial weights and batch order and trains what a run of two one-rank facilities trains.
Its own learning-rate schedule, its own inner optimizers (one torch AdamW or SGD per facility, kept
across rounds), its own averaging and outer Nesterov step (torch's SGD). A change to mpifed's schedules,
optimizer state, sampling or reduction makes the run and the loop part; each test also runs the loop
with a planted defect (the inner state reset every round, the schedule shifted by one step) to show that
such a change moves the result far beyond the tolerance."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import mpifed

from mpifed import configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.data.corpus import Sampler, open_corpus
from mpifed.layout import FlatLayout
from mpifed.model import InitialModel, model_for

FACILITIES = 2


def _lr(train: dict, step: int, total: int, shift: int = 0) -> float:
    """Linear warm-up to the peak over `warmup_steps`, then cosine to `min_lr` at the last step (written
    from the README's description, not from mpifed's code)."""
    step += shift
    peak, floor, warm = train["lr"], train["min_lr"], train["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    done = min(1.0, (step - warm) / max(1, total - warm - 1))
    return floor + (peak - floor) * (1 + math.cos(math.pi * done)) / 2


class Reference:
    """The run of `folder/mpifed.toml`, redone in one process: each facility a model and an optimizer."""

    def __init__(self, folder, reset_inner=None, shift=0):
        self.raw = configfile.load(folder / "mpifed.toml")
        cfg = configfile.from_dict(self.raw)
        self.cfg, self.shift = cfg, shift
        self.reset_inner = cfg.train.inner_state == "reset" if reset_inner is None else reset_inner
        assert len(cfg.facility) == FACILITIES and all(f.ranks == 1 for f in cfg.facility)
        corpus = open_corpus(cfg.data, FACILITIES, cfg.train.seed, True, lambda tokens: tokens)
        self.validation = corpus.validation(cfg.data.val_sequences)
        # mpifed's batch order: each facility's partition, its one rank's sampler
        self.samplers = [Sampler(corpus.partition(f), 0, 1, cfg.train.micro_batch, seed=(cfg.train.seed, f, 0))
                         for f in range(FACILITIES)]
        # mpifed's initial weights, into plain transformers models
        shape = model_for(cfg, corpus.seq_len, corpus.vocab_size)
        layout = FlatLayout.of(shape)
        initial = torch.from_numpy(InitialModel(shape, layout, cfg)(0, layout.numel).copy())
        self.layout = layout
        self.models = [model_for(cfg, corpus.seq_len, corpus.vocab_size) for _ in range(FACILITIES)]
        self.initial, self.global_ = initial.clone(), initial.clone()
        for model in self.models:
            self._load(model, self.global_)
        self.inner = [self._optimizer(model) for model in self.models]
        fed = cfg.federation
        self.outer_param = torch.nn.Parameter(self.global_.clone())
        self.outer = (torch.optim.SGD([self.outer_param], lr=fed.outer_lr if fed.outer_lr is not None else 0.7,
                                      momentum=fed.outer_momentum if fed.outer_momentum is not None else 0.9,
                                      nesterov=True) if fed.outer == "diloco" else None)
        self.step = 0

    def _optimizer(self, model):
        train = self.cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        if train.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.0, momentum=train.momentum)
        return torch.optim.AdamW(params, lr=0.0, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)

    def _load(self, model, flat):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for slot, param in zip(self.layout.slots, params):
                param.copy_(flat[slot.offset:slot.offset + slot.numel].view(slot.shape))

    def _flat(self, model):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def _loss(self, model, ids):
        ids = torch.from_numpy(ids)
        return model(input_ids=ids, labels=ids).loss

    def round(self):
        train, total = self.raw["train"], self.cfg.federation.rounds * self.cfg.train.local_steps
        for k in range(self.cfg.train.local_steps):
            lr = _lr(train, self.step + k, total, self.shift)
            for model, opt, sampler in zip(self.models, self.inner, self.samplers):
                model.train()
                opt.zero_grad()
                self._loss(model, sampler.next_batch()).backward()
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
        self.step += self.cfg.train.local_steps
        mean = sum(self._flat(m) for m in self.models) / FACILITIES  # equal tokens: equal weights
        if self.outer is None:  # fedavg, learning rate 1: the mean itself
            self.global_ = mean
        else:  # the pseudo-gradient as the gradient of torch's own Nesterov SGD
            self.outer.zero_grad()
            self.outer_param.grad = self.global_ - mean
            self.outer.step()
            self.global_ = self.outer_param.detach().clone()
        for model, opt in zip(self.models, self.inner):
            self._load(model, self.global_)
            if self.reset_inner:
                opt.state.clear()

    def dp_step(self):
        """Data parallelism over the same two ranks: one model, the two batches' gradients averaged."""
        model, opt = self.models[0], self.inner[0]
        total = self.cfg.federation.rounds * self.cfg.train.local_steps
        model.train()
        opt.zero_grad()
        for sampler in self.samplers:
            (self._loss(model, sampler.next_batch()) / FACILITIES).backward()
        for group in opt.param_groups:
            group["lr"] = _lr(self.raw["train"], self.step, total, self.shift)
        opt.step()
        self.step += 1
        self.global_ = self._flat(model)

    @torch.no_grad()
    def val_loss(self):
        """The global model on the validation set as mpifed scores it: facility f the rows f::F in batches
        of 8, each batch's mean weighted by its size."""
        model = self.models[0]
        self._load(model, self.global_)
        model.eval()
        ids, _ = self.validation
        total = 0.0
        for f in range(FACILITIES):
            rows = ids[f::FACILITIES]
            for i in range(0, len(rows), 8):
                total += float(self._loss(model, rows[i:i + 8])) * len(rows[i:i + 8])
        return total / len(ids)


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    result = mpifed("simulate", "--facilities", str(FACILITIES), "--ranks-per-facility", "1", "--out", str(out),
                    "--set", "train.warmup_steps=3", "--set", "train.schedule=cosine", "--set", "train.min_lr=1e-4",
                    "--set", "train.micro_batch=4", "--set", "eval.facilities=false", *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = checkpoint.verify(out / checkpoint.main_name(rounds[-1]["round"]))
    return out, rounds, checkpoint.read_flat(final.path, final.layout, "model")


@pytest.mark.parametrize("outer", ["fedavg", "diloco"])
def test_three_rounds_equal_a_plain_pytorch_loop(tmp_path, outer):
    """Two facilities, three rounds of four steps, warm-up and cosine: the final loss within 1e-5 of the
    loop's, every round's too, and the weights within 1e-5."""
    out, rounds, model = _run(tmp_path, outer, f"federation.outer={outer}", "federation.rounds=3",
                              "train.local_steps=4", "train.lr=3e-3")
    ref = Reference(out)
    losses = []
    for _ in range(3):
        ref.round()
        losses.append(ref.val_loss())
    got = [r["val_loss"] for r in rounds]
    np.testing.assert_allclose(got, losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model, ref.global_.numpy(), rtol=0, atol=1e-5)
    # planted defects: the inner AdamW state reset every round, the schedule one step late
    for defect in [dict(reset_inner=True), dict(shift=1)]:
        wrong = Reference(out, **defect)
        for _ in range(3):
            wrong.round()
        assert abs(wrong.val_loss() - got[-1]) > 1e-3, defect
    if outer == "fedavg":  # mpifed resetting its inner state (its own `reset` mode): the loop that resets agrees
        out, rounds, _ = _run(tmp_path, "reset", "federation.rounds=3", "train.local_steps=4", "train.lr=3e-3",
                              "train.inner_state=reset")
        reset = Reference(out)
        for _ in range(3):
            reset.round()
        assert abs(reset.val_loss() - rounds[-1]["val_loss"]) < 1e-5 and abs(rounds[-1]["val_loss"] - got[-1]) > 1e-3


def test_fedavg_of_one_step_rounds_with_sgd_is_data_parallelism(tmp_path):
    """FedAvg with H = 1 and plain SGD averages θ − η·g over the facilities: one step of data parallelism
    over the same ranks. Twenty steps: the weights within 1e-5 of a DP loop's."""
    out, _, model = _run(tmp_path, "sgd", "federation.rounds=20", "train.local_steps=1", "train.optimizer=sgd",
                         "train.lr=0.2", "eval.every=20")
    ref = Reference(out)
    for _ in range(20):
        ref.dp_step()
    np.testing.assert_allclose(model, ref.global_.numpy(), rtol=0, atol=1e-5)
    assert np.abs(model - ref.initial.numpy()).max() > 1e-2  # it did move
    wrong = Reference(out, shift=1)  # planted defect: the schedule one step late
    for _ in range(20):
        wrong.dp_step()
    assert np.abs(model - wrong.global_.numpy()).max() > 1e-4
