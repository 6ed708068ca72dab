"""Shared pieces of the reliability scripts (DDP, crash/resume) and their tests.

A tiny fx-traceable CNN, a deterministic synthetic dataset whose items carry their index (so a
test can see which samples formed each global batch), the full callback stack, and probes that
record, per optimizer step, digests of the state every callback touches. Everything here is plain
``torch``/``lightning``: the scripts run it in separate processes, the tests import it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sparsity import (
    FilterThresholding,
    ProximalSparsity,
    PrunedCheckpointMixin,
    PrunedExport,
    SparsityMonitor,
    SparsityRegularizer,
    VariableSplitting,
)
from lightning_sparsity.functional.scores import filter_norms

N_SAMPLES = 128
N_CLASSES = 4
IMAGE = (1, 10, 10)


class TinyNet(nn.Module):
    """conv(1->8) ReLU conv(8->12) ReLU maxpool flatten fc(48->16) ReLU fc(16->4); optional BN."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.bn1: nn.Module = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(8, 12, 3)
        self.pool = nn.MaxPool2d(3)
        self.fc1 = nn.Linear(12 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class IndexedData(torch.utils.data.Dataset):
    """``N_SAMPLES`` fixed samples ``(x, y, index)``; labels from a fixed random projection."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(N_SAMPLES, *IMAGE, generator=g)
        proj = torch.randn(IMAGE[1] * IMAGE[2], N_CLASSES, generator=g)
        self.y = (self.x.flatten(1) @ proj).argmax(1)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


class LitTiny(PrunedCheckpointMixin):
    """Cross-entropy on ``TinyNet`` with Adam; records the sample indices of every batch."""

    def __init__(self, lr: float = 0.02, batchnorm: bool = False, crash: str = "") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet(batchnorm)
        self.seen: list[list[int]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, idx = batch
        self.seen.append([int(i) for i in idx])
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loader(
    batch_size: int, *, single_process_reference: bool = False
) -> torch.utils.data.DataLoader:
    """The training loader, sequential and without workers.

    Under ``strategy="ddp"`` Lightning replaces its sampler by a ``DistributedSampler`` with
    ``shuffle=True`` (always, for training) and ``seed=PL_GLOBAL_SEED``: each epoch a permutation
    ``perm = randperm(N, generator=seed + epoch)`` that does not depend on the number of ranks, of
    which rank ``r`` of ``R`` takes ``perm[r::R]``. Batch ``k`` of every rank together is thus
    ``perm[k*R*b : (k+1)*R*b]``. ``single_process_reference=True`` gives one process the same
    permutation (a ``DistributedSampler`` with one replica and the same seed; Lightning calls its
    ``set_epoch`` every epoch), so ``R`` ranks of batch ``b`` and one process of batch ``R*b`` see
    the same global batches, in the same order.
    """
    data = IndexedData()
    sampler = None
    if single_process_reference:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=1, rank=0, shuffle=True, seed=seed
        )
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)


class ResumableLoader(torch.utils.data.DataLoader):
    """A sequential loader that Lightning can resume mid-epoch (it has ``state_dict`` /
    ``load_state_dict``, Lightning's ``_Stateful``): ``consumed`` counts the batches the training
    loop finished in the current epoch (``CountConsumed`` increments it before ``ModelCheckpoint``
    saves); after ``load_state_dict`` the next iteration skips them. Without such a loader
    Lightning warns that a mid-epoch resume is unreliable and restarts the epoch's data.
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__(IndexedData(), batch_size=batch_size, shuffle=False)
        self.consumed = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict.get("consumed", 0))


class CountConsumed(pl.Callback):
    """First in the callback list: one more finished batch, before ModelCheckpoint saves."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def on_train_batch_end(self, *args: Any) -> None:
        self.loader.consumed += 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("LOCAL_RANK", 0))


class RankDependentScore:
    """A thresholding criterion that disagrees between ranks: rank 0 ranks filters by their L2 norm
    (kills the weakest), every other rank by minus the norm (would kill the strongest). Masks that
    still agree across ranks prove the decision is rank 0's, shared by broadcast.
    """

    def __init__(self) -> None:
        self.local_choices: list[list[int]] = []

    def __call__(self, weight: Tensor) -> Tensor:
        norms = filter_norms(weight, "l2")
        scores = norms if rank() == 0 else -norms
        self.local_choices.append([int(i) for i in torch.argsort(scores, stable=True)[:2]])
        return scores


def digest(tensors: Iterable[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:24]


def layer(pl_module: pl.LightningModule, name: str) -> nn.Module:
    return pl_module.model.get_submodule(name)


class GradProbe(pl.Callback):
    """Put one before and one after a gradient-adding callback: their difference is the
    callback's contribution, recorded per optimizer step.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(
            {n: layer(pl_module, n).weight.grad.detach().clone() for n in self.names}  # type: ignore[union-attr]
        )


class WeightProbe(pl.Callback):
    """Records the weights of ``names`` at every ``on_train_batch_end`` (where it stands in the
    callback list decides before/after which callback).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.weights: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.weights.append({n: layer(pl_module, n).weight.detach().clone() for n in self.names})


class Recorder(pl.Callback):
    """Last in the list: per step a digest of every parameter, per epoch the masks, and at fit end
    (still inside the Trainer, process group up) everything gathered to every rank.
    """

    def __init__(self, callbacks: dict[str, Any], probes: dict[str, Any]) -> None:
        self.callbacks = callbacks
        self.probes = probes
        self.param_digests: list[str] = []
        self.masks: list[dict[str, list[bool]]] = []
        self.splitting: list[dict[str, Any]] = []
        self.gathered: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.param_digests.append(digest(pl_module.parameters()))
        split = self.callbacks.get("splitting")
        if split is not None:
            self.splitting.append(
                {"beta": split.beta, "U": digest(split.U[k] for k in sorted(split.U))}
            )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        masks = {}
        for key in ("thresholding", "rank_thresholding"):
            cb = self.callbacks.get(key)
            if cb is not None:
                masks.update({f"{key}/{n}": m.tolist() for n, m in cb.masks.items()})
        self.masks.append(masks)

    def record(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        probes = self.probes
        out: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "seen": pl_module.seen,
            "param_digests": self.param_digests,
            "masks": self.masks,
            "splitting": self.splitting,
            "final_weights": {
                k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
            },
            "metrics": {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("sparsity/")
            },
        }
        if "grad_before" in probes:
            before, after = probes["grad_before"].grads, probes["grad_after"].grads
            out["penalty_grads"] = [
                digest(a[n] - b[n] for n in sorted(a)) for a, b in zip(after, before)
            ]
            out["penalty_grad_nonzero"] = sum(
                int(any(bool((a[n] - b[n]).abs().sum() > 0) for n in a))
                for a, b in zip(after, before)
            )
        if "prox_before" in probes:
            before, after = probes["prox_before"].weights, probes["prox_after"].weights
            out["prox_weights"] = [digest(a[n] for n in sorted(a)) for a in after]
            out["prox_changed"] = sum(
                int(any(not torch.equal(a[n], b[n]) for n in a)) for a, b in zip(after, before)
            )
            out["prox_zero_filters"] = [
                int((filter_norms(a[n], "l2") == 0).sum()) for a in after for n in sorted(a)
            ]
        rank_cb = self.callbacks.get("rank_criterion")
        if rank_cb is not None:
            out["rank_local_choices"] = rank_cb.local_choices
        split = self.callbacks.get("splitting")
        if split is not None:
            out["splitting_final"] = {
                "beta": split.beta,
                "U": {k: v.cpu() for k, v in split.U.items()},
            }
        export = self.callbacks.get("export")
        if export is not None:
            out["export_paths"] = {k: str(v) for k, v in export.paths.items()}
        return out

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        mine = self.record(trainer, pl_module)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            self.gathered = gathered
        else:
            self.gathered = [mine]


def build_callbacks(export_dir: Path | None, *, monitor: bool = True) -> tuple[list[Any], Recorder]:
    """Every library callback at once, each on its own layers, wrapped in probes:

    regularizer (l1_l2 on conv1) between two gradient probes; proximal L0 (filters of conv2);
    variable splitting (fc1); thresholding (relative 0.3 of the largest filter norm, every epoch)
    plus a second thresholding of conv1 by the rank-dependent criterion; the monitor; the export.
    The sparsity callbacks run their per-step work together, in their own order, when Lightning
    reaches the first of them in the list: so the weight probes around the proximal map stand
    before and after all of them (their difference is the map and the masks).
    """
    reg = SparsityRegularizer("l1_l2", strength=0.05, layers=["conv1"])
    prox = ProximalSparsity(strength=0.02, penalty="l0", granularity="filter", layers=["conv2"])
    split = VariableSplitting(strength=0.02, beta=1.0, growth_every_n_epochs=1, layers=["fc1"])
    thresholding = FilterThresholding(threshold=0.3, relative=True)
    criterion = RankDependentScore()
    rank_thresholding = FilterThresholding(
        criterion=criterion, fraction=0.2, layers=["conv1"], max_rounds=2
    )
    callbacks: dict[str, Any] = {
        "regularizer": reg,
        "proximal": prox,
        "splitting": split,
        "thresholding": thresholding,
        "rank_thresholding": rank_thresholding,
        "rank_criterion": criterion,
    }
    probes: dict[str, Any] = {
        "grad_before": GradProbe(["conv1"]),
        "grad_after": GradProbe(["conv1"]),
        "prox_before": WeightProbe(["conv2"]),
        "prox_after": WeightProbe(["conv2"]),
    }
    stack: list[Any] = [
        probes["prox_before"],
        probes["grad_before"],
        reg,
        probes["grad_after"],
        prox,
        split,
        thresholding,
        rank_thresholding,
        probes["prox_after"],
    ]
    if monitor:
        callbacks["monitor"] = SparsityMonitor(histograms=False)
        stack.append(callbacks["monitor"])
    if export_dir is not None:
        callbacks["export"] = PrunedExport(dirpath=export_dir, formats=("ckpt", "pt"))
        stack.append(callbacks["export"])
    recorder = Recorder(callbacks, probes)
    stack.append(recorder)
    return stack, recorder


def export_widths(path: Path) -> dict[str, Any]:
    """The pruned widths stored in an exported file (opened with ``weights_only=True``)."""
    return torch.load(path, weights_only=True)["pruned_widths"]["modules"]
