"""Checking hand-written gradients: against finite differences and against torch.

Two helpers cover what every op needs:

- ``check_gradients(fn, *inputs)`` runs, in float64, ``gradcheck`` (reverse mode, forward
  mode, batched gradients through vmap, undefined upstream gradients) and ``gradgradcheck``
  (double backward, reverse-over-reverse and forward-over-reverse, batched).
- ``assert_same_as_torch(fn, torch_fn, *inputs)`` runs a manualgrad callable and its torch
  twin on copies of the same inputs, backpropagates the same upstream gradient through both
  and compares the output and every gradient: inputs that require grad, and parameters by
  name when both callables are modules.

``assert_raises_like_torch`` checks that bad input fails the way torch fails, and
``assert_error_within_torch`` that float32 results are as close to the float64 truth as torch's.
"""
from __future__ import annotations

import torch
from torch.autograd import gradcheck, gradgradcheck

__all__ = ["check_gradients", "assert_same_as_torch", "assert_raises_like_torch", "assert_error_within_torch",
           "float32_errors", "as_float64", "saved_bytes", "saved_bytes_by_op"]


def as_float64(t):
    """A float64 leaf with the same values and requires_grad; other objects unchanged.

    float64 tensors are returned as they are, so a test can hand in a deliberately
    non-contiguous float64 view and have it checked as such.
    """
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def check_gradients(
    fn,
    *inputs,
    atol=1e-5,
    rtol=1e-3,
    eps=1e-6,
    gradgrad=True,
    batched_forward_grad=True,
    nondet_tol=0.0,
    **kwargs,
):
    """gradcheck + gradgradcheck of ``fn(*inputs, **kwargs)`` in float64.

    Floating inputs are converted to float64 (requires_grad kept); pass float64 tensors to
    control layout (e.g. non-contiguous views). Tensors that require grad are checked whether
    passed by position or by keyword. Raises ``GradcheckError`` naming what failed.

    ``batched_forward_grad=False`` is for in-place ops: torch's batched forward-AD check
    cannot see an in-place tangent update through its legacy vmap.
    ``nondet_tol`` is for ops whose backward is deterministic only up to rounding.
    """
    inputs = tuple(as_float64(t) for t in inputs)
    # Keyword tensors that require grad are checked too: they join the positional inputs
    # gradcheck differentiates, and the wrapper hands them back by name.
    grad_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    fixed = {k: as_float64(v) for k, v in kwargs.items() if k not in grad_names}
    n = len(inputs)
    inputs += tuple(as_float64(kwargs[k]) for k in grad_names)

    def f(*args):
        return fn(*args[:n], **fixed, **dict(zip(grad_names, args[n:])))
    gradcheck(
        f,
        inputs,
        eps=eps,
        atol=atol,
        rtol=rtol,
        nondet_tol=nondet_tol,
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=batched_forward_grad,
        check_undefined_grad=True,
        raise_exception=True,
    )
    if gradgrad:
        gradgradcheck(
            f,
            inputs,
            eps=eps,
            atol=atol,
            rtol=rtol,
            nondet_tol=nondet_tol,
            check_batched_grad=True,
            check_fwd_over_rev=True,
            check_rev_over_rev=True,
            raise_exception=True,
        )
    return True


def _copy_input(t):
    if isinstance(t, torch.Tensor):
        return t.detach().clone().requires_grad_(t.requires_grad)
    return t


def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(fn, inputs, kwargs, grad_outputs):
    out = _outputs(fn(*inputs, **kwargs))
    diff = [(o, g) for o, g in zip(out, grad_outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
    if diff:
        torch.autograd.backward([o for o, _ in diff], [g for _, g in diff])
    return out


def assert_same_as_torch(fn, torch_fn, *inputs, grad_output=None, rtol=1e-5, atol=1e-6, **kwargs):
    """Compare ``fn`` with ``torch_fn``: output, input gradients and parameter gradients.

    Both run on fresh copies of ``inputs`` (same values, same requires_grad) with
    ``**kwargs``. ``grad_output`` is the upstream gradient (a tensor, or a tuple for several
    outputs); by default a random one, the same for both. If both callables are modules,
    their parameters are compared by name (load the same state_dict into both first).
    Returns the pair of output tuples for further checks.
    """
    mg_inputs = [_copy_input(t) for t in inputs]
    th_inputs = [_copy_input(t) for t in inputs]
    # Keyword tensors too get a copy per run, so their gradients can be compared.
    mg_kwargs = {k: _copy_input(v) for k, v in kwargs.items()}
    th_kwargs = {k: _copy_input(v) for k, v in kwargs.items()}

    # The torch run fixes the output shapes, and with them the default upstream gradients.
    with torch.random.fork_rng():
        probe_kwargs = {k: _copy_input(v) for k, v in kwargs.items()}
        th_probe = _outputs(torch_fn(*[_copy_input(t) for t in inputs], **probe_kwargs))
    if grad_output is None:
        grad_outputs = tuple(
            torch.randn_like(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else None
            for o in th_probe
        )
    else:
        grad_outputs = _outputs(grad_output)

    # Same RNG stream for both runs, so random ops (dropout) draw the same numbers.
    state = torch.random.get_rng_state()
    mg_out = _run(fn, mg_inputs, mg_kwargs, grad_outputs)
    torch.random.set_rng_state(state)
    th_out = _run(torch_fn, th_inputs, th_kwargs, grad_outputs)

    assert len(mg_out) == len(th_out), f"{len(mg_out)} outputs, torch gives {len(th_out)}"
    for i, (a, b) in enumerate(zip(mg_out, th_out)):
        if isinstance(b, torch.Tensor):
            _close(a, b, rtol, atol, f"output {i}")
    for i, (a, b) in enumerate(zip(mg_inputs, th_inputs)):
        if isinstance(b, torch.Tensor) and b.requires_grad:
            _close(a.grad, b.grad, rtol, atol, f"gradient of input {i}")
    for k, b in th_kwargs.items():
        if isinstance(b, torch.Tensor) and b.requires_grad:
            _close(mg_kwargs[k].grad, b.grad, rtol, atol, f"gradient of {k}=")
    if isinstance(fn, torch.nn.Module) and isinstance(torch_fn, torch.nn.Module):
        mg_params = dict(fn.named_parameters())
        th_params = dict(torch_fn.named_parameters())
        assert mg_params.keys() == th_params.keys(), f"{sorted(mg_params)} != {sorted(th_params)}"
        for name, p in th_params.items():
            _close(mg_params[name].grad, p.grad, rtol, atol, f"gradient of parameter {name!r}")
    return mg_out, th_out


def _close(actual, expected, rtol, atol, what):
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{what}: manualgrad gives {'None' if actual is None else 'a tensor'}, "
            f"torch gives {'None' if expected is None else 'a tensor'}"
        )
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != torch's {expected.dtype}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_raises_like_torch(fn, torch_fn, *args, match=None, **kwargs):
    """Both calls fail, with the same exception type. Returns manualgrad's exception.

    ``match`` (a regex) is checked against manualgrad's message, so a test can pin that the
    message says what is wrong.
    """
    import re

    try:
        torch_fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - we want whatever torch raises
        expected = type(e)
    else:
        raise AssertionError("torch accepts this input; nothing to compare")
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        assert isinstance(e, expected), f"raised {type(e).__name__}({e}), torch raises {expected.__name__}"
        if match is not None:
            assert re.search(match, str(e)), f"message {str(e)!r} does not match {match!r}"
        return e
    raise AssertionError(f"no exception; torch raises {expected.__name__}")


def _as(t, dtype):
    # a leaf of this dtype with the same values and requires_grad; other objects unchanged
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _outputs_and_gradients(fn, inputs, kwargs, grad_outputs, dtype):
    """fn's outputs and the gradients of its inputs that require grad (positional, then keyword),
    under grad_outputs, all computed in ``dtype``; named for messages."""
    inputs = [_as(t, dtype) for t in inputs]
    kwargs = {k: _as(v, dtype) for k, v in kwargs.items()}
    out = _run(fn, inputs, kwargs, [None if g is None else g.to(dtype) for g in grad_outputs])
    results = [(f"output {i}", o) for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    results += [(f"gradient of input {i}", t.grad) for i, t in enumerate(inputs)
                if isinstance(t, torch.Tensor) and t.requires_grad]
    results += [(f"gradient of {k}=", t.grad) for k, t in kwargs.items()
                if isinstance(t, torch.Tensor) and t.requires_grad]
    return results


def float32_errors(fn, torch_fn, *inputs, grad_output=None, **kwargs):
    """{name: (manualgrad's error, torch's error, scale)} for every output and input gradient.

    ``fn`` and ``torch_fn`` run in float32, and ``torch_fn`` in float64 (the truth), from the same
    float32-rounded inputs and upstream gradient (by default a random one). An error is the max
    abs difference from the truth, the scale the truth's max abs value."""
    inputs = [_as(t, torch.float32) for t in inputs]
    kwargs = {k: _as(v, torch.float32) for k, v in kwargs.items()}
    if grad_output is None:
        with torch.random.fork_rng():
            probe = _outputs(torch_fn(*map(_copy_input, inputs), **{k: _copy_input(v) for k, v in kwargs.items()}))
        grad_output = tuple(torch.randn_like(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else None
                            for o in probe)
    grad_outputs = _outputs(grad_output)
    truth = _outputs_and_gradients(torch_fn, inputs, kwargs, grad_outputs, torch.float64)
    ours = _outputs_and_gradients(fn, inputs, kwargs, grad_outputs, torch.float32)
    theirs = _outputs_and_gradients(torch_fn, inputs, kwargs, grad_outputs, torch.float32)
    assert [n for n, _ in ours] == [n for n, _ in truth], f"{[n for n, _ in ours]} != torch's {[n for n, _ in truth]}"
    errors = {}
    for (name, t64), (_, a), (_, b) in zip(truth, ours, theirs):
        if t64 is None or t64.numel() == 0:
            continue
        errors[name] = ((a.double() - t64).abs().max().item(), (b.double() - t64).abs().max().item(),
                        t64.abs().max().item())
    return errors


def assert_error_within_torch(fn, torch_fn, draws, factor=2.0, ulps=4):
    """manualgrad in float32 is on average at most ``factor`` times as far from the float64 truth
    as torch in float32, for every output and input gradient (see ``float32_errors``).

    ``draws`` is an iterable of (inputs, kwargs): random inputs of one kind. The errors are summed
    over the draws before they are compared: one draw's error is mostly luck (where a gradient
    cancels, a last-bit difference in an intermediate decides it), so that the ratio of two
    equally accurate implementations ranges over 0.1-10x from draw to draw, while the ratio of
    the sums over a few dozen draws stays near 1 and a systematic loss of accuracy shows.
    Allowed: factor * torch's summed error + ``ulps`` float32 ulps of each draw's result scale
    (so that results torch happens to get exactly right do not demand the same of manualgrad).
    Returns {name: (manualgrad's summed error, torch's)}."""
    eps = torch.finfo(torch.float32).eps
    sums = {}
    for inputs, kwargs in draws:
        for name, (ours, theirs, scale) in float32_errors(fn, torch_fn, *inputs, **kwargs).items():
            s = sums.setdefault(name, [0.0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + ours, s[1] + theirs, s[2] + scale
    assert sums, "no draws"
    for name, (ours, theirs, scale) in sums.items():
        allowed = factor * theirs + ulps * eps * scale
        assert ours <= allowed, (
            f"{name}: summed error {ours:.3g} against float64, torch's float32 error {theirs:.3g} "
            f"(ratio {ours / max(theirs, 1e-300):.2f}, allowed {factor} x + {ulps} ulps of the scales)")
    return {name: (ours, theirs) for name, (ours, theirs, _) in sums.items()}


def saved_bytes(fn, *args, exclude=(), **kwargs):
    """Unique bytes that ``fn(*args, **kwargs)`` saves for backward.

    Every tensor autograd packs (torch's own nodes and custom Functions alike) is counted
    once per storage (inside ``manualgrad.lean()``, the tensors lean keeps), so an output saved by one node and an input saved by the next count
    once. Storages of the tensors in ``exclude`` (typically the parameters, which exist
    anyway) are left out. Returns (bytes, output).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _lean_again():
        out = fn(*args, **kwargs)
    return sum(storages.values()), out


def _lean_again():
    """Inside manualgrad.lean(), lean() again: its hooks then sit inside the counting ones and
    pass on to them what they keep (the innermost saved-tensor hooks are the only ones torch calls)."""
    import contextlib

    from .memory import in_lean, lean

    return lean() if in_lean() else contextlib.nullcontext()


def _graph_nodes(outputs):
    """Every autograd node reachable from the outputs' grad_fns, in creation order."""
    todo = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen = {}
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        todo.extend(n for n, _ in node.next_functions)
    return sorted(seen.values(), key=lambda n: n._sequence_nr())


def _saved_values(node):
    # a custom Function's node keeps its ctx's saved tensors; torch's own nodes one _saved_<name> each
    if hasattr(node, "_raw_saved_tensors"):
        return list(node.saved_tensors)
    values = []
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            values.extend(value if isinstance(value, (tuple, list)) else [value])
    return values


def saved_bytes_by_op(fn, *args, exclude=(), **kwargs):
    """What ``fn(*args, **kwargs)`` keeps for backward, per op: ({grad_fn name: bytes}, output).

    Like ``saved_bytes``, every storage counts once; it goes to the first op (in forward order)
    that keeps it, so an op that keeps only what an earlier op keeps anyway shows 0 bytes (or
    does not show). Under ``manualgrad.lean()`` the tensors a recipe keeps are counted, where the
    op that saves the recomputed tensor is charged only for what no earlier op keeps.
    The values sum to ``saved_bytes``'s total. Storages of ``exclude`` (the parameters) are left out.
    """
    from .memory import probing

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    probe = []  # the storages unpacked while one node is probed

    def pack(t):
        return t

    def unpack(t):
        if probing_on[0]:
            probe.append(t.untyped_storage())
            return torch.empty(0)
        return t

    probing_on = [False]
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), _lean_again():
        out = fn(*args, **kwargs)
    per_op, counted = {}, set(skip)
    probing_on[0] = True
    try:
        with probing():
            for node in _graph_nodes(_outputs(out)):
                probe.clear()
                _saved_values(node)
                name = type(node).__name__
                for s in probe:
                    if s.data_ptr() not in counted:
                        counted.add(s.data_ptr())
                        per_op[name] = per_op.get(name, 0) + s.nbytes()
    finally:
        probing_on[0] = False
    return per_op, out
