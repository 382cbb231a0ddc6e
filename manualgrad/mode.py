"""manualgrad.enable(): route the torch calls a model makes itself to manualgrad's Functions.

``manualgrad.convert`` swaps ``nn.Linear`` and friends, but a model's own ``forward`` also calls
``F.gelu``, ``F.scaled_dot_product_attention``, ``torch.matmul``, ``x.softmax(-1)``, ``a @ b``.
Inside ``with manualgrad.enable():`` a ``TorchFunctionMode`` sends each such call to the twin
in ``manualgrad.functional``, so its backward is the hand-written one::

    with manualgrad.enable():
        loss = model(x)
        loss.backward()

What is routed (``routes()`` lists it) is one table:

- every ``torch.nn.functional`` name manualgrad implements, to the twin of the same name (the
  twins keep torch's signatures, so the call's arguments pass through as they are);
- the torch-level functions and Tensor methods behind them that models call directly, each with
  torch's parameter list written out as torch declares it (``torch.softmax(input, dim,
  dtype=None)``, not ``F.softmax``'s ``_stacklevel``): one binder turns any valid call
  (positional, keyword, Tensor method, operator) into the twin's keywords.

Everything else runs through torch unchanged, and so does a routed call that

- has a form the twin does not take (``out=``, ``mm``'s ``out_dtype``, addmm's deprecated
  positional ``beta``/``alpha``, ``torch.embedding``'s out-of-range padding index);
- has no floating-point tensor argument, or a complex one (integer index arithmetic, masks);
- hits an option the twin does not support: the twin raises ``NotImplementedError`` while
  checking its arguments, before any work (``scaled_dot_product_attention``'s dropout off the
  CPU, nested tensors in ``multi_head_attention_forward``), and torch's function runs the call instead;
- comes from inside an autograd.Function's forward or a manualgrad backward (see
  ``_inside_function``; ``loss.backward()`` under the mode runs without it anyway: torch pops
  a mode for the torch functions it handles, and backward is one).

Non-reentrant ``torch.utils.checkpoint`` recomputes its region during backward, so a region
routed in forward must be routed again: pass ``context_fn=manualgrad.mode.checkpoint_contexts``
or enter ``enable()`` inside the checkpointed function.

Bad arguments fail as torch's do: torch parses the call (a missing ``dim``, an unknown keyword:
TypeError) before any mode sees it, and a twin's own checks raise torch's exception types.

Nesting: entering ``enable()`` while a manualgrad mode is already active pushes nothing, so a
call is routed once however deep the nesting; each exit, also on an exception, restores the
torch-function mode stack as it was. The mode holds no state besides that per-instance record.
"""
import ast
import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as TF
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from . import functional as MF

__all__ = ["checkpoint_contexts", "enable", "routes"]


class _Route(NamedTuple):
    twin: Callable
    names: tuple = None  # torch's parameters in order; None: the twin takes torch's arguments as they are
    positional: int = 0  # how many of them may be given positionally
    defaults: dict = None
    renames: dict = None  # torch's keyword -> the twin's (None: dropped, e.g. cudnn_enabled)
    fix: Callable = None  # last adjustment of the twin's keywords; None from it: torch runs the call


def _parse(spec):
    """'input, dim, dtype=None' -> (names, positional count, defaults). '*' starts keyword-only."""
    names, defaults, positional = [], {}, None
    for item in (part.strip() for part in spec.split(",")):
        if item == "*":
            positional = len(names)
            continue
        name, eq, default = item.partition("=")
        names.append(name)
        if eq:
            defaults[name] = ast.literal_eval(default)
    return tuple(names), len(names) if positional is None else positional, defaults


def _embedding_padding(kw):
    # torch.embedding's padding_idx: any negative (F.embedding passes -1) means none; the twin
    # wants None or a row. One past the rows: torch ignores it, the twin would raise: torch runs.
    p = kw["padding_idx"]
    if p >= kw["weight"].shape[0]:
        return None
    return {**kw, "padding_idx": None if p < 0 else p}


_T = torch.Tensor
# torch-level entry points: (callables, parameters as torch declares them, twin name, renames, fix).
# Parameter names are the twin's wherever torch's keyword is the same. A Tensor method's self is
# its first parameter (always positional); __rmatmul__(self, other) is other @ self, hence its order.
_TORCH_LEVEL = [
    ((torch.softmax, _T.softmax), "input, dim, dtype=None", "softmax", None, None),
    ((torch.log_softmax, _T.log_softmax), "input, dim, dtype=None", "log_softmax", None, None),
    ((torch.tanh, _T.tanh), "input", "tanh", None, None),
    ((torch.sigmoid, _T.sigmoid), "input", "sigmoid", None, None),
    ((torch.relu, _T.relu), "input", "relu", None, None),
    ((torch.matmul, _T.matmul, _T.__matmul__), "input, other", "matmul", None, None),
    ((_T.__rmatmul__,), "other, input", "matmul", None, None),
    ((torch.mm, _T.mm), "input, mat2", "mm", None, None),
    ((torch.bmm, _T.bmm), "input, mat2", "bmm", None, None),
    ((torch.addmm, _T.addmm), "input, mat1, mat2, *, beta=1, alpha=1", "addmm", None, None),
    ((torch.baddbmm, _T.baddbmm), "input, batch1, batch2, *, beta=1, alpha=1", "baddbmm", None, None),
    ((torch.layer_norm,), "input, normalized_shape, weight=None, bias=None, eps=1e-05, cudnn_enable=True",
     "layer_norm", {"cudnn_enable": None}, None),
    ((torch.group_norm,), "input, num_groups, weight=None, bias=None, eps=1e-05, cudnn_enabled=True",
     "group_norm", {"cudnn_enabled": None}, None),
    ((torch.batch_norm,), "input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled",
     "batch_norm", {"cudnn_enabled": None}, None),
    ((torch.instance_norm,), "input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, "
     "cudnn_enabled", "instance_norm", {"cudnn_enabled": None}, None),
    ((torch.rms_norm,), "input, normalized_shape, weight=None, eps=None", "rms_norm", None, None),
    ((torch.dropout,), "input, p, train", "dropout", {"train": "training"}, None),
    ((torch.embedding,), "weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False",
     "embedding", {"indices": "input"}, _embedding_padding),
    # more activations, distances, dropouts (ops/activation_more.py, distance.py, dropout_more.py; torch.prelu,
    # hardshrink, pdist, cosine_similarity, pairwise_distance are torch.nn.functional's own: routed by name)
    ((torch.selu,), "input", "selu", None, None),
    ((torch.celu,), "input, alpha=1.0", "celu", None, None),
    ((_T.prelu,), "input, weight", "prelu", None, None),
    ((_T.hardshrink,), "input, lambd=0.5", "hardshrink", None, None),
    ((torch.threshold,), "input, threshold, value", "threshold", None, None),
    ((torch.rrelu,), "input, lower=0.125, upper=0.3333333333333333, training=False", "rrelu", None, None),
    ((torch.alpha_dropout,), "input, p, train", "alpha_dropout", {"train": "training"}, None),
    ((torch.feature_alpha_dropout,), "input, p, train", "feature_alpha_dropout", {"train": "training"}, None),
    # weight normalization (ops/weight_norm.py): what torch.nn.utils.parametrizations.weight_norm calls
    ((torch._weight_norm,), "v, g, dim=0", "weight_norm", None, None),
]


def _with_indices(twin, *args, **kwargs):
    return twin(*args, **{**kwargs, "return_indices": True})


def _build_routes():
    routes = {}
    for name in MF.__all__:  # torch.nn.functional twins: same signature, arguments pass through
        torch_fn = getattr(TF, name, None)
        if callable(torch_fn):
            routes[torch_fn] = _Route(getattr(MF, name))
        # F.max_pool2d(..., return_indices=True) and the other max poolings dispatch on the flag to
        # F.max_pool2d_with_indices, which asks the mode under its own name (with return_indices
        # as a keyword): the twin with return_indices=True, as that function always returns both
        with_indices = getattr(TF, name + "_with_indices", None)
        if callable(with_indices):
            routes[with_indices] = _Route(functools.partial(_with_indices, getattr(MF, name)))
    for fns, spec, twin_name, renames, fix in _TORCH_LEVEL:
        twin = getattr(MF, twin_name, None)
        if twin is None:  # a family not in manualgrad.functional (yet): torch runs these
            continue
        names, positional, defaults = _parse(spec)
        for fn in fns:
            routes[fn] = _Route(twin, names, positional, defaults, renames or {}, fix)
    return routes


_ROUTES = _build_routes()


def routes():
    """The routed torch callables, each with the manualgrad twin it goes to."""
    return {fn: route.twin for fn, route in _ROUTES.items()}


def _bind(route, args, kwargs):
    """torch's arguments of a call as the twin's keywords, or None for a form the twin does not take.

    torch has already checked the call against its own signature (a bad one raised TypeError
    before the mode saw it), so only valid calls arrive: an extra positional argument or an
    unknown keyword means another overload (out=, out_dtype, deprecated forms), left to torch.
    """
    if len(args) > route.positional:
        return None
    bound = dict(route.defaults)
    bound.update(zip(route.names, args))
    for key, value in kwargs.items():
        if key not in route.defaults and key not in route.names:
            return None
        bound[key] = value
    if len(bound) != len(route.names) or not isinstance(bound[route.names[0]], torch.Tensor):
        return None
    kw = {}
    for key, value in bound.items():
        key = route.renames.get(key, key)
        if key is not None:
            kw[key] = value
    return kw if route.fix is None else route.fix(kw)


def _floating(args, kwargs):
    """At least one floating-point tensor argument and no complex one."""
    floating = False
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if a.is_complex():
                return False
            floating = floating or a.is_floating_point()
    return floating


def _function_names():
    """Autograd node class names of manualgrad's Functions: ``<Fn>Backward``, and under torch.func
    transforms ``<Fn>GeneratedBackward`` (functorch wraps each Function in a generated one)."""
    names, todo = set(), [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(__package__ + "."):
            names.update((cls.__name__ + "Backward", cls.__name__ + "GeneratedBackward"))
    return frozenset(names)


_NODE_NAMES = _function_names()


def _inside_function():
    """Whether the current call comes from inside an autograd.Function, where it must run as torch's.

    - Forward: autograd runs every Function's forward with forward-mode AD off, so
      ``_is_fwd_grad_enabled()`` is False inside one. That covers manualgrad twins called
      directly under the mode (a converted ``Linear``: its forward's addmm stays torch's) and
      ``torch.inference_mode``, where no gradient is recorded and torch's functions should run.
      (A twin the mode itself calls runs with the mode popped: torch pops a mode while its
      ``__torch_function__`` runs.)
    - Backward: ``loss.backward()``, ``torch.autograd.grad`` and ``torch.autograd.backward``
      are torch functions too, so under the mode torch pops it for them and the engine runs
      the whole backward without it: a hand-written backward's products stay torch's, also
      with ``create_graph=True``. The mode is on during a backward only when something enters
      it there (a checkpointed region that enters ``enable()`` and is recomputed). The engine
      names the node it is running (``_current_autograd_node``): inside a manualgrad node the
      backward's calls run as written, except for non-reentrant checkpoint's recomputation,
      which runs from inside the first backward that unpacks a saved tensor, with grad enabled
      and its saved-tensor hooks pushed: it must route as the original forward did (save the
      same tensors), so there calls are routed.
    """
    if torch.compiler.is_compiling():
        return False  # traced: backward is traced ahead of time, forwards are inlined by Dynamo
    if not torch._C._is_fwd_grad_enabled():
        return True
    node = torch._C._current_autograd_node()
    if node is None or type(node).__name__ not in _NODE_NAMES:
        return False
    recomputing = torch.is_grad_enabled() and torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    return not recomputing


class _ManualgradMode(TorchFunctionMode):
    """The TorchFunctionMode behind ``enable()``: a dict lookup, then the twin or torch."""

    def __init__(self):
        super().__init__()
        self._pushed = []  # per __enter__: whether it pushed this mode (re-entry of the same object)

    def __enter__(self):
        active = any(isinstance(m, _ManualgradMode) for m in _get_current_function_mode_stack())
        self._pushed.append(not active)
        if not active:
            super().__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self._pushed.pop():
            super().__exit__(exc_type, exc_val, exc_tb)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        # out=None is passed explicitly by some functionals (F.normalize): only a real out= runs torch
        if route is not None and kwargs.get("out") is None and _floating(args, kwargs) and not _inside_function():
            if route.names is None:
                call_args, call_kwargs = args, kwargs
            else:
                call_args, call_kwargs = (), _bind(route, args, kwargs)
            if call_kwargs is not None:
                try:
                    return route.twin(*call_args, **call_kwargs)
                except NotImplementedError:
                    pass  # an option the twin does not support, found before any work: torch runs it
        return func(*args, **kwargs)


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)``:
    the forward and its recomputation both run under ``enable()``.

    Non-reentrant checkpoint recomputes the forward during backward and requires it to save
    the same tensors as the first run. Backward runs with the mode popped (see
    ``_inside_function``), so a region routed in forward would be recomputed with torch's ops
    and torch raises CheckpointError; with these contexts (or ``with enable():`` inside ``fn``)
    the recomputation routes too.
    """
    return enable(), enable()


def enable():
    """A context manager under which supported torch calls run manualgrad's Functions.

    ``with manualgrad.enable(): loss = model(x); loss.backward()``. Routed: the
    ``torch.nn.functional`` functions manualgrad implements and the torch-level ops models call
    directly (see ``routes()``); anything else, and options a twin does not support, run
    through torch unchanged. Nests and re-enters (a call is routed once); leaving it, also by
    an exception, restores torch's mode stack. Works under torch.compile and torch.func.
    """
    return _ManualgradMode()
