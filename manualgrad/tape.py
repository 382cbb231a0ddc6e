"""A tape engine: reverse-mode autodiff at tensor level, in one file.

micrograd's idea (Karpathy) on whole tensors rather than scalars: every op returns a
``Tensor`` that remembers its parents (the inputs it was computed from) and a closure,
``backward_fn``, that turns the gradient of the output into one gradient per parent.
``loss.backward()`` then

1. sorts the graph topologically: every node after all the nodes it was computed from;
2. walks that order backwards from the loss, calling each node's ``backward_fn`` once its
   gradient is complete;
3. *adds* the gradients a node receives from each of its consumers (a node used twice, as in
   ``x * x``, gets both contributions: the multivariate chain rule is a sum over paths).

The local derivatives of the neural-network ops are not written again here: ``linear``,
``relu``, ``softmax``, ``cross_entropy``, ``layer_norm`` ... call manualgrad's own pure
``*_backward`` functions from ``manualgrad/ops/*.py``, the same ones behind the
``torch.autograd.Function``s, so the engine and the package share one set of derivations.
Only the tensor arithmetic (``+ - * / @``, ``sum``, ``mean``, ``reshape`` ...), which has no
``*_backward`` in the package, is differentiated here, with the math in a comment.

    >>> from manualgrad import tape
    >>> x = tape.Tensor(torch.randn(3), requires_grad=True)
    >>> (x * x).sum().backward()
    >>> torch.allclose(x.grad, 2 * x.data)
    True

Differences from torch.autograd, on purpose: no double backward (gradients are plain torch
tensors), no in-place ops, the graph is not freed by ``backward`` (it goes with the last
reference to the output), and ``.grad`` is kept on leaves only (``retain_grad()`` as in torch).
"""
import torch

from .ops._checks import get_reduction
from .ops.activation import (
    gelu_backward, gelu_forward, relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
    tanh_backward, tanh_forward,
)
from .ops.classification_loss import (
    _check_index_target, _check_label_smoothing, _has_ignored_targets, cross_entropy_backward,
    cross_entropy_forward,
)
from .ops.linear import linear_backward, linear_forward
from .ops.normalization import layer_norm_backward, layer_norm_forward
from .ops.regression_loss import regression_loss_backward, regression_loss_forward
from .ops.softmax import log_softmax_backward, log_softmax_forward, softmax_backward, softmax_forward

__all__ = [
    "Tensor", "topological_order", "matmul",
    "linear", "relu", "tanh", "sigmoid", "gelu", "softmax", "log_softmax",
    "cross_entropy", "mse_loss", "layer_norm",
]


class Tensor:
    """A torch tensor (``data``) plus the record of how it was computed.

    Args:
        data: a torch tensor (or anything ``torch.as_tensor`` takes), shared, not copied, and
            detached, so torch's own autograd never records anything.
        requires_grad: a leaf whose gradient ``backward`` should compute into ``.grad``.

    Attributes:
        parents: the Tensors this one was computed from (empty for a leaf).
        backward_fn: ``dy -> gradients``, one per parent (None where a parent needs none), for
            dy = dL/d(this tensor); None for a leaf.
        op: the name of the op that made it ('' for a leaf).
        grad: dL/d(data) after ``backward``, on leaves that require grad (accumulates, as torch).
    """

    def __init__(self, data, requires_grad=False):
        data = torch.as_tensor(data).detach()
        if requires_grad and not (data.is_floating_point() or data.is_complex()):
            raise RuntimeError(
                f"Only Tensors of floating point and complex dtype can require gradients, got {data.dtype}"
            )
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self.parents = ()
        self.backward_fn = None
        self.op = ""
        self._retains_grad = False

    # -- a few read-only views of data --------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)

    def dim(self):
        return self.data.dim()

    def item(self):
        return self.data.item()

    def __repr__(self):
        how = f"op={self.op!r}" if self.op else "leaf"
        return (f"Tensor(shape={list(self.shape)}, dtype={self.dtype}, {how}, "
                f"requires_grad={self.requires_grad})")

    def retain_grad(self):
        """Keep this non-leaf tensor's gradient in ``.grad`` after ``backward`` (as torch)."""
        self._retains_grad = True
        return self

    # -- the engine -----------------------------------------------------------------------------
    def backward(self, grad=None):
        """Compute dself/dleaf for every leaf that requires grad, adding it to ``leaf.grad``.

        ``grad`` is dL/d(self) for some further L; it defaults to 1 for a one-element self and
        is required otherwise (the same RuntimeErrors as torch).
        """
        if not self.requires_grad:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        if grad is None:
            if self.data.numel() != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs: this output has shape "
                    f"{list(self.shape)}; call .sum() first or pass backward(grad) of that shape"
                )
            grad = torch.ones_like(self.data)  # dself/dself = 1
        grad = grad.data if isinstance(grad, Tensor) else torch.as_tensor(grad)
        if grad.shape != self.shape:
            raise RuntimeError(
                f"Mismatch in shape: grad_output[0] has a shape of {grad.shape} and output[0] has a "
                f"shape of {self.shape}."
            )
        # grads[node] = dL/dnode, summed so far over the consumers of node already visited
        grads = {self: grad}
        with torch.no_grad():  # plain tensor arithmetic: the *_backward functions may work in place
            for node in reversed(topological_order(self)):
                # every consumer of node comes later in the order, so was visited: dy is complete
                dy = grads.pop(node, None)
                if dy is None:
                    continue
                if node.backward_fn is None or node._retains_grad:
                    # a leaf (or retain_grad): keep the gradient, adding to an earlier backward's
                    # (clone: dy may be a view shared with another node, e.g. both inputs of a + b)
                    if node.grad is None:
                        node.grad = dy.clone(memory_format=torch.contiguous_format)
                    else:
                        node.grad = node.grad + dy
                if node.backward_fn is None:
                    continue
                for parent, g in zip(node.parents, node.backward_fn(dy)):
                    if g is None or not parent.requires_grad:
                        continue
                    # a parent used by several nodes gets the sum of their gradients: +=, never =
                    grads[parent] = g if parent not in grads else grads[parent] + g

    # -- tensor arithmetic, with broadcasting -----------------------------------------------------
    def __add__(self, other):
        a, b = self, _wrap(other, self)
        # y = a + b:  da = dy, db = dy  (each un-broadcast to its input's shape)
        return _result(a.data + b.data, (a, b), lambda dy: (_sum_to(dy, a), _sum_to(dy, b)), "add")

    def __sub__(self, other):
        a, b = self, _wrap(other, self)
        # y = a - b:  da = dy, db = -dy
        return _result(a.data - b.data, (a, b), lambda dy: (_sum_to(dy, a), _sum_to(-dy, b)), "sub")

    def __mul__(self, other):
        a, b = self, _wrap(other, self)

        def backward(dy):
            # y = a b:  da = dy b, db = dy a
            return _sum_to(dy * b.data, a), _sum_to(dy * a.data, b)

        return _result(a.data * b.data, (a, b), backward, "mul")

    def __truediv__(self, other):
        a, b = self, _wrap(other, self)
        y = a.data / b.data

        def backward(dy):
            # y = a / b:  da = dy / b,  db = -dy a / b^2 = -dy y / b
            return _sum_to(dy / b.data, a), _sum_to(-dy * y / b.data, b)

        return _result(y, (a, b), backward, "div")

    def __radd__(self, other):
        return _wrap(other, self) + self

    def __rsub__(self, other):
        return _wrap(other, self) - self

    def __rmul__(self, other):
        return _wrap(other, self) * self

    def __rtruediv__(self, other):
        return _wrap(other, self) / self

    def __neg__(self):
        # y = -x:  dx = -dy
        return _result(-self.data, (self,), lambda dy: (-dy,), "neg")

    def __pow__(self, p):
        if not isinstance(p, (int, float)):
            raise NotImplementedError("tape.Tensor ** p: only a Python number exponent p is supported")
        x = self

        def backward(dy):
            # y = x^p:  dx = dy p x^(p-1)     (0 for p = 0, as torch, even where x^-1 is inf)
            return (dy * p * x.data ** (p - 1) if p else torch.zeros_like(dy),)

        return _result(x.data**p, (x,), backward, "pow")

    def exp(self):
        y = self.data.exp()
        # y = e^x:  dx = dy y
        return _result(y, (self,), lambda dy: (dy * y,), "exp")

    def log(self):
        x = self
        # y = log x:  dx = dy / x
        return _result(x.data.log(), (x,), lambda dy: (dy / x.data,), "log")

    def relu(self):
        return relu(self)

    def tanh(self):
        return tanh(self)

    def sigmoid(self):
        return sigmoid(self)

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    # -- reductions and shape ---------------------------------------------------------------------
    def sum(self, dim=None, keepdim=False):
        x = self
        # y = sum_i x_i over dim:  dx_i = dy (every summed element moves y one for one)
        return _result(_reduce(torch.sum, x.data, dim, keepdim), (x,),
                       lambda dy: (_unreduce(dy, x.shape, dim, keepdim),), "sum")

    def mean(self, dim=None, keepdim=False):
        x = self
        y = _reduce(torch.mean, x.data, dim, keepdim)
        count = x.data.numel() // max(y.numel(), 1)  # elements per mean
        # y = sum_i x_i / n over dim:  dx_i = dy / n
        return _result(y, (x,), lambda dy: (_unreduce(dy / count, x.shape, dim, keepdim),), "mean")

    def reshape(self, *shape):
        x = self
        # the same numbers in another shape:  dx = dy in x's shape
        return _result(x.data.reshape(*shape), (x,), lambda dy: (dy.reshape(x.shape),), "reshape")

    def transpose(self, dim0, dim1):
        # y = x with two dims swapped:  dx = dy with them swapped back
        y = self.data.transpose(dim0, dim1)
        return _result(y, (self,), lambda dy: (dy.transpose(dim0, dim1),), "transpose")


# ---------------------------------------------------------------------------------------------
# the graph


def topological_order(root):
    """Every node ``root`` depends on through tensors that require grad, each after its parents.

    A depth-first search that lists a node once all its parents are listed (post-order), with an
    explicit stack instead of recursion, so a graph thousands of ops deep does not hit Python's
    recursion limit.
    """
    order, seen = [], {root}
    stack = [(root, iter(root.parents))]
    while stack:
        node, parents = stack[-1]
        for p in parents:
            if p.requires_grad and p not in seen:
                seen.add(p)
                stack.append((p, iter(p.parents)))  # visit p's parents first; come back to node later
                break
        else:  # every parent of node is listed: node can be
            stack.pop()
            order.append(node)
    return order


def _wrap(x, like=None):
    """x as a Tensor: a number or a plain torch tensor becomes a constant (no gradient).

    A Python number next to a Tensor ``like`` takes the dtype torch would compute in, so that
    ``y * 0.9995`` on float64 multiplies by the float64 0.9995, not by a float32 rounding of it.
    """
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (bool, int, float, complex)):
        return Tensor(torch.tensor(x, dtype=torch.result_type(like.data, x)))
    return Tensor(x)


def _data(x):
    return None if x is None else x.data


def _result(data, parents, backward_fn, op):
    """The output node of an op. It records its parents only if one of them needs a gradient."""
    out = Tensor(data)
    out.op = op
    if any(p.requires_grad for p in parents):
        out.requires_grad = True
        out.parents = parents
        out.backward_fn = backward_fn
    return out


def _sum_to(g, x):
    """The gradient for input x of a broadcasting op, from g = dL/dy: un-broadcast to x's shape,
    in x's dtype (as torch: float32 x + float64 0-dim y gives a float64 gradient for y). None
    when x needs no gradient."""
    return _unbroadcast(g, x.shape).to(x.dtype) if x.requires_grad else None


def _unbroadcast(g, shape):
    """g, the gradient of a broadcast result, summed back to ``shape``.

    Broadcasting copies x along leading dims it lacks and along its size-1 dims; a value copied
    to k places receives the sum of those k gradients (it is a node used k times).
    """
    # sum over the leading dims broadcasting added: x (3, 4) in y (5, 3, 4) -> sum over dim 0
    extra = g.dim() - len(shape)
    if extra:
        g = g.sum(dim=tuple(range(extra)))
    # sum over the dims where x has size 1 and y does not, keeping them: (3, 1) in (3, 4)
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g


def _reduced_dims(dim, ndim):
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return set(range(ndim))  # all dims, as torch.sum(x) and torch.sum(x, dim=())
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return {d % max(ndim, 1) for d in dims}


def _reduce(fn, x, dim, keepdim):
    if dim is None and not keepdim:
        return fn(x)
    return fn(x, dim=tuple(_reduced_dims(dim, x.dim())), keepdim=keepdim)


def _unreduce(dy, shape, dim, keepdim):
    """dy of a reduction over dim, sent back to every element it reduced: put back the reduced
    dims as size 1 (if keepdim dropped them), then broadcast to the input's shape."""
    dims = _reduced_dims(dim, len(shape))
    kept = [1 if i in dims else n for i, n in enumerate(shape)]  # y's shape with keepdim=True
    return dy.reshape(kept).expand(shape)


# ---------------------------------------------------------------------------------------------
# matmul: no *_backward in the package for a general matmul, so its rule is here


def matmul(a, b):
    """y = a @ b, with torch.matmul's rules: 1-D operands, batched and broadcast leading dims."""
    a, b = _wrap(a), _wrap(b)

    def backward(dy):
        # 1-D operands are a row (1, k) on the left, a column (k, 1) on the right: put back
        # the dims torch.matmul dropped from y for them, so dy is (..., n, p)
        a2 = a.data if a.dim() > 1 else a.data.unsqueeze(0)
        b2 = b.data if b.dim() > 1 else b.data.unsqueeze(-1)
        dy2 = dy if b.dim() > 1 else dy.unsqueeze(-1)
        dy2 = dy2 if a.dim() > 1 else dy2.unsqueeze(-2)
        da = db = None
        if a.requires_grad:
            # da = dy b^T                                     (..., n, k), summed to a's shape
            da = _unbroadcast(dy2 @ b2.mT, a2.shape).reshape(a.shape)
        if b.requires_grad:
            # db = a^T dy                                     (..., k, p), summed to b's shape
            db = _unbroadcast(a2.mT @ dy2, b2.shape).reshape(b.shape)
        return da, db

    return _result(a.data @ b.data, (a, b), backward, "matmul")


# ---------------------------------------------------------------------------------------------
# neural-network ops: forward and backward are manualgrad's own ops/*_forward, *_backward


def linear(input, weight, bias=None):
    """y = x W^T + b (torch.nn.functional.linear); backward is ops.linear.linear_backward."""
    x, w, b = _wrap(input), _wrap(weight), None if bias is None else _wrap(bias)

    def backward(dy):
        needs = (x.requires_grad, w.requires_grad, b is not None and b.requires_grad)
        # dx = dy W, dW = dy^T x, db = sum of dy over rows
        return linear_backward(dy, x.data, w.data, needs)  # (dx, dW, db): zip drops db without b

    y = linear_forward(x.data, w.data, _data(b))
    return _result(y, (x, w) if b is None else (x, w, b), backward, "linear")


def _elementwise(op, forward, backward, x, *args):
    """y = f(x) from an ops/ pair, whose backward takes (dy, y, *args): dx = dy f'(x)."""
    x = _wrap(x)
    y = forward(x.data, *args)
    return _result(y, (x,), lambda dy: (backward(dy, y, *args),), op)


def relu(input):
    """y = max(x, 0); dx = dy 1[y > 0] (ops.activation.relu_backward)."""
    return _elementwise("relu", relu_forward, relu_backward, input)


def tanh(input):
    """y = tanh(x); dx = dy (1 - y^2) (ops.activation.tanh_backward)."""
    return _elementwise("tanh", tanh_forward, tanh_backward, input)


def sigmoid(input):
    """y = 1 / (1 + e^-x); dx = dy y (1 - y) (ops.activation.sigmoid_backward)."""
    return _elementwise("sigmoid", sigmoid_forward, sigmoid_backward, input)


def softmax(input, dim):
    """y = e^x / sum e^x over dim; dx = y (dy - sum(dy y)) (ops.softmax.softmax_backward)."""
    return _elementwise("softmax", softmax_forward, softmax_backward, input, dim)


def log_softmax(input, dim):
    """y = x - log sum e^x over dim; dx = dy - e^y sum(dy) (ops.softmax.log_softmax_backward)."""
    return _elementwise("log_softmax", log_softmax_forward, log_softmax_backward, input, dim)


def gelu(input, approximate="none"):
    """y = x Phi(x); dx = dy (Phi(x) + x phi(x)) (ops.activation.gelu_backward, which needs x, not y)."""
    x = _wrap(input)
    y = gelu_forward(x.data, approximate)
    return _result(y, (x,), lambda dy: (gelu_backward(dy, x.data, approximate),), "gelu")


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """torch.nn.functional.cross_entropy with class-index targets; logits (N, C, *) or (C,).

    dx_i = g_i (p_i - onehot(t_i)) without weight or smoothing (ops.classification_loss.
    cross_entropy_backward, which handles weight, ignore_index and label_smoothing too).
    ``target`` and ``weight`` are constants (torch does not differentiate them either).
    """
    x = _wrap(input)
    t, w = _data(_wrap(target)), _data(None if weight is None else _wrap(weight))
    if x.dim() == 1:  # unbatched: one row of C logits
        loss = cross_entropy(x.reshape(1, -1), t.reshape(1), weight, ignore_index, reduction, label_smoothing)
        return loss.reshape(()) if reduction == "none" else loss
    if isinstance(weight, Tensor) and weight.requires_grad:
        raise RuntimeError("cross_entropy is not differentiable with respect to argument 'weight'. "
                           "This input cannot have requires_grad True.")
    reduction = get_reduction(None, None, reduction)
    t = _check_index_target(x.data, t, w)  # torch's shape and dtype errors
    eps = _check_label_smoothing(label_smoothing)
    masked = _has_ignored_targets(t, ignore_index, x.shape[1])  # IndexError for a bad class
    options = (w, reduction, ignore_index, eps, masked)
    y = cross_entropy_forward(x.data, t, *options)
    return _result(y, (x,), lambda dy: (cross_entropy_backward(dy, x.data, t, *options),), "cross_entropy")


def mse_loss(input, target, reduction="mean"):
    """reduce((x - t)^2); dx = 2 (x - t) dy, dt = -dx, un-broadcast
    (ops.regression_loss.regression_loss_backward around mse_loss_backward)."""
    x, t = _wrap(input), _wrap(target)
    reduction = get_reduction(None, None, reduction)
    y = regression_loss_forward("mse", x.data, t.data, None, reduction)

    def backward(dy):
        needs = (x.requires_grad, t.requires_grad, False)
        return regression_loss_backward("mse", dy, x.data, t.data, None, y, reduction, needs=needs)[:2]

    return _result(y, (x, t), backward, "mse_loss")


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b over the trailing ``normalized_shape`` dims
    (ops.normalization.layer_norm_backward)."""
    x = _wrap(input)
    w, b = (None if p is None else _wrap(p) for p in (weight, bias))
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    affine = [(p, i) for i, p in ((1, w), (2, b)) if p is not None]  # (param, index in dx, dw, db)

    def backward(dy):
        needs = (x.requires_grad, w is not None and w.requires_grad, b is not None and b.requires_grad)
        grads = layer_norm_backward(dy, x.data, _data(w), shape, eps, needs)
        return [grads[0]] + [grads[i] for _, i in affine]

    y = layer_norm_forward(x.data, shape, _data(w), _data(b), eps)
    return _result(y, (x, *(p for p, _ in affine)), backward, "layer_norm")

