import torch

from .. import functional as F


def _forward(module, n, conv_transpose, input, output_size):
    """torch's _ConvTransposeNd forward: output_size (if given) picks the output_padding."""
    if module.padding_mode != "zeros":
        raise ValueError(f"Only `zeros` padding mode is supported for {type(module).__name__}")
    # torch's own method: output_size -> output_padding, ValueError for a size out of range
    output_padding = module._output_padding(input, output_size, module.stride, module.padding, module.kernel_size,
                                            n, module.dilation)
    return conv_transpose(input, module.weight, module.bias, module.stride, module.padding, output_padding,
                          module.groups, module.dilation)


class ConvTranspose1d(torch.nn.ConvTranspose1d):
    """Drop-in for ``torch.nn.ConvTranspose1d`` with a hand-written backward (``output_size`` in
    forward as torch's)."""

    def forward(self, input, output_size=None):
        return _forward(self, 1, F.conv_transpose1d, input, output_size)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """Drop-in for ``torch.nn.ConvTranspose2d`` with a hand-written backward (``output_size`` in
    forward as torch's)."""

    def forward(self, input, output_size=None):
        return _forward(self, 2, F.conv_transpose2d, input, output_size)


class ConvTranspose3d(torch.nn.ConvTranspose3d):
    """Drop-in for ``torch.nn.ConvTranspose3d`` with a hand-written backward (``output_size`` in
    forward as torch's)."""

    def forward(self, input, output_size=None):
        return _forward(self, 3, F.conv_transpose3d, input, output_size)
