"""Gradient clipping, written out: twin of torch.nn.utils.clip_grad_norm_.

    n_i = ||g_i||_p                                    one norm per gradient
    N   = ||(n_1, ..., n_k)||_p = ||concat(g_1, ..., g_k)||_p
    c   = min(max_norm / (N + 1e-6), 1)
    g_i = c g_i                                         in place

The coefficient is clamped on the device rather than tested with ``if c < 1``: every gradient
is multiplied (by 1 when no clipping is needed), so nothing waits for the device to report N.

``register_clip_listener(fn)`` lets an observer (the gradient monitor) see every call:
``fn(parameters, total_norm, clip_coef)`` with the 0-dim device tensors N and min(c, 1), so it
can record them without a host sync. It returns a handle whose ``remove()`` unregisters it.
"""
from __future__ import annotations

import types
import warnings
from collections import OrderedDict

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype
from torch.utils.hooks import RemovableHandle

__all__ = ["clip_grad_norm_", "register_clip_listener"]

_clip_listeners = OrderedDict()  # handle id -> fn(parameters, total_norm, clip_coef); called in registration order


def register_clip_listener(fn):
    """Call ``fn(parameters, total_norm, clip_coef)`` after every ``clip_grad_norm_``.

    ``parameters`` is the list of parameters passed in, ``total_norm`` the 0-dim N it returns and
    ``clip_coef`` the 0-dim min(max_norm / (N + 1e-6), 1) the gradients were multiplied by; both
    stay on the device. Not called when no parameter has a gradient. Returns a handle with
    ``remove()``.
    """
    handle = RemovableHandle(_clip_listeners)
    _clip_listeners[handle.id] = fn
    return handle


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Clip the gradient norm of an iterable of parameters, in place, like torch's.

    The norm is taken over all gradients together, as if they were concatenated into one
    vector; parameters whose ``.grad`` is None are ignored.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose gradients are clipped.
        max_norm (float): largest allowed total norm.
        norm_type (float, optional): p of the p-norm; ``float('inf')`` or ``'inf'`` for the max
            norm (default: 2.0).
        error_if_nonfinite (bool, optional): raise RuntimeError if the total norm is nan or
            ±inf (default: False). This check has to read the norm on the host, so it is the
            one case that synchronizes.
        foreach (bool, optional): only None and False are accepted; True raises
            NotImplementedError (the result does not depend on it).

    Returns:
        Tensor: the total norm N of the gradients before clipping (0-dim; ``tensor(0.)`` if
        no parameter has a gradient).
    """
    if foreach:
        raise NotImplementedError("manualgrad.utils.clip_grad_norm_: foreach=True is not implemented; leave it at None")
    with torch.no_grad():
        if isinstance(parameters, Tensor):
            parameters = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            parameters = list(parameters)  # a generator must not be consumed twice
            if is_generator and len(parameters) == 0:
                warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
        grads = [p.grad for p in parameters if p.grad is not None]
        norm_type = float(norm_type)
        max_norm = float(max_norm)
        if len(grads) == 0:
            return torch.tensor(0.0)

        # Gradients grouped by (device, dtype) with torch's own grouping: its order (a C++ hash
        # map, not first appearance) is the order of the n_i in N, so it fixes N's rounding.
        groups = {key: group for key, ([group], _) in _group_tensors_by_device_and_dtype([grads]).items()}
        first_device = grads[0].device

        # n_i = ||g_i||_p = (Σ_j |g_ij|^p)^(1/p)     (max_j |g_ij| for p = inf)      0-dim each
        norms = [torch.linalg.vector_norm(g, norm_type) for group in groups.values() for g in group]
        # N = ||(n_1, ..., n_k)||_p                                                     0-dim
        total_norm = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
        if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):  # host sync, on request
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from "
                "`parameters` is non-finite, so it cannot be clipped. To disable "
                "this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`"
            )

        # c = max_norm / (N + 1e-6)                                                     0-dim
        clip_coef = max_norm / (total_norm + 1e-6)
        # c = min(c, 1): scale down only                                                0-dim
        clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
        for (device, _), group in groups.items():
            coef = clip_coef_clamped.to(device)
            for g in group:
                # g_i = c g_i                                                           like g_i
                g.mul_(coef)
        for fn in list(_clip_listeners.values()):
            fn(parameters, total_norm, clip_coef_clamped)
        return total_norm
