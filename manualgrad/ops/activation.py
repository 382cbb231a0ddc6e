"""Elementwise activations: y = f(x), dx = dy * f'(x).

Every op here is elementwise, so its vmap rule is the op itself on the batched tensor (the
batch dim passes through untouched). That rule, unlike ``generate_vmap_rule``, also serves
``inplace=True``, where the Function marks its input dirty and returns it.

In-place variants (``inplace=True``) overwrite x with y, so their backward is written in
terms of y.
"""
import torch


# ---------------------------------------------------------------------------------------------
# relu: y = max(x, 0)

def relu_forward(x, inplace=False):
    return x.clamp_min_(0) if inplace else x.clamp_min(0)


def relu_backward(dy, y):
    # dx = dy * 1[y > 0]     (y > 0 exactly where x > 0)     (*) like x
    return dy * (y > 0)


class ReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, inplace):
        return relu_forward(x, inplace)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace = inputs
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(x)
        # y, not x: the next layer usually saves y too, so the two share one storage.
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return relu_backward(dy, y), None

    @staticmethod
    def jvp(ctx, dx, _):
        (y,) = ctx.saved_tensors
        # An in-place op must update its input's tangent in place too.
        return dx.mul_(y > 0) if ctx.inplace else relu_backward(dx, y)

    @staticmethod
    def vmap(info, in_dims, x, inplace):
        return ReLUFunction.apply(x, inplace), in_dims[0]


def relu(input, inplace=False):
    """Drop-in for ``torch.nn.functional.relu``."""
    return ReLUFunction.apply(input, inplace)
