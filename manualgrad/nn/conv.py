import torch

from .. import functional as F


class Conv1d(torch.nn.Conv1d):
    """Drop-in for ``torch.nn.Conv1d`` with a hand-written backward, every ``padding_mode``.

    As torch's: 'zeros' pads inside the convolution; 'reflect', 'replicate' and 'circular' pad
    the input first (``F.pad``, hand-written backward too) and convolve it without padding."""

    def forward(self, input):
        if self.padding_mode != "zeros":
            # torch's _reversed_padding_repeated_twice: (before, after) per spatial dim, last
            # first, the odd one after for padding='same'
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(torch.nn.Conv2d):
    """Drop-in for ``torch.nn.Conv2d`` with a hand-written backward, every ``padding_mode``
    (see Conv1d)."""

    def forward(self, input):
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv3d(torch.nn.Conv3d):
    """Drop-in for ``torch.nn.Conv3d`` with a hand-written backward, every ``padding_mode``
    (see Conv1d)."""

    def forward(self, input):
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv3d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
