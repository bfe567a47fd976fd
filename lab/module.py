"""The LightningModule that trains every variant: one classifier, one recipe.

- AdamW (or SGD, momentum 0.9, Nesterov) with weight decay on weights only: no decay on
  norms, biases (any parameter with < 2 dims), tokens, position embeddings, attention-bias
  tables (`model.no_weight_decay()`).
- LR: linear warmup over `train.warmup` of the budget, then cosine to `train.min_lr`; set
  before every optimizer step from the progress (global step / total steps, or elapsed
  training time / budget seconds for wall-clock budgets). No scheduler object: resuming
  restores the step (and the timer), hence the LR.
- Optional EMA of the weights (timm ModelEmaV3, updated after every optimizer step); then
  evaluation, the final metrics and the exported weights are the EMA's.
- Optional hard distillation (DeiT): loss = (1 - alpha) * CE(cls, y) + alpha * CE(dist, argmax
  teacher(x)); a model without a distillation head gets both terms on its single head.
  Without a teacher, a model with two heads is trained on their average (what it predicts).
- Mixup/CutMix (timm Mixup from the datamodule) -> SoftTargetCrossEntropy; else CE with
  label smoothing. Top-1/top-5 (%) via torchmetrics.
- A non-finite loss raises `NonFiniteLoss` (the variant fails; the others go on).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from lab import record as R
from lab import track


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf."""


# --------------------------------------------------------------------------- settings


def resolve_accelerator(train) -> str:
    if train.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return train.accelerator


def resolve_precision(train, accelerator: Optional[str] = None) -> str:
    accelerator = accelerator or resolve_accelerator(train)
    if train.precision == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    return train.precision


def lr_at(progress: float, *, lr: float, min_lr: float, warmup: float) -> float:
    """Linear warmup over `warmup` (share of the budget), then cosine from lr to min_lr."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return lr * p / warmup
    span = max(1.0 - warmup, 1e-12)
    t = min(max((p - warmup) / span, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim < 2
            or name in skip
            or name.endswith(".bias")
            or "token" in name.split(".")[-1]
            or "pos" in name.split(".")[-1]
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- the module


class LabModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        train,
        *,
        num_classes: int,
        total_steps: Optional[int] = None,
        global_batch: int = 1,
        mixup_fn: Optional[Callable] = None,
        label_smoothing: float = 0.0,
        teacher: Optional[nn.Module] = None,
    ):
        super().__init__()
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.model = model
        self.cfg = train
        self.num_classes = int(num_classes)
        self.total_steps = total_steps
        self.global_batch = int(global_batch)
        self.mixup_fn = mixup_fn
        self.label_smoothing = float(label_smoothing)
        self.progress_fn: Optional[Callable[[], float]] = None  # wall-clock budgets: share of time used
        self.ema = None
        if train.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=train.ema)
        # not a submodule: neither trained, nor saved in checkpoints, nor switched to train mode
        object.__setattr__(self, "_teacher", teacher.eval().requires_grad_(False) if teacher is not None else None)
        self.distill_alpha = float(train.distill.alpha) if (train.distill is not None and teacher is not None) else 0.0
        self.val_top1 = MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(
            num_classes=self.num_classes, top_k=min(5, self.num_classes), average="micro"
        )
        self.val_loss = MeanMetric()
        if mixup_fn is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        self.last_loss: Optional[torch.Tensor] = None
        self.last_lr: float = 0.0
        self.last_val: dict[str, float] = {}
        self.best_top1: float = float("-inf")
        object.__setattr__(self, "_train_fn", None)  # the model (or its compiled forward): not a 2nd submodule
        if train.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ helpers
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def progress(self) -> float:
        if self.progress_fn is not None:
            return float(self.progress_fn())
        if self.total_steps:
            return self.global_step / self.total_steps
        return 0.0

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _forward_fn(self) -> Callable:
        if self._train_fn is None:
            fn = self.model.forward_heads if self.distill_alpha > 0 else self.model
            object.__setattr__(self, "_train_fn", torch.compile(fn) if self.cfg.compile else fn)
        return self._train_fn

    # ------------------------------------------------------------------ lightning hooks
    def on_fit_start(self) -> None:
        if self._teacher is not None:
            self._teacher.to(self.device)
            if self.cfg.channels_last:
                self._teacher.to(memory_format=torch.channels_last)
        if self.ema is not None:
            self.ema.to(self.device)

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.weight_decay)
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = lr_at(self.progress(), lr=self.cfg.lr, min_lr=self.cfg.min_lr, warmup=self.cfg.warmup)
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        self.last_lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = self._prep(x)
        target = y
        if self.mixup_fn is not None:
            x, target = self.mixup_fn(x, y)
        fn = self._forward_fn()
        if self.distill_alpha > 0:
            cls, dist = fn(x)
            with torch.no_grad():
                t = self._teacher(x).argmax(dim=-1)
            a = self.distill_alpha
            loss = (1 - a) * self.criterion(cls, target) + a * F.cross_entropy(dist if dist is not None else cls, t)
        else:
            loss = self.criterion(fn(x), target)
        self.last_loss = loss.detach()
        if self.device.type == "cpu" or (self.global_step + 1) % self.cfg.log_every == 0:
            if not torch.isfinite(self.last_loss).all():
                raise NonFiniteLoss(
                    f"training loss is {self.last_loss.item()} at step {self.global_step + 1} "
                    f"(lr {self.last_lr:.3g}); lower train.lr or set train.grad_clip"
                )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.eval_model(self._prep(x)).float()
        self.val_loss.update(F.cross_entropy(logits, y), weight=y.shape[0])
        self.val_top1.update(logits, y)
        self.val_top5.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        top1 = float(self.val_top1.compute()) * 100.0
        top5 = float(self.val_top5.compute()) * 100.0
        loss = float(self.val_loss.compute())
        for m in (self.val_top1, self.val_top5, self.val_loss):
            m.reset()
        self.last_val = {R.VAL_TOP1: top1, R.VAL_TOP5: top5, R.VAL_LOSS: loss}
        if not self.trainer.sanity_checking:
            self.best_top1 = max(self.best_top1, top1)

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lab"] = {"best_top1": self.best_top1, "last_val": self.last_val}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lab = checkpoint.get("lab") or {}
        self.best_top1 = float(lab.get("best_top1", float("-inf")))
        self.last_val = dict(lab.get("last_val") or {})

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The weights that were evaluated (EMA's if any), keys of the plain model."""
        return {k: v.detach().cpu() for k, v in self.eval_model.state_dict().items()}


# --------------------------------------------------------------------------- weights files


def save_final(path: Path, module: LabModule, model_cfg: dict[str, Any], **meta: Any) -> Path:
    """`final.pt`: {'model': grafts config dict, 'state_dict': evaluated weights, ...meta}."""
    from lab.checkpoints import write_atomic

    obj = {"model": model_cfg, "state_dict": module.state_dict_for_export(), **meta}
    return write_atomic(path, lambda tmp: torch.save(obj, tmp), keep_previous=False)


def model_state_from_file(path: str | Path) -> tuple[Optional[dict[str, Any]], dict[str, torch.Tensor]]:
    """(model config or None, plain-model state_dict) from final.pt, a Lightning .ckpt or a state_dict."""
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    cfg = None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        cfg = obj.get("model") if isinstance(obj.get("model"), dict) else None
        sd = obj["state_dict"]
    elif (
        isinstance(obj, dict)
        and "model" in obj
        and isinstance(obj["model"], dict)
        and all(isinstance(v, torch.Tensor) for v in obj["model"].values())
    ):
        sd = obj["model"]  # DeiT/timm-style {'model': state_dict}
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise ValueError(f"{path}: not a checkpoint or state_dict")
    if any(k.startswith("ema.module.") for k in sd):  # Lightning checkpoint with EMA: use the EMA weights
        sd = {k[len("ema.module.") :]: v for k, v in sd.items() if k.startswith("ema.module.")}
    elif any(k.startswith("model.") for k in sd):
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    return cfg, sd


# --------------------------------------------------------------------------- callbacks (used by lab.runner)


class MlflowMetrics(pl.Callback):
    """train/loss + lr every `log_every` steps; val/* + epoch, images_seen, train_seconds at each eval.
    The step of every metric is the global optimizer step."""

    def __init__(self, cl, run_id: str, *, log_every: int, timer, global_batch: int, train_size: int):
        self.cl, self.run_id, self.log_every = cl, run_id, log_every
        self.timer, self.global_batch, self.train_size = timer, global_batch, max(1, train_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and step % self.log_every == 0 and pl_module.last_loss is not None:
            with self.timer.paused():
                track.log_metrics(
                    self.cl, self.run_id, {R.TRAIN_LOSS: float(pl_module.last_loss), R.LR: pl_module.last_lr}, step
                )

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or not pl_module.last_val:
            return
        step = trainer.global_step
        images = step * self.global_batch
        track.log_metrics(
            self.cl,
            self.run_id,
            {
                **pl_module.last_val,
                R.EPOCH: images / self.train_size,
                R.IMAGES_SEEN: images,
                R.TRAIN_SECONDS: self.timer.train_seconds,
            },
            step,
        )


class LastCheckpoint(pl.Callback):
    """Writes `last.ckpt` every `every_n_steps`, after each eval, at the end, and when a signal stops
    the run (lab.signals: at the batch boundary after SIGTERM/SIGINT, then raises `Interrupted`).
    Every write is atomic with a checksum and keeps the previous file (lab.checkpoints)."""

    def __init__(self, path: Path, every_n_steps: Optional[int] = None, timer=None):
        self.path = Path(path)
        self.timer = timer
        self.every_n_steps = every_n_steps
        self.exception: Optional[BaseException] = None
        self.saved_step: Optional[int] = None

    def save(self, trainer) -> None:
        from lab.checkpoints import write_atomic

        if trainer.is_global_zero:
            write_atomic(self.path, lambda tmp: trainer.save_checkpoint(str(tmp), weights_only=False))
        else:  # the other ranks take part in the collective save; only rank 0 writes
            trainer.save_checkpoint(str(self.path.with_name(f"{self.path.name}.rank")), weights_only=False)
        self.saved_step = trainer.global_step

    def _save_timed(self, trainer) -> None:
        if self.timer is not None:
            with self.timer.paused():
                self.save(trainer)
        else:
            self.save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lab import signals

        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save_timed(trainer)
        signum = signals.pending()
        if signum is not None:
            if self.saved_step != trainer.global_step:
                self.save(trainer)
            signals.clear()
            raise signals.Interrupted(signum, where=f"at step {trainer.global_step}")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        from lab import signals

        self.exception = exception
        if (
            signals.as_interrupted(exception) is not None
            and trainer.global_step > 0
            and self.saved_step != trainer.global_step
        ):
            try:
                self.save(trainer)
            except Exception:  # noqa: BLE001 - best effort; the periodic checkpoint remains
                pass


class StepProgress(pl.Callback):
    """One progress bar over the whole budget (optimizer steps, or seconds for wall-clock), with ETA."""

    def __init__(self, label: str, total_steps: Optional[int], timer, max_seconds: Optional[float]):
        self.label, self.total_steps, self.timer, self.max_seconds = label, total_steps, timer, max_seconds
        self.bar = None

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        if self.total_steps is not None:
            self.bar = tqdm(
                total=self.total_steps,
                initial=trainer.global_step,
                desc=self.label,
                unit="step",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
        else:
            self.bar = tqdm(
                total=int(math.ceil(self.max_seconds or 0)),
                desc=self.label,
                unit="s",
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is None:
            return
        n = trainer.global_step if self.total_steps is not None else int(self.timer.train_seconds)
        self.bar.update(max(0, min(n, self.bar.total) - self.bar.n))
        if trainer.global_step % 10 == 0 and pl_module.last_loss is not None:
            post = {"loss": f"{float(pl_module.last_loss):.3f}"}
            if pl_module.last_val:
                post["top1"] = f"{pl_module.last_val['val/top1']:.1f}"
            self.bar.set_postfix(post, refresh=False)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()
