"""alpha_dropout, feature_alpha_dropout and dropout1d / 2d / 3d (channel-wise feature dropout).

torch's kernel (aten/src/ATen/native/Dropout.cpp, _dropout_impl) draws a noise tensor and
multiplies; for alpha dropout it also adds a shift b that keeps the mean and variance of SELU
activations:

    noise ~ Bernoulli(1 - p), shaped like x, or (N, C, 1, ..., 1) for feature dropout
    dropout:        y = x * noise / (1 - p)                 dx = dy * noise / (1 - p)
    alpha dropout:  y = x * a noise + b,                    dx = dy * a noise
                    b = alpha' a (noise - 1 + p),  a = ((alpha'^2 p + 1)(1 - p))^(-1/2),
                    alpha' = 1.7580993408473766 (= SELU's scale * alpha)

The noise is drawn here with torch's own calls (``x.new_empty(N, C, 1, ...)`` or
``empty_like(x)``, then ``bernoulli_(1 - p)``), outside the Function, so under the same seed
the draws are torch's, also under torch.func.vmap (same batching rules, same randomness
modes and errors). The Function takes the drawn mask as an input and keeps it bit-packed for
backward (ceil(numel / 8) bytes; torch keeps the float noise, and b for alpha dropout).
"""
import math
import warnings

import torch

from ._apply import INPUT, apply
from .dropout import bernoulli_like, dropout, pack_bits, unpack_bits

_ALPHA = 1.7580993408473766


def alpha_dropout_coefficients(p):
    """(a, b0, b1): the scale of kept entries and the shift of dropped (b0) and kept (b1) ones."""
    a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
    return a, _ALPHA * a * (p - 1), _ALPHA * a * p


def _noise_scale(p, alpha, like):
    """The value torch's noise holds where kept, a or 1 / (1 - p), rounded in like's dtype as torch
    rounds it; a 0-dim tensor (no .item(): a graph break under torch.compile)."""
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return one.mul_(alpha_dropout_coefficients(p)[0]) if alpha else one.div_(1 - p)


def draw_keep(x, p, feature):
    """keep ~ Bernoulli(1 - p), drawn as torch's _dropout_impl draws its noise (bool)."""
    if feature:
        if x.dim() < 2:
            raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
        noise = x.new_empty((x.shape[0], x.shape[1], *[1] * (x.dim() - 2)))
    elif _batched(x):
        # under vmap torch's draw is on a contiguous (*batch, *sample) tensor, whatever x's layout
        noise = x.new_empty(x.shape)
    else:  # laid out like x: the draws follow x's memory order (also under torch.compile)
        return bernoulli_like(x, 1 - p, x.dtype).bool()
    return noise.bernoulli_(1 - p).bool()


def _batched(t):
    """t is batched by some torch.func.vmap level (possibly under other transforms' wrappers)."""
    if torch.compiler.is_compiling():  # Dynamo traces through transforms itself
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def noise_dropout_forward(x, keep, p, alpha, inplace=False):
    """torch's arithmetic op for op (bit for bit): noise as float, b from it, y = x * noise (+ b)."""
    noise = keep.to(x.dtype)  #                                (N, C, 1...) or like x: 0/1
    if alpha:
        a = alpha_dropout_coefficients(p)[0]
        # b = alpha' a (noise - 1) + alpha' a p                 like noise
        b = noise.add(-1).mul_(_ALPHA * a).add_(_ALPHA * a * p)
        # noise = a * keep;  y = x * noise + b                  (*) like x
        noise.mul_(a)
        return (x.mul_(noise) if inplace else x * noise).add_(b)
    # noise = keep / (1 - p);  y = x * noise                    (*) like x
    noise.div_(1 - p)
    return x.mul_(noise) if inplace else x * noise


def noise_dropout_backward(dy, keep, p, alpha, x_shape):
    # dx = dy * s * keep,  s = a (alpha) or 1 / (1 - p)        (*) like dy (keep broadcasts)
    dx = (dy * _noise_scale(p, alpha, dy)).mul_(keep.view(torch.uint8))
    # (summed to x's shape where the mask alone was batched under vmap)
    return dx if dx.shape == x_shape else dx.sum_to_size(x_shape)


class NoiseDropoutFunction(torch.autograd.Function):
    """``apply(x, keep, p, alpha, inplace)``: y = x * keep * s (+ b), keep drawn beforehand."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, keep, p, alpha, inplace):
        y = noise_dropout_forward(x, keep, p, alpha, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, keep, ctx.p, ctx.alpha, ctx.inplace = inputs
        ctx.x_shape, ctx.keep_shape = x.shape, keep.shape
        if ctx.inplace:
            ctx.mark_dirty(x)
        packed = pack_bits(keep.reshape(-1))  # ceil(numel / 8) bytes
        ctx.save_for_backward(packed)
        ctx.save_for_forward(packed)

    @staticmethod
    def _keep(ctx):
        (packed,) = ctx.saved_tensors
        return unpack_bits(packed, math.prod(ctx.keep_shape)).view(ctx.keep_shape)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        keep = NoiseDropoutFunction._keep(ctx)
        return noise_dropout_backward(dy, keep, ctx.p, ctx.alpha, ctx.x_shape), None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        keep = NoiseDropoutFunction._keep(ctx)
        if ctx.inplace:  # an in-place op updates its input's tangent in place too
            return dx.mul_(_noise_scale(ctx.p, ctx.alpha, dx)).mul_(keep.view(torch.uint8))
        return noise_dropout_backward(dx, keep, ctx.p, ctx.alpha, dx.shape)


def _vmap_rule(fn):
    def vmap(info, in_dims, x, keep, p, alpha, inplace):
        """Elementwise with a broadcast mask: the mask's batch dim put where x's is (x itself
        stays as it is: in place, the input object is what must come back). The mask, drawn by
        torch's own calls, already follows the randomness mode; "same" leaves it unbatched."""
        xd, kd = in_dims[0], in_dims[1]
        if xd is None:
            if kd is not None and inplace:
                raise RuntimeError("vmap: in-place dropout with a different mask per sample would write several "
                                   "results into an input that is not batched")
            keep, xd = (keep if kd is None else keep.movedim(kd, 0)), (None if kd is None else 0)
        else:
            keep = keep.unsqueeze(xd) if kd is None else keep.movedim(kd, xd)
        return fn.apply(x, keep, p, alpha, inplace), xd
    return staticmethod(vmap)


# One class per op, so that graph nodes and coverage rows name it.
class AlphaDropoutFunction(NoiseDropoutFunction):
    pass


class FeatureAlphaDropoutFunction(NoiseDropoutFunction):
    pass


class FeatureDropoutFunction(NoiseDropoutFunction):
    pass


for _fn in (NoiseDropoutFunction, AlphaDropoutFunction, FeatureAlphaDropoutFunction, FeatureDropoutFunction):
    _fn.vmap = _vmap_rule(_fn)
_FUNCTIONS = {(False, True): AlphaDropoutFunction, (True, True): FeatureAlphaDropoutFunction,
              (True, False): FeatureDropoutFunction}


def _noise_dropout(input, p, training, inplace, feature, alpha):
    """torch's _dropout_impl: the early returns, then the draw and the Function."""
    if p == 0 or not training or input.numel() == 0:
        return input
    if feature and input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    if p == 1:
        # y = x * 0, no draw (torch multiplies by zeros({}) for every variant)
        return dropout(input, 1.0, True, inplace)
    return apply(_FUNCTIONS[feature, alpha], input, draw_keep(input, p, feature), float(p), alpha, inplace)


def _check_p(p):
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def alpha_dropout(input, p=0.5, training=False, inplace=False):
    """Drop-in for ``torch.nn.functional.alpha_dropout``: torch's draws under the same seed."""
    _check_p(p)
    return _noise_dropout(input, p, training, inplace, feature=False, alpha=True)


def feature_alpha_dropout(input, p=0.5, training=False, inplace=False):
    """Drop-in for ``torch.nn.functional.feature_alpha_dropout``: one draw per (sample, channel)."""
    _check_p(p)
    return _noise_dropout(input, p, training, inplace, feature=True, alpha=True)


def _feature_dropout(input, p, training, inplace):
    return _noise_dropout(input, p, training, inplace, feature=True, alpha=False)


def dropout1d(input, p=0.5, training=True, inplace=False):
    """Drop-in for ``torch.nn.functional.dropout1d``: zeroes whole channels of (N, C, L) or (C, L)."""
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {inp_dim}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    return _unbatched(input, inp_dim == 3, p, training, inplace)


def _unbatched(input, is_batched, p, training, inplace):
    # torch: an unbatched input gets a batch dim of 1 (in place: on the input object itself)
    if not is_batched:
        input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = _feature_dropout(input, p, training, inplace)
    if not is_batched:
        result = result.squeeze_(0) if inplace else result.squeeze(0)
    return result


def dropout2d(input, p=0.5, training=True, inplace=False):
    """Drop-in for ``torch.nn.functional.dropout2d``, warnings included (a 3D input is (N, C, L), as torch)."""
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (3, 4):
        warnings.warn(
            f"dropout2d: Received a {inp_dim}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs).",
            stacklevel=2,
        )
    if inp_dim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _feature_dropout(input, p, training, inplace)


def dropout3d(input, p=0.5, training=True, inplace=False):
    """Drop-in for ``torch.nn.functional.dropout3d``: (N, C, D, H, W) or unbatched (C, D, H, W)."""
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (4, 5):
        warnings.warn(
            f"dropout3d: Received a {inp_dim}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs).",
            stacklevel=2,
        )
    return _unbatched(input, inp_dim == 5, p, training, inplace)
