"""Shared fixtures: models built from Ultralytics yamls (no downloads) with live activations."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from yoloprune.offline import configure_offline

configure_offline()  # as the entry points do, before anything imports Ultralytics (it reads the switches once)

from yoloprune.io import load_model
from yoloprune.prune import calibrate_bn
from yoloprune.runtime import flat_tensors


@functools.cache
def _live(name: str) -> nn.Module:
    model = load_model(name)
    gen = torch.Generator().manual_seed(0)
    calibrate_bn(model, [torch.rand(4, 3, 128, 128, generator=gen) for _ in range(2)])
    return model.eval()


def live_model(name: str) -> nn.Module:
    """Return a fresh copy of ``name`` (a model yaml) whose BN statistics were recalibrated on random images.

    Random-init BN statistics (mean 0, var 1) let activations shrink toward zero through
    depth, which hides conversion mistakes; recalibrated statistics keep every layer alive.
    """
    return copy.deepcopy(_live(name))


def tensors(obj) -> list[torch.Tensor]:
    """Return every tensor in a nested output (dicts, lists, tuples), in order."""
    return flat_tensors(obj)


@pytest.fixture
def image_batch():
    """A deterministic batch of two 128x128 images in [0, 1]."""
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
