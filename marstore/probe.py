"""Probes: what each layer knows about a target, against a control task.

    report = run_probes(ProbeOptions(store="acts.h5", layer="encoder_blocks.*", target="nactions", out="probes"))

For every layer that the pattern matches, a linear (or small MLP) probe is trained on the
layer's rows, standardised with the per-channel statistics that the store recorded, and the same
probe is trained on a control task (the targets shuffled across rows). Selectivity is the test
metric minus the control's. Rows whose features or targets are not finite are skipped and
counted.

Two solvers. "direct" (the default for linear probes) finds the linear probe's optimum: ridge
regression in closed form, or L2-penalised logistic regression by full-batch L-BFGS (at most
LBFGS_ITERATIONS a penalty), the penalty chosen by the exact leave-one-out error over the
training rows (ridge) or on the validation split (logistic). Activations are far from
isotropic (token means of a transformer span a few directions with most of the variance, and a
small-variance direction can hold the target), and minibatch gradient descent leaves such
directions unlearned on stores of a few thousand rows, reporting a layer as knowing nothing that
a least-squares fit reads well. An MLP probe is the linear optimum, frozen, plus an MLP that
learns what it leaves (ResidualMLP). "adamw" (MLPs, or on request) trains by minibatches: a step
whose loss or gradient is not finite is skipped and counted; gradient norms far above their
running median are reported; the best validation weights are kept; Ctrl-C, or a scheduler's
SIGTERM, saves a resumable state at the last finished epoch. Either way each probe is saved as a
file that load_probe() turns into a module applicable to the layer's activations (TrainedProbe;
marstore.evaluate applies them to other stores), and resume=True keeps the layers finished
before an interruption.
Outputs: report.json, report.md (the table and the plots), depth.png (metric and control against depth),
loss_curves.png, by_position.png (a target of several values a row: R² at each position) or by_class.png
(each class's recall), and a table. compare_reports() puts several reports of one target side by side.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import math
import os
import pickle
import signal
import statistics
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from marstore.dataset import (ActivationDataset, available_memory, condition_mask, flat_tokens, in_forward_order, layers_of,
                              parse_condition, reduce_read_tokens, row_tokens, rows_where, split_sizes, token_axes,
                              target_row_shape)
from marstore.errors import MarstoreError
from marstore.hooks import (HookError, UnfoldLayout, parse_recorded_reduction, recorded_unfold, reduce_tokens,
                            reduction_text)
from marstore.report import heatmap, human_bytes, markdown_table, text_table
from marstore.store import Store, StoreError, open_store
from marstore.transfer import resolve_device

log = logging.getLogger(__name__)


class ProbeError(MarstoreError):
    """A probe that cannot be trained as asked; the message says why."""


class ProbeInterrupted(Exception):
    """Ctrl-C or SIGTERM (`signum`): the layers finished and the state at the last finished epoch
    are saved; run again with resume=True."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


SOLVERS = ("auto", "direct", "adamw")
TOKEN_MODES = ("mean", "flat", "each", "aligned")
MAX_EACH = 256  # probes a layer with --tokens each: more tokens than that want a reduction first
ADAMW_WEIGHT_DECAY = 1e-4
# L2 penalties the direct solver tries, on features standardised to unit variance
PENALTIES = tuple(10.0 ** k for k in range(-6, 3))
LBFGS_ITERATIONS = 200  # a penalty, for logistic regression
BOOTSTRAP_DRAWS = 1000  # resamples of the test rows behind each 95% interval
# Fewer test rows than this and the resamples understate the spread: 0 of 7 right resamples to
# 0.000 to 0.000. Such a run is told so (the usual rule of thumb for a sample's mean).
FEW_TEST_ROWS = 30


@dataclass
class ProbeOptions:
    store: str
    target: str | None = None  # by default the store's target, when it has one
    layer: str | list[str] = "**"  # a name or pattern, or several; by default every layer
    out: str = "probes"
    task: str = "auto"  # regression, classification or auto
    kind: str = "linear"  # linear or mlp
    metric: str | None = None  # classification's headline: accuracy (default), balanced_accuracy or macro_f1
    # a row of tokens read as their mean, "flat": side by side (frame means of --reduction mean:4), or
    # "each": a probe for each (a diffusion head's denoising steps stacked by --multi-fire stack, frames);
    # "aligned": each token a row of its own, with its own value of a target that holds one a token
    tokens: str = "mean"
    solver: str = "auto"  # direct (linear probes' optimum), adamw (minibatches), or auto: direct for linear, adamw for mlp
    hidden: int = 256
    epochs: int = 40
    lr: float = 1e-2
    weight_decay: float | None = None  # the L2 penalty; adamw: 1e-4, direct: chosen per layer, unless given
    batch_size: int = 256
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    group: str | None = None
    where: list[str] = field(default_factory=list)  # TARGET=VALUE or TARGET!=VALUE: probe the rows that meet them all
    max_rows: int | None = None  # at most this many of those rows, drawn at random with the seed
    patience: int = 8
    seed: int = 0
    device: str = "cpu"
    control: bool = True
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.where, str):  # one condition, not its characters
            self.where = [self.where]
        for name in ("epochs", "batch_size", "hidden", "patience") + (("max_rows",) if self.max_rows is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ProbeError(f"--{name.replace('_', '-')} {value!r}: give an integer of at least 1")
        if not self.lr > 0 or not (self.weight_decay is None or self.weight_decay >= 0):
            raise ProbeError(f"--lr {self.lr} --weight-decay {self.weight_decay}: the rate must be above 0, the decay at least 0")
        if self.kind not in ("linear", "mlp"):
            raise ProbeError(f"--kind {self.kind!r}: use linear or mlp")
        if self.tokens not in TOKEN_MODES:
            raise ProbeError(f"--tokens {self.tokens!r}: use one of {', '.join(TOKEN_MODES)}")
        if self.metric not in (None, *CLASSIFICATION_METRICS):
            raise ProbeError(f"--metric {self.metric!r}: use one of {', '.join(CLASSIFICATION_METRICS)} (for classification)")
        if self.solver not in SOLVERS:
            raise ProbeError(f"--solver {self.solver!r}: use one of {', '.join(SOLVERS)}")
        if self.solver == "direct" and self.kind != "linear":
            raise ProbeError(f"--solver direct finds a linear probe's optimum; an {self.kind} probe trains with --solver adamw")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ProbeError(f"--val-fraction {self.val_fraction} --test-fraction {self.test_fraction}: each must be above 0, "
                             "and together below 1 (the rest trains)")
        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise ProbeError(str(exc)) from None
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ProbeError(f"--out {self.out} is a file; give a folder for the report, the plots and the weights")
        if self.group is not None and self.group == self.target:
            raise ProbeError(f"--group {self.group} is the target itself: the test rows' values would never be seen in "
                             "training; group by what ties rows together (an episode id)")


def _features(ds: ActivationDataset, positions: np.ndarray, layer: str) -> tuple[torch.Tensor, dict, tuple]:
    """(the probe's input rows, everything read, the statistics that standardised them)"""
    data = ds.read_all(positions)
    channel_axis = ds.channel_axes.get(layer) if ds.reduction is None else None
    stats = _used_stats(*ds.stats[layer], data[layer], channel_axis)
    return feature_rows(data[layer], *stats, channel_axis), data, stats


def read_ragged_tokens(ds: ActivationDataset, positions: np.ndarray, layer: str) -> dict:
    """The columns of the rows at positions, a ragged layer's as every token of the rows, one after
    another, (tokens, ...), and data["token counts"] each row's count (--tokens aligned)."""
    data = dict(ds.__getitems__(positions).columns)
    rows = data[layer]
    data["token counts"] = np.array([len(r) for r in rows], dtype=np.int64)
    data[layer] = torch.cat(rows) if rows else torch.empty(0, *ds.token_shapes[layer])
    return data


def _ragged_tokens(ds: ActivationDataset, positions: np.ndarray, layer: str) -> tuple[torch.Tensor, dict, tuple]:
    """As _features, for --tokens aligned on a ragged layer: every token of the rows, one after
    another, standardised (read_ragged_tokens)."""
    data = read_ragged_tokens(ds, positions, layer)
    stats = _used_stats(*ds.stats[layer], data[layer], None)
    return feature_rows(data[layer], *stats), data, stats


def _used_stats(mean: Any, std: Any, x: torch.Tensor, channel_axis: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The store's per-channel statistics as the features take them, or (None, None) where they
    do not fit the rows' channels (a store written without statistics)."""
    mean, std = np.asarray(mean), np.asarray(std)
    channels = x.shape[-1 if channel_axis is None else 1 + channel_axis]
    if not mean.size or mean.shape[-1] != channels:
        return None, None
    return torch.from_numpy(mean).float(), torch.from_numpy(np.where(std > 0, std, 1.0)).float()


def feature_rows(x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
                 channel_axis: int | None = None, token: int | None = None) -> torch.Tensor:
    """A probe's input: rows as read (after the read-time token reduction), standardised per
    channel, flat. The channels of a layer stored whole go last first (its tokens side by side);
    token picks one token, as flat_tokens numbers them."""
    if token is not None:
        x = flat_tokens(x, 1, channel_axis)[:, token]
    elif channel_axis is not None:
        x = x.movedim(1 + channel_axis, -1)
    if mean is not None:
        x = (x - mean) / std
    return x.reshape(len(x), -1)


def finite_rows(x: torch.Tensor, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The rows whose features and targets are all finite (text is never non-finite)."""
    finite = torch.isfinite(x).all(1)
    if isinstance(y, torch.Tensor):
        finite &= torch.isfinite(y.reshape(len(y), -1).float()).all(1)
    return finite


def aligned_targets(y: torch.Tensor | np.ndarray, count: int | np.ndarray, target: str,
                    layer: str) -> tuple[torch.Tensor | np.ndarray, np.ndarray]:
    """--tokens aligned: a target that holds a value (or a row of values) for each of a row's
    `count` tokens, laid out as its rows' tokens are ((rows, count, ...), or the tokens' own axes:
    UVA's mask (rows, 4, 256) for z_proj's (4, 256, D)), as one row a token; and the row each
    token row came from (tokens of one sample are not independent: intervals draw whole rows).
    count, for a ragged layer: each row's token count, whose first values of the target's (padded
    to the most, or longer) are its tokens'."""
    shape = tuple(y.shape[1:])
    if isinstance(count, np.ndarray):
        most = int(count.max()) if len(count) else 0
        if not shape or shape[0] < most:
            raise ProbeError(f"{layer}: --tokens aligned reads each of a row's tokens (their count varies, up to {most}) "
                             f"with its own value of target {target!r}, which holds {shape or 'one value'} a row; give a "
                             f"target padded to at least {most} values a row, its first ones the tokens'")
        owner = np.repeat(np.arange(len(y)), count)
        token = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
        return (y[owner, token] if isinstance(y, np.ndarray) else y[torch.from_numpy(owner), torch.from_numpy(token)]), owner
    if not count:
        raise ProbeError(f"{layer}: its rows have no tokens (a row of features alone, or tokens reduced at extraction); "
                         "--tokens aligned reads a layer stored with its tokens (--reduction none)")
    axes = token_axes(shape, count)
    if axes is None:
        raise ProbeError(f"{layer}: --tokens aligned reads each of its {count} tokens with its own value of target "
                         f"{target!r}, which holds {shape or 'one value'} a row; give a target of shape ({count}, ...) a row "
                         "(a value for each token), or probe --tokens mean")
    return y.reshape(len(y) * count, *shape[axes:]), np.repeat(np.arange(len(y)), count)


def where_rows_and_tokens(store: Store, where: Sequence[str], rows: int, aligned: bool) -> tuple[np.ndarray, list[tuple]]:
    """--where's rows (those of the first `rows` that meet its conditions on targets of one value
    a row) and, for --tokens aligned, its conditions on targets of a value a token (labels!=-100),
    parsed as (condition, target, negated, value), each checked to hold its value in those rows."""
    parsed = [(condition, *parse_condition(store, condition)) for condition in where]
    # a target of several values a row (a label for each token) selects tokens
    token_where = [p for p in parsed if aligned and store.targets[p[1]].shape[1:]]
    row_where = [p[0] for p in parsed if p not in token_where]
    selection = rows_where(store, row_where, rows) if row_where else np.arange(rows)
    for condition, name, negated, value in token_where:
        column = np.asarray(store.target(name, 0, rows))[selection]
        condition_mask(column.reshape(-1), condition, negated, value, f"no token of the rows of {store.path}")
    return selection, token_where


def tokens_meeting(data: dict, conditions: Sequence[tuple], tokens: int, count: int | np.ndarray, layer: str) -> torch.Tensor:
    """Which of `tokens` token rows (--tokens aligned; count: a row's tokens, or each row's) meet
    every parsed condition of where_rows_and_tokens, on the targets of a value a token that data
    holds for their rows."""
    keep = np.ones(tokens, dtype=bool)
    for condition, name, negated, value in conditions:
        column, _ = aligned_targets(data[name], count, name, layer)
        column = np.asarray(column)
        if column.ndim != 1:
            raise ProbeError(f"--where {condition}: target {name!r} holds {column.shape[1:]} values a token; --where "
                             "compares a target of one value a token")
        keep &= ~(column == value) if negated else column == value
    return torch.from_numpy(keep)


def _metrics(task: str, pred: torch.Tensor, y: torch.Tensor) -> dict:
    """The test (or validation) metrics of predictions pred (rows, outputs) against y; a
    classification's from the sums of the row terms its bootstrap resamples sum (one definition)."""
    if task == "regression":
        err = ((pred - y) ** 2).mean(0)
        var = y.var(0, unbiased=False)
        r2 = torch.where(var > 0, 1 - err / var.clamp_min(1e-12), torch.zeros_like(var))
        return {"mse": float(err.mean()), "r2": float(r2.mean()), "r2_per_dim": [round(float(v), 6) for v in r2]}
    total = torch.tensor([float(len(y))], dtype=torch.float64)
    sums = _row_terms("macro_f1", pred, y).sum(1, keepdim=True)  # per class: true positives, its rows, rows predicted as it
    hits, support = sums[:, 0].reshape(3, -1)[:2].tolist()
    return {"accuracy": float(sum(hits) / total[0]),
            **{m: float(_metric_of_sums(m, sums, total)[0]) for m in ("balanced_accuracy", "macro_f1")},
            # which classes a layer tells apart; None for a class without test rows
            "recall_per_class": [round(h / n, 6) if n else None for h, n in zip(hits, support)]}


CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _headline(task: str, metric: str | None) -> str:
    return "r2" if task == "regression" else metric or "accuracy"


class ResidualMLP(nn.Module):
    """The MLP probe: a frozen linear path, set to the linear probe's optimum, plus an MLP whose
    output layer starts at zero. Training starts where the linear probe ends and learns what it
    leaves: minibatch steps on activations far from isotropic left a plain MLP well below the
    linear probe's optimum (R² 0.79 against 0.99), and the MLP's gain over the linear probe
    would have measured the optimiser, not the layer."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out).requires_grad_(False)
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class _Trainer:
    """One probe on one layer (or its control): training with skips, checkpoints and resume.
    An MLP starts from `linear` (the linear probe's optimum), the starting point counted as epoch -1."""

    def __init__(self, opts: ProbeOptions, task: str, x: dict, y: dict, classes: int, state_path: str,
                 linear: nn.Linear | None = None):
        self.opts, self.task, self.x, self.y, self.classes = opts, task, x, y, classes
        self.state_path = state_path
        g = torch.Generator().manual_seed(opts.seed)
        d_in = x["train"].shape[1]
        d_out = classes if task == "classification" else y["train"].shape[1]
        self.model = nn.Linear(d_in, d_out) if opts.kind == "linear" else ResidualMLP(d_in, opts.hidden, d_out)
        with torch.no_grad():  # seeded init, independent of the global RNG
            for p in self.model.parameters():
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / math.sqrt(p.shape[-1] if p.dim() > 1 else d_in))
            if isinstance(self.model, ResidualMLP):
                self.model.linear.load_state_dict(linear.state_dict())
                self.model.mlp[-1].weight.zero_()
                self.model.mlp[-1].bias.zero_()
        self.model.to(opts.device)
        decay = ADAMW_WEIGHT_DECAY if opts.weight_decay is None else opts.weight_decay
        self.optim = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=decay)
        self.loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        self.epoch = 0
        self.best = (math.inf, -1, copy.deepcopy(self.model.state_dict()))
        self.history: list[dict] = []
        self.start_losses = None  # an MLP's: each validation row's loss under the linear optimum
        if isinstance(self.model, ResidualMLP):  # the linear optimum to beat
            self.start_losses, self.start_state = self._val_row_losses(), self.best[2]
            self.best = (float(self.start_losses.mean()), -1, self.start_state)  # the validation loss, one forward
            self.history.append({"epoch": -1, "train_loss": None, "val_loss": self.best[0]})
        self.skipped_steps = self.grad_spikes = 0
        self.norms: collections.deque = collections.deque(maxlen=100)
        self._snapshot = self._state()

    def _state(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "optim": copy.deepcopy(self.optim.state_dict()),
                "epoch": self.epoch, "best_loss": self.best[0], "best_epoch": self.best[1], "best_model": self.best[2],
                "history": list(self.history), "skipped_steps": self.skipped_steps, "grad_spikes": self.grad_spikes,
                "norms": list(self.norms), "options": _recorded(self.opts), "rows": self._rows()}

    def _rows(self) -> dict[str, int]:
        return {split: len(x) for split, x in self.x.items()}

    def _load(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optim.load_state_dict(s["optim"])
        self.epoch, self.history = s["epoch"], list(s["history"])
        self.best = (s["best_loss"], s["best_epoch"], s["best_model"])
        self.skipped_steps, self.grad_spikes = s["skipped_steps"], s["grad_spikes"]
        self.norms = collections.deque(s["norms"], maxlen=100)

    def _val_loss(self) -> float:
        with torch.no_grad():
            out = self.model(self.x["val"].to(self.opts.device))
            return float(self.loss_fn(out, self.y["val"].to(self.opts.device)))

    def _val_row_losses(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(self.x["val"].to(self.opts.device)).float()
            y = self.y["val"].to(self.opts.device)
            if self.task == "classification":
                return nn.functional.cross_entropy(out, y, reduction="none").cpu()
            return nn.functional.mse_loss(out, y, reduction="none").mean(1).cpu()

    def _beats_the_start(self, label: str) -> bool:
        """Whether the best epoch's validation loss is below the linear optimum's by more than
        the standard error of the rows' paired differences: a few dozen validation rows choose
        among epochs by chance too, and an MLP that only seemed better read less on the test
        rows than the linear probe it started from (four blocks of eight, by up to 0.08 R²)."""
        gain = self.start_losses - self._val_row_losses()
        margin = float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else 0.0
        if float(gain.mean()) > margin:
            return True
        log.info("%s: the MLP's best epoch (%d) beat the linear optimum by %.3g on the validation rows, within their "
                 "standard error %.3g: the linear optimum is kept", label, self.best[1], float(gain.mean()), margin)
        return False

    def fit(self, label: str) -> None:
        opts = self.opts
        if opts.resume and os.path.exists(self.state_path):
            state = torch.load(self.state_path, weights_only=True)
            _check_same_options(label, state["options"], self.opts)
            if state.get("rows", self._rows()) != self._rows():  # the store grew, or other rows were skipped
                raise ProbeError(f"{label}: --resume: the splits now hold {self._rows()} rows, {state['rows']} when it was "
                                 "interrupted (did an extraction add rows since?); run without --resume to start over")
            try:
                self._load(state)
            except (RuntimeError, ValueError) as exc:  # a state saved by a marstore whose probe had other parameters
                first = str(exc).strip().splitlines()[0]
                raise ProbeError(f"{label}: --resume: {self.state_path} holds another probe than this marstore trains "
                                 f"({first}); run without --resume to start over") from None
            log.info("%s: resumed at epoch %d", label, self.epoch)
        xt, yt = self.x["train"], self.y["train"]
        bar = tqdm(total=opts.epochs, initial=self.epoch, desc=label, unit="epoch", leave=False, disable=None if opts.progress else True)
        try:
            while self.epoch < opts.epochs and self.epoch - max(self.best[1], 0) <= opts.patience:
                order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(opts.seed * 10_007 + self.epoch))
                losses, steps, skipped = [], 0, 0
                for start in range(0, len(order), opts.batch_size):
                    idx = order[start : start + opts.batch_size]
                    xb, yb = xt[idx].to(opts.device), yt[idx].to(opts.device)
                    steps += 1
                    loss = self.loss_fn(self.model(xb), yb)
                    if not torch.isfinite(loss):
                        skipped += 1
                        continue
                    self.optim.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
                    if not math.isfinite(norm):
                        skipped += 1
                        continue
                    if len(self.norms) >= 20 and norm > 10 * statistics.median(self.norms):
                        self.grad_spikes += 1
                        log.warning("%s: gradient norm %.3g at epoch %d is over 10x its running median %.3g",
                                    label, norm, self.epoch, statistics.median(self.norms))
                    self.norms.append(norm)
                    self.optim.step()
                    losses.append(loss.item())
                self.skipped_steps += skipped
                if steps >= 4 and skipped > steps / 2:
                    raise ProbeError(f"{label}: {skipped} of {steps} steps in epoch {self.epoch} had a non-finite loss or "
                                     "gradient; lower the learning rate (--lr) or check the features")
                val = self._val_loss()
                self.history.append({"epoch": self.epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_loss": val})
                if val < self.best[0]:
                    self.best = (val, self.epoch, copy.deepcopy(self.model.state_dict()))
                self.epoch += 1
                self._snapshot = self._state()
                bar.update(1)
                bar.set_postfix(val=f"{val:.4g}")
        except KeyboardInterrupt:
            _replace_whole(self.state_path, lambda path: torch.save(self._snapshot, path))
            raise ProbeInterrupted(f"{label}: interrupted; state at epoch {self._snapshot['epoch']} saved to "
                                   f"{self.state_path}") from None
        finally:
            bar.close()
        self.model.load_state_dict(self.best[2])
        if self.start_losses is not None and self.best[1] >= 0 and not self._beats_the_start(label):
            self.best = (self.history[0]["val_loss"], -1, self.start_state)
            self.model.load_state_dict(self.start_state)
        if os.path.exists(self.state_path):
            os.remove(self.state_path)


def _predict(model: nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(device)).float().cpu()


def _resampled_counts(rows: int, seed: int, groups: np.ndarray | None = None,
                      draws: int = BOOTSTRAP_DRAWS) -> Iterator[torch.Tensor]:
    """Bootstrap resamples of the test rows, in blocks: (block, rows) float64, each row's count in
    a resample. With groups (a group id a row: an episode, say) whole groups are drawn, as rows
    of one episode are not independent and drawing rows would make the intervals too narrow.
    The same seed gives the same resamples, so that probe and control are compared on each."""
    g = torch.Generator().manual_seed(seed + 7_919)
    inverse = None if groups is None else torch.from_numpy(np.unique(groups, return_inverse=True)[1].reshape(-1))
    units = rows if inverse is None else int(inverse.max()) + 1
    block = max(1, min(draws, (1 << 22) // max(rows, 1)))  # about 32 MB of counts
    for start in range(0, draws, block):
        picks = torch.randint(units, (min(block, draws - start), units), generator=g)
        counts = torch.zeros(picks.shape, dtype=torch.float64).scatter_add_(1, picks, torch.ones(picks.shape, dtype=torch.float64))
        yield counts if inverse is None else counts[:, inverse]


def _row_terms(metric: str, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(terms, rows) float64: what a resample's metric (r2 or one of CLASSIFICATION_METRICS) sums
    over its rows, a column a row; laid out so that the sums of every resample in a block are one
    matrix product with the block's counts (a long, thin product that BLAS runs fastest this way)."""
    if metric == "r2":
        y = y.double().reshape(len(y), -1)
        centred = y - y.mean(0)  # the variance does not change, and its sums lose less to rounding
        return torch.cat([(pred.double().reshape(len(pred), -1) - y) ** 2, centred, centred * centred], 1).T.contiguous()
    labels = pred.argmax(1)
    if metric == "accuracy":
        return (labels == y).double()[None]
    truth = nn.functional.one_hot(y, pred.shape[1]).double()
    chosen = nn.functional.one_hot(labels, pred.shape[1]).double()
    return torch.cat([truth * chosen, truth, chosen], 1).T.contiguous()


def _metric_of_sums(metric: str, sums: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each resample's metric, from the sums of its rows' terms (terms, draws) and its row count."""
    if metric == "accuracy":
        return sums[0] / total
    third = len(sums) // 3
    first, second, last = sums[:third], sums[third : 2 * third], sums[2 * third :]
    if metric == "r2":  # squared errors, centred targets and their squares
        err, mean, square = first / total, second / total, last / total
        var = square - mean**2
        # a value constant in the resample leaves rounding's 1e-17 here, not 0 (R² -1e9): within
        # float64's rounding of the squares, the variance is none (its R² 0, as _metrics has it)
        varies = var > 1e-12 * square
        return torch.where(varies, 1 - err / var.clamp_min(1e-300), torch.zeros_like(var)).mean(0)
    hits, support, chosen = first, second, last  # per class: true positives, rows of the class, rows predicted as it
    if metric == "balanced_accuracy":  # the mean recall of the classes the resample holds
        scores, counted = hits / support.clamp_min(1), support > 0
    else:  # macro_f1, over the classes predicted or present: 2 tp / ((tp + fn) + (tp + fp))
        scores, counted = 2 * hits / (support + chosen).clamp_min(1e-12), support + chosen > 0
    return (scores * counted).sum(0) / counted.sum(0).clamp_min(1)


def _resampled_metric(metric: str, pred: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A metric (as _metrics gives it) of each resample, counts (draws, rows) of each row's copies in it."""
    return _metric_of_sums(metric, _row_terms(metric, pred, y) @ counts.T, counts.sum(1))


def _intervals(metric: str, preds: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int,
               groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """95% bootstrap intervals (percentiles) of a test metric of each of preds' (prediction,
    target) pairs, over the same resamples of the test rows (or of their groups); "selectivity":
    of probe less control."""
    terms = {name: _row_terms(metric, pred, y) for name, (pred, y) in preds.items()}
    rows = next(iter(terms.values())).shape[1]
    if rows == 0:
        return {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in preds}
    for counts in _resampled_counts(rows, seed, groups):
        total = counts.sum(1)
        for name, t in terms.items():
            samples[name].append(_metric_of_sums(metric, t @ counts.T, total))
    drawn = {name: torch.cat(s) for name, s in samples.items()}
    if "control" in drawn:
        drawn["selectivity"] = drawn["probe"] - drawn["control"]
    return {name: [float(v) for v in torch.quantile(d, torch.tensor([0.025, 0.975], dtype=d.dtype))]
            for name, d in drawn.items()}


def _fit_direct(opts: ProbeOptions, task: str, x: dict, y: dict, classes: int) -> tuple[nn.Linear, float, list[dict]]:
    """The linear probe's optimum for each penalty (or the one given), and the penalty that wins:
    for regression the lowest leave-one-out error over the training rows (exact, from the same
    eigendecomposition: every training row counts, where the validation split of a small store
    holds a few and picks by chance), for classification the lowest validation loss.
    (the probe, its penalty, every penalty's losses)"""
    device = torch.device(opts.device)
    xv = x["val"].to(device, torch.float64)
    penalties = PENALTIES if opts.weight_decay is None else (opts.weight_decay,)
    tried: list[dict] = []  # per penalty: its losses, weight and bias
    if task == "regression":
        yv = y["val"].to(device, torch.float64)
        ridge = _Ridge(x["train"].to(device), y["train"].to(device))
        for penalty, loo_loss in zip(penalties, ridge.loo_losses(penalties)):
            weight, bias = ridge.fit(penalty)
            tried.append({"penalty": penalty, "loo_loss": loo_loss,
                          "val_loss": float(((xv @ weight.T + bias - yv) ** 2).mean()), "weight": weight, "bias": bias})
        criterion = "loo_loss"
    else:
        xt = x["train"].to(device, torch.float64)
        yt, yv = y["train"].to(device), y["val"].to(device)
        probe = nn.Linear(xt.shape[1], classes, dtype=torch.float64, device=device)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        for penalty in sorted(penalties, reverse=True):  # each fit starts from the last, more penalised one
            _logistic_fit(probe, xt, yt, penalty)
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(probe(xv), yv))
            tried.append({"penalty": penalty, "val_loss": val, "weight": probe.weight.detach().clone(),
                          "bias": probe.bias.detach().clone()})
        tried.reverse()
        criterion = "val_loss"
    bad = [t["penalty"] for t in tried if not math.isfinite(t["val_loss"])]
    if bad:
        raise ProbeError(f"the direct solver's validation loss is not finite for penalties {bad}; check the features, "
                         "or use --solver adamw")
    best = min(reversed(tried), key=lambda t: t[criterion])  # a tie goes to the larger penalty
    probe = nn.Linear(best["weight"].shape[1], best["weight"].shape[0])
    with torch.no_grad():
        probe.weight.copy_(best["weight"])
        probe.bias.copy_(best["bias"])
    return probe.to(device), best["penalty"], [{k: v for k, v in t.items() if k not in ("weight", "bias")} for t in tried]


def _logistic_fit(probe: nn.Linear, x: torch.Tensor, y: torch.Tensor, penalty: float) -> None:
    """L2-penalised multinomial logistic regression by full-batch L-BFGS, from the probe's weights.
    A bounded number of iterations: with a small penalty and separable classes the weights grow
    slowly for ever, while the validation loss has long settled."""
    optim = torch.optim.LBFGS(probe.parameters(), max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optim.zero_grad()
        value = nn.functional.cross_entropy(probe(x), y) + penalty * probe.weight.square().sum()
        value.backward()
        return value

    optim.step(loss)


class _Ridge:
    """Ridge regression of y on x for any penalty, from one eigendecomposition: argmin of
    mean((x w + b - y)^2) + penalty * |w|^2, the bias unpenalised; with more features than rows
    through the rows' Gram matrix (the same solution, a smaller matrix). loo_losses are the exact
    leave-one-out errors of those fits, from the diagonal of their hat matrices. With more rows
    than features, the rows are read in blocks of BLOCK and made float64 a block at a time:
    float64 copies of a large store's rows never exist whole."""

    BLOCK = 16384

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.n, features = x.shape
        self.x_mean, self.y_mean = x.mean(0, dtype=torch.float64), y.double().mean(0)
        self.primal = features <= self.n
        if self.primal:
            self.x, self.y = x, y
            gram = torch.zeros(features, features, dtype=torch.float64, device=x.device)
            cross = torch.zeros(features, y.shape[1], dtype=torch.float64, device=x.device)
            for xc, yc in self._blocks():
                gram += xc.T @ xc
                cross += xc.T @ yc
            eig, self.vec = torch.linalg.eigh(gram / self.n)
            self.along = self.vec.T @ (cross / self.n)
        else:
            self.xc, self.yc = x.double() - self.x_mean, y.double() - self.y_mean
            eig, self.vec = torch.linalg.eigh(self.xc @ self.xc.T / self.n)
            self.along = self.vec.T @ self.yc
        self.eig = eig.clamp_min(0)

    def _blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The centred rows and targets, in float64, a block at a time."""
        for start in range(0, self.n, self.BLOCK):
            stop = start + self.BLOCK
            yield self.x[start:stop].double() - self.x_mean, self.y[start:stop].double() - self.y_mean

    def fit(self, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (outputs, features), bias)"""
        if self.primal:
            w = self.vec @ (self.along / (self.eig + penalty)[:, None])
        else:
            w = self.xc.T @ (self.vec @ (self.along / (self.eig + penalty)[:, None])) / self.n
        return w.T, self.y_mean - self.x_mean @ w

    def loo_losses(self, penalties: Sequence[float]) -> list[float]:
        """The mean squared leave-one-out error of each penalty's fit, in one pass over the rows."""
        sums = [0.0] * len(penalties)
        blocks = ((xc @ self.vec, yc) for xc, yc in self._blocks()) if self.primal else [(None, self.yc)]
        for rows, yc in blocks:  # rows: the block's rows in the eigenbasis
            for i, penalty in enumerate(penalties):
                if self.primal:
                    fitted = rows @ (self.along / (self.eig + penalty)[:, None])
                    leverage = (rows.square() / (self.n * (self.eig + penalty))).sum(1)
                else:
                    shrink = self.eig / (self.eig + penalty)
                    fitted = self.vec @ (shrink[:, None] * self.along)
                    leverage = (self.vec.square() * shrink).sum(1)
                # the unpenalised bias adds 1/n to every row's leverage; a row the fit interpolates
                # (leverage 1) has an unbounded leave-one-out error, kept finite and large
                held_out = (yc - fitted) / (1 - 1 / self.n - leverage).clamp_min(1e-12)[:, None]
                sums[i] += float(held_out.square().sum())
        return [total / (self.n * self.along.shape[1]) for total in sums]


@dataclass
class _Prepared:
    """A layer's rows, ready to probe."""
    task: str
    xs: dict  # features by split
    ys: dict  # targets by split: class numbers or float rows
    labels: list  # classification: the label value (int or str) of each class, in the probe's output order
    skipped: int  # rows with non-finite features or targets
    sizes: dict  # rows of each split
    test_groups: np.ndarray | None  # the test rows' --group values
    seen_sources: np.ndarray  # the train and validation rows' source indices: the samples the probe was fitted or chosen on
    features: dict  # how rows of the layer become the probe's input (see TrainedProbe)

    def tokens(self) -> int:
        """Tokens of a row: --tokens each's probes."""
        return row_tokens(self.features["row_shape"], self.features["channel_axis"])[0]

    def token(self, i: int) -> "_Prepared":
        """The rows of token i alone (the features of every token lie side by side in xs)."""
        count = self.tokens()
        return replace(self, xs={k: v.reshape(len(v), count, -1)[:, i] for k, v in self.xs.items()},
                       features={**self.features, "token": i})


def the_one_value(y: torch.Tensor) -> Any:
    """What every row of y holds, where all hold the same (a number for rows of one value, else
    a list); None where the rows differ, so that there is something to predict."""
    rows = y.reshape(len(y), -1)
    if not bool((rows == rows[0]).all()):
        return None
    return rows[0, 0].item() if rows.shape[1] == 1 else rows[0].tolist()


def _split_fractions(opts: ProbeOptions) -> tuple[float, float, float]:
    """The train, val and test fractions of the selected rows."""
    return 1 - opts.val_fraction - opts.test_fraction, opts.val_fraction, opts.test_fraction


def _prepare(opts: ProbeOptions, layer: str, selection: np.ndarray, token_where: Sequence[tuple]) -> _Prepared:
    """A layer's features and targets in train, val and test splits of the selected rows (and,
    with --tokens aligned, of the tokens that token_where's conditions select)."""
    columns = dict.fromkeys([opts.target, *([opts.group] if opts.group else []), *(c[1] for c in token_where)])
    ds = ActivationDataset(opts.store, [layer], list(columns), rows=selection,
                           reduction="mean" if opts.tokens == "mean" else None)
    if ds.ragged and opts.tokens not in ("mean", "aligned"):
        raise ProbeError(f"{layer} is ragged (its token count varies): --tokens {opts.tokens} needs one count; use --tokens "
                         "mean (or aligned)")
    if opts.tokens != "mean":  # every token in memory as float32 (token means are read block by block, the means kept)
        check_token_memory(opts.store, layer, opts.tokens, selection)
    test_frac, val_frac = opts.test_fraction, opts.val_fraction
    splits = ds.split(_split_fractions(opts), seed=opts.seed, group=opts.group)
    empty = [name for name, positions in splits.items() if not len(positions)]
    if empty:
        grouped = f" grouped by {opts.group!r}" if opts.group else ""
        hint = "extract more rows" + ("" if "train" in empty else ", or raise those fractions")
        raise ProbeError(f"{layer}: the {' and '.join(empty)} split{'s' * (len(empty) > 1)} would be empty with "
                         f"{len(selection)} rows{grouped} (--val-fraction {val_frac}, --test-fraction {test_frac}); {hint}")
    xs, ys = {}, {}
    skipped = 0
    test_groups = None
    target_tokens: dict = {}  # --tokens aligned: the target's own axes of the tokens, as predictions take them back
    for name, positions in splits.items():
        x, data, stats = _ragged_tokens(ds, positions, layer) if ds.ragged and opts.tokens == "aligned" else \
            _features(ds, positions, layer)
        y = data[opts.target]
        groups = np.asarray(data[opts.group]) if opts.group else None
        count: int | np.ndarray = 0
        if opts.tokens == "aligned":
            count = data["token counts"] if ds.ragged else row_tokens(data[layer].shape[1:], ds.channel_axes.get(layer))[0]
            stored = tuple(y.shape[1:])
            y, owner = aligned_targets(y, count, opts.target, layer)
            # (a ragged layer's predictions: (rows, most tokens), each row's first ones its tokens')
            target_tokens = {"target_tokens": [] if ds.ragged else list(stored[: len(stored) - len(y.shape[1:])])}
            x = x.reshape(len(y), -1)
            groups = owner if groups is None else groups[owner]  # the test's intervals draw whole rows
        meeting = tokens_meeting(data, token_where, len(x), count, layer)
        finite = finite_rows(x, y)
        skipped += int((meeting & ~finite).sum())
        finite &= meeting
        xs[name], ys[name] = x[finite], y[finite.numpy()] if isinstance(y, np.ndarray) else y[finite]
        if name == "test" and groups is not None:
            test_groups = groups[finite.numpy()]
    ds.close()
    with open_store(opts.store) as store:
        seen_sources = store.index()[selection[np.concatenate([splits["train"], splits["val"]])]]
        info = store.layers[layer]
        # a layer as the target that a module gave as booleans (a mask), stored as they were: labels 0 and 1
        boolean = opts.target in store.layers and store.layers[opts.target].attrs.get("source_dtype") == "bool" \
            and store.layers[opts.target].attrs.get("reduction") == "none"
        run = store.run_of(layer)
        recorded = next((spec for spec in run.get("layers", []) if spec.get("store_name") == layer), {})
        extraction = run.get("options", {})
        # read while the store is open: a closed file's attributes read as absent
        features = {"layer": layer, "row_shape": list(info.row_shape), "ragged": info.layout == "ragged",
                    "channel_axis": ds.channel_axes.get(layer), "reduction": str(info.attrs.get("reduction", "none")),
                    "channels_first": bool(recorded.get("channels_first", False)), "tokens": opts.tokens, **target_tokens,
                    "mean": stats[0], "std": stats[1],
                    # how the hooks took the module's captures, for a probe of its live output (LiveProbes)
                    "multi_fire": extraction.get("multi_fire", "error"),
                    "unfolded": int(info.attrs["unfolded"]) if "unfolded" in info.attrs else None,
                    "unfold_layout": str(info.attrs["unfold_layout"]) if "unfold_layout" in info.attrs else None}
    task = opts.task
    names: list[str] = []  # a text target's strings, sorted: class i is names[i]
    if opts.target in ds.text:
        if ys["train"].ndim != 1:
            raise ProbeError(f"{layer}: target {opts.target!r} holds text of shape {ys['train'].shape[1:]} a row; "
                             "a probe takes one string a row for its class")
        if task == "regression":
            raise ProbeError(f"{layer}: target {opts.target!r} holds text, whose strings are classes; "
                             "use --task classification (or auto)")
        names = sorted(set().union(*(v.tolist() for v in ys.values())))
        code = {text: i for i, text in enumerate(names)}
        ys = {k: torch.tensor([code[v] for v in a], dtype=torch.long) for k, a in ys.items()}
        task = "classification"
    y_all = ys["train"]
    if task == "auto":
        integral = (not torch.is_floating_point(y_all) or boolean) and y_all.dim() == 1
        task = "classification" if integral and int(y_all.max()) < 1000 else "regression"
    labels: list[int] | list[str] = []
    fractional = torch.is_floating_point(y_all) and any(not torch.equal(v, v.round()) for v in ys.values())
    if task == "classification" and (fractional or y_all.dim() != 1):
        kind = f"{str(y_all.dtype).removeprefix('torch.')} values"
        kind += f" of shape {tuple(y_all.shape[1:])} a row" if y_all.dim() > 1 else " that are not whole numbers"
        raise ProbeError(f"{layer}: --task classification needs one integer label a row, and target {opts.target!r} "
                         f"holds {kind}; use --task regression")
    if min(len(v) for v in xs.values()) == 0:
        raise ProbeError(f"{layer}: a split is empty after skipping {skipped} non-finite rows; the store has too few rows")
    value = the_one_value(torch.cat([v.reshape(len(v), -1) for v in ys.values()]))  # of the rows left
    if value is not None:
        value = names[int(value)] if names else value
        raise ProbeError(f"{layer}: target {opts.target!r} is {value!r} in every selected row: a probe has nothing to "
                         "predict; choose another target, or select rows where it varies (--where)")
    if task == "classification":
        # the label values, in order, become classes 0..k-1: labels such as -1 ("unknown") or
        # sparse ids are classes like any other, and the probe has one output per value seen
        values = torch.unique(torch.cat([v.long().reshape(-1) for v in ys.values()]))
        labels = [names[i] for i in values.tolist()] if names else values.tolist()
        ys = {name: torch.searchsorted(values, v.long().reshape(-1)) for name, v in ys.items()}
    else:
        features["target_shape"] = list(y_all.shape[1:])  # predictions take it back
        ys = {name: v.float().reshape(len(v), -1) for name, v in ys.items()}
    return _Prepared(task, xs, ys, labels, skipped, {k: len(v) for k, v in splits.items()}, test_groups, seen_sources,
                     features)


def _suggest_aligned(store: Store, target: str, layers: list[str]) -> None:
    """Says where the target has a value for each token of a layer stored with its tokens (a
    label for each position): probed on token means or side by side, each row's values are one
    output each, where --tokens aligned reads each token against its own."""
    shape = target_row_shape(store, target)
    fitting = [name for name in layers if store.layers[name].layout == "dense" and token_axes(
        shape, row_tokens(store.layers[name].row_shape, store.layers[name].attrs.get("channel_axis"))[0]) is not None]
    if fitting:
        log.info("target %s holds %s a row, a value for each token of %s: if each belongs to its token (a label for "
                 "each position), --tokens aligned probes every token against its own", target, shape,
                 ", ".join(fitting[:3]) + (f" and {len(fitting) - 3} more" if len(fitting) > 3 else ""))


def check_token_memory(path: str, layer: str, tokens: str, selection: np.ndarray) -> None:
    """Refuses a probe whose features would not fit in memory (a killed process says nothing):
    --tokens flat, each and aligned hold every token of the selected rows as float32, and a
    standardised copy of them (marstore evaluate: a copy as the probe reads them)."""
    with open_store(path) as store:
        info = store.layers[layer]
        shape: tuple | str = tuple(info.row_shape)
        values = len(selection) * math.prod(info.row_shape)
        if info.layout == "ragged":  # (a token's shape)
            count = int(store.token_counts(layer)[selection].sum())
            values, shape = count * math.prod(info.row_shape), f"{count} tokens of {shape} in all"
    features, available = values * 4, available_memory()
    if 2 * features > available:
        fit = int(available / (2 * features / len(selection)))
        raise ProbeError(f"{layer}: --tokens {tokens} holds {human_bytes(features)} of float32 features ({len(selection)} "
                         f"rows of {shape}), twice that while it standardises them, and {human_bytes(available)} of memory is "
                         f"available; probe fewer rows (--max-rows {fit} or fewer, or --where), their token means (--tokens "
                         "mean), or store fewer tokens (--reduction mean:G at extraction)")


def drawn_rows(rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """count of the rows, drawn at random with the seed (--max-rows), in their order."""
    return np.sort(np.random.default_rng(seed).choice(rows, count, replace=False))


def _control(ys: dict, seed: int) -> dict:
    """The control task: every split's targets shuffled across its rows (fixed seed)."""
    g = torch.Generator().manual_seed(seed + 99_991)
    return {k: v[torch.randperm(len(v), generator=g)] for k, v in ys.items()}


def run_probes(opts: ProbeOptions) -> dict:
    """Trains the probes that opts asks for; writes report.json and the plots; returns the report."""
    with open_store(opts.store) as s:
        layers = in_forward_order(s, layers_of(s, opts.layer))
        if opts.layer == "**":
            log.info("probing every layer of %s (%d; --layer picks some)", opts.store, len(layers))
        if opts.target is None:
            if len(s.targets) != 1:
                raise ProbeError(f"--target: name one of the targets of {opts.store}: {', '.join(sorted(s.targets))}"
                                 if s.targets else f"{opts.store} holds no targets to probe: extract with --targets")
            opts = replace(opts, target=next(iter(s.targets)))
            log.info("probing for %s, the target of %s", opts.target, opts.store)
        # a layer is a target too (what a method returned, stored with --layers: MAR's mask), but not a group
        if opts.target not in s.targets and opts.target not in s.layers:
            raise ProbeError(f"--target {opts.target!r} is not in {opts.store}; its targets are {sorted(s.targets)} (or "
                             "name one of its layers)")
        if opts.group is not None and opts.group not in s.targets:
            raise ProbeError(f"--group {opts.group!r} is not in {opts.store}; its targets are {sorted(s.targets)}")
        if opts.target in layers:
            layers.remove(opts.target)
            log.info("--target %s is a layer: it is not probed for itself", opts.target)
            if not layers:
                raise ProbeError(f"--target {opts.target!r} is the one layer --layer selects; a layer cannot be its own target")
        # every layer's probe sees the same rows, also while an extraction still adds some
        source = {"path": os.path.abspath(opts.store), "status": s.status, "rows": s.rows, "created": str(s.file.attrs["created"]),
                  # what the source indices index: the probe files say which samples they saw
                  "dataset": [s.metadata.get("dataset"), s.metadata.get("dataset_args")]}
        try:
            selection, token_where = where_rows_and_tokens(s, opts.where, s.rows, opts.tokens == "aligned")
        except StoreError as exc:
            raise ProbeError(str(exc)) from None
        if opts.tokens != "aligned":
            _suggest_aligned(s, opts.target, layers)
    if opts.where:
        log.info("--where %s: %d of the %d committed rows", " ".join(opts.where), len(selection), source["rows"])
    matched = len(selection)  # (the rows --where selects, before --max-rows draws some)
    if opts.max_rows is not None and len(selection) > opts.max_rows:
        log.info("--max-rows %d: probing %d of the %d rows%s, drawn with --seed %d", opts.max_rows, opts.max_rows,
                 len(selection), " that meet --where" if opts.where else "", opts.seed)
        selection = drawn_rows(selection, opts.max_rows, opts.seed)
    if source["status"] != "complete":
        log.warning("%s is incomplete (an extraction was interrupted or still runs): the probes see its %d committed "
                    "rows only", opts.store, source["rows"])
    if not opts.group:  # (grouped, the test rows are those of whole groups, known once split)
        test_rows = split_sizes(len(selection), _split_fractions(opts))[-1]
        if 0 < test_rows < FEW_TEST_ROWS:
            log.warning("the test split holds %d of the %d rows: each moves the metric by %.2f, and the interval from "
                        "resamples of so few understates the spread; extract more rows, or raise --test-fraction",
                        test_rows, len(selection), 1 / test_rows)
    finished = _finished_report(opts, source) if opts.resume else None
    if finished is not None:
        return finished
    os.makedirs(opts.out, exist_ok=True)
    rows: list[dict] = []
    with _sigterm_stops_like_ctrl_c() as stop:
        try:
            for layer in layers:
                entries = _finished_before(opts, layer, source)
                if entries is None:
                    entries = _probe_layer(opts, layer, source, selection, token_where)
                    _write_json(_finished_path(opts, layer), {"options": _recorded(opts), "store": source, "entries": entries})
                rows += entries
        except (KeyboardInterrupt, ProbeInterrupted) as exc:
            where = str(exc) if isinstance(exc, ProbeInterrupted) else f"{layer}: interrupted"
            done = layers.index(layer)
            kept = f"; {done} finished layer{'s' * (done > 1)} kept" if done else ""
            raise ProbeInterrupted(f"{where}{kept}; run again with --resume", stop["signum"]) from None
    task = rows[-1]["task"]
    report = {"store": source["path"], "store_status": source["status"], "rows": source["rows"], "target": opts.target,
              "task": task, "metric": _headline(task, opts.metric), "solver": _solver_of(opts), "options": asdict(opts), "layers": rows}
    if opts.where or opts.max_rows is not None:
        report["selected_rows"] = len(selection)
        report["where_rows"] = matched
    if token_where:  # the conditions that selected tokens, not rows (--tokens aligned)
        report["token_where"] = [condition for condition, *_ in token_where]
    report["plots"] = _plots(report, opts.out)
    with open(os.path.join(opts.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    report["report"] = os.path.join(opts.out, "report.json")
    report["markdown"] = _markdown(report, opts.out)
    for layer in layers:  # report.json holds them now
        os.remove(_finished_path(opts, layer))
    return report


def _probe_layer(opts: ProbeOptions, layer: str, source: dict, selection: np.ndarray,
                 token_where: Sequence[tuple]) -> list[dict]:
    """The probe (and its control) on one layer of source (the store's path and committed rows),
    or with --tokens each on each of its tokens: the layer's entries in the report."""
    prep = _prepare(opts, layer, selection, token_where)
    if prep.task == "regression" and opts.metric:
        raise ProbeError(f"{layer}: --metric {opts.metric} is a classification's; target {opts.target!r} is probed by "
                         "regression, whose metric is R²")
    if opts.tokens != "each":
        return [_probe_entry(opts, layer, prep, source)]
    count = prep.tokens()
    if not 1 <= count <= MAX_EACH:
        have = f"{count} tokens" if count else "no tokens"
        raise ProbeError(f"{layer}: rows of shape {tuple(prep.features['row_shape'])} have {have}; --tokens each trains a probe "
                         f"for each of 1 to {MAX_EACH} tokens (store fewer: --reduction mean:G, or probe --tokens mean)")
    return [_probe_entry(opts, f"{layer}[{i}]", prep.token(i), source) for i in range(count)]


def _probe_entry(opts: ProbeOptions, name: str, prep: _Prepared, source: dict) -> dict:
    """The probe and its control on prep's rows: the entry `name` of the report."""
    task, xs, ys, labels = prep.task, prep.xs, prep.ys, prep.labels
    entry: dict[str, Any] = {"layer": name, "task": task, "split_rows": prep.sizes, "skipped_rows": prep.skipped,
                             "inputs": int(xs["train"].shape[1]), "features": _features_text(prep.features)}
    if prep.features["tokens"] == "aligned":  # the rows the probe saw: each split's tokens (skipped_rows counts them)
        entry["token_rows"] = {split: len(x) for split, x in xs.items()}
    if task == "regression":
        entry["target_shape"] = prep.features["target_shape"]  # of r2_per_dim, flat in the metrics
    if labels:
        entry["classes"] = labels  # class i of the probe's outputs is the label value labels[i]
    solver = _solver_of(opts)
    entry["solver"] = solver
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the test split's predictions and targets
    for control in ([False, True] if opts.control else [False]):
        label = f"{name}{' (control)' if control else ''}"
        safe = _safe_name(name) + ("-control" if control else "")
        targets = _control(ys, opts.seed) if control else ys
        weights = os.path.join(opts.out, f"{safe}.pt")
        result: dict[str, Any] = {}
        if solver == "direct" or opts.kind == "mlp":  # an MLP starts from the linear optimum
            try:
                model, penalty, penalties = _fit_direct(replace(opts, weight_decay=None) if opts.kind == "mlp" else opts,
                                                        task, xs, targets, len(labels))
            except ProbeError as exc:
                raise ProbeError(f"{label}: {exc}") from None
            result = {"penalty": penalty, "penalties": penalties} if solver == "direct" else {"linear_penalty": penalty}
        if solver == "adamw":
            trainer = _Trainer(opts, task, xs, targets, len(labels), os.path.join(opts.out, f"{safe}.state.pt"),
                               linear=model if opts.kind == "mlp" else None)
            trainer.fit(label)
            model = trainer.model
            result |= {"best_epoch": trainer.best[1], "epochs": trainer.epoch, "skipped_steps": trainer.skipped_steps,
                       "grad_spikes": trainer.grad_spikes, "history": trainer.history}
        torch.save(_probe_file(opts, name, control, prep, model, source), weights)
        which = "control" if control else "probe"
        tests[which] = (_predict(model, xs["test"], opts.device), targets["test"])
        entry[which] = {"test": _metrics(task, *tests[which]),
                        "val": _metrics(task, _predict(model, xs["val"], opts.device), targets["val"]),
                        **result, "weights": weights}
    head = _headline(task, opts.metric)
    if opts.control:
        entry["selectivity"] = entry["probe"]["test"][head] - entry["control"]["test"][head]
    _add_intervals(entry, head, tests, opts.seed, prep.test_groups)
    return entry


def _features_text(features: dict) -> str:
    """What a probe's input is, in words: which tokens of the stored rows, and how reduced."""
    count = row_tokens(features["row_shape"], features["channel_axis"])[0]
    if features["tokens"] == "aligned":
        text = f"tokens one by one ({'their count varies' if features['ragged'] else f'{count} a row'}), each with its own target value"
    elif features["ragged"]:
        text = "mean of each row's tokens (their count varies)"
    elif not count:
        text = "stored row"
    elif "token" in features:
        text = f"token {features['token']} of {count}"
    else:
        text = f"mean of {count} tokens" if features["tokens"] == "mean" else f"{count} tokens side by side"
    reduction = features["reduction"]
    return text + ("" if reduction == "none" else f" (reduced at extraction: {reduction})")


def token_mean_shape(features: dict) -> tuple[int, ...] | None:
    """The shape of the mean of a row's tokens (what --tokens mean reads) for rows held as
    features describes them (row_shape, ragged, channel_axis, reduction), where that mean is over
    every token the module gave: rows stored whole or ragged, averaged at extraction, or averaged
    in equal groups (mean:G, frames). None where extraction kept some tokens alone (first, last, a
    token list). A row without tokens is its own mean."""
    kept, _ = parse_recorded_reduction(features["reduction"])
    if not (kept in ("none", "mean") or str(kept).startswith("mean:")):
        return None
    if features["ragged"]:
        return tuple(features["row_shape"][-1:])
    tokens, width = row_tokens(features["row_shape"], features["channel_axis"])
    return (width,) if tokens else tuple(features["row_shape"])


def _add_intervals(entry: dict, metric: str, tests: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int,
                   groups: np.ndarray | None) -> None:
    intervals = _intervals(metric, tests, seed, groups)
    for which in intervals.keys() & tests.keys():
        entry[which]["test"][f"{metric}_ci95"] = intervals[which]
    if "selectivity" in intervals:
        entry["selectivity_ci95"] = intervals["selectivity"]


PROBE_FORMAT = "marstore-probe/1"


def source_ranges(sources: np.ndarray) -> np.ndarray:
    """Source indices as sorted, disjoint [start, stop) ranges, (k, 2) int64: a probe file records
    the samples it saw this way, a few ranges for an extraction of consecutive samples."""
    s = np.unique(np.asarray(sources, dtype=np.int64))
    if not len(s):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(s) != 1) + 1
    return np.stack([s[np.r_[0, breaks]], s[np.r_[breaks - 1, len(s) - 1]] + 1], 1)


def in_ranges(values: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Whether each value lies in one of source_ranges' ranges."""
    at = np.searchsorted(ranges[:, 0], values, side="right") - 1
    return (at >= 0) & (values < ranges[np.maximum(at, 0), 1]) if len(ranges) else np.zeros(len(values), dtype=bool)


def _probe_file(opts: ProbeOptions, name: str, control: bool, prep: _Prepared, model: nn.Module, source: dict) -> dict:
    """A trained probe as one file that loads with weights_only=True and needs nothing else to be
    applied (load_probe): its weights, the statistics that standardised its input, how rows of
    the layer become that input, its classes, and the samples it was fitted or chosen on."""
    return {"format": PROBE_FORMAT, "name": name, "layer": prep.features["layer"], "target": opts.target,
            "control": control, "task": prep.task, "kind": opts.kind, "hidden": opts.hidden, "classes": prep.labels,
            "features": prep.features, "seen_sources": torch.from_numpy(source_ranges(prep.seen_sources)), "trained_on": source,
            "options": _recorded(opts), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


class TrainedProbe(nn.Module):
    """A probe that `marstore probe` trained, from its file (load_probe). Called on rows of its
    layer as a store holds them, (rows, *row_shape), or (rows, tokens, *token_shape) for a ragged
    layer, it gives the probe's outputs (logits, or the target's values); for a layer that
    extraction reduced on the device it also takes the module's capture before that reduction
    (UVA's (B, 1024, D) blocks for a store of token means). predict() gives labels or values.
    features() and head are the two halves: rows as read (after the read-time token reduction)
    to standardised input, and the fitted model."""

    def __init__(self, file: dict, path: str = ""):
        super().__init__()
        self.path = path
        self.name, self.layer = file["name"], file["layer"]  # the report's name (a token's: layer[i]), the store's
        self.target, self.task, self.kind = file["target"], file["task"], file["kind"]
        self.control, self.classes = file["control"], list(file["classes"])
        # the store it was trained on; "dataset" ([--dataset, --dataset-arg]) is None where not recorded
        self.trained_on = {"dataset": [None, None], **file["trained_on"]}
        self.seen_sources = file["seen_sources"].numpy()  # [start, stop) ranges
        self.where = list(file["options"].get("where", []))  # the conditions on its rows (--where), if any
        f = file["features"]
        self.row_shape, self.ragged, self.tokens, self.token = tuple(f["row_shape"]), f["ragged"], f["tokens"], f.get("token")
        self.channel_axis, self.reduction, self.channels_first = f["channel_axis"], f["reduction"], f["channels_first"]
        # how extraction hooked the module: a firing policy (None in files written before it was
        # recorded), and k where the module ran on k rows a sample, unfolded to (B, k, ...) (as
        # its layout says; sample-major in files written before it was recorded)
        self.multi_fire, self.unfolded = f.get("multi_fire"), f.get("unfolded")
        self.unfold_layout = recorded_unfold(self.unfolded, f.get("unfold_layout"))
        self.register_buffer("mean", f["mean"])
        self.register_buffer("std", f["std"])
        state = file["state_dict"]
        if self.kind == "linear":
            self.head: nn.Module = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        else:
            self.head = ResidualMLP(state["linear.weight"].shape[1], file["hidden"], state["linear.weight"].shape[0])
        self.head.load_state_dict(state)
        self.target_shape = tuple(f.get("target_shape", ()))
        self.target_tokens = tuple(f.get("target_tokens", ()))  # --tokens aligned: the target's axes of the tokens
        self.requires_grad_(False).eval()  # fitted: gradients reach the activations only

    def saw(self, sources: np.ndarray | Sequence[int]) -> np.ndarray:
        """For each source index (a sample of the data set the probe was trained on): whether the
        probe was fitted or chosen on it (its training or validation rows). Its test samples, and
        samples its store never held, are unseen."""
        return in_ranges(np.asarray(sources, dtype=np.int64), self.seen_sources)

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """The probe's input from rows as ActivationDataset reads them for it (reduction="mean"
        where the probe took token means, else None); --tokens aligned: a row for each token,
        the rows' tokens one after another."""
        x = feature_rows(rows.float(), self.mean, self.std, None if self.tokens == "mean" else self.channel_axis,
                         self.token)
        return x.reshape(-1, row_tokens(self.row_shape, self.channel_axis)[1]) if self.tokens == "aligned" else x

    def _as_stored(self, x: torch.Tensor) -> torch.Tensor:
        stored = x.shape[2:] == self.row_shape if self.ragged else x.shape[1:] == self.row_shape
        layout = UnfoldLayout.parse(self.unfold_layout) if self.unfolded else None
        if layout is not None and not stored and len(x) % self.unfolded == 0:
            # the module's own B*k rows, unfolded as extraction did
            x = layout.unfold(x, len(x) // self.unfolded)
            stored = x.shape[1:] == self.row_shape
        if stored or self.reduction == "none" or self.ragged:
            if not stored:
                form = f"(rows, tokens, {', '.join(map(str, self.row_shape))})" if self.ragged else f"(rows, {self.row_shape})"
                raise ProbeError(f"{self.name}: activations of shape {tuple(x.shape)}; this probe takes rows shaped {form}")
            return x
        try:
            reduced = reduce_tokens(x.float(), *parse_recorded_reduction(self.reduction),
                                    len(layout.axes) if layout is not None else 1)  # the channels follow the unfolded axes
        except HookError as exc:
            reduced, why = None, f" ({exc})"
        else:
            why = ""
        if reduced is None or reduced.shape[1:] != self.row_shape:
            raise ProbeError(f"{self.name}: activations of shape {tuple(x.shape)}; this probe takes rows of shape "
                             f"{self.row_shape}, as the store holds them, or the capture that extraction reduced to them "
                             f"(reduction {reduction_text(self.reduction)}){why}")
        return reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, outputs), or (rows, tokens, outputs) for a probe of each token (--tokens aligned)."""
        rows = reduce_read_tokens(self._as_stored(x), "mean" if self.tokens == "mean" else None, 1,
                                  self.channel_axis)
        out = self.head(self.features(rows))
        return out.reshape(len(rows), -1, out.shape[-1]) if self.tokens == "aligned" else out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor | list:
        """Class labels (the label values the store held: ints, or strings as a list), or the
        target's values (rows, *dims) for a regression; a probe of each token (--tokens aligned)
        gives them for each token, laid out as its target was ((rows, h, w) for a (rows, h, w) map), or a
        list of rows of strings."""
        out = self(x)
        tokens = self.target_tokens or ((-1,) if self.tokens == "aligned" else ())  # a ragged layer's: as padded
        if self.task == "regression":
            return out.reshape(len(out), *tokens, *self.target_shape)
        chosen = out.argmax(-1).reshape(len(out), *tokens)
        if self.classes and isinstance(self.classes[0], str):
            return np.array(self.classes, dtype=object)[chosen.numpy()].tolist()
        return torch.tensor(self.classes, dtype=torch.long)[chosen]


def load_probe(path: str | os.PathLike) -> TrainedProbe:
    """A probe file (`<layer>.pt`, or `<layer>-control.pt`, in the folder `marstore probe` wrote)
    as a TrainedProbe. Loaded with weights_only=True: a probe file holds no pickle."""
    path = os.fspath(path)
    try:
        file = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ProbeError(f"{path}: not a probe file that loads ({reason})") from None
    if not isinstance(file, dict) or file.get("format") != PROBE_FORMAT:
        if isinstance(file, dict) and file and all(isinstance(v, torch.Tensor) for v in file.values()):
            raise ProbeError(f"{path} holds a bare state dict, as marstore wrote probes before {PROBE_FORMAT}: it lacks "
                             "the statistics and classes a probe needs to be applied; run `marstore probe` again")
        found = file.get("format") if isinstance(file, dict) else type(file).__name__
        raise ProbeError(f"{path} is not a marstore probe file (format {found!r}; this marstore reads {PROBE_FORMAT!r})")
    missing = sorted(_PROBE_KEYS - file.keys())
    if missing:  # a file of a development version of the format
        raise ProbeError(f"{path} lacks {', '.join(missing)}, which a {PROBE_FORMAT} file holds; run `marstore probe` again")
    return TrainedProbe(file, path)


_PROBE_KEYS = frozenset({"name", "layer", "target", "control", "task", "kind", "hidden", "classes", "features", "seen_sources",
                         "trained_on", "state_dict"})


def _solver_of(opts: ProbeOptions) -> str:
    if opts.solver != "auto":
        return opts.solver
    return "direct" if opts.kind == "linear" else "adamw"


def _safe_name(layer: str) -> str:
    return layer.replace("/", "_")


def _finished_path(opts: ProbeOptions, layer: str) -> str:
    return os.path.join(opts.out, f"{_safe_name(layer)}.done.json")


_NOT_RECORDED = ("resume", "progress", "device")  # options that change where or how, not the result


def _recorded(opts: ProbeOptions) -> dict:
    """The options a resume must repeat to reach the same result (not where, or how shown)."""
    return {k: v for k, v in asdict(opts).items() if k not in _NOT_RECORDED}


def _check_same_options(label: str, then: dict, opts: ProbeOptions) -> None:
    now = _recorded(opts)
    differ = sorted(k for k in now if then.get(k) != now[k])
    if differ:
        raise ProbeError(f"{label}: --resume: the options differ from the interrupted run's: " + ", ".join(
            f"{k} (then {then.get(k)!r}, now {now[k]!r})" for k in differ) + "; repeat them, or run without --resume to start over")


def _finished_report(opts: ProbeOptions, source: dict) -> dict | None:
    """With resume, the report that a run with these options wrote on this store, when there is
    one: kept, not trained again (the targets of `marstore probe --target a b` resume this way)."""
    path = os.path.join(opts.out, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    recorded = {k: v for k, v in report.get("options", {}).items() if k not in _NOT_RECORDED}
    if recorded != json.loads(json.dumps(_recorded(opts))) or (report.get("store"), report.get("rows")) != (
            source["path"], source["rows"]):
        return None
    log.info("%s: finished before with these options on these rows: kept", path)
    return {**report, "report": path, "markdown": os.path.join(opts.out, "report.md")}


def _finished_before(opts: ProbeOptions, layer: str, source: dict) -> list[dict] | None:
    """With resume, the entries of a layer that an interrupted run finished, when it was trained
    with these options on these rows of this store."""
    path = _finished_path(opts, layer)
    if not (opts.resume and os.path.exists(path)):
        return None
    with open(path) as f:
        done = json.load(f)
    _check_same_options(layer, done["options"], opts)
    if done["store"] != source:
        raise ProbeError(f"{layer}: --resume: the store is not the one the interrupted run read ({done['store']['rows']} rows "
                         f"then, {source['rows']} now; created {done['store']['created']} then, {source['created']} now); "
                         "run without --resume to start over")
    log.info("%s: kept the probe finished before the interruption (%s)", layer, path)
    return done["entries"]


def _write_json(path: str, value: dict) -> None:
    def write(aside: str) -> None:
        with open(aside, "w") as f:
            json.dump(value, f)

    _replace_whole(path, write)


def _replace_whole(path: str, write: Callable[[str], None]) -> None:
    """Whole or not at all: written aside, then renamed, so that a second Ctrl-C never leaves
    half a file to resume from."""
    write(path + ".partial")
    os.replace(path + ".partial", path)


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c() -> Iterator[dict]:
    """SIGTERM, what a batch scheduler sends before it kills a job, stops the probes as Ctrl-C
    does (where Python's default handling is in place, in the main thread). Yields the signal
    that stopped them."""
    stop = {"signum": signal.SIGINT}
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        stop["signum"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _plots(report: dict, out: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = report_depth_plot(report, out, f"What each layer knows about {report['target']}")
    curves = os.path.join(out, "loss_curves.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    by_penalty = report["solver"] == "direct"  # no epochs: the loss that chose among the penalties
    loss = "loo_loss" if by_penalty and report["task"] == "regression" else "val_loss"
    for r in report["layers"]:
        points = r["probe"]["penalties"] if by_penalty else r["probe"]["history"]
        ax.plot([e["penalty" if by_penalty else "epoch"] for e in points], [e[loss] for e in points],
                "o-" if by_penalty else "-", label=r["layer"])
    if by_penalty:
        ax.set_xscale("log")
    ax.set_xlabel("L2 penalty" if by_penalty else "epoch")
    ax.set_ylabel("leave-one-out loss (training rows)" if loss == "loo_loss" else "validation loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return {"depth": depth, "loss_curves": curves, **report_breakdown_plot(report, out)}


MAX_CLASS_COLUMNS = 50  # by_class.png's columns: more would be unreadable


def report_breakdown_plot(report: dict, out: str) -> dict:
    """A heatmap of each layer's probe at each part of the target, where the target has parts:
    {"by_position": path} for a regression whose target has several values a row (test R² at
    each position of its first axis, the other axes averaged: how far along UVA's 16-step action
    horizon a layer reads the actions); {"by_class": path} for a classification of 2 to
    MAX_CLASS_COLUMNS classes (each class's test recall: which tasks a layer tells apart). {}
    for other reports."""
    if report["task"] == "regression":
        entries = [e for e in report["layers"] if e.get("target_shape")]
        if not entries or math.prod(entries[0]["target_shape"]) < 2:
            return {}
        shape = entries[0]["target_shape"]
        values = np.array([np.reshape(e["probe"]["test"]["r2_per_dim"], shape).reshape(shape[0], -1).mean(1) for e in entries])
        kind, label = "by_position", "test R²"
        xlabel = (f"position along the first axis of {report['target']} {tuple(shape)}"
                  + (" (the others averaged)" if len(shape) > 1 else ""))
        title = f"Test R² of each layer's probe for {report['target']}, by position"
        columns = None
    else:
        entries = [e for e in report["layers"] if "recall_per_class" in e["probe"]["test"]]
        classes = entries[0]["classes"] if entries else []
        if not 2 <= len(classes) <= MAX_CLASS_COLUMNS:
            return {}
        values = np.array([[np.nan if v is None else v for v in e["probe"]["test"]["recall_per_class"]]
                           for e in entries], dtype=float)
        kind, label = "by_class", "test recall"
        xlabel, title = f"class of {report['target']}", f"Test recall of each class of {report['target']}, by layer"
        columns = [str(c) for c in classes]
    path = os.path.join(out, f"{kind}.png")
    heatmap(path, values, [e["layer"] for e in entries], columns, label=label, title=title, xlabel=xlabel)
    return {kind: path}


def report_depth_plot(report: dict, out: str, title: str) -> str:
    """depth.png of a report: each layer's test metric, its control's, and their bands."""
    metric, by_layer = report["metric"], {r["layer"]: r for r in report["layers"]}
    path = os.path.join(out, "depth.png")
    _depth_plot(path, list(by_layer), metric, title,
                [(f"probe ({metric})", "o-", None, by_layer, "probe"), ("control task", "s--", None, by_layer, "control")])
    return path


def _depth_plot(path: str, names: list[str], metric: str, title: str,
                lines: list[tuple[str, str, str | None, dict[str, dict], str]]) -> None:
    """The test metric of each layer, a line (label, style, color, layer entries by name, "probe"
    or "control") at a time, with its 95% band where every point has one; a layer a line lacks
    leaves a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(max(6, 0.6 * len(names)), 24), 4))
    for label, style, color, entries, which in lines:
        tests = [entries[n][which]["test"] if n in entries and which in entries[n] else None for n in names]
        if all(t is None for t in tests):
            continue
        values = [math.nan if t is None else t[metric] for t in tests]
        line, = ax.plot(range(len(names)), values, style, label=label, color=color)
        if all(t is None or f"{metric}_ci95" in t for t in tests):
            low, high = zip(*((math.nan, math.nan) if t is None else t[f"{metric}_ci95"] for t in tests))
            ax.fill_between(range(len(names)), low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    step = max(1, math.ceil(len(names) / 40))  # at most 40 names on the axis (a probe for each of 100 denoising steps)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=45, ha="right")
    ax.set_ylabel(f"test {metric} (bands: 95% bootstrap intervals)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_report(path: str) -> dict:
    file = os.path.join(path, "report.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ProbeError(f"{path}: no probe report to read ({reason}); give a folder that `marstore probe` wrote, or its "
                         "report.json") from None
    if not isinstance(report, dict) or not {"target", "metric", "layers"} <= report.keys():
        raise ProbeError(f"{file} is not a report of `marstore probe` (it lacks target, metric or layers)")
    return report


def compare_reports(paths: Sequence[str], out: str, labels: Sequence[str] | None = None) -> dict:
    """Probe reports side by side (one per checkpoint of a training run, say): depth.png with
    each report's probe metric (solid, with its band) and control (dashed), report.md and
    comparison.json with each layer's metric and interval per report. The reports must be of
    one target and metric; layers are matched by name, in the order the reports give them."""
    labels = list(labels) if labels else [os.path.normpath(p) for p in paths]
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise ProbeError(f"--label {' '.join(labels)}: give one distinct label for each of the {len(paths)} reports")
    if len(paths) < 2:
        raise ProbeError("give two reports or more to compare")
    reports = [_read_report(p) for p in paths]
    kinds = sorted({(r["target"], r["metric"]) for r in reports})
    if len(kinds) > 1:
        raise ProbeError("the reports are of different targets or metrics ("
                         + ", ".join(f"{label}: {r['target']} {r['metric']}" for label, r in zip(labels, reports))
                         + "); compare reports of one target")
    (target, metric), = kinds
    names = list(dict.fromkeys(entry["layer"] for r in reports for entry in r["layers"]))
    by_layer = [{entry["layer"]: entry for entry in r["layers"]} for r in reports]
    os.makedirs(out, exist_ok=True)
    colors = [f"C{i % 10}" for i in range(len(reports))]
    depth = os.path.join(out, "depth.png")
    _depth_plot(depth, names, metric, f"What each layer knows about {target}",
                [(label, "o-", color, entries, "probe") for label, color, entries in zip(labels, colors, by_layer)]
                + [(f"{label} (control)", "--", color, entries, "control")
                   for label, color, entries in zip(labels, colors, by_layer)])
    def summary(entry: dict | None) -> dict | None:  # a layer's figures in one report
        if entry is None:
            return None
        return {metric: entry["probe"]["test"][metric], "ci95": entry["probe"]["test"].get(f"{metric}_ci95"),
                "control": entry["control"]["test"][metric] if "control" in entry else None}

    comparison = {"target": target, "metric": metric, "reports": [os.path.abspath(p) for p in paths], "labels": labels,
                  "layers": {n: {label: summary(entries.get(n)) for label, entries in zip(labels, by_layer)} for n in names}}
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump(comparison, f, indent=2)

    def cell(value: dict | None) -> str:
        if value is None:
            return "-"
        return f"{value[metric]:.3f}" + ("" if value["ci95"] is None else " ({:.3f} to {:.3f})".format(*value["ci95"]))

    header = ["layer", *labels]
    rows = [[n, *(cell(comparison["layers"][n][label]) for label in labels)] for n in names]
    markdown = os.path.join(out, "report.md")
    with open(markdown, "w") as f:
        f.write("\n".join([f"# What each layer knows about `{target}`, by report", "",
                           f"Test {metric} of each layer's probe (its 95% interval); `-`: a layer the report lacks.", "",
                           *markdown_table(header, rows), "",
                           f"![test {metric} of each layer, by report]({os.path.basename(depth)})", ""]))
    return {"depth": depth, "markdown": markdown, "json": os.path.join(out, "comparison.json"),
            "table": text_table(header, rows),
            "comparison": comparison}


def summarize_targets(reports: Sequence[dict], out: str) -> dict:
    """What each layer knows about each of several targets (the reports of `marstore probe
    --target a b c`): by_target.png, a heatmap of layers x targets of each report's test metric
    (R² or the classification's headline), and summary.md with the same table; a layer a report
    lacks is blank. {"by_target": path, "markdown": path, "table": rows of text}."""
    names = list(dict.fromkeys(e["layer"] for r in reports for e in r["layers"]))
    columns = [f"{r['target']} ({r['metric']})" for r in reports]
    values = np.full((len(names), len(reports)), np.nan)
    for j, r in enumerate(reports):
        for e in r["layers"]:
            values[names.index(e["layer"]), j] = e["probe"]["test"][r["metric"]]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "by_target.png")
    heatmap(path, values, names, columns, label="test metric", annotate=True,
            title="What each layer knows about each target (test metric)")
    header = ["layer", *columns]
    rows = [[n, *("-" if np.isnan(v) else f"{v:.3f}" for v in values[i])] for i, n in enumerate(names)]
    markdown = os.path.join(out, "summary.md")
    with open(markdown, "w") as f:
        f.write("\n".join(["# What each layer knows about each target", "",
                           "Each report's test metric; the reports, with intervals and controls, are in the folders of "
                           "the targets.", "", *markdown_table(header, rows), "",
                           f"![test metric of each layer for each target]({os.path.basename(path)})", ""]))
    return {"by_target": path, "markdown": markdown, "table": text_table(header, rows)}


def _table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The by-layer table's header and cells, for the terminal and for report.md."""
    metric = report["metric"]
    header = ["layer", metric, "95% interval", "control", "select.", "skipped rows", "skipped steps"]
    cells = []
    for r in report["layers"]:
        ctrl = r.get("control", {}).get("test", {}).get(metric)
        sel = r.get("selectivity")
        interval = r["probe"]["test"].get(f"{metric}_ci95")  # absent from reports older than the intervals
        cells.append([r["layer"], f"{r['probe']['test'][metric]:.3f}", "" if interval is None else "{:.3f} to {:.3f}".format(*interval),
                      "" if ctrl is None else f"{ctrl:.3f}",
                      "" if sel is None else f"{sel:.3f}", str(r["skipped_rows"]),
                      str(r["probe"].get("skipped_steps", "-"))])  # the direct solver takes no steps to skip
    return header, cells


def table(report: dict) -> str:
    header, cells = _table_rows(report)
    widths = (max(9, len(header[1])), 17, 9, 8, 13, 14)
    return "\n".join(" ".join([f"{row[0]:<28}", *(f"{c:>{w}}" for c, w in zip(row[1:], widths))]) for row in [header, *cells])


def _solver_text(report: dict) -> str:
    if report["solver"] == "adamw" and report["options"]["kind"] == "mlp":
        return ("each the linear probe's optimum (frozen) plus an MLP trained by AdamW on minibatches on what it leaves, "
                "the best validation epoch kept (epoch -1: the linear optimum alone)")
    if report["solver"] == "adamw":
        return "trained by AdamW on minibatches, the best validation epoch kept"
    if report["task"] == "regression":
        fit, by = "in closed form (ridge)", "by its leave-one-out error over the training rows"
    else:
        fit, by = "by L-BFGS (logistic regression)", "on the validation split"
    return f"solved {fit}" + (f"; the L2 penalty was chosen {by}" if report["options"]["weight_decay"] is None else "")


def _breakdown_lines(report: dict) -> list[str]:
    """report.md's lines for the by-position or by-class heatmap, where there is one."""
    if "by_position" in report["plots"]:
        return [f"![test R² of each layer's probe at each position of {report['target']}]"
                f"({os.path.basename(report['plots']['by_position'])})", ""]
    if "by_class" in report["plots"]:
        return [f"![test recall of each class of {report['target']}, by layer]"
                f"({os.path.basename(report['plots']['by_class'])})", ""]
    return []


def probe_inputs(report: dict, header: list[str], cells: list[list[str]]) -> str:
    """What the probes read, for report.md: a sentence where every probe reads alike (" Each
    probe reads the mean of 64 tokens, 64 inputs."), else a column put into the table (--tokens
    each); "" for reports older than the entries' features."""
    inputs = [f"{r['features']}, {r['inputs']} inputs" for r in report["layers"] if "features" in r]
    if len(set(inputs)) == 1:
        return f" Each probe reads the {inputs[0]}."
    if inputs:
        header.insert(1, "probe input")
        for row, text in zip(cells, inputs):
            row.insert(1, text)
    return ""


def _markdown(report: dict, out: str) -> str:
    """report.md: the table and the plots, for a notebook, a pull request or a browser."""
    header, cells = _table_rows(report)
    o = report["options"]
    drawn = f" (drawn by whole {o['group']!r} groups)" if o["group"] else ""
    reads = probe_inputs(report, header, cells)
    row_where = [c for c in o.get("where") or [] if c not in report.get("token_where", [])]
    lines = [
        f"# What each layer knows about `{report['target']}`",
        "",
        f"Store `{report['store']}` ({report['store_status']}, {report['rows']} rows"
        + (f"; the {report.get('where_rows', report.get('selected_rows'))} where {' and '.join(row_where)}"
           if row_where else "")
        + (f"; {report['selected_rows']} of them, drawn at random with seed {o['seed']} by --max-rows"
           if report.get("where_rows", 0) > report.get("selected_rows", 0) else "")
        + (f"; their tokens where {' and '.join(report['token_where'])}" if report.get("token_where") else "") +
        f"). {'MLP' if o['kind'] == 'mlp' else 'Linear'} probes "
        f"for {report['task']}, {_solver_text(report)}; the metric is the test {report['metric']}, its 95% interval "
        f"the percentiles of {BOOTSTRAP_DRAWS} resamples of the test rows{drawn}.{reads} " + (
            "The control is the same probe trained on the targets shuffled across rows; selectivity is the probe's "
            "metric less the control's." if o["control"] else "No control task was trained."),
        "",
        *markdown_table(header, cells),
        "",
        f"![test {report['metric']} of each layer's probe and its control]({os.path.basename(report['plots']['depth'])})",
        "",
        f"![the loss that chose each probe, by {'L2 penalty' if report['solver'] == 'direct' else 'epoch'}]"
        f"({os.path.basename(report['plots']['loss_curves'])})",
        "",
        *_breakdown_lines(report),
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path

