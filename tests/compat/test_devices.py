"""Every manualgrad functional op runs where its inputs are: no op hard-codes the CPU.

Three checks:
- on every available device (cpu; cuda when present, else skipped) each op's output and every
  input gradient stay on the input's device and equal torch's;
- on the ``meta`` device (shapes only, no data: runs on this CPU-only machine) each op's
  forward and backward give torch's shapes, dtypes and the meta device. A tensor the op made
  on the CPU by default (``torch.zeros(n)`` with no ``device=``) cannot be mixed with meta
  tensors, so this fails wherever a CUDA run would;
- a scan of the source of manualgrad/ops, manualgrad/nn and manualgrad/functional.py finds no
  CPU literal (``device="cpu"``, ``torch.device("cpu")``, ``.to("cpu")``) and no ``.cpu()``
  call; comparing a device type with "cpu" to choose a kernel is allowed, as is each entry of
  ``ALLOWED`` (file and function, with the reason no tensor lands on the CPU there).

``SAMPLES`` holds one call per op, and a test checks it covers ``manualgrad.functional.__all__``,
so a new op is not left out silently.
"""
import ast
import pathlib

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F

torch.set_num_threads(1)
ROOT = pathlib.Path(F.__file__).resolve().parent
RTOL, ATOL = 1e-5, 1e-5


def _x(*shape):
    return torch.randn(shape, requires_grad=True)


def _probs(*shape):
    return torch.rand(shape).clamp(0.05, 0.95).requires_grad_(True)


def _cls(n, c):
    return torch.randint(0, c, (n,))


# name: (() -> (args, kwargs), torch reference: None for torch.nn.functional's function of the
# same name); inputs are made on the CPU and moved to the device by the test
SAMPLES = {
    "adaptive_avg_pool1d": (lambda: ((_x(2, 3, 7), 3), {}), None),
    "adaptive_avg_pool2d": (lambda: ((_x(2, 3, 7, 6), (3, 2)), {}), None),
    "adaptive_max_pool2d": (lambda: ((_x(2, 3, 7, 6), (3, 2)), {}), None),
    # more pooling (one block)
    "avg_pool3d": (lambda: ((_x(2, 3, 5, 4, 3), 2), dict(stride=(2, 1, 2), padding=1, count_include_pad=False)), None),
    "adaptive_avg_pool3d": (lambda: ((_x(2, 3, 5, 4, 3), (3, 2, 2)), {}), None),
    "adaptive_max_pool1d": (lambda: ((_x(2, 3, 7), 3), {}), None),
    "adaptive_max_pool3d": (lambda: ((_x(2, 3, 5, 4, 3), (3, 2, 2)), {}), None),
    "lp_pool1d": (lambda: ((_x(2, 3, 7), 2, 3), dict(stride=2, ceil_mode=True)), None),
    "lp_pool2d": (lambda: ((_x(2, 3, 7, 6), 2, 2), {}), None),
    "lp_pool3d": (lambda: ((_x(2, 3, 5, 4, 3), 2, 2), dict(stride=1)), None),
    "max_unpool1d": (lambda: ((_x(2, 3, 5), TF.max_pool1d(torch.randn(2, 3, 9), 3, 2, 1, return_indices=True)[1], 3),
                              dict(stride=2, padding=1, output_size=(9,))), None),
    "max_unpool2d": (lambda: ((_x(2, 3, 3, 2), TF.max_pool2d(torch.randn(2, 3, 7, 5), 3, 2, return_indices=True)[1], 3),
                              dict(stride=2, output_size=(7, 5))), None),
    "max_unpool3d": (lambda: ((_x(2, 3, 2, 2, 1), TF.max_pool3d(torch.randn(2, 3, 4, 4, 2), 2, return_indices=True)[1], 2),
                              {}), None),
    "fractional_max_pool2d": (lambda: ((_x(2, 3, 7, 6), 2), dict(output_size=(4, 3))), None),
    "fractional_max_pool3d": (lambda: ((_x(2, 3, 5, 4, 6), 2), dict(output_ratio=(0.5, 0.5, 0.6))), None),
    # end of more pooling
    "addmm": (lambda: ((_x(3, 5), _x(3, 4), _x(4, 5)), dict(beta=0.5, alpha=2.0)), torch.addmm),
    "avg_pool1d": (lambda: ((_x(2, 3, 7), 3, 2), {}), None),
    "avg_pool2d": (lambda: ((_x(2, 3, 7, 6), 2), dict(padding=1, count_include_pad=False)), None),
    "baddbmm": (lambda: ((_x(2, 3, 5), _x(2, 3, 4), _x(2, 4, 5)), dict(beta=0.5)), torch.baddbmm),
    "batch_norm": (lambda: ((_x(4, 3, 5), torch.zeros(3), torch.ones(3), _x(3), _x(3)), dict(training=True)), None),
    "binary_cross_entropy": (lambda: ((_probs(4, 3), torch.rand(4, 3)), {}), None),
    "binary_cross_entropy_with_logits": (lambda: ((_x(4, 3), torch.rand(4, 3)), dict(pos_weight=torch.rand(3) + 0.5)), None),
    "bmm": (lambda: ((_x(2, 3, 4), _x(2, 4, 5)), {}), torch.bmm),
    "conv1d": (lambda: ((_x(2, 3, 9), _x(4, 3, 3), _x(4)), dict(padding=1)), None),
    "conv2d": (lambda: ((_x(2, 3, 7, 6), _x(4, 3, 3, 3), _x(4)), dict(stride=2, padding=1)), None),
    # conv3d and the transposed convolutions (one block)
    "conv3d": (lambda: ((_x(2, 3, 5, 4, 3), _x(4, 3, 3, 2, 2), _x(4)), dict(stride=2, padding=1)), None),
    "conv_transpose1d": (lambda: ((_x(2, 3, 9), _x(3, 4, 3), _x(4)), dict(stride=2, output_padding=1)), None),
    "conv_transpose2d": (lambda: ((_x(2, 4, 5, 6), _x(4, 3, 3, 2), _x(6)), dict(stride=2, padding=1, groups=2)), None),
    "conv_transpose3d": (lambda: ((_x(2, 3, 3, 4, 2), _x(3, 2, 2, 3, 2), _x(2)), dict(stride=(2, 1, 2))), None),
    "max_pool3d": (lambda: ((_x(2, 3, 5, 4, 3), 2), dict(stride=(2, 1, 2), padding=1)), None),
    # end of conv3d and the transposed convolutions
    "cross_entropy": (lambda: ((_x(5, 4), _cls(5, 4)), dict(weight=torch.rand(4) + 0.5, label_smoothing=0.1)), None),
    "dropout": (lambda: ((_x(4, 6), 0.3), {}), None),
    "elu": (lambda: ((_x(4, 6),), {}), None),
    "embedding": (lambda: ((torch.tensor([1, 0, 7, 1]), _x(8, 3)), {}), None),
    # embedding bags (one block)
    "embedding_bag": (lambda: ((torch.tensor([1, 0, 7, 1, 2]), _x(8, 3), torch.tensor([0, 2, 2])),
                               dict(mode="sum", per_sample_weights=_x(5), padding_idx=7)), None),
    # end of embedding bags
    # weight normalization (one block)
    "weight_norm": (lambda: ((_x(4, 3, 5), _x(1, 1, 5)), dict(dim=2)), torch._weight_norm),
    # end of weight normalization
    "gelu": (lambda: ((_x(4, 6),), dict(approximate="tanh")), None),
    "glu": (lambda: ((_x(4, 6),), {}), None),
    # instance norm
    "instance_norm": (lambda: ((_x(2, 3, 5), torch.zeros(3), torch.ones(3), _x(3), _x(3)), {}), None),
    # end of instance norm
    # local response norm
    "local_response_norm": (lambda: ((_x(2, 5, 3, 2), 3), dict(alpha=0.5, k=2.0)), None),
    # end of local response norm
    "group_norm": (lambda: ((_x(2, 6, 5), 3, _x(6), _x(6)), {}), None),
    "hardswish": (lambda: ((_x(4, 6) * 4,), {}), None),
    "huber_loss": (lambda: ((_x(4, 3), torch.randn(4, 3)), dict(delta=0.5)), None),
    "kl_div": (lambda: ((_x(4, 3), torch.rand(4, 3)), dict(reduction="batchmean")), None),
    "l1_loss": (lambda: ((_x(4, 3), torch.randn(4, 3)), {}), None),
    "layer_norm": (lambda: ((_x(3, 5, 4), (4,), _x(4), _x(4)), {}), None),
    "leaky_relu": (lambda: ((_x(4, 6), 0.1), {}), None),
    "linear": (lambda: ((_x(3, 4), _x(5, 4), _x(5)), {}), None),
    "linear_cross_entropy": (lambda: ((_x(6, 4), _x(7, 4), _cls(6, 7)), dict(linear_bias=_x(7))), None),
    "log_softmax": (lambda: ((_x(4, 6),), dict(dim=-1)), None),
    "matmul": (lambda: ((_x(2, 3, 4), _x(4, 5)), {}), torch.matmul),
    "max_pool1d": (lambda: ((_x(2, 3, 7), 2), {}), None),
    "max_pool2d": (lambda: ((_x(2, 3, 7, 6), 2), dict(stride=2, padding=1)), None),
    "mish": (lambda: ((_x(4, 6),), {}), None),
    "mm": (lambda: ((_x(3, 4), _x(4, 5)), {}), torch.mm),
    "mse_loss": (lambda: ((_x(4, 3), torch.randn(4, 3)), {}), None),
    "multi_head_attention_forward": (lambda: ((_x(5, 2, 8), _x(6, 2, 8), _x(6, 2, 8), 8, 2, _x(24, 8), _x(24),
                                                _x(1, 1, 8), _x(1, 1, 8), True, 0.0, _x(8, 8), _x(8)),
                                               dict(need_weights=False)), None),
    "nll_loss": (lambda: ((_x(5, 4), _cls(5, 4)), {}), None),
    # pointwise and margin losses, bilinear (one block)
    "poisson_nll_loss": (lambda: ((_x(4, 3), torch.rand(4, 3) * 3), dict(full=True)), None),
    "gaussian_nll_loss": (lambda: ((_x(4, 3), _x(4, 3), _probs(4)), dict(full=True)), None),
    "margin_ranking_loss": (lambda: ((_x(4, 3), _x(4, 3), _x(4, 3)), dict(margin=0.5)), None),
    "hinge_embedding_loss": (lambda: ((_x(4, 3), torch.randn(4, 3).sign()), dict(margin=0.5)), None),
    "soft_margin_loss": (lambda: ((_x(4, 3), torch.randn(4, 3).sign()), {}), None),
    "multilabel_soft_margin_loss": (lambda: ((_x(4, 3), torch.rand(4, 3)), dict(weight=torch.rand(3))), None),
    "multilabel_margin_loss": (lambda: ((_x(4, 3), torch.tensor([[0, -1, 2], [2, 1, -1], [-1, 0, 0], [0, 1, 2]])),
                                        {}), None),
    "multi_margin_loss": (lambda: ((_x(4, 3), _cls(4, 3)), dict(p=2, margin=0.5, weight=torch.rand(3))), None),
    "bilinear": (lambda: ((_x(2, 3, 4), _x(2, 3, 5), _x(6, 4, 5), _x(6)), {}), None),
    # end of pointwise and margin losses, bilinear
    # resampling
    "interpolate": (lambda: ((_x(2, 3, 7, 6),), dict(size=(4, 9), mode="bicubic", align_corners=True)), None),
    "grid_sample": (lambda: ((_x(2, 3, 7, 6), _x(2, 4, 5, 2)), dict(mode="bicubic", padding_mode="reflection",
                                                                    align_corners=False)), None),
    "affine_grid": (lambda: ((_x(2, 2, 3), (2, 3, 7, 6)), dict(align_corners=False)), None),
    # end of resampling
    "pad": (lambda: ((_x(2, 3, 7, 6), (2, 1, -1, 3)), dict(mode="reflect")), None),
    "pixel_shuffle": (lambda: ((_x(2, 8, 3, 5), 2), {}), None),
    "pixel_unshuffle": (lambda: ((_x(2, 3, 4, 6), 2), {}), None),
    "channel_shuffle": (lambda: ((_x(2, 6, 3, 5), 3), {}), None),
    "unfold": (lambda: ((_x(2, 3, 7, 6), (2, 3)), dict(dilation=(2, 1), padding=1, stride=2)), None),
    "fold": (lambda: ((_x(2, 12, 12), (4, 5), 2), {}), None),
    "relu": (lambda: ((_x(4, 6),), {}), None),
    "rms_norm": (lambda: ((_x(3, 5, 4), (4,), _x(4)), {}), None),
    "scaled_dot_product_attention": (lambda: ((_x(2, 2, 5, 4), _x(2, 2, 6, 4), _x(2, 2, 6, 4)), dict(is_causal=True)), None),
    "sigmoid": (lambda: ((_x(4, 6),), {}), torch.sigmoid),
    "silu": (lambda: ((_x(4, 6),), {}), None),
    "smooth_l1_loss": (lambda: ((_x(4, 3), torch.randn(4, 3)), dict(beta=0.5)), None),
    "softmax": (lambda: ((_x(4, 6),), dict(dim=1)), None),
    "softplus": (lambda: ((_x(4, 6),), dict(beta=2.0)), None),
    "tanh": (lambda: ((_x(4, 6),), {}), torch.tanh),
    # more activations (ops/activation_more.py)
    "celu": (lambda: ((_x(4, 6),), dict(alpha=0.5)), None),
    "hardshrink": (lambda: ((_x(4, 6),), dict(lambd=0.3)), None),
    "hardsigmoid": (lambda: ((_x(4, 6) * 4,), {}), None),
    "hardtanh": (lambda: ((_x(4, 6),), dict(min_val=-0.5, max_val=0.7)), None),
    "logsigmoid": (lambda: ((_x(4, 6),), {}), None),
    "prelu": (lambda: ((_x(2, 3, 5), _x(3)), {}), None),
    "relu6": (lambda: ((_x(4, 6) * 4,), {}), None),
    "rrelu": (lambda: ((_x(4, 6),), {}), None),  # eval: training draws with a data-dependent count (not on meta)
    "selu": (lambda: ((_x(4, 6),), {}), None),
    "softmin": (lambda: ((_x(4, 6),), dict(dim=1)), None),
    "softshrink": (lambda: ((_x(4, 6),), dict(lambd=0.3)), None),
    "softsign": (lambda: ((_x(4, 6),), {}), None),
    "tanhshrink": (lambda: ((_x(4, 6),), {}), None),
    "threshold": (lambda: ((_x(4, 6), 0.1, -2.0), {}), None),
    # distances and normalization (ops/distance.py)
    "cosine_similarity": (lambda: ((_x(4, 6), _x(4, 6)), dict(dim=1)), None),
    "normalize": (lambda: ((_x(4, 6),), dict(p=3.0)), None),
    "pairwise_distance": (lambda: ((_x(4, 6), _x(4, 6)), dict(p=1.5)), None),
    "pdist": (lambda: ((_x(5, 3),), {}), None),
    # metric-learning losses (ops/loss_metric.py)
    "cosine_embedding_loss": (lambda: ((_x(4, 6), _x(4, 6), torch.tensor([1.0, -1.0, 1.0, -1.0])), dict(margin=-0.2)), None),
    "triplet_margin_loss": (lambda: ((_x(4, 6), _x(4, 6), _x(4, 6)), dict(p=1.5, swap=True)), None),
    "triplet_margin_with_distance_loss": (lambda: ((_x(4, 6), _x(4, 6), _x(4, 6)), dict(swap=True, margin=2.0)), None),
    # ctc_loss (ops/ctc.py): padded targets, lengths as tuples (torch has no meta kernel for tensor lengths)
    "ctc_loss": (lambda: ((_x(6, 3, 5).log_softmax(2).detach().requires_grad_(), torch.tensor([[1, 2, 2], [4, 3, 0], [1, 0, 0]]),
                           (6, 5, 4), (3, 2, 1)), dict(blank=0, zero_infinity=True)), None),
    # end of ctc_loss
    # more dropouts (ops/dropout_more.py)
    "alpha_dropout": (lambda: ((_x(4, 6), 0.3, True), {}), None),
    "feature_alpha_dropout": (lambda: ((_x(4, 6, 3), 0.3, True), {}), None),
    "dropout1d": (lambda: ((_x(4, 6, 3), 0.3), {}), None),
    "dropout2d": (lambda: ((_x(2, 4, 3, 3), 0.3), {}), None),
    "dropout3d": (lambda: ((_x(2, 4, 3, 2, 2), 0.3), {}), None),
    # functional leftovers: upsample aliases, *_with_indices, gumbel_softmax, native_channel_shuffle, conv_tbc
    "upsample": (lambda: ((_x(2, 3, 7, 6),), dict(size=(4, 9), mode="bicubic", align_corners=True)), None),
    "upsample_nearest": (lambda: ((_x(2, 3, 7, 6),), dict(scale_factor=2)), None),
    "upsample_bilinear": (lambda: ((_x(2, 3, 7, 6),), dict(size=(4, 9))), None),
    "max_pool1d_with_indices": (lambda: ((_x(2, 3, 7), 2), dict(stride=2, padding=1)), None),
    "max_pool2d_with_indices": (lambda: ((_x(2, 3, 7, 6), 2), dict(stride=2, padding=1)), None),
    "max_pool3d_with_indices": (lambda: ((_x(2, 3, 5, 4, 6), 2), {}), None),
    "adaptive_max_pool1d_with_indices": (lambda: ((_x(2, 3, 7), 3), {}), None),
    "adaptive_max_pool2d_with_indices": (lambda: ((_x(2, 3, 7, 6), (3, 2)), {}), None),
    "adaptive_max_pool3d_with_indices": (lambda: ((_x(2, 3, 5, 4, 6), (2, 3, 2)), {}), None),
    "fractional_max_pool2d_with_indices": (lambda: ((_x(2, 3, 7, 6), 2), dict(output_size=(4, 3))), None),
    "fractional_max_pool3d_with_indices": (lambda: ((_x(2, 3, 5, 4, 6), 2), dict(output_ratio=(0.5, 0.5, 0.6))), None),
    "gumbel_softmax": (lambda: ((_x(4, 6),), dict(tau=0.5, dim=0)), None),
    # (torch's native_channel_shuffle has no derivative: the reference is the same permutation's)
    "native_channel_shuffle": (lambda: ((_x(2, 6, 3, 5), 3), {}), TF.channel_shuffle),
    "conv_tbc": (lambda: ((_x(7, 2, 3), _x(3, 3, 4), _x(4), 1), {}), None),
    # end of functional leftovers
}
# In-place-only names (hardtanh_ ...): their input cannot be a leaf that requires grad, so they
# run in test_inplace_variants_stay_on_the_input_device below, on x * 1.
INPLACE_VARIANTS = {
    "hardtanh_": ((-0.5, 0.7), {}), "threshold_": ((0.1, 2.0), {}), "selu_": ((), {}), "celu_": ((0.5,), {}),
    "rrelu_": ((), {}),
    "relu_": ((), {}), "elu_": ((0.5,), {}), "leaky_relu_": ((0.2,), {}),  # functional leftovers
}
OPS = sorted(SAMPLES)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _call(name, device):
    """(ours, theirs, args, kwargs): the op's sample inputs on ``device``, leaves there."""
    make, reference = SAMPLES[name]
    args, kwargs = make()

    def to(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().to(device).requires_grad_(v.requires_grad)

    args, kwargs = [to(a) for a in args], {k: to(v) for k, v in kwargs.items()}
    return getattr(F, name), reference or getattr(TF, name), args, kwargs


def _fresh(values):
    return [v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v for v in values]


def _run(fn, args, kwargs, dy_seed=1):
    """Output and the gradients of the leaves that require grad, for a fixed upstream gradient."""
    args, kw_values = _fresh(args), _fresh(list(kwargs.values()))
    kwargs = dict(zip(kwargs, kw_values))
    torch.manual_seed(0)  # the same draws for random ops
    out = fn(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out  # (output, attention weights)
    leaves = [v for v in args + kw_values if isinstance(v, torch.Tensor) and v.requires_grad]
    gen = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(out.shape, generator=gen).to(out.device) if out.device.type != "meta" else torch.ones_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    return out, grads, args + kw_values


def test_samples_cover_every_functional_op():
    assert set(SAMPLES) | set(INPLACE_VARIANTS) == set(F.__all__), (
        f"ops without a device sample: {sorted(set(F.__all__) - set(SAMPLES))}; "
        f"samples of no op: {sorted(set(SAMPLES) - set(F.__all__))}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_op_output_and_gradients_stay_on_the_input_device_and_match_torch(name, device):
    ours, theirs, args, kwargs = _call(name, device)
    out, grads, inputs = _run(ours, args, kwargs)
    ref_out, ref_grads, ref_inputs = _run(theirs, args, kwargs)
    assert out.device == torch.device(device), f"output on {out.device}"
    assert grads, "no input requires grad: the gradient check would be empty"
    for g in grads:
        assert g.device == torch.device(device), f"gradient on {g.device}"
    # multi-head attention chains four products (projections, scores, weighted values, output):
    # its float32 rounding differs from torch's fused path by a few ulps of the summed terms
    rtol, atol = (1e-4, 1e-4) if name == "multi_head_attention_forward" else (RTOL, ATOL)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")
    # state an op updates (batch norm's running statistics) is updated where it lives, as torch's
    for a, b in zip(inputs, ref_inputs):
        if isinstance(a, torch.Tensor) and not a.requires_grad:
            assert a.device == torch.device(device)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", OPS)
def test_op_forward_and_backward_run_on_the_meta_device_with_torchs_shapes(name):
    ours, theirs, args, kwargs = _call(name, "meta")
    try:
        ref_out, ref_grads, _ = _run(theirs, args, kwargs)
    except (NotImplementedError, RuntimeError) as e:  # pragma: no cover - depends on the torch version
        pytest.skip(f"torch's own {name} does not run on meta: {e}")
    out, grads, _ = _run(ours, args, kwargs)
    assert (out.device.type, out.shape, out.dtype) == ("meta", ref_out.shape, ref_out.dtype)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert (g.device.type, g.shape, g.dtype) == ("meta", r.shape, r.dtype)


@pytest.mark.parametrize("device", ["meta", *DEVICES])
@pytest.mark.parametrize("name", sorted(INPLACE_VARIANTS))
def test_inplace_variants_stay_on_the_input_device(name, device):
    args, kwargs = INPLACE_VARIANTS[name]
    x = torch.randn(4, 6).to(device).requires_grad_()
    outs = []
    for fn in (getattr(F, name), getattr(TF, name)):
        h = x * 1
        out = fn(h, *args, **kwargs)
        assert out is h
        (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
        outs.append((out, g))
    (out, g), (ref, ref_g) = outs
    assert (out.device, g.device) == (x.device, x.device)
    if device != "meta":
        torch.testing.assert_close((out, g), (ref, ref_g), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# source scan

# (file under manualgrad/, enclosing function): why a "cpu" literal there makes no tensor on the CPU
ALLOWED = {
    ("ops/_apply.py", "_autocast_device"): "the autocast device type read for a call with no tensor argument",
}


def _functions_by_node(tree):
    """id(node) -> name of the innermost function defining it (module level: None)."""
    owner = {}
    for fn in ast.walk(tree):  # outer functions first, so inner ones overwrite them
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            owner.update((id(n), fn.name) for n in ast.walk(fn))
    return owner


def _cpu_literals(tree):
    """(line, enclosing function, what) of every CPU hard-coding in a module's syntax tree."""
    compared = set()  # string constants that are operands of a comparison: device dispatch
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            compared.update(id(n) for n in [node.left, *node.comparators])
    owner = _functions_by_node(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] == "cpu":
            if id(node) not in compared:
                found.append((node.lineno, owner.get(id(node)), f"the literal {node.value!r}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
            found.append((node.lineno, owner.get(id(node)), ".cpu()"))
    return found


def _sources():
    return sorted([*(ROOT / "ops").glob("*.py"), *(ROOT / "nn").glob("*.py"), ROOT / "functional.py"])


def test_source_scan_finds_a_planted_cpu_literal():
    """The scan itself: it flags each form of hard-coding and lets device dispatch pass."""
    planted = (
        "y = torch.zeros(3, device='cpu')\nz = x.cpu()\nd = torch.device('cpu:0')\nw = x.to('cpu')\n"
        "if x.device.type == 'cpu':\n    pass\ndef f(x):\n    return x.to(device='cpu')\n"
    )
    found = sorted((line, fn) for line, fn, _ in _cpu_literals(ast.parse(planted)))
    assert found == [(1, None), (2, None), (3, None), (4, None), (8, "f")]


def test_no_op_or_module_source_hard_codes_the_cpu():
    files = _sources()
    assert len(files) > 10, "the scan found no sources"
    hits = [
        f"{p.relative_to(ROOT.parent)}:{line} ({fn}): {what}"
        for p in files
        for line, fn, what in _cpu_literals(ast.parse(p.read_text()))
        if (p.relative_to(ROOT).as_posix(), fn) not in ALLOWED
    ]
    assert not hits, "CPU hard-coded in: " + "; ".join(hits)
