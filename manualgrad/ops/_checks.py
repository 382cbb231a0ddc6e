"""Shared helpers for ops: argument checks and reductions.

Value checks (a target class out of range, say) need the tensor's values on the host. They
run only where that is free and possible: concrete CPU tensors outside torch.compile and
outside torch.func transforms. Elsewhere the op itself fails (gather raises on CUDA through a
device-side assert), as torch's own kernels do.
"""
import math

import torch
from torch.nn import _reduction as _legacy


def can_inspect_values(*tensors):
    """True when reading these tensors' values costs no device sync and breaks no tracing."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.is_meta:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(t) or isinstance(t, torch._subclasses.FakeTensor):
            return False
    return True


REDUCTIONS = ("none", "mean", "sum")


def get_reduction(size_average, reduce, reduction):
    """torch's handling of the deprecated size_average/reduce arguments, then a check."""
    if size_average is not None or reduce is not None:
        reduction = _legacy.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def reduce_forward(loss, reduction):
    # none: loss (*) ; mean: sum(loss) / numel () ; sum: sum(loss) ()
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def reduce_backward(dout, shape, reduction):
    """Upstream gradient of the reduced loss, as a gradient of the elementwise loss (shape)."""
    if reduction == "none":
        return dout  #                                        (*) as the loss
    numel = 1
    for s in shape:
        numel *= s
    # d sum / d loss_i = 1 ; d mean / d loss_i = 1 / numel   (*) expanded, no copy
    scale = dout if reduction == "sum" else dout / numel
    return scale.expand(shape)


def is_transformed(t):
    """t is seen through a transform: functorch (vmap, grad, jvp) or the legacy vmap that
    gradcheck's batched-gradient checks use. Under torch.compile Dynamo traces through
    transforms itself (and cannot trace these checks): never transformed there."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t)


def can_write_inplace(*operands):
    """True when a fresh temporary may be updated in place with these operands.

    That needs: no graph being recorded (a forward, or a backward without create_graph; with
    one, double backward needs every intermediate as it was), no transform wrapping an operand
    (vmap cannot write a batched operand into an unbatched temporary) and one dtype for all
    (in-place arithmetic never promotes). Saves an allocation and a pass in plain backward.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # compiled: the compiler plans buffers
        return False
    dtype = None
    for t in operands:
        if t is None:
            continue
        if is_transformed(t) or (dtype is not None and t.dtype != dtype):
            return False
        dtype = t.dtype
    return True


def rows(t):
    """t as (rows, last): the leading dims folded into one. Their product is spelled out, as
    reshape's -1 cannot tell the row count of a tensor with no elements."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
