"""AlphaDropout, FeatureAlphaDropout, Dropout1d/2d/3d: the torch classes with forward routed to
manualgrad.functional (ops/dropout_more.py)."""
import torch

from .. import functional as F


class AlphaDropout(torch.nn.AlphaDropout):
    """Drop-in for ``torch.nn.AlphaDropout``: torch's draws; the backward keeps the mask bit-packed."""

    def forward(self, input):
        return F.alpha_dropout(input, self.p, self.training)


class FeatureAlphaDropout(torch.nn.FeatureAlphaDropout):
    """Drop-in for ``torch.nn.FeatureAlphaDropout``: one draw per (sample, channel)."""

    def forward(self, input):
        return F.feature_alpha_dropout(input, self.p, self.training)


class Dropout1d(torch.nn.Dropout1d):
    """Drop-in for ``torch.nn.Dropout1d``: whole channels, torch's draws under the same seed."""

    def forward(self, input):
        return F.dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    """Drop-in for ``torch.nn.Dropout2d``: whole channels, torch's draws under the same seed."""

    def forward(self, input):
        return F.dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    """Drop-in for ``torch.nn.Dropout3d``: whole channels, torch's draws under the same seed."""

    def forward(self, input):
        return F.dropout3d(input, self.p, self.training, self.inplace)
