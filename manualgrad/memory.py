"""``lean()``: keep less for backward, with bit-identical gradients.

Inside ``with manualgrad.lean():`` (around the forward; backward may run inside or outside it)
an op whose output is cheap to recompute *exactly* from tensors it keeps anyway tags that output
with a **recipe**: a function and the arguments it needs. When a later op saves the tagged tensor
for its backward (a Linear its input, a conv its input, a multiply its operands...), what is kept
is the recipe instead: its tensors are already kept by the producer, so nothing new is held, and
the tensor is recomputed when that backward asks for it.

    y = gelu(x)          GELU keeps x (its backward needs it); y tagged: gelu(x)
    z = linear(y, W)     Linear would keep y (for dW); lean() keeps the recipe: x, already kept

A recipe runs the very op the forward ran, on the very tensors it ran on (same shapes, strides,
dtypes, thread count), so the recomputed tensor equals the forward's bit for bit, and so do the
gradients. It never inverts an op (a LayerNorm's x_hat from its output, say): that would round
differently. Recipes in use:

    gelu, silu (out of place)   from the input they keep
    layer_norm, rms_norm        from the input they keep (and the parameters)
    batch_norm                  from the input it keeps, with the batch statistics recomputed the
                                same way (and the running statistics left alone)
    relu                        on a tagged input (relu(batch_norm(x)) in place, say): the input's
                                recipe, then relu
    dropout                     on a tagged input (dropout(gelu(x))): the input's recipe times the
                                mask dropout keeps
    a view of a tagged tensor   its base's recipe, then the same view (as_strided)

Dropout itself, inside lean(), keeps the generator state its mask was drawn from (5056 bytes on
the CPU) instead of the bit-packed mask when that is smaller, and backward redraws the mask
(see ops/dropout.py). Attention never keeps a score-sized tensor, with or without lean()
(ops/attention.py recomputes the probabilities from Q and K in backward).

Mechanics: ``lean()`` installs ``torch.autograd.graph.saved_tensors_hooks``. Its pack hook turns
a tagged tensor into its recipe (recursively: a recipe's arguments may be tagged themselves) and
keeps any other tensor as it is (an op's own output detached, or it would hold its graph in a
reference cycle: autograd gives an unpacked tensor its grad_fn back).
A tensor saved by several ops (relu's output, kept by relu and by the next conv) is packed once
and recomputed once. The unpack hook reruns the recipe, with autocast off (its arguments are
already in the dtypes the forward ran in). Outer hooks (``saved_bytes``, a
``torch.utils.checkpoint`` around the lean region) still see every tensor lean keeps: lean
passes them on. A recipe holds its tensors by weak reference, so it never keeps alive what its
producer does not (under no_grad, or inside a checkpoint): without them it no longer applies.
A tensor modified in place after it was saved raises torch's RuntimeError on backward, as
without lean; a tagged tensor modified in place is kept as it is.

Double backward (``create_graph=True``): the recipe runs with grad mode on, through manualgrad's
functional ops; autograd then gives the unpacked tensor the graph edge the saved one had, so
second derivatives see the same graph as without lean.

torch.compile: while Dynamo traces, nothing is tagged or looked up (lean() changes nothing in a
compiled region; the compiler's partitioner decides what to recompute there), so a compiled
model gives the gradients it gives without lean(). Under torch.func transforms and where the
producer needs no gradient nothing is tagged either.
"""
import contextlib
import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["lean", "in_lean", "tag", "recipe_of", "Recipe"]

_local = threading.local()  # .depth: how many lean() regions this thread is in
_recipes = WeakIdKeyDictionary()  # tensor -> (its version when tagged, Recipe)

try:  # the hooks in force where lean() is entered, to pass kept tensors on to
    _top_hooks = torch._C._autograd._top_saved_tensors_default_hooks
except AttributeError:  # an older torch: lean() is then the innermost and only hook
    _top_hooks = None


class Recipe:
    """``fn(*args)`` recomputes a tensor; args may be tensors, Recipes, or plain values.

    Tensor args are held by weak reference: a recipe must not keep alive what its producer no
    longer keeps (under no_grad, or when an outer hook such as checkpoint's drops the producer's
    saved tensors); a recipe with a dead argument no longer applies."""
    __slots__ = ("fn", "args")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = tuple(weakref.ref(a) if isinstance(a, torch.Tensor) else a for a in args)

    def arguments(self):
        """The args, tensors dereferenced; None if one of them is gone."""
        args = tuple(a() if isinstance(a, weakref.ref) else a for a in self.args)
        return None if any(a is None for a, r in zip(args, self.args) if isinstance(r, weakref.ref)) else args


def active(ctx):
    """True where a producer should tag its output: inside lean(), eager, no transform, and the
    producer in the graph (so it keeps what its recipe needs; a Function's setup_context runs with
    grad mode off, so ``ctx.needs_input_grad`` says it)."""
    return (not torch.compiler.is_compiling() and getattr(_local, "depth", 0) > 0 and any(ctx.needs_input_grad)
            and not torch._C._are_functorch_transforms_active())


def in_lean():
    """True inside a lean() region of this thread (never while torch.compile traces)."""
    return not torch.compiler.is_compiling() and getattr(_local, "depth", 0) > 0


def tag(ctx, t, fn, *args, inplace=False):
    """Inside lean(): record that ``fn(*args)`` recomputes ``t`` bit for bit (``args`` tensors the
    producer keeps anyway, parameters, Recipes, plain values). Outside: nothing.

    Called from a Function's setup_context; ``inplace``: t is an input the Function marked dirty,
    whose version autograd bumps once more when setup_context returns."""
    if active(ctx) and isinstance(t, torch.Tensor):
        _recipes[t] = (t._version + inplace, Recipe(fn, args))


def recipe_of(t, since=0):
    """t's Recipe if t still holds what was tagged, else None. ``since``: the number of in-place
    writes to t an in-place op's forward made before its setup_context looks t up (exactly: any
    other write in between changes the version, and the recipe no longer applies)."""
    if not in_lean():  # (outside lean() nothing is looked up; compiled graphs hold no recipes)
        return None
    entry = _recipes.get(t) if isinstance(t, torch.Tensor) else None
    if entry is None:
        # a view of a tagged tensor, not written since (a view shares its base's version)
        return _view_recipe(t) if isinstance(t, torch.Tensor) and t._base is not None and not since else None
    if entry[0] != t._version - since:
        return None
    return entry[1]


def _view_recipe(t):
    """A view of a tagged tensor (a transpose of a LayerNorm's output, say): its base's recipe,
    then the same view (the recomputed base has the layout the forward's had)."""
    base = recipe_of(t._base)
    if base is None:
        return None
    return Recipe(_view, (base, t._base.stride(), t.size(), t.stride(), t.storage_offset()))


def _view(base, base_stride, size, stride, offset):
    if base.stride() != base_stride:  # not the forward's layout: as_strided would read other elements
        raise RuntimeError(f"lean(): a recomputed tensor has strides {base.stride()}, the forward's had {base_stride}")
    return base.as_strided(size, stride, offset)


# ---------------------------------------------------------------------------------------------
# the hooks: what is kept for a saved tensor, and how it comes back

class _Kept:
    """A tensor kept as it is (or as the outer pack hook packed it), with its version then."""
    __slots__ = ("value", "version", "outer")

    def __init__(self, value, version, outer):
        self.value, self.version, self.outer = value, version, outer


class _Recompute:
    """A recipe with its tensor arguments packed. One per tagged tensor however many ops save it
    (relu and the next conv, the Q, K and V projections), and recomputed once for all of them:
    ``cache`` holds the result per grad mode (a plain one, and a differentiable one for double
    backward) until the last op that saved it is done with it."""
    __slots__ = ("fn", "args", "cache")

    def __init__(self, fn, args):
        self.fn, self.args, self.cache = fn, args, {}


_probing = threading.local()  # .on: saved_bytes_by_op is looking at what is kept, not recomputing


def _hooks(outer):
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def keep(t):
        if outer_pack is not None:
            return _Kept(outer_pack(t), None, outer_unpack)
        # An op's own output is kept detached: with its grad_fn it would be a reference cycle
        # (output -> node -> what the node keeps -> output) that outlives a graph never
        # backpropagated; on unpack autograd gives it its grad_fn back. Any other tensor is kept
        # itself, the object recipes refer to (weakly).
        return _Kept(t.detach() if _own_output(t) else t, t._version, None)

    def pack_recipe(r):
        """The recipe with its arguments packed, or None if one of them is gone."""
        args = r.arguments()
        if args is None:
            return None
        packed = []
        for a in args:
            if isinstance(a, Recipe):
                a = pack_recipe(a)
                if a is None:
                    return None
            elif isinstance(a, torch.Tensor):
                a = pack(a)
            packed.append(a)
        return _Recompute(r.fn, tuple(packed))

    memo = WeakIdKeyDictionary()  # tagged tensor -> (its version, its _Recompute)

    def pack(t):
        seen = memo.get(t)
        if seen is not None and seen[0] == t._version:
            return seen[1]
        r = recipe_of(t)
        packed = None if r is None else pack_recipe(r)
        if packed is None:
            return keep(t)
        memo[t] = (t._version, packed)
        return packed

    return pack, _unpack


try:
    _next_sequence_nr = torch._C._autograd._get_sequence_nr
except AttributeError:  # a torch without it: every tensor with a grad_fn is kept detached
    _next_sequence_nr = None


def _own_output(t):
    """Whether t is an output of the node now saving it: the newest node (nodes are numbered as
    they are made, and the saving node is made before it packs anything)."""
    if t.grad_fn is None:
        return False
    return _next_sequence_nr is None or t.grad_fn._sequence_nr() == _next_sequence_nr() - 1


def _unpack(p, cache=True):
    if isinstance(p, _Kept):
        if p.outer is not None:
            return p.outer(p.value)
        if p.version != p.value._version and not getattr(_probing, "on", False):
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{p.value.type()} {list(p.value.shape)}] is at version {p.value._version}; "
                f"expected version {p.version} instead (saved inside manualgrad.lean())")
        return p.value
    probing = getattr(_probing, "on", False)
    grad_mode = torch.is_grad_enabled()
    if not probing and grad_mode in p.cache:
        return p.cache[grad_mode]
    # (a recipe inside a recipe is not cached: only the outer result is saved by some op)
    args = [_unpack(a, False) if isinstance(a, (_Kept, _Recompute)) else a for a in p.args]
    if probing:
        return torch.empty(0)  # saved_bytes_by_op: only the kept tensors matter
    with contextlib.ExitStack() as stack:
        # the recipe runs in the dtypes the forward ran in (its args are already cast)
        for device in {a.device.type for a in args if isinstance(a, torch.Tensor)}:
            if torch.amp.is_autocast_available(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        out = p.fn(*args)
    if cache:
        p.cache[grad_mode] = out
    return out


@contextlib.contextmanager
def lean():
    """Keep less for backward, exactly: see the module docstring.

    Example::

        with manualgrad.lean():
            loss = model(x, y)
        loss.backward()          # the same gradients as without lean(), bit for bit
    """
    outer = _top_hooks(False) if _top_hooks is not None else None
    pack, unpack = _hooks(outer)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _local.depth -= 1


@contextlib.contextmanager
def probing():
    """While on, unpacking a lean-saved tensor records what is kept without recomputing
    (for ``manualgrad.testing.saved_bytes_by_op``)."""
    _probing.on = True
    try:
        yield
    finally:
        _probing.on = False
