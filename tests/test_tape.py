"""manualgrad.tape: every op's gradients against torch.autograd, the engine's graph handling
(reused nodes, deep graphs, accumulation), torch's errors, and an MLP step on sklearn digits."""
import sys

import pytest
import torch
import torch.nn.functional as TF

from manualgrad import tape

torch.set_num_threads(1)  # many tiny ops: OpenMP stalls on a loaded machine

F64 = torch.float64


def randn(*shape):
    return torch.randn(shape, dtype=F64)


def positive(*shape):
    return torch.rand(shape, dtype=F64) + 0.5


def assert_same_gradients(tape_fn, torch_fn, *inputs):
    """tape_fn on tape Tensors and torch_fn on torch leaves, same values: same output, and the
    same gradient for every floating-point input under one random upstream gradient dy."""
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    nodes = [tape.Tensor(t, requires_grad=t.is_floating_point()) for t in inputs]
    expected, out = torch_fn(*leaves), tape_fn(*nodes)
    torch.testing.assert_close(out.data, expected.detach())
    dy = torch.randn_like(expected)
    expected.backward(dy)
    out.backward(dy)
    for i, (leaf, node) in enumerate(zip(leaves, nodes)):
        if leaf.requires_grad:
            torch.testing.assert_close(node.grad, leaf.grad, msg=lambda m, i=i: f"input {i}: {m}")


# (id, fn on tape Tensors, fn on torch tensors (None: the same fn works for both), inputs)
CASES = [
    ("add_(7,1)+(1,13)", lambda a, b: a + b, None, lambda: (randn(7, 1), randn(1, 13))),
    ("add_(7,13)+scalar", lambda a, b: a + b, None, lambda: (randn(7, 13), randn())),
    ("sub_(3,1,5)-(4,1)", lambda a, b: a - b, None, lambda: (randn(3, 1, 5), randn(4, 1))),
    ("mul_(7,13)*scalar", lambda a, b: a * b, None, lambda: (randn(7, 13), randn())),
    ("mul_(2,1,5)*(3,1)", lambda a, b: a * b, None, lambda: (randn(2, 1, 5), randn(3, 1))),
    ("div_(5,4)/(4,)", lambda a, b: a / b, None, lambda: (randn(5, 4), positive(4))),
    ("div_scalar/(5,4)", lambda a, b: a / b, None, lambda: (randn(), positive(5, 4))),
    ("python_numbers", lambda a: 2 * a - 1 / (a * a + 1) + a / 3 - (1 - a), None, lambda: (randn(7, 13),)),
    ("neg", lambda a: -a, None, lambda: (randn(7, 13),)),
    ("pow_3", lambda a: a**3, None, lambda: (randn(7, 13),)),
    ("pow_-0.5", lambda a: a**-0.5, None, lambda: (positive(7, 13),)),
    ("exp", lambda a: a.exp(), None, lambda: (randn(7, 13),)),
    ("log", lambda a: a.log(), None, lambda: (positive(7, 13),)),
    ("matmul_(7,5)@(5,3)", lambda a, b: a @ b, None, lambda: (randn(7, 5), randn(5, 3))),
    ("matmul_(2,7,5)@(5,3)", lambda a, b: a @ b, None, lambda: (randn(2, 7, 5), randn(5, 3))),
    ("matmul_(4,5)@(3,5,6)", lambda a, b: a @ b, None, lambda: (randn(4, 5), randn(3, 5, 6))),
    ("matmul_(2,1,4,5)@(3,5,6)", lambda a, b: a @ b, None, lambda: (randn(2, 1, 4, 5), randn(3, 5, 6))),
    ("matmul_(5,)@(5,3)", lambda a, b: a @ b, None, lambda: (randn(5), randn(5, 3))),
    ("matmul_(7,5)@(5,)", lambda a, b: a @ b, None, lambda: (randn(7, 5), randn(5))),
    ("matmul_(5,)@(5,)", lambda a, b: a @ b, None, lambda: (randn(5), randn(5))),
    ("matmul_(5,)@(2,5,3)", lambda a, b: a @ b, None, lambda: (randn(5), randn(2, 5, 3))),
    ("sum_all", lambda a: a.sum(), None, lambda: (randn(3, 4, 5),)),
    ("sum_dim1", lambda a: a.sum(1), None, lambda: (randn(3, 4, 5),)),
    ("sum_dims02_keepdim", lambda a: a.sum((0, 2), keepdim=True), None, lambda: (randn(3, 4, 5),)),
    ("sum_dim-1_keepdim", lambda a: a.sum(-1, keepdim=True), None, lambda: (randn(3, 4, 5),)),
    ("sum_of_scalar", lambda a: a.sum(), None, lambda: (randn(),)),
    ("mean_all", lambda a: a.mean(), None, lambda: (randn(3, 4, 5),)),
    ("mean_dim-2", lambda a: a.mean(-2), None, lambda: (randn(3, 4, 5),)),
    ("mean_dims12_keepdim", lambda a: a.mean((1, 2), keepdim=True), None, lambda: (randn(3, 4, 5),)),
    ("reshape", lambda a: a.reshape(12, 5), None, lambda: (randn(3, 4, 5),)),
    ("reshape_-1", lambda a: a.reshape(-1), None, lambda: (randn(3, 4, 5),)),
    ("transpose_0_2", lambda a: a.transpose(0, 2), None, lambda: (randn(3, 4, 5),)),
    ("linear_bias_(2,3,5)", tape.linear, TF.linear, lambda: (randn(2, 3, 5), randn(4, 5), randn(4))),
    ("linear_no_bias", tape.linear, TF.linear, lambda: (randn(7, 5), randn(4, 5))),
    ("linear_1d_input", tape.linear, TF.linear, lambda: (randn(5), randn(4, 5), randn(4))),
    ("relu", tape.relu, torch.relu, lambda: (randn(7, 13),)),
    ("tanh", tape.tanh, torch.tanh, lambda: (randn(7, 13),)),
    ("sigmoid", tape.sigmoid, torch.sigmoid, lambda: (randn(7, 13),)),
    ("gelu", tape.gelu, TF.gelu, lambda: (randn(7, 13),)),
    ("gelu_tanh", lambda a: tape.gelu(a, "tanh"), lambda a: TF.gelu(a, approximate="tanh"), lambda: (randn(7, 13),)),
    ("softmax_dim0", lambda a: tape.softmax(a, 0), lambda a: TF.softmax(a, 0), lambda: (randn(2, 3, 7),)),
    ("softmax_dim-1", lambda a: tape.softmax(a, -1), lambda a: TF.softmax(a, -1), lambda: (randn(2, 3, 7),)),
    ("log_softmax_dim1", lambda a: tape.log_softmax(a, 1), lambda a: TF.log_softmax(a, 1), lambda: (randn(2, 3, 7),)),
    ("cross_entropy_mean", tape.cross_entropy, TF.cross_entropy, lambda: (randn(9, 5), torch.randint(5, (9,)))),
    ("cross_entropy_sum", lambda x, t: tape.cross_entropy(x, t, reduction="sum"),
     lambda x, t: TF.cross_entropy(x, t, reduction="sum"), lambda: (randn(9, 5), torch.randint(5, (9,)))),
    ("cross_entropy_none", lambda x, t: tape.cross_entropy(x, t, reduction="none"),
     lambda x, t: TF.cross_entropy(x, t, reduction="none"), lambda: (randn(9, 5), torch.randint(5, (9,)))),
    ("cross_entropy_smoothing_weight", lambda x, t, w: tape.cross_entropy(x, t, w.data, label_smoothing=0.1),
     lambda x, t, w: TF.cross_entropy(x, t, w.detach(), label_smoothing=0.1),
     lambda: (randn(9, 5), torch.randint(5, (9,)), positive(5))),
    ("cross_entropy_ignore_index", lambda x, t: tape.cross_entropy(x, t, ignore_index=2),
     lambda x, t: TF.cross_entropy(x, t, ignore_index=2), lambda: (randn(9, 5), torch.arange(9) % 5)),
    ("cross_entropy_(N,C,d)", tape.cross_entropy, TF.cross_entropy, lambda: (randn(3, 5, 4), torch.randint(5, (3, 4)))),
    ("cross_entropy_unbatched", tape.cross_entropy, TF.cross_entropy, lambda: (randn(5), torch.tensor(3))),
    ("mse_loss_mean", tape.mse_loss, TF.mse_loss, lambda: (randn(7, 13), randn(7, 13))),
    ("mse_loss_sum", lambda x, t: tape.mse_loss(x, t, "sum"), lambda x, t: TF.mse_loss(x, t, reduction="sum"),
     lambda: (randn(7, 13), randn(7, 13))),
    ("mse_loss_none_broadcast_target", lambda x, t: tape.mse_loss(x, t, "none"),
     lambda x, t: TF.mse_loss(x, t, reduction="none"), lambda: (randn(7, 13), randn(1, 13))),
    ("layer_norm_affine", lambda x, w, b: tape.layer_norm(x, (10,), w, b),
     lambda x, w, b: TF.layer_norm(x, (10,), w, b),
     lambda: (randn(4, 3, 10), randn(10), randn(10))),
    ("layer_norm_2d_shape", lambda x, w, b: tape.layer_norm(x, (3, 10), w, b),
     lambda x, w, b: TF.layer_norm(x, (3, 10), w, b), lambda: (randn(4, 3, 10), randn(3, 10), randn(3, 10))),
    ("layer_norm_plain", lambda x: tape.layer_norm(x, 10), lambda x: TF.layer_norm(x, (10,)), lambda: (randn(4, 10),)),
    ("layer_norm_bias_only", lambda x, b: tape.layer_norm(x, (10,), None, b),
     lambda x, b: TF.layer_norm(x, (10,), None, b), lambda: (randn(4, 10), randn(10))),
]


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch warns for the broadcast mse target
@pytest.mark.parametrize("tape_fn, torch_fn, make_inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_op_gradients_match_torch_autograd(tape_fn, torch_fn, make_inputs):
    assert_same_gradients(tape_fn, torch_fn or tape_fn, *make_inputs())


def test_node_used_twice_gets_both_gradients():
    x = tape.Tensor(randn(5), requires_grad=True)
    (x * x).sum().backward()
    # d(x^2)/dx = 2x: the two uses each contribute x
    torch.testing.assert_close(x.grad, 2 * x.data)


def test_diamond_graph_matches_torch_autograd():
    def f(x):
        a = x * 2  # a feeds two branches that meet again in d
        b, c = a.exp(), a.tanh()
        return (b * c + a).sum()

    assert_same_gradients(f, f, randn(3, 4))


def test_deep_chain_does_not_hit_the_recursion_limit():
    steps = 3 * sys.getrecursionlimit()  # 2 ops a step: thousands of nodes deep
    x = tape.Tensor(randn(3), requires_grad=True)
    y = x
    for _ in range(steps):
        y = y * 0.9995 + 0.001
    y.sum().backward()
    # y = 0.9995^steps x + const, so dy/dx = 0.9995^steps
    torch.testing.assert_close(x.grad, torch.full((3,), 0.9995**steps, dtype=F64))


def test_topological_order_lists_each_node_once_after_its_parents():
    x = tape.Tensor(randn(3), requires_grad=True)
    a = x * 2
    loss = (a.exp() * a.tanh() + a * x).sum()
    order = tape.topological_order(loss)
    position = {id(n): i for i, n in enumerate(order)}
    assert len(position) == len(order) == 8  # x, *2, exp, tanh, mul, mul, add, sum
    assert order[-1] is loss
    for node in order:
        for parent in node.parents:
            if parent.requires_grad:  # the constant 2 is not on the tape's path
                assert position[id(parent)] < position[id(node)]


def test_leaf_gradients_accumulate_across_backward_calls_like_torch():
    x = randn(4)
    t, n = x.clone().requires_grad_(), tape.Tensor(x, requires_grad=True)
    for _ in range(2):
        (t.exp() * t).sum().backward()
        (n.exp() * n).sum().backward()
    torch.testing.assert_close(n.grad, t.grad)


def test_retain_grad_keeps_an_intermediate_gradient_like_torch():
    x = randn(4, 3)
    t, n = x.clone().requires_grad_(), tape.Tensor(x, requires_grad=True)
    th, nh = t.tanh(), tape.tanh(n)
    th.retain_grad()
    nh.retain_grad()
    (th * th).sum().backward()
    (nh * nh).sum().backward()
    torch.testing.assert_close(nh.grad, th.grad)
    torch.testing.assert_close(n.grad, t.grad)


def test_constants_are_not_recorded_and_get_no_gradient():
    w = tape.Tensor(randn(3), requires_grad=True)
    c = randn(3)
    y = w * c + tape.Tensor(c)  # plain torch tensor and non-grad Tensor: constants
    y.sum().backward()
    assert y.parents[1].requires_grad is False and y.parents[1].grad is None
    torch.testing.assert_close(w.grad, c)


def test_gradient_of_a_float64_scalar_added_to_float32_has_float64_dtype_like_torch():
    a, s = torch.randn(3, 4), randn()
    ta, ts = a.clone().requires_grad_(), s.clone().requires_grad_()
    na, ns = tape.Tensor(a, True), tape.Tensor(s, True)
    (ta + ts).sum().backward()
    (na + ns).sum().backward()
    assert ns.grad.dtype == ts.grad.dtype == F64
    torch.testing.assert_close(ns.grad, ts.grad)


def test_one_element_output_backward_seeds_one_like_torch():
    x = randn(1, 1)
    t, n = x.clone().requires_grad_(), tape.Tensor(x, True)
    (t * 3).backward()
    (n * 3).backward()
    torch.testing.assert_close(n.grad, t.grad)


# ---------------------------------------------------------------------------------------------
# errors: torch's exception types, messages that say what is wrong


def test_backward_of_non_scalar_raises_runtime_error_like_torch():
    x = randn(3, 4)
    with pytest.raises(RuntimeError, match="only for scalar outputs") as torch_error:
        (x.clone().requires_grad_() * 2).backward()
    with pytest.raises(type(torch_error.value), match=r"only for scalar outputs.*shape \[3, 4\]"):
        (tape.Tensor(x, requires_grad=True) * 2).backward()


def test_backward_with_a_wrong_shape_grad_raises_runtime_error_like_torch():
    x = randn(3, 4)
    with pytest.raises(RuntimeError, match="Mismatch in shape") as torch_error:
        (x.clone().requires_grad_() * 2).backward(torch.ones(4, 3, dtype=F64))
    with pytest.raises(type(torch_error.value), match=r"Mismatch in shape.*\[4, 3\].*\[3, 4\]"):
        (tape.Tensor(x, requires_grad=True) * 2).backward(torch.ones(4, 3, dtype=F64))


def test_backward_without_any_grad_raises_runtime_error_like_torch():
    x = randn(3)
    with pytest.raises(RuntimeError, match="does not require grad") as torch_error:
        (x * 2).sum().backward()
    with pytest.raises(type(torch_error.value), match="does not require grad"):
        (tape.Tensor(x) * 2).sum().backward()


def test_integer_tensor_requiring_grad_raises_runtime_error_like_torch():
    x = torch.arange(3)
    with pytest.raises(RuntimeError, match="floating point") as torch_error:
        x.clone().requires_grad_()
    with pytest.raises(type(torch_error.value), match="floating point.*int64"):
        tape.Tensor(x, requires_grad=True)


def test_cross_entropy_with_an_out_of_range_class_raises_index_error_like_torch():
    x, t = randn(4, 5), torch.tensor([0, 1, 7, 2])
    with pytest.raises(IndexError, match="out of bounds") as torch_error:
        TF.cross_entropy(x, t)
    with pytest.raises(type(torch_error.value), match="Target 7 is out of bounds"):
        tape.cross_entropy(tape.Tensor(x, True), t)


def test_tensor_exponent_is_not_implemented():
    x = tape.Tensor(randn(3), requires_grad=True)
    with pytest.raises(NotImplementedError, match="Python number exponent"):
        x ** tape.Tensor(randn(3))


def test_cross_entropy_weight_that_requires_grad_raises_runtime_error_like_torch():
    x, t, w = randn(4, 5), torch.tensor([0, 1, 4, 2]), positive(5)
    with pytest.raises(RuntimeError, match="weight") as torch_error:
        TF.cross_entropy(x.clone().requires_grad_(), t, w.clone().requires_grad_())
    with pytest.raises(type(torch_error.value), match="not differentiable with respect to argument 'weight'"):
        tape.cross_entropy(tape.Tensor(x, True), t, tape.Tensor(w, True))


# ---------------------------------------------------------------------------------------------
# an MLP on sklearn's digits: the engine against torch.autograd on the same weights


def _digits(n):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def _mlp_weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 64), (32,), (10, 32), (10,)]
    return [torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.1) for s in shapes]


def _mlp_loss(linear, relu, cross_entropy, params, x, y):
    w1, b1, w2, b2 = params
    return cross_entropy(linear(relu(linear(x, w1, b1)), w2, b2), y)


def test_mlp_on_digits_gradients_match_torch_autograd():
    x, y = _digits(256)
    ref = [p.clone().requires_grad_() for p in _mlp_weights()]
    ours = [tape.Tensor(p, requires_grad=True) for p in _mlp_weights()]
    expected = _mlp_loss(TF.linear, torch.relu, TF.cross_entropy, ref, x, y)
    loss = _mlp_loss(tape.linear, tape.relu, tape.cross_entropy, ours, tape.Tensor(x), y)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss.data, expected.detach())
    for n, r in zip(ours, ref):
        torch.testing.assert_close(n.grad, r.grad)  # float32 tolerances


def test_mlp_sgd_steps_on_digits_follow_torch():
    x, y = _digits(256)
    ref = [p.clone().requires_grad_() for p in _mlp_weights()]
    ours = [tape.Tensor(p, requires_grad=True) for p in _mlp_weights()]
    losses = []
    for _ in range(5):
        expected = _mlp_loss(TF.linear, torch.relu, TF.cross_entropy, ref, x, y)
        loss = _mlp_loss(tape.linear, tape.relu, tape.cross_entropy, ours, tape.Tensor(x), y)
        expected.backward()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for n, r in zip(ours, ref):
                n.data -= 0.5 * n.grad
                n.grad = None
                r -= 0.5 * r.grad
                r.grad = None
    for n, r in zip(ours, ref):
        torch.testing.assert_close(n.data, r.detach())
    assert losses[-1] < losses[0]  # and the steps do train

