"""Small torch.nn models shared by the compatibility tests, and a helper that gives a
converted copy next to the untouched torch original (same weights, same buffers)."""
import copy

import torch
from torch import nn

import manualgrad


def converted_pair(model):
    """(ours, theirs): a manualgrad.convert(strict=True) deep copy of ``model``, and ``model``."""
    return manualgrad.convert(copy.deepcopy(model), strict=True), model


def mlp(d_in=6, d_hidden=8, n_classes=4, dropout=0.0):
    """Linear, LayerNorm, GELU, Dropout, Linear, ReLU, Linear: (N, d_in) -> (N, n_classes)."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(d_hidden, d_hidden), nn.ReLU(), nn.Linear(d_hidden, n_classes),
    )


def cnn(in_channels=2, n_classes=3):
    """conv 3x3, BatchNorm2d, ReLU, max pool 2, flatten, linear: (N, C, 6, 6) -> (N, n_classes).

    The BatchNorm's running statistics are moved off their (0, 1) init, so eval mode
    really uses them."""
    model = nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 3 * 3, n_classes),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model
