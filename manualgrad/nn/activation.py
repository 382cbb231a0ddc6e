"""Activation modules: the torch classes with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


class ReLU(torch.nn.ReLU):
    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(torch.nn.ELU):
    def forward(self, input):
        return F.elu(input, self.alpha, self.inplace)


class GELU(torch.nn.GELU):
    def forward(self, input):
        return F.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    def forward(self, input):
        return F.silu(input, inplace=self.inplace)


class Tanh(torch.nn.Tanh):
    def forward(self, input):
        return F.tanh(input)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input):
        return F.sigmoid(input)


class Softplus(torch.nn.Softplus):
    def forward(self, input):
        return F.softplus(input, self.beta, self.threshold)


class Softmax(torch.nn.Softmax):
    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class Hardswish(torch.nn.Hardswish):
    def forward(self, input):
        return F.hardswish(input, self.inplace)


class Mish(torch.nn.Mish):
    def forward(self, input):
        return F.mish(input, inplace=self.inplace)


class GLU(torch.nn.GLU):
    def forward(self, input):
        return F.glu(input, self.dim)
