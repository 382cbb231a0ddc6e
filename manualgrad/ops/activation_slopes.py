"""prelu and rrelu: leaky relu with a learned slope (prelu: y = x for x > 0, else w x, dw too)
or a random one (rrelu: a ~ U(lower, upper) per element in training, torch's draws)."""
import torch

from ._apply import INPUT, LOWER, apply
from .activation import _step, leaky_relu


# ---------------------------------------------------------------------------------------------
# prelu: y = x where x > 0, else w x;  w one slope, or one per channel (dim 1), broadcast

def _prelu_weight(x, w):
    """w shaped to broadcast against x as torch does: a scalar, or (C, 1, ..., 1) along dim 1."""
    if w.dim() > 1:
        raise RuntimeError(f"prelu: Expected `weight` to be a scalar or 1D tensor, but got: ndim = {w.dim()}")
    if w.numel() == 1:
        return w.reshape(())
    if x.dim() == 0:
        raise RuntimeError("Not allow zero-dim input tensor.")
    channels = x.shape[1] if x.dim() > 1 else 1
    if channels != w.numel():
        raise RuntimeError(
            "Mismatch of parameter numbers and input channel size. "
            f"Found parameter numbers = {w.numel()} and channel size = {channels}."
        )
    return w.reshape(-1, *[1] * (x.dim() - 2))


def prelu_forward(x, w):
    wb = _prelu_weight(x, w)
    # y = x where x > 0, else w x (nan: w x, torch's branch)  (*) like x
    return torch.where(x > 0, x, x * wb)


def prelu_backward(dy, x, w):
    wb = _prelu_weight(x, w)
    # dx = dy where x > 0, else w dy (nan included)           (*) like x
    dx = torch.lerp(dy * wb, dy, _step(x))
    # dw = sum over all but the channel dim of dy * min(x, 0)   (x > 0 adds 0; a nan adds nan)   (C,) or ()
    dw_full = dy * x.clamp_max(0)
    if w.numel() == 1:
        return dx, dw_full.sum().reshape(w.shape)
    dims = [0, *range(2, x.dim())]
    return dx, dw_full.sum(dims).reshape(w.shape)


def prelu_jvp(dx, dw, x, w):
    # dy = dx where x > 0, else w dx + dw x                    (*) like x
    wb = _prelu_weight(x, w)
    t = torch.lerp(dx * wb, dx, _step(x)) if dx is not None else torch.zeros_like(x)
    if dw is not None:
        t = t + _prelu_weight(x, dw) * x.clamp_max(0)
    return t


class PReLUFunction(torch.autograd.Function):
    autocast = LOWER  # autocast: the autocast dtype (prelu is on torch's lower-precision lists, CPU and CUDA)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return prelu_forward(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw = prelu_backward(dy, x, w)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None)

    @staticmethod
    def jvp(ctx, dx, dw):
        x, w = ctx.saved_tensors
        return prelu_jvp(dx, dw, x, w)


def prelu(input, weight):
    """Drop-in for ``torch.nn.functional.prelu``."""
    _prelu_weight(input, weight)  # torch's shape checks, before any work
    return apply(PReLUFunction, input, weight)


# ---------------------------------------------------------------------------------------------
# rrelu: y = x where x > 0, else a x, a ~ U(lower, upper) drawn per element in training;
#        a = (lower + upper) / 2 in eval (leaky_relu)

def rrelu_noise(x, lower, upper):
    """The slopes torch's CPU kernel draws (aten/src/ATen/native/Activation.cpp,
    _rrelu_with_noise_train): walking x in row-major order, for each element x <= 0 (not nan) one
    ``uniform_real_distribution<double>(lower, upper)`` draw: a 64-bit random number r, and
    a = (r mod 2^53) 2^-53 (upper - lower) + lower, in double, with lower and upper first rounded
    to x's compute dtype; then rounded to that dtype. 1 where x > 0 or nan. An int64 ``random_()``
    is one 64-bit draw per element, r mod 2^63, which keeps the 53 low bits: the same numbers.
    (Not ``uniform_`` on a double tensor: its vectorized kernel fuses the multiply-add.)"""
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo, hi = (torch.tensor(v, dtype=opmath).item() for v in (lower, upper))
    neg = (x <= 0).reshape(-1)  # row-major, as the kernel walks x.contiguous()
    k = int(neg.sum())
    r = torch.empty(k, dtype=torch.int64, device=x.device).random_()
    # a = U[0, 1) on 53 bits, scaled to [lower, upper): two roundings, as the C++ (no fma)   (k,)
    a = ((r & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53).mul_(hi - lo).add_(lo).to(opmath)
    noise = torch.ones(x.numel(), dtype=opmath, device=x.device).masked_scatter_(neg, a)
    return noise.view(x.shape)


def rrelu_forward(x, noise, inplace=False):
    # y = x a (a = 1 where x > 0), in the compute dtype, rounded to x's   (*) like x
    y = x.to(noise.dtype) * noise
    return x.copy_(y) if inplace else y.to(x.dtype)


def rrelu_backward(dy, noise):
    # dx = dy a                                               (*) like x
    return dy * noise.to(dy.dtype)


class RReLUFunction(torch.autograd.Function):
    """``apply(x, noise, inplace)``: training rrelu, the slopes drawn beforehand (rrelu_noise)."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, noise, inplace):
        y = rrelu_forward(x, noise, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, noise, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(noise)
        ctx.save_for_forward(noise)

    @staticmethod
    def backward(ctx, dy):
        (noise,) = ctx.saved_tensors
        return rrelu_backward(dy, noise), None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (noise,) = ctx.saved_tensors
        return dx.mul_(noise.to(dx.dtype)) if ctx.inplace else rrelu_backward(dx, noise)

    @staticmethod
    def vmap(info, in_dims, x, noise, inplace):
        """Elementwise: the slopes' batch dim put where x's is. (F.rrelu cannot draw under vmap,
        as torch's rrelu cannot: this serves slopes drawn outside, passed in.)"""
        xd, nd = in_dims[0], in_dims[1]
        if xd is None:
            if inplace:
                raise RuntimeError("vmap: in-place rrelu with batched slopes would write several results "
                                   "into an input that is not batched")
            x, xd = x.expand(info.batch_size, *x.shape), 0
        noise = noise.unsqueeze(xd) if nd is None else noise.movedim(nd, xd)
        return RReLUFunction.apply(x, noise, inplace), xd


def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """Drop-in for ``torch.nn.functional.rrelu``: in training, torch's CPU slopes under the same seed.

    Off the CPU the slopes come from the same scheme on that device's generator, not from torch's
    fused kernel there (same distribution, other numbers).
    """
    if lower > upper:
        raise RuntimeError(f"Lower bound should be less than or equal to the upper bound, got lower = {lower} "
                           f"and upper = {upper}")
    if not training:
        # torch: leaky_relu with the mean slope (rrelu_with_noise, eval)
        return leaky_relu(input, (float(lower) + float(upper)) / 2, inplace)
    if not input.is_floating_point():
        raise NotImplementedError(f'"rrelu_with_noise_out_cpu" not implemented for {input.dtype}')
    # (torch's backward uses the mean slope instead of the drawn ones when upper - lower <= 1e-6:
    #  slopes within 1e-6 of each other; here always the drawn ones, which y was made with)
    noise = rrelu_noise(input.detach(), lower, upper)
    return apply(RReLUFunction, input, noise, inplace)


def rrelu_(input, lower=1.0 / 8, upper=1.0 / 3, training=False):
    """Drop-in for ``torch.nn.functional.rrelu_``."""
    return rrelu(input, lower, upper, training, inplace=True)
