"""apply(Fn, *args): ``Fn.apply(*args)`` without the per-call argument binding.

``torch.autograd.Function.apply`` binds every call's arguments to ``forward``'s signature
with ``inspect.signature`` when ``setup_context`` is defined (for defaults and keywords).
manualgrad's functional twins always pass every argument positionally, so the binding is a
no-op that costs about 8 us a call, several times that when it runs with caches cold
between large kernels: measurably slower steps on small networks (see benchmarks/).

Under torch.compile and torch.func transforms this is ``Fn.apply`` itself, so Dynamo and
functorch see the standard path.
"""
import torch

try:  # the C-level apply that torch.autograd.Function.apply ends in
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

    _base_apply = torch._C._FunctionBase.__dict__["apply"]
except (ImportError, AttributeError, KeyError):  # a torch without them: the standard path
    _base_apply = None


def apply(fn, *args):
    if _base_apply is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _base_apply.__get__(None, fn)(*_unwrap_dead_wrappers(args))
