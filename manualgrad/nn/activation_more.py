"""More activation modules: the torch classes with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


class Hardtanh(torch.nn.Hardtanh):
    def forward(self, input):
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class ReLU6(torch.nn.ReLU6):  # a Hardtanh(0, 6) in torch too
    def forward(self, input):
        return F.hardtanh(input, self.min_val, self.max_val, self.inplace)


class Hardsigmoid(torch.nn.Hardsigmoid):
    def forward(self, input):
        return F.hardsigmoid(input, self.inplace)


class LogSigmoid(torch.nn.LogSigmoid):
    def forward(self, input):
        return F.logsigmoid(input)


class Softsign(torch.nn.Softsign):
    def forward(self, input):
        return F.softsign(input)


class Tanhshrink(torch.nn.Tanhshrink):
    def forward(self, input):
        return F.tanhshrink(input)


class Softshrink(torch.nn.Softshrink):
    def forward(self, input):
        return F.softshrink(input, self.lambd)


class Hardshrink(torch.nn.Hardshrink):
    def forward(self, input):
        return F.hardshrink(input, self.lambd)


class Threshold(torch.nn.Threshold):
    def forward(self, input):
        return F.threshold(input, self.threshold, self.value, self.inplace)


class SELU(torch.nn.SELU):
    def forward(self, input):
        return F.selu(input, self.inplace)


class CELU(torch.nn.CELU):
    def forward(self, input):
        return F.celu(input, self.alpha, self.inplace)


class PReLU(torch.nn.PReLU):
    """Drop-in for ``torch.nn.PReLU``: the gradient of its weight (one slope or one per channel) hand-written."""

    def forward(self, input):
        return F.prelu(input, self.weight)


class RReLU(torch.nn.RReLU):
    """Drop-in for ``torch.nn.RReLU``: in training, torch's random slopes under the same seed."""

    def forward(self, input):
        return F.rrelu(input, self.lower, self.upper, self.training, self.inplace)


class Softmin(torch.nn.Softmin):
    def forward(self, input):
        return F.softmin(input, self.dim, _stacklevel=5)


class Softmax2d(torch.nn.Softmax2d):
    def forward(self, input):
        if input.dim() not in (3, 4):
            raise ValueError(f"Softmax2d: expected input to be 3D or 4D, got {input.dim()}D instead")
        return F.softmax(input, -3, _stacklevel=5)
