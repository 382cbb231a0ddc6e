"""GradientMonitor under torch.distributed: 2 gloo processes on CPU against one process.

The processes are started once (torch.multiprocessing.spawn) and run every scenario; rank 0
writes the event files, every rank saves what the test needs to recompute by hand.

What holds: under DDP (the monitor on the wrapped module) and under FSDP2 (``fully_shard`` on
every Linear and the root: DTensor parameters and gradients, uneven shards, one of them empty),
with the batch split between the ranks, every logged per-module gradient norm, max |g|,
parameter norm, update ratio and the global norm equals the statistic one process logs on the
whole batch: shards combined as sqrt(sum of squares), replicas counted once. So does it with
``sharded=True`` over plain-tensor row blocks, and with DTensor parameters replicated on both
ranks (whose Partial gradients raise NotImplementedError until made Replicate).

The noise scale (linear regression, closed form in test_noise_scale.py): under DDP from the
per-rank micro-batch gradients (K = 1; K = 2 with ``no_sync`` or with every backward
all-reduced), under FSDP2 from the increments of the sharded gradients over K = 4 backwards;
each equals the estimators computed here from the saved micro-batch gradients and lands on
the closed form. Under FSDP2 with ``set_requires_gradient_sync(False)`` nothing is logged.
"""
import contextlib
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter

from manualgrad.monitor import GradientMonitor
from manualgrad.utils import clip_grad_norm_
from tests.monitor.test_monitor import read, scalar
from tests.monitor.test_noise_scale import (assert_logged_b_simple_near_the_closed_form, ema, hand_estimates,
                                            micro_gradient, regression_batch, regression_model)
from tests.ports import leave, spawn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without the gloo backend")
WORLD, STEPS, BATCH = 2, 3, 8
NOISE_STEPS, NOISE_B, NOISE_BETA = 300, 8, 0.99  # logging steps, samples per micro-batch and rank
SYNCED_STEPS = 20
FSDP_STEPS, FSDP_K = 300, 4  # under FSDP2: B_small = 2 x 8, B_big = 4 x 2 x 8
EPS = torch.finfo(torch.float32).eps
# Norms are sums over at most 13 x 11 float32 squares, added in another order (per shard, then
# across ranks) and of gradients averaged in another order: agreement to rtol 1e-5 (~80 ulps).
RTOL = 1e-5
CLIP = 0.6  # max_norm: the first step is not clipped, the others are


def mlp():
    # odd widths: FSDP's dim-0 shards are uneven; the last bias (1 element) leaves rank 1 empty
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.ReLU(), torch.nn.Linear(11, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 1))


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS)]


def train_stats(model, params_model, writer, rank):
    """SGD with momentum, every step logged; ``rank`` None: the whole batch in this process."""
    opt = torch.optim.SGD(params_model.parameters(), lr=0.1, momentum=0.9)
    with GradientMonitor(params_model, writer, optimizer=opt, every=1):
        for x, y in batches():
            if rank is not None:
                x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            clip_grad_norm_(params_model.parameters(), CLIP)  # (with DTensors under FSDP2)
            opt.step()


@contextlib.contextmanager
def fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def train_noise(model, module, writer, rank, K, steps=NOISE_STEPS, defer=None):
    """Linear regression at a fixed w on this rank's data; returns this rank's micro-batch gradients per step.

    ``defer(model)``: the context of every backward but the last (accumulate without reducing).
    """
    gen = torch.Generator().manual_seed(100 + rank)
    micro = []
    with GradientMonitor(module, writer, every=1, noise_ema=NOISE_BETA, cosine=False) as mon:
        for _ in range(steps):
            module.zero_grad()
            grads = []
            for k in range(K):
                x, y = regression_batch(NOISE_B, gen)
                loss = 0.5 * (model(x).squeeze(1) - y).square().mean() / K
                with defer(model) if defer and k < K - 1 else contextlib.nullcontext():
                    loss.backward()
                grads.append(micro_gradient(x, y))
            micro.append(torch.stack(grads))
            mon.step()
    return micro


def _worker(rank, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    saved = {}

    def writer(name):
        return SummaryWriter(os.path.join(outdir, name)) if rank == 0 else None

    w = writer("ddp")
    model = mlp()
    train_stats(DDP(model), model, w, rank)
    if w:
        w.close()

    from torch.distributed.fsdp import fully_shard

    w = writer("fsdp")
    model = mlp()
    for i in (0, 2, 4):
        fully_shard(model[i])
    fully_shard(model)
    saved["fsdp_placements"] = {n: (type(p).__name__, str(p.placements), tuple(p.to_local().shape))
                                for n, p in model.named_parameters()}
    train_stats(model, model, w, rank)
    if w:
        w.close()

    # plain tensors, each rank a disjoint block of rows of every parameter: sharded=True
    w = writer("sharded_flag")
    full = mlp()
    x, y = batches()[0]
    torch.nn.functional.mse_loss(full(x), y).backward()
    shard = mlp()
    for i in (0, 2, 4):
        for k in ("weight", "bias"):
            p = getattr(full[i], k)
            piece = torch.nn.Parameter(p.detach().tensor_split(WORLD)[rank].clone())
            piece.grad = p.grad.tensor_split(WORLD)[rank].clone()
            setattr(shard[i], k, piece)
    with GradientMonitor(shard, w, sharded=True, every=1) as mon:
        mon.step()
    if w:
        w.close()

    # DTensor parameters replicated on every rank (the batch sharded): the weight's gradient
    # comes out Partial (not supported: it must raise), then made Replicate like the parameter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    w = writer("replicated")
    model = linear()
    distribute_module(model, mesh)
    x = distribute_tensor(batches()[0][0][:, :5], mesh, [Shard(0)])
    model(x).square().mean().backward()
    with GradientMonitor(model, w, every=1) as mon:
        try:
            mon.step()
        except NotImplementedError as e:
            saved["replicated_error"] = str(e)
        for p in model.parameters():
            p.grad = p.grad.redistribute(mesh, [Replicate()])
        saved["replicated_placements"] = [str(p.grad.placements) for p in model.parameters()]
        mon.step()
    if w:
        w.close()

    for K in (1, 2):
        w = writer(f"noise_K{K}")
        model = regression_model()
        # K = 2: the first backward under no_sync, the last all-reduces
        saved[f"noise_K{K}"] = train_noise(DDP(model), model, w, rank, K, defer=DDP.no_sync)
        if w:
            w.close()
    w = writer("noise_K2_synced")  # every micro-batch all-reduced: .grad sums the ranks' means
    model = regression_model()
    saved["noise_K2_synced"] = train_noise(DDP(model), model, w, rank, 2, steps=SYNCED_STEPS)
    if w:
        w.close()

    # FSDP2: increments of the sharded .grad (rank 1's shard of the (1, 4) weight is empty)
    for name, defer, steps in (("noise_fsdp", None, FSDP_STEPS), ("noise_fsdp_unreduced", fsdp_no_sync, 3)):
        w = writer(name)
        model = regression_model()
        fully_shard(model)
        saved[name] = train_noise(model, model, w, rank, FSDP_K, steps, defer)
        if w:
            w.close()
    torch.save(saved, os.path.join(outdir, f"rank{rank}.pt"))
    leave()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the run's directory, [what rank 0 saved, what rank 1 saved])."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    spawn(_worker, (outdir,), nprocs=WORLD)
    return outdir, [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training in one process on the whole batch."""
    logdir = tmp_path_factory.mktemp("single")
    writer = SummaryWriter(logdir)
    model = mlp()
    train_stats(model, model, writer, rank=None)
    writer.close()
    return read(logdir)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_every_logged_statistic_equals_one_process_on_the_whole_batch(run, single, name):
    outdir, saved = run
    ea = read(os.path.join(outdir, name))
    ours, ref = set(ea.Tags()["scalars"]), set(single.Tags()["scalars"])
    assert ref <= ours
    assert ours - ref <= {"noise/B_simple", "noise/tr_sigma", "noise/g_sq"}  # one rank alone has no noise scale
    stats = [t for t in ref if t.split("/")[0] in ("grad", "param", "update")
             or t in ("global/grad_norm", "global/clip_coef", "global/clip_norm_before", "global/clip_fraction")]
    assert len(stats) == 6 * 3 + 4  # norm, max_abs, param norm, ratio, log10 ratio, cosine_prev; 3 Linears
    assert scalar(single, "global/clip_fraction") == {0: 0.0, 1: 1.0, 2: 1.0}
    for tag in sorted(stats):
        got, want = scalar(ea, tag), scalar(single, tag)
        assert sorted(got) == sorted(want), tag
        for step, v in want.items():
            if tag == "global/clip_fraction":
                tol = dict(abs=0)
            elif tag.startswith("update/ratio"):
                # ||θ_before - θ_after|| in float32: each difference is off by up to eps |θ_i|,
                # so the ratio by up to 2 eps on top of the gradient's own rounding
                tol = dict(rel=RTOL, abs=2 * EPS)
            elif tag.startswith("update/log10_ratio"):
                tol = dict(abs=(RTOL + 2 * EPS / 10**v) / math.log(10))
            else:
                tol = dict(rel=RTOL, abs=1e-7)
            assert got[step] == pytest.approx(v, **tol), (tag, step)
    if name == "fsdp":  # the statistics above did come from DTensor shards, one of them empty
        placements = saved[1]["fsdp_placements"]
        assert placements["0.weight"] == ("DTensor", "(Shard(dim=0),)", (5, 13))
        assert placements["4.bias"] == ("DTensor", "(Shard(dim=0),)", (0,))


def one_step_alone(tmp_path, model, loss):
    """The statistics one process logs for one backward of ``loss(model)`` (no optimizer)."""
    writer = SummaryWriter(tmp_path)
    loss(model).backward()
    with GradientMonitor(model, writer, every=1) as mon:
        mon.step()
    writer.close()
    return read(tmp_path)


def assert_same_norms(ea, ref, step=0):
    tags = [t for t in ref.Tags()["scalars"] if t.split("/")[0] in ("grad", "param") or t == "global/grad_norm"]
    assert {t.split("/")[0] for t in tags} == {"grad", "param", "global"}
    for tag in tags:
        assert scalar(ea, tag)[step] == pytest.approx(scalar(ref, tag)[0], rel=RTOL, abs=1e-7), tag


def test_sharded_flag_sums_plain_tensor_shards_across_ranks(run, tmp_path):
    outdir, _ = run
    x, y = batches()[0]
    ref = one_step_alone(tmp_path, mlp(), lambda m: torch.nn.functional.mse_loss(m(x), y))
    assert_same_norms(read(os.path.join(outdir, "sharded_flag")), ref)


def test_replicated_dtensors_count_once_and_partial_gradients_raise(run, tmp_path):
    outdir, saved = run
    assert "Partial(sum)" in saved[0]["replicated_error"] and "only Shard and Replicate" in saved[0]["replicated_error"]
    assert saved[0]["replicated_placements"] == ["(Replicate(),)"] * 2
    x = batches()[0][0][:, :5]
    ref = one_step_alone(tmp_path, linear(), lambda m: m(x).square().mean())
    assert_same_norms(read(os.path.join(outdir, "replicated")), ref)


@pytest.mark.parametrize("name, steps", [("noise_K1", NOISE_STEPS), ("noise_K2", NOISE_STEPS),
                                         ("noise_K2_synced", SYNCED_STEPS)])
def test_noise_scale_under_ddp_equals_a_hand_computation_from_every_ranks_gradients(run, name, steps):
    outdir, saved = run
    ea = read(os.path.join(outdir, name))
    # per step, the K micro-batch gradients of both ranks (K R of them, b samples each)
    micro = [torch.cat([saved[r][name][t] for r in range(WORLD)]) for t in range(steps)]
    expected = ema(hand_estimates(micro, NOISE_B), NOISE_BETA)
    checked = list(range(0, steps, 10))
    for tag, col in (("noise/g_sq", 0), ("noise/tr_sigma", 1)):
        logged = scalar(ea, tag)
        assert len(logged) == steps
        assert [logged[t] for t in checked] == pytest.approx(expected[checked, col].tolist(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("K", [1, 2])
def test_noise_scale_under_ddp_lands_on_the_closed_form(run, K):
    outdir, saved = run
    ea = read(os.path.join(outdir, f"noise_K{K}"))
    micro = [torch.cat([saved[r][f"noise_K{K}"][t] for r in range(WORLD)]) for t in range(NOISE_STEPS)]
    per_step = hand_estimates(micro, NOISE_B)
    # (the seeds are fixed, so the run is too)
    assert_logged_b_simple_near_the_closed_form(ea, per_step, NOISE_BETA)


def test_noise_scale_under_fsdp_equals_a_hand_computation_from_the_increments(run):
    outdir, saved = run
    ea = read(os.path.join(outdir, "noise_fsdp"))
    # per step, the K increments of .grad: each the mean over ranks of a micro-batch gradient (R b samples)
    micro = [torch.stack([saved[r]["noise_fsdp"][t] for r in range(WORLD)]).mean(0) for t in range(FSDP_STEPS)]
    per_step = hand_estimates(micro, WORLD * NOISE_B)
    expected = ema(per_step, NOISE_BETA)
    checked = list(range(0, FSDP_STEPS, 25))
    for tag, col in (("noise/g_sq", 0), ("noise/tr_sigma", 1)):
        logged = scalar(ea, tag)
        assert len(logged) == FSDP_STEPS
        assert [logged[t] for t in checked] == pytest.approx(expected[checked, col].tolist(), rel=1e-4, abs=1e-5)
    assert_logged_b_simple_near_the_closed_form(ea, per_step, NOISE_BETA)


def test_no_noise_scale_under_fsdp_when_micro_batches_are_not_reduced(run):
    outdir, _ = run
    tags = read(os.path.join(outdir, "noise_fsdp_unreduced")).Tags()["scalars"]
    assert "grad/norm/model" in tags and not any(t.startswith("noise/") for t in tags)
