"""Rearrangement modules: torch.nn's, with manualgrad.functional's ops (hand-written backward)
in forward. Constructor, attributes and ``repr`` are torch's own."""
import torch

from .. import functional as F


class PixelShuffle(torch.nn.PixelShuffle):
    """Drop-in for ``torch.nn.PixelShuffle`` with a hand-written backward (pixel_unshuffle)."""

    def forward(self, input):
        return F.pixel_shuffle(input, self.upscale_factor)


class PixelUnshuffle(torch.nn.PixelUnshuffle):
    """Drop-in for ``torch.nn.PixelUnshuffle`` with a hand-written backward (pixel_shuffle)."""

    def forward(self, input):
        return F.pixel_unshuffle(input, self.downscale_factor)


class ChannelShuffle(torch.nn.ChannelShuffle):
    """Drop-in for ``torch.nn.ChannelShuffle`` with a hand-written backward (the inverse shuffle)."""

    def forward(self, input):
        return F.channel_shuffle(input, self.groups)


class Fold(torch.nn.Fold):
    """Drop-in for ``torch.nn.Fold`` (col2im) with a hand-written backward (unfold)."""

    def forward(self, input):
        return F.fold(input, self.output_size, self.kernel_size, self.dilation, self.padding, self.stride)


class Unfold(torch.nn.Unfold):
    """Drop-in for ``torch.nn.Unfold`` (im2col) with a hand-written backward (fold)."""

    def forward(self, input):
        return F.unfold(input, self.kernel_size, self.dilation, self.padding, self.stride)
