"""manualgrad.coverage: per-op counts of hand-written and torch backward nodes and their FLOPs.

What holds: a converted MLP runs only hand-written backward nodes (one per layer); an
unconverted model with the mode off runs none; in a mixed model the FLOP share equals the one
worked out by hand from 2 M N K per matrix product and one FLOP per element for elementwise ops
and reductions; coverage leaves .grad, buffers and the RNG as they were; the command line
prints the table (exit 0) and rejects bad arguments with one line (exit 2).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import manualgrad
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.coverage import CoverageReport, main, node_op, op_flops

torch.set_num_threads(1)

B = 4  # batch


def make_mlp():
    """A torch MLP 6-10-10-3 (the CLI tests import it by name)."""
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3)
    )


def mlp_inputs():
    return torch.randn(B, 6)


def rows(report):
    return {r.op: r for r in report.rows}


def linear_flops(n_in, n_out, needs_dx):
    """Backward FLOPs of y = x W^T + b for a (B, n_in) x: dW = dy^T x is a (n_out, B) @ (B, n_in)
    product, 2 n_out B n_in; dx = dy W, 2 B n_out n_in; db sums the (B, n_out) dy."""
    return 2 * n_out * B * n_in + (2 * B * n_out * n_in if needs_dx else 0) + B * n_out


def test_converted_mlp_runs_only_hand_written_backward_one_node_per_layer():
    report = manualgrad.coverage(manualgrad.convert(make_mlp()), mlp_inputs(), mode=False)
    by_op = rows(report)
    assert set(by_op) == {"linear", "relu"}
    assert (by_op["linear"].hand_written_nodes, by_op["relu"].hand_written_nodes) == (3, 2)
    assert all(r.torch_nodes == 0 and r.torch_flops == 0 for r in report.rows)
    assert report.hand_written_flop_share == 1.0 and report.hand_written_node_share == 1.0
    assert report.torch_ops == []
    # the first layer's input needs no gradient: no dx there
    expected = linear_flops(6, 10, False) + linear_flops(10, 10, True) + linear_flops(10, 3, True)
    assert by_op["linear"].hand_written_flops == expected


def test_unconverted_model_without_the_mode_runs_no_hand_written_backward():
    report = manualgrad.coverage(make_mlp(), mlp_inputs(), mode=False)
    assert report.hand_written_flop_share == 0.0 and report.hand_written_node_share == 0.0
    assert all(r.hand_written_nodes == 0 for r in report.rows)
    assert report.torch_ops == ["addmm", "relu"]  # t (the weight transpose) is a view: 0 FLOPs
    assert rows(report)["t"].torch_flops == 0


def test_mixed_model_flop_share_matches_the_formulas_worked_out_by_hand():
    # manualgrad Linear(8, 16), then torch's ReLU and Linear(16, 3): x needs no gradient.
    model = torch.nn.Sequential(mnn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    report = manualgrad.coverage(model, torch.randn(B, 8), mode=False)
    hand = 2 * 16 * B * 8 + B * 16  # dW (16, B) @ (B, 8); db: sum of (B, 16)
    relu = B * 16  # threshold_backward: one per element
    addmm = 2 * B * 3 * 16 + 2 * 16 * B * 3 + B * 3  # d(input) (B,3)@(3,16), dW^T (16,B)@(B,3), db sum
    by_op = rows(report)
    assert (by_op["linear"].hand_written_flops, by_op["relu"].torch_flops, by_op["addmm"].torch_flops) == (hand, relu, addmm)
    assert report.hand_written_flop_share == pytest.approx(hand / (hand + relu + addmm), rel=1e-12)
    assert report.hand_written_node_share == pytest.approx(1 / 4)  # linear | relu, addmm, t
    assert report.torch_ops == ["addmm", "relu"]


def test_the_mode_routes_an_unconverted_torch_mlp_to_hand_written_backward():
    report = manualgrad.coverage(make_mlp(), mlp_inputs())  # mode=True: nn.Linear's F.linear is routed
    assert (rows(report)["linear"].hand_written_nodes, rows(report)["relu"].hand_written_nodes) == (3, 2)
    assert report.hand_written_flop_share == 1.0 and report.torch_ops == []


class CumsumModel(torch.nn.Module):
    """Linear(6, 10), a cumulative sum (which the mode does not route), Linear(10, 3)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 10), torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def test_under_the_mode_an_op_it_does_not_route_is_left_to_torch_with_its_flops():
    report = manualgrad.coverage(CumsumModel(), mlp_inputs())
    hand = linear_flops(6, 10, False) + linear_flops(10, 3, True)
    cumsum = B * 10  # flip, cumsum, flip: one cumsum over the (B, 10) gradient; flips only move data
    assert (rows(report)["linear"].hand_written_flops, rows(report)["cumsum"].torch_flops) == (hand, cumsum)
    assert report.hand_written_flop_share == pytest.approx(hand / (hand + cumsum), rel=1e-12)
    assert report.torch_ops == ["cumsum"]


def test_op_flops_follow_the_documented_convention():
    aten = torch.ops.aten
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert op_flops(aten.mm.default, (a, b), {}, a @ b) == 2 * 5 * 3 * 7
    assert op_flops(aten.sum.dim_IntList, (a, [0]), {}, a.sum(0)) == 5 * 7  # a reduction: its input
    assert op_flops(aten.mul.Tensor, (a, a[0]), {}, a * a[0]) == 5 * 7  # elementwise: its output
    assert op_flops(aten.t.default, (a,), {}, a.t()) == 0  # a view
    assert op_flops(aten.clone.default, (a,), {}, a.clone()) == 0  # a copy


def test_torch_cpu_attention_backward_counts_its_five_matrix_products():
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))  # (batch, heads, L, E)
    report = manualgrad.coverage(torch.nn.functional.scaled_dot_product_attention, q, k, v, mode=False)
    (row,) = report.rows
    # recompute Q K^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 2 L S E each per head
    assert row.torch_nodes == 1 and row.torch_flops == 5 * 2 * (2 * 3) * 5 * 5 * 8


def test_op_names_come_from_the_function_or_the_torch_node():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    logits, target = torch.randn(3, 5, requires_grad=True), torch.tensor([0, 1, 4])
    assert node_op(torch.nn.functional.max_pool2d(x, 2).grad_fn) == ("max_pool2d_with_indices", False)
    assert node_op(torch.nn.functional.leaky_relu(x).grad_fn) == ("leaky_relu", False)
    assert node_op(F.leaky_relu(x).grad_fn) == ("leaky_relu", True)
    assert node_op(F.nll_loss(logits, target).grad_fn) == ("nll_loss", True)
    assert node_op(F.binary_cross_entropy_with_logits(x, x.detach()).grad_fn) == ("binary_cross_entropy_with_logits", True)


def test_loss_fn_reduces_the_output_and_its_backward_is_counted():
    model, y = manualgrad.convert(make_mlp()), torch.tensor([0, 2, 1, 1])
    report = manualgrad.coverage(model, mlp_inputs(), mode=False, loss_fn=lambda out: F.cross_entropy(out, y))
    assert rows(report)["cross_entropy"].hand_written_nodes == 1 and report.hand_written_flop_share == 1.0
    # torch's cross-entropy instead: its two nodes are torch's
    report = manualgrad.coverage(model, mlp_inputs(), mode=False,
                                 loss_fn=lambda out: torch.nn.functional.cross_entropy(out, y))
    assert set(report.torch_ops) == {"log_softmax", "nll_loss"}
    assert 0 < report.hand_written_flop_share < 1


def test_every_output_of_a_tuple_is_backpropagated_without_an_extra_sum_node():
    lin_a, lin_b = mnn.Linear(6, 4), torch.nn.Linear(6, 2)
    report = manualgrad.coverage(lambda x: (lin_a(x), {"b": lin_b(x)}), mlp_inputs(), mode=False)
    assert set(rows(report)) == {"linear", "addmm", "t"}  # no SumBackward0: upstream grads are ones
    assert rows(report)["linear"].hand_written_flops == linear_flops(6, 4, False)


def test_coverage_leaves_grads_buffers_and_the_rng_as_they_were():
    model = torch.nn.Sequential(mnn.Linear(6, 5), mnn.BatchNorm1d(5), mnn.Dropout(0.5))
    before, x = [b.clone() for b in model.buffers()], mlp_inputs()
    state = torch.get_rng_state()
    manualgrad.coverage(model, x, mode=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), before))
    assert torch.equal(torch.get_rng_state(), state)


def test_an_output_that_needs_no_gradient_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        manualgrad.coverage(make_mlp().requires_grad_(False), mlp_inputs(), mode=False)


def test_table_lists_ops_largest_first_and_to_dict_agrees():
    model = torch.nn.Sequential(mnn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    report = manualgrad.coverage(model, torch.randn(B, 8), mode=False)
    lines = str(report).splitlines()
    assert lines[0].startswith(f"backward of Sequential: {report.hand_written_flop_share:.1%} of {report.total_flops:,}")
    assert [line.split()[0] for line in lines[2:-1]] == ["linear", "addmm", "relu", "t"]
    assert lines[-1] == "torch ops left: addmm, relu"
    d = report.to_dict()
    assert d["hand_written_flop_share"] == report.hand_written_flop_share
    assert sum(r["hand_written_flops"] + r["torch_flops"] for r in d["rows"]) == d["total_flops"] == report.total_flops


def test_module_is_importable_and_callable_under_one_name():
    import manualgrad.coverage as module

    assert module is manualgrad.coverage and module.CoverageReport is CoverageReport
    assert isinstance(manualgrad.coverage(make_mlp(), mlp_inputs(), mode=False), CoverageReport)


# --- command line ---------------------------------------------------------------------------

FACTORY = "tests.test_coverage:make_mlp"


def test_command_prints_the_table_and_exits_0(capsys):
    for options in ([], ["--convert", "--no-mode"]):  # routed by the mode, or converted
        assert main([FACTORY, "--input-shape", "4,6", *options]) == 0
        out = capsys.readouterr().out
        assert "100.0% of" in out and out.splitlines()[-1] == "torch ops left: none"
    assert main([FACTORY, "--inputs", "tests.test_coverage:mlp_inputs", "--no-mode", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hand_written_flop_share"] == 0.0 and d["torch_ops"] == ["addmm", "relu"]


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "required: factory"),
        ([FACTORY], "--input-shape"),
        ([FACTORY, "--input-shape", "4,x"], "positive integers"),
        ([FACTORY, "--input-shape", "4,0"], "positive integers"),
        ([FACTORY, "--input-shape", "4,6", "--inputs", "tests.test_coverage:mlp_inputs"], "not both"),
        (["tests.test_coverage", "--input-shape", "4,6"], "expected module:name"),
        (["no_such_module_xyz:f", "--input-shape", "4,6"], "cannot import no_such_module_xyz"),
        (["tests.test_coverage:nope", "--input-shape", "4,6"], "has no attribute nope"),
        (["tests.test_coverage:B", "--input-shape", "4,6"], "not callable"),
        ([FACTORY, "--input-shape", "4,6", "--dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m manualgrad.coverage: error: ") and says in err


def test_python_dash_m_runs_the_module_once_and_prints_the_table():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "manualgrad.coverage", FACTORY, "--input-shape", "4,6",
         "--convert", "--no-mode"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "" and "torch ops left: none" in proc.stdout
