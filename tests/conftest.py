"""Shared fixtures: a throw-away MLflow store and tiny training specs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import lab  # noqa: F401 - first, so that OMP_WAIT_POLICY=PASSIVE is set before torch loads OpenMP
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def randomize_bn(model: nn.Module, seed: int = 0) -> torch.Generator:
    """Non-trivial BN statistics/affines so BN folding and zero-init don't hide bugs; returns the
    generator, for callers that randomise more from the same stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return g


class KillAt(pl.Callback):
    """Simulates Ctrl-C after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture
def store(tmp_path, monkeypatch):
    """cwd = tmp_path and MLFLOW_TRACKING_URI = a fresh SQLite store there; returns the URI."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


TINY_MODEL = {"zoo": "deit_tiny", "img_size": 16, "patch_size": 4, "num_classes": 4,
              "stages": [{"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}]}


def tiny_spec_dict(name: str = "tiny", **sections) -> dict:
    """A spec that trains in well under a second per variant (synthetic 16 px, 4 classes)."""
    doc = {
        "name": name,
        "data": {"dataset": "synthetic", "image_size": 16, "batch_size": 16, "synthetic_size": 160,
                 "num_classes": 4, "augment": {"hflip": 0.0, "scale": [0.9, 1.0]}},
        "model": dict(TINY_MODEL),
        "train": {"lr": 3e-3, "log_every": 2, "eval_every": 5, "threads": 2, "warmup": 0.1},
        "budget": {"steps": 12},
        # the after-training inspection (figures) costs ~1-2 s per variant: tests/test_inspection.py
        # turns it on where it is the subject
        "tracking": {"inspect": False},
        # inference throughput after training costs seconds per variant: on only where a test asks
        "bench": {"after_train": False},
    }
    for k, v in sections.items():
        doc[k] = v
    return doc


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(doc) -> path of a YAML spec in tmp_path."""
    def _write(doc: dict, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        return p
    return _write
