"""apply(Fn, *args): ``Fn.apply(*args)``, fast in eager mode and traceable by torch.compile.

Eager: ``torch.autograd.Function.apply`` binds every call's arguments to ``forward``'s
signature with ``inspect.signature`` when ``setup_context`` is defined (for defaults and
keywords). manualgrad's functional twins always pass every argument positionally, so the
binding is a no-op that costs about 8 us a call, several times that when it runs with caches
cold between large kernels: measurably slower steps on small networks (see benchmarks/).
``apply`` calls the C-level apply directly.

torch.compile: Dynamo refuses to trace a Function that defines a custom ``jvp`` (a graph
break at every op). Forward-mode AD does not exist inside a compiled graph anyway, so under
compile ``apply`` runs each Function's *traceable twin*: a subclass identical but for ``jvp``,
made once per Function by ``register_traceable`` when manualgrad is imported. Dynamo then
traces forward + setup_context into the graph and the hand-written backward into the
compiled backward graph.

Under torch.func transforms it is ``Fn.apply`` itself, so functorch sees the standard path.

Autocast: every Function declares ``autocast``, what torch's autocast lists do with the op it
implements (ATen's autocast_mode.cpp). Inside an autocast region ``apply`` casts the floating
tensor arguments accordingly and runs the Function with autocast off, so its hand-written
forward and backward compute in exactly the dtypes chosen here (nothing inside is re-cast):

- ``LOWER``: the autocast dtype (bfloat16 / float16): matmuls, convolutions, attention.
- ``FLOAT32``: float32: the losses.
- ``FLOAT32_ON_CUDA``: float32 on CUDA, the input's dtype elsewhere (softmax, log_softmax,
  the norms, softplus): torch's CPU list leaves them alone, its CUDA list runs them in float32.
- ``FLOAT32_ON_CPU``: the other way round (reflect pads of 1 and 2 dims, replicate pads,
  the 3-d poolings, max unpooling, fractional max pooling): on torch's CPU float32 list, on no CUDA list.
- ``INPUT``: no cast, the dtype the input arrives in (the other elementwise ops, pooling,
  dropout, embedding); ops with float32 parameters (the norms) mix dtypes like torch's kernels.

As torch recommends, call backward outside the autocast region; the casts are ordinary
autograd ops, so gradients reach float32 leaves in float32.

NaN origin: while a GradientMonitor traces a step it puts a recorder in ``recorders``; each
eager call then hands it ``(fn, args, output)`` after the Function ran (references only, no
kernel), so the monitor can name the Function where a non-finite value was born. With no
monitor tracing, the cost is one test of an empty list.
"""
import torch

try:  # the C-level apply that torch.autograd.Function.apply ends in
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

    _base_apply = torch._C._FunctionBase.__dict__["apply"]
except (ImportError, AttributeError, KeyError):  # a torch without them: the standard path
    _base_apply = None


INPUT, LOWER, FLOAT32, FLOAT32_ON_CUDA = "input", "lower", "float32", "float32 on cuda"
FLOAT32_ON_CPU = "float32 on cpu"

recorders = []  # callables (fn, args, output) of GradientMonitors tracing the current step


def _autocast_dtype(policy, device_type):
    if policy == LOWER:
        return torch.get_autocast_dtype(device_type)
    if policy == FLOAT32 or (policy == FLOAT32_ON_CUDA and device_type == "cuda") or (
            policy == FLOAT32_ON_CPU and device_type == "cpu"):
        return torch.float32
    return None


def autocast_on(device_type):
    """True inside an autocast region for this device type (a device without autocast, meta say: False)."""
    return (torch._C._is_any_autocast_enabled() and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def _autocast_device(args):
    """The device type whose autocast applies to this call, or None when it is off."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    return device_type if autocast_on(device_type) else None


def apply(fn, *args):
    if torch._C._is_any_autocast_enabled():
        device_type = _autocast_device(args)
        if device_type is not None:
            dtype = _autocast_dtype(fn.autocast, device_type)
            if dtype is not None:
                args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast(device_type, enabled=False):
                return apply(fn, *args)
    if torch.compiler.is_compiling():
        return fn._traceable_apply(*args)
    if "_traceable_apply" not in fn.__dict__:  # a Function from outside the package, first call
        _register(fn)
    if _base_apply is None or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    out = _base_apply.__get__(None, fn)(*_unwrap_dead_wrappers(args))
    if recorders:
        for record in recorders:
            record(fn, args, out)
    return out


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _traceable_apply(twin):
    # A staticmethod: the one kind of attribute Dynamo resolves on a Function class.
    return staticmethod(lambda *args: twin.apply(*args))


def _register(fn):
    if fn.jvp is torch.autograd.Function.jvp:
        fn._traceable_apply = _traceable_apply(fn)
        return
    twin = type(fn.__name__, (fn,), {
        "jvp": torch.autograd.Function.jvp,  # the only difference: no custom jvp
        "__module__": fn.__module__,
        "__qualname__": fn.__qualname__,
    })
    twin._traceable_apply = fn._traceable_apply = _traceable_apply(twin)


def register_traceable(package="manualgrad"):
    """Give every Function defined in ``package`` its traceable twin, as ``Fn._traceable_apply``.

    Each class gets its own (a subclass never runs its parent's twin); a Function without a
    custom jvp is its own twin. A Function from elsewhere gets its twin on its first eager call
    through ``apply`` (Dynamo cannot build a class while tracing)."""
    for fn in list(_subclasses(torch.autograd.Function)):
        if fn.__module__.startswith(package + ".") and "_traceable_apply" not in fn.__dict__:
            _register(fn)
