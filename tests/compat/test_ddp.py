"""DistributedDataParallel over converted models: 2 gloo processes on CPU.

The processes are started once (torch.multiprocessing.spawn) and run every scenario; each
writes what it saw to a file and the tests compare those records in this process.

What holds: with the batch split between the two ranks, every rank's gradients after backward
equal a single-process run on the whole batch (mean loss: DDP averages the ranks' gradients),
parameters stay bit-for-bit identical across ranks after SGD steps and follow the
single-process trajectory, for a model converted before wrapping and one converted after.
A model with BatchNorm (training mode, buffers broadcast from rank 0 at every forward) gives
the gradients and running statistics torch's own model gives under the same DDP, and the
gradients are the mean of the two half-batches' single-process gradients (each rank
normalises with its own half's statistics).
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import manualgrad
import manualgrad.functional as MF
from tests.compat._models import cnn, mlp
from tests.ports import leave, spawn

pytestmark = [
    pytest.mark.trajectory,  # follows a trajectory: run again under other CPUs' kernels
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch built without the gloo backend"),
]
torch.set_num_threads(1)
WORLD, STEPS, TOL = 2, 3, 1e-5
# scenario: (model builder, input shape, classes, "ours" | "torch" | "ours_after_wrap")
SCENARIOS = {
    "mlp_ours": (mlp, (8, 6), 4, "ours"),
    "mlp_ours_after_wrap": (mlp, (8, 6), 4, "ours_after_wrap"),
    "cnn_bn_ours": (cnn, (8, 2, 6, 6), 3, "ours"),
    "cnn_bn_torch": (cnn, (8, 2, 6, 6), 3, "torch"),
}


def _loss_fn(impl):
    return torch.nn.functional.cross_entropy if impl == "torch" else MF.cross_entropy


def _clone(named):
    return {k: v.detach().clone() for k, v in named}


def _train(model, impl, batches, rank):
    """SGD steps on this rank's half of each batch; records gradients, parameters, buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inner = model.module if isinstance(model, DDP) else model
    record = []
    for x, y in batches:
        if rank is not None:  # this rank's share of the batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad(set_to_none=True)
        _loss_fn(impl)(model(x), y).backward()
        grads = {k: p.grad.detach().clone() for k, p in inner.named_parameters()}
        buffers = _clone(inner.named_buffers())
        opt.step()
        record.append(dict(grads=grads, buffers=buffers, params=_clone(inner.named_parameters())))
    return record


def _worker(rank, port, states, batches, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, (build, _, _, impl) in SCENARIOS.items():
        model = build()
        model.load_state_dict(states[name])
        if impl == "ours":
            manualgrad.convert(model, strict=True)
        ddp = DDP(model)  # broadcast_buffers=True: rank 0's buffers reach every rank at each forward
        if impl == "ours_after_wrap":  # same Parameter objects: DDP's gradient hooks stay attached
            manualgrad.convert(ddp.module, strict=True)
        results[name] = _train(ddp, impl, batches[name], rank)
        # one more forward (eval: no update of its own) broadcasts rank 0's running statistics again
        model.eval()
        with torch.no_grad():
            ddp(batches[name][0][0][:2])
        results[name].append(dict(buffers=_clone(model.named_buffers())))
        results[name + ":classes"] = sorted({type(m).__module__.split(".")[0] for m in model.modules() if not list(m.children())})
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    leave()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """(initial states, batches, [rank 0 record, rank 1 record]) of one 2-process run."""
    torch.manual_seed(0)
    states, batches = {}, {}
    for name, (build, shape, classes, _) in SCENARIOS.items():
        states[name] = copy.deepcopy(build().state_dict())
        batches[name] = [(torch.randn(shape), torch.randint(0, classes, (shape[0],))) for _ in range(STEPS)]
    states["cnn_bn_torch"] = states["cnn_bn_ours"]  # the same network, torch's and ours
    batches["cnn_bn_torch"] = batches["cnn_bn_ours"]
    outdir = str(tmp_path_factory.mktemp("ddp"))
    spawn(_worker, (states, batches, outdir), nprocs=WORLD)
    ranks = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]
    return states, batches, ranks


def _close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=0, atol=TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def _single_process(name, states, batches, impl):
    build = SCENARIOS[name][0]
    model = build()
    model.load_state_dict(states[name])
    if impl != "torch":
        manualgrad.convert(model, strict=True)
    return _train(model, impl, batches[name], rank=None)


@pytest.mark.parametrize("name", ["mlp_ours", "mlp_ours_after_wrap"])
def test_every_ranks_gradients_equal_one_process_on_the_whole_batch(ddp_run, name):
    states, batches, ranks = ddp_run
    assert ranks[0][name + ":classes"] == ["manualgrad"], "the DDP model ran torch's layers"
    for impl in ("ours", "torch"):  # the converted and the torch model, single process
        single = _single_process(name, states, batches, impl)
        for rank, record in enumerate(ranks):
            for step in range(STEPS):
                _close(record[name][step]["grads"], single[step]["grads"], f"{impl} rank {rank} step {step} grad")
                _close(record[name][step]["params"], single[step]["params"], f"{impl} rank {rank} step {step} param")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parameters_stay_identical_across_ranks_after_every_step(ddp_run, name):
    _, _, ranks = ddp_run
    for step in range(STEPS):
        for k, p in ranks[0][name][step]["params"].items():
            assert torch.equal(ranks[1][name][step]["params"][k], p), f"step {step}: {k} differs between ranks"
    # the steps moved the parameters, so identity is not just the shared initial state
    first = next(iter(ranks[0][name][0]["params"]))
    assert not torch.equal(ranks[0][name][STEPS - 1]["params"][first], ddp_run[0][name][first])


def test_batchnorm_model_under_ddp_gives_torchs_gradients_and_running_stats(ddp_run):
    _, _, ranks = ddp_run
    assert ranks[0]["cnn_bn_ours:classes"] == ["manualgrad"] and ranks[0]["cnn_bn_torch:classes"] == ["torch"]
    for rank, record in enumerate(ranks):
        ours, theirs = record["cnn_bn_ours"], record["cnn_bn_torch"]
        for step in range(STEPS + 1):
            for key in ("grads", "params", "buffers"):
                if key in theirs[step]:
                    _close(ours[step][key], theirs[step][key], f"rank {rank} step {step} {key}")


def test_batchnorm_ddp_gradient_is_the_mean_of_the_half_batch_gradients(ddp_run):
    states, batches, ranks = ddp_run
    (x, y), state = batches["cnn_bn_ours"][0], states["cnn_bn_ours"]
    halves = []
    for xh, yh in zip(x.chunk(WORLD), y.chunk(WORLD)):
        model = manualgrad.convert(cnn(), strict=True)
        model.load_state_dict(state)
        MF.cross_entropy(model(xh), yh).backward()
        halves.append({k: p.grad for k, p in model.named_parameters()})
    mean = {k: (halves[0][k] + halves[1][k]) / WORLD for k in halves[0]}
    for rank, record in enumerate(ranks):
        _close(record["cnn_bn_ours"][0]["grads"], mean, f"rank {rank} step 0 grad")
    # per-half batch statistics: not the whole batch's gradient (that would need SyncBatchNorm)
    whole = manualgrad.convert(cnn(), strict=True)
    whole.load_state_dict(state)
    MF.cross_entropy(whole(x), y).backward()
    assert not torch.allclose(whole[0].weight.grad, mean["0.weight"], rtol=0, atol=TOL)


def test_batchnorm_buffers_are_broadcast_from_rank_0(ddp_run):
    _, _, ranks = ddp_run
    # after a forward, each rank has updated rank 0's broadcast statistics with its own half...
    after_step = [r["cnn_bn_ours"][0]["buffers"]["1.running_mean"] for r in ranks]
    assert not torch.allclose(after_step[0], after_step[1])
    # ...and the next forward's broadcast makes them rank 0's again, on every rank
    final = [r["cnn_bn_ours"][-1]["buffers"] for r in ranks]
    for k, b in final[0].items():
        assert torch.equal(final[1][k], b), f"{k} not broadcast"
