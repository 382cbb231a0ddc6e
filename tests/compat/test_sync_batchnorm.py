"""SyncBatchNorm: 2 gloo processes on CPU, each with part of the batch, against one process on the
whole batch; and the single-process path against torch's SyncBatchNorm.

torch's own SyncBatchNorm cannot be the reference for the synchronized path here: on CPU it raises
ValueError in training under a process group (its kernels, batch_norm_stats and friends, are
CUDA-only; the first test pins that, so it says when torch starts running it). The reference is
therefore torch's (and manualgrad's) BatchNorm on the whole batch, which the synchronized layer
reproduces by definition: each rank's output and input gradient are its rows of the whole batch's,
its weight and bias gradients sum over the ranks to the whole batch's (DDP's all-reduce does that
sum; torch's SyncBatchNorm leaves them per rank too), and the running stats equal the whole batch's
on every rank. Batches split evenly, unevenly, and with one rank empty. A converted CNN with the
ranks' gradients averaged (DDP's job; DDP itself refuses SyncBatchNorm on CPU) gets the whole batch's
gradients. A process group of one rank is batch_norm on that rank's rows alone.

The processes are started once (torch.multiprocessing.spawn, as tests/compat/test_ddp.py) and run
every scenario; each writes what it saw to a file and the tests compare in this process. One step
and an eval pass per scenario, no training trajectory: not marked ``trajectory``.

Tolerance: the two sides compute the same sums over the M elements of a channel in different
orders (per rank and combined, against all at once); the recursive-summation bound M u (u the
unit roundoff) relative to the largest magnitude involved covers it.
"""
import copy
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from torch.nn.parallel import DistributedDataParallel as DDP

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from tests.compat._models import cnn
from tests.conftest import exact_dy
from tests.ports import leave, spawn

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch built without the gloo backend"),
]
WORLD = 2
# scenario: (whole-batch shape, rows of rank 0 and rank 1, dtype, BatchNorm class, constructor kwargs)
SCENARIOS = {
    "even_2d": ((8, 3, 4, 5), (4, 4), torch.float32, torch.nn.BatchNorm2d, {}),
    "uneven_cumulative": ((7, 4, 3), (2, 5), torch.float32, torch.nn.BatchNorm1d, dict(momentum=None)),
    "no_bias": ((6, 3, 5), (3, 3), torch.float32, torch.nn.BatchNorm1d, dict(bias=False)),
    "no_affine_untracked": ((6, 3, 2, 2), (4, 2), torch.float32, torch.nn.BatchNorm2d,
                            dict(affine=False, track_running_stats=False)),
    "one_rank_empty": ((5, 3), (5, 0), torch.float32, torch.nn.BatchNorm1d, {}),
    "float64": ((6, 3, 2, 3, 2), (3, 3), torch.float64, torch.nn.BatchNorm3d, {}),
    # a bfloat16 input, float32 parameters and stats (statistics and backward in float32, as torch)
    "bfloat16": ((6, 3, 4), (2, 4), torch.bfloat16, torch.nn.BatchNorm1d, {}),
}
STEPS = 2


def _batch_norm(cls, kwargs, dtype, c):
    """A torch BatchNorm of c channels with random (not 1, 0) weight, bias and running stats."""
    bn = cls(c, **kwargs).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    with torch.no_grad():
        for p in bn.parameters():
            p.uniform_(0.5, 1.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn


def _inputs(shape, dtype):
    """STEPS (x, dy) pairs on the whole batch: x with a mean of its own per channel, dy exact."""
    return [((torch.randn(shape, dtype=dtype) * 2 + 3), exact_dy(shape).to(dtype)) for _ in range(STEPS)]


def _run(model, batches, rows=None, rank=None):
    """Training steps then one eval forward; (y, dx, dw, db, buffers) of each step, y of the eval."""
    record = []
    for x, dy in batches:
        if rank is not None:  # this rank's rows
            x, dy = x.split(rows)[rank], dy.split(rows)[rank]
        x = x.clone().requires_grad_()
        y = model(x)
        params = list(model.parameters())
        grads = torch.autograd.grad(y, [x] + params, dy)
        record.append(dict(y=y.detach(), dx=grads[0], params=dict(zip(("weight", "bias"), grads[1:])),
                           buffers={k: v.clone() for k, v in model.named_buffers()}))
    model.eval()
    x = batches[0][0] if rank is None else batches[0][0].split(rows)[rank]
    with torch.no_grad():
        record.append(dict(y=model(x)))
    model.train()
    return record


def _worker(rank, port, states, batches, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, (shape, rows, dtype, cls, kwargs) in SCENARIOS.items():
        bn = _batch_norm(cls, kwargs, dtype, shape[1])
        bn.load_state_dict(states[name])
        # torch's conversion of a BatchNorm model, then manualgrad's
        model = manualgrad.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(bn)), strict=True)
        results[name] = dict(classes=[f"{type(m).__module__}.{type(m).__name__}" for m in model],
                             record=_run(model, batches[name], rows, rank))

    # a converted CNN, mean loss on this rank's half, gradients averaged over the ranks as DDP
    # would (DDP itself refuses SyncBatchNorm layers on CPU, torch's and so the twin: recorded)
    model = cnn()
    model.load_state_dict(states["ddp_cnn"])
    model = manualgrad.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), strict=True)
    try:
        DDP(model)
        results["ddp_on_cpu"] = "ran"
    except ValueError as e:
        results["ddp_on_cpu"] = str(e)
    x, target = (t.chunk(WORLD)[rank] for t in batches["ddp_cnn"])
    MF.cross_entropy(model(x), target).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= WORLD
    results["ddp_cnn"] = dict(grads={k: p.grad for k, p in model.named_parameters()},
                              buffers={k: b.clone() for k, b in model.named_buffers()},
                              classes=sorted({type(m).__module__.split(".")[0] for m in model[:4]}))

    # a process group of this rank alone (world size 1): manualgrad's batch_norm on the half
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    model = mnn.SyncBatchNorm(3, process_group=groups[rank])
    x = batches["ddp_cnn"][0][:, :1].reshape(8, 3, -1).chunk(WORLD)[rank].clone().requires_grad_()
    y = model(x)
    dy = exact_dy(y.shape)
    y.backward(dy)
    results["alone"] = dict(x=x.detach(), dy=dy, y=y.detach(), dx=x.grad, node=type(y.grad_fn).__name__,
                            buffers={k: b.clone() for k, b in model.named_buffers()})

    # what torch's own SyncBatchNorm does with a CPU input here
    try:
        torch.nn.SyncBatchNorm(3)(torch.randn(4, 3))
        results["torch_cpu"] = "ran"
    except ValueError as e:
        results["torch_cpu"] = str(e)

    # differentiating the gradient (every rank runs the same calls: no collective is left waiting)
    model = mnn.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, requires_grad=True)
    (dx,) = torch.autograd.grad(model(x), x, torch.randn(4, 3, 2), create_graph=True)
    try:
        dx.sum().backward()
        results["double_backward"] = "ran"
    except NotImplementedError as e:
        results["double_backward"] = str(e)
    try:
        with fwAD.dual_level():
            model(fwAD.make_dual(x.detach(), torch.randn_like(x)))
        results["jvp"] = "ran"
    except NotImplementedError as e:
        results["jvp"] = str(e)
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    leave()


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """(initial states, batches, [rank 0 results, rank 1 results]) of one 2-process run."""
    torch.manual_seed(0)
    states, batches = {}, {}
    for name, (shape, _, dtype, cls, kwargs) in SCENARIOS.items():
        states[name] = copy.deepcopy(_batch_norm(cls, kwargs, dtype, shape[1]).state_dict())
        batches[name] = _inputs(shape, dtype)
    states["ddp_cnn"] = cnn().state_dict()
    batches["ddp_cnn"] = (torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,)))
    outdir = str(tmp_path_factory.mktemp("syncbn"))
    spawn(_worker, (states, batches, outdir), nprocs=WORLD)
    ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]
    return states, batches, ranks


def _tol(ref, m):
    # M u relative to the largest magnitude (see the module docstring); a bfloat16 result: the float32
    # values within that, then rounded to bfloat16 on each side, one bfloat16 ulp apart at most
    u = torch.finfo(torch.float32 if ref.dtype == torch.bfloat16 else ref.dtype).eps
    ulp = torch.finfo(torch.bfloat16).eps if ref.dtype == torch.bfloat16 else 0
    return (m * u + ulp) * max([1.0] + ref.abs().flatten().tolist())


def _close(actual, expected, m, what):
    if not expected.is_floating_point():  # num_batches_tracked
        assert torch.equal(actual, expected), what
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=_tol(expected, m), msg=lambda s: f"{what}: {s}")


def _whole_batch(name, states, batches, impl):
    shape, _, dtype, cls, kwargs = SCENARIOS[name]
    bn = _batch_norm(cls, kwargs, dtype, shape[1])
    bn.load_state_dict(states[name])
    model = torch.nn.Sequential(bn)  # as on the ranks: the same buffer names
    if impl == "manualgrad":
        manualgrad.convert(model, strict=True)
    record = _run(model, batches[name])
    # eval is never synchronized (as torch): each rank's eval output is the model's on its rows alone
    model.eval()
    with torch.no_grad():
        record[-1] = [dict(y=model(x)) for x in batches[name][0][0].split(SCENARIOS[name][1])]
    return record


def test_torch_sync_batchnorm_cannot_run_on_cpu_under_a_process_group(sync_run):
    # the reason the synchronized path is compared with the whole batch, not torch's SyncBatchNorm
    for results in sync_run[2]:
        assert "expected input tensor to be on GPU" in results["torch_cpu"], (
            "torch's SyncBatchNorm now runs on CPU: compare the synchronized path against it too")


def test_ddp_refuses_sync_batchnorm_layers_on_cpu(sync_run):
    # DDP's own check (isinstance torch.nn.SyncBatchNorm, device "cpu"): the twin cannot go
    # under DDP on CPU; its gradients are averaged by hand in the CNN test instead
    for results in sync_run[2]:
        assert results["ddp_on_cpu"] == "SyncBatchNorm layers only work with GPU modules", (
            "DDP now accepts SyncBatchNorm on CPU: run the CNN test under DDP")


def test_convert_sync_batchnorm_output_converts_to_the_twin(sync_run):
    for results in sync_run[2]:
        for name in SCENARIOS:
            assert results[name]["classes"] == ["manualgrad.nn.sync_batchnorm.SyncBatchNorm"], name


@pytest.mark.parametrize("impl", ["torch", "manualgrad"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_rank_gets_its_rows_of_one_process_on_the_whole_batch(sync_run, name, impl):
    states, batches, ranks = sync_run
    shape, rows, _, _, _ = SCENARIOS[name]
    m = shape[0] * int(torch.Size(shape[2:]).numel())  # elements per channel, whole batch
    whole = _whole_batch(name, states, batches, impl)
    for step in range(STEPS + 1):  # the last: eval, with the running stats
        for rank, results in enumerate(ranks):
            ours = results[name]["record"][step]
            what = f"{impl} rank {rank} step {step}"
            if step == STEPS:
                _close(ours["y"], whole[step][rank]["y"], m, what + " eval y")
                continue
            _close(ours["y"], whole[step]["y"].split(rows)[rank], m, what + " y")
            _close(ours["dx"], whole[step]["dx"].split(rows)[rank], m, what + " dx")
            assert ours["buffers"].keys() == whole[step]["buffers"].keys()
            for k, b in whole[step]["buffers"].items():
                _close(ours["buffers"][k], b, m, f"{what} {k}")
        if step < STEPS:
            for k, g in whole[step]["params"].items():  # each rank's own sums; DDP adds them up
                _close(ranks[0][name]["record"][step]["params"][k] + ranks[1][name]["record"][step]["params"][k],
                       g, m, f"{impl} step {step} d{k}")


def test_converted_cnn_with_averaged_gradients_gets_the_whole_batch_gradients_and_running_stats(sync_run):
    # unlike plain BatchNorm under DDP (tests/compat/test_ddp.py: the mean of the halves' gradients)
    states, batches, ranks = sync_run
    model = cnn()
    model.load_state_dict(states["ddp_cnn"])
    torch.nn.functional.cross_entropy(model(batches["ddp_cnn"][0]), batches["ddp_cnn"][1]).backward()
    m = 8 * 6 * 6  # the longest sum: the BatchNorm's and the conv weight gradient's, over N H W
    for rank, results in enumerate(ranks):
        assert results["ddp_cnn"]["classes"] == ["manualgrad"]
        for k, p in model.named_parameters():
            _close(results["ddp_cnn"]["grads"][k], p.grad, m, f"rank {rank} d{k}")
        for k, b in model.named_buffers():
            _close(results["ddp_cnn"]["buffers"][k], b, m, f"rank {rank} {k}")


def test_a_process_group_of_one_is_batch_norm_on_the_rank_alone(sync_run):
    for rank, results in enumerate(sync_run[2]):
        alone = results["alone"]
        assert alone["node"] == "BatchNormFunctionBackward", "not manualgrad's batch_norm"
        ref = torch.nn.BatchNorm1d(3)
        x = alone["x"].clone().requires_grad_()
        y = ref(x)
        y.backward(alone["dy"])
        assert torch.equal(alone["y"], y), f"rank {rank}"  # the same torch kernel
        _close(alone["dx"], x.grad, x.numel() // 3, f"rank {rank} dx")
        for k, b in ref.named_buffers():
            assert torch.equal(alone["buffers"][k], b), k


def test_each_ranks_weight_gradient_is_its_own_part(sync_run):
    # dw is not all-reduced in the layer (DDP does it): the ranks' parts differ
    _, _, ranks = sync_run
    dw = [r["even_2d"]["record"][0]["params"]["weight"] for r in ranks]
    assert not torch.allclose(dw[0], dw[1])


def test_double_backward_and_forward_ad_across_processes_raise_not_implemented(sync_run):
    for results in sync_run[2]:
        assert "double backward across processes is not supported" in results["double_backward"]
        assert "forward-mode AD across processes is not supported" in results["jvp"]


# ---------------------------------------------------------------------------------------------
# one process: no process group, as torch's SyncBatchNorm on CPU

@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False), dict(track_running_stats=False)])
def test_without_a_process_group_it_is_torchs_sync_batchnorm(kwargs):
    assert not dist.is_initialized()
    theirs = torch.nn.SyncBatchNorm(3, **kwargs)
    ours = manualgrad.convert(copy.deepcopy(theirs), strict=True)
    assert type(ours) is mnn.SyncBatchNorm
    for step in range(STEPS + 1):
        if step == STEPS:
            ours.eval(), theirs.eval()
        x = (torch.randn(5, 3, 4) * 2 + 3).requires_grad_()
        dy = exact_dy((5, 3, 4))
        results = []
        for model in (ours, theirs):
            xi = x.detach().clone().requires_grad_()
            y = model(xi)
            grads = torch.autograd.grad(y, [xi] + list(model.parameters()), dy)
            results.append((y, grads, dict(model.named_buffers())))
            if model is ours:
                assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"  # manualgrad's batch_norm
        (y, grads, buffers), (ty, tgrads, tbuffers) = results
        assert torch.equal(y, ty), f"step {step}: y"  # torch's kernel on both sides
        for k in tbuffers:
            assert torch.equal(buffers[k], tbuffers[k]), f"step {step}: {k}"
        for g, tg in zip(grads, tgrads):
            _close(g, tg, x.numel() // 3, f"step {step} gradient")


def test_without_a_process_group_gradients_and_their_gradients_match_finite_differences():
    model = mnn.SyncBatchNorm(3).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)

    def f(x, w, b):
        return torch.func.functional_call(model, {"weight": w, "bias": b}, (x,))

    args = (x, w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("shape,match", [((3,), "expected at least 2D input"),
                                         ((4, 0, 2), "number of input channels should be non-zero")])
def test_bad_input_raises_torchs_value_error(shape, match):
    for cls in (torch.nn.SyncBatchNorm, mnn.SyncBatchNorm):
        with pytest.raises(ValueError, match=match):
            cls(3)(torch.randn(shape))


def test_convert_maps_convert_sync_batchnorm_output_to_the_twin_keeping_its_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12)))
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = list(model.parameters())
    manualgrad.convert(model, strict=True)
    assert type(model[1]) is type(model[3][1]) is mnn.SyncBatchNorm
    assert all(p is q for p, q in zip(model.parameters(), params))
