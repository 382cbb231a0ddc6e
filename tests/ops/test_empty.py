"""Zero-size inputs: every op of manualgrad.functional, with a zero in each size of its inputs.

torch returns empty outputs (or the reduction of nothing: 0 for a sum, nan for a mean), empty
input gradients and zero parameter gradients, and leaves batch_norm's running stats as they
were; where it raises, manualgrad raises the same exception type. Each op has a small table
of sample inputs built from named sizes (N, C, L, ...); every size in turn is set to 0.

A new op in manualgrad.functional without an entry in CASES fails
``test_every_functional_op_has_empty_cases``. TORCH_DIFFERS lists the few places where torch's own
gradient is not the sum over nothing (its backward raises, or gives nan): there manualgrad gives 0.
"""
import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch


def x(*shape):
    """A float32 leaf that requires grad."""
    return torch.randn(shape, requires_grad=True)


def probs(*shape):
    """Values in (0.1, 0.9): probabilities for binary_cross_entropy."""
    return (torch.rand(shape) * 0.8 + 0.1).requires_grad_()


def classes(shape, c):
    """Class indices in [0, c); with c = 0 there are no valid ones: zeros (out of range, as
    torch would see them)."""
    return torch.randint(0, c, shape) if c > 0 else torch.zeros(shape, dtype=torch.long)


def _lce_torch(input, linear_weight, target, *, linear_bias=None, **kwargs):
    # torch's reference of the fused op: cross_entropy of the logits
    return TF.cross_entropy(TF.linear(input, linear_weight, linear_bias), target, **kwargs)


def _unpool_indices(N, C, *S):
    """Indices as max pooling with kernel 2 would give them: window s at 2 s, flat in a grid of 2 S."""
    idx = torch.zeros((), dtype=torch.long)
    for s in S:
        idx = idx[..., None] * (2 * s) + 2 * torch.arange(s)
    return idx.expand(N, C, *S).contiguous()


# name -> list of (variant, sizes, build); build(**sizes) -> (args, kwargs). The torch twin is
# the same name in torch.nn.functional, else in torch (the matmul family), else TORCH[name].
TORCH = {"linear_cross_entropy": _lce_torch, "weight_norm": torch._weight_norm}

ACT = dict(N=2, C=3, L=4)


def _act(**kw):
    return lambda N, C, L: ((x(N, C, L),), dict(kw))


def _loss(make_input=x, make_target=lambda *s: torch.randn(s), **kw):
    return lambda N, C: ((make_input(N, C), make_target(N, C)), dict(kw))


def _loss_cases(make_input=x, make_target=lambda *s: torch.randn(s), reductions=("mean", "sum", "none"), **kw):
    return [(r, dict(N=3, C=4), _loss(make_input, make_target, reduction=r, **kw)) for r in reductions]


def _log_probs(N, C, *rest):
    return torch.randn(N, C, *rest).log_softmax(1).detach().requires_grad_()


def _probs_target(*shape):
    return torch.rand(shape).softmax(1) if shape[1] else torch.rand(shape)


def _bn(training, stats=True, affine=True, spatial=True):
    def build(N, C, L):
        shape = (N, C, L) if spatial else (N, C)
        rm, rv = (torch.randn(C), torch.rand(C) + 0.5) if stats else (None, None)
        w, b = (x(C), x(C)) if affine else (None, None)
        return (x(*shape), rm, rv, w, b, training), {}
    return build


def _sdpa(mask=None, **kw):
    def build(B, L, S, E, Ev):
        kwargs = dict(kw)
        if mask == "bool":
            kwargs["attn_mask"] = torch.rand(L, S) > 0.3
        elif mask == "float":
            kwargs["attn_mask"] = x(B, L, S)
        return (x(B, L, E), x(B, S, E), x(B, S, Ev)), kwargs
    return build


def _mha(L, S, N, E):
    H = 1
    args = (x(L, N, E), x(S, N, E), x(S, N, E), E, H, x(3 * E, E), x(3 * E), None, None, False, 0.0,
            x(E, E), x(E))
    return args, dict(training=True, need_weights=True)


CASES = {
    **{name: [("", ACT, _act())] for name in ("elu", "gelu", "hardswish", "leaky_relu", "mish", "relu", "sigmoid",
                                               "silu", "softplus", "tanh")},
    "glu": [("", dict(N=2, C=3, L=2), lambda N, C, L: ((x(N, C, 2 * L),), {}))],
    "softmax": [("dim=1", ACT, _act(dim=1)), ("dim=-1", ACT, _act(dim=-1))],
    "log_softmax": [("dim=1", ACT, _act(dim=1)), ("dim=-1", ACT, _act(dim=-1))],
    "dropout": [("train", ACT, _act(p=0.5)), ("eval", ACT, _act(p=0.5, training=False))],
    "mse_loss": _loss_cases(),
    "l1_loss": _loss_cases(),
    "huber_loss": _loss_cases(),
    "smooth_l1_loss": _loss_cases(),
    "binary_cross_entropy": _loss_cases(probs, lambda *s: torch.rand(s)),
    "binary_cross_entropy_with_logits": _loss_cases(make_target=lambda *s: torch.rand(s)) + [
        ("pos_weight", dict(N=3, C=4), lambda N, C: ((x(N, C), torch.rand(N, C)), dict(pos_weight=torch.rand(C))))],
    "kl_div": _loss_cases(_log_probs, _probs_target, ("mean", "sum", "none", "batchmean")),
    "cross_entropy": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((x(N, C), classes((N,), C)), dict(reduction=r)))
        for r in ("mean", "sum", "none")] + [
        ("smoothing", dict(N=3, C=4), lambda N, C: ((x(N, C), classes((N,), C)), dict(label_smoothing=0.1))),
        ("weight", dict(N=3, C=4), lambda N, C: ((x(N, C), classes((N,), C)), dict(weight=torch.rand(C)))),
        ("probs", dict(N=3, C=4), lambda N, C: ((x(N, C), _probs_target(N, C)), {})),
        ("spatial", dict(N=2, C=4, L=3), lambda N, C, L: ((x(N, C, L), classes((N, L), C)), {})),
    ],
    "nll_loss": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((_log_probs(N, C), classes((N,), C)), dict(reduction=r)))
        for r in ("mean", "sum", "none")] + [
        ("weight", dict(N=3, C=4), lambda N, C: ((_log_probs(N, C), classes((N,), C)), dict(weight=torch.rand(C)))),
        ("spatial", dict(N=2, C=4, L=3), lambda N, C, L: ((_log_probs(N, C, L), classes((N, L), C)), {})),
    ],
    # pointwise and margin losses, bilinear (one block)
    "poisson_nll_loss": _loss_cases(make_target=lambda *s: torch.rand(s) * 3, full=True),
    "gaussian_nll_loss": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((x(N, C), x(N, C), probs(N, C)), dict(reduction=r)))
        for r in ("mean", "sum", "none")] + [
        ("homoscedastic", dict(N=3, C=4), lambda N, C: ((x(N, C), x(N, C), probs(N)), {}))],
    "margin_ranking_loss": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((x(N, C), x(N, C), torch.randn(N, C).sign()), dict(reduction=r)))
        for r in ("mean", "sum", "none")] + [
        ("margin", dict(N=3, C=4), lambda N, C: ((x(N, C), x(N, C), x(N, C)), dict(margin=0.5)))],
    "hinge_embedding_loss": _loss_cases(make_target=lambda *s: torch.randn(s).sign(), margin=0.5),
    "soft_margin_loss": _loss_cases(make_target=lambda *s: torch.randn(s).sign()),
    "multilabel_soft_margin_loss": _loss_cases(make_target=lambda *s: torch.rand(s)) + [
        ("weight", dict(N=3, C=4), lambda N, C: ((x(N, C), torch.rand(N, C)), dict(weight=torch.rand(C))))],
    "multilabel_margin_loss": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((x(N, C), classes((N, C), C)), dict(reduction=r)))
        for r in ("mean", "sum", "none")],
    "multi_margin_loss": [
        (r, dict(N=3, C=4), lambda N, C, r=r: ((x(N, C), classes((N,), C)), dict(reduction=r)))
        for r in ("mean", "sum", "none")] + [
        ("p=2-weight", dict(N=3, C=4), lambda N, C: ((x(N, C), classes((N,), C)), dict(p=2, weight=torch.rand(C))))],
    "bilinear": [
        ("", dict(N=3, I=4, J=2, O=5), lambda N, I, J, O: ((x(N, I), x(N, J), x(O, I, J), x(O)), {})),
        ("batched", dict(B=2, N=3, I=4, J=2, O=5),
         lambda B, N, I, J, O: ((x(B, N, I), x(B, N, J), x(O, I, J)), {}))],
    # end of pointwise and margin losses, bilinear
    "linear_cross_entropy": [
        (r, dict(N=3, D=5, C=4), lambda N, D, C, r=r: ((x(N, D), x(C, D), classes((N,), C)),
                                                        dict(linear_bias=x(C), reduction=r)))
        for r in ("mean", "sum", "none")],
    "linear": [("", dict(N=3, I=4, O=5), lambda N, I, O: ((x(N, I), x(O, I), x(O)), {}))],
    "conv1d": [("", dict(N=2, Ci=2, Co=3, L=5), lambda N, Ci, Co, L: ((x(N, Ci, L), x(Co, Ci, 3), x(Co)), {})),
               ("padding", dict(N=2, Ci=2, Co=3, L=5),
                lambda N, Ci, Co, L: ((x(N, Ci, L), x(Co, Ci, 3), x(Co)), dict(padding=1)))],
    "conv2d": [("", dict(N=2, Ci=2, Co=3, H=4, W=5),
                lambda N, Ci, Co, H, W: ((x(N, Ci, H, W), x(Co, Ci, 3, 3), x(Co)), dict(padding=1)))],
    # conv3d and the transposed convolutions (one block)
    "conv3d": [("", dict(N=2, Ci=2, Co=3, D=3, H=4, W=2),
                lambda N, Ci, Co, D, H, W: ((x(N, Ci, D, H, W), x(Co, Ci, 2, 3, 1), x(Co)), dict(padding=1))),
               ("groups", dict(N=2, G=2, D=3, H=3, W=3),
                lambda N, G, D, H, W: ((x(N, 2 * G, D, H, W), x(2 * G, 2, 3, 3, 3)), dict(groups=G, padding=1)))],
    "conv_transpose1d": [("", dict(N=2, Ci=2, Co=3, L=4),
                          lambda N, Ci, Co, L: ((x(N, Ci, L), x(Ci, Co, 3), x(Co)), dict(stride=2, output_padding=1)))],
    "conv_transpose2d": [("", dict(N=2, Ci=2, Co=3, H=3, W=4),
                          lambda N, Ci, Co, H, W: ((x(N, Ci, H, W), x(Ci, Co, 3, 2), x(Co)),
                                                   dict(stride=2, padding=1))),
                         ("groups", dict(N=2, G=2, H=3, W=3),
                          lambda N, G, H, W: ((x(N, 2 * G, H, W), x(2 * G, 1, 3, 3)), dict(groups=G)))],
    "conv_transpose3d": [("", dict(N=2, Ci=2, Co=3, D=2, H=3, W=2),
                          lambda N, Ci, Co, D, H, W: ((x(N, Ci, D, H, W), x(Ci, Co, 2, 2, 3), x(Co)), dict(stride=2)))],
    "max_pool3d": [("", dict(N=2, C=3, D=2, H=4, W=3),
                    lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(kernel_size=2, padding=1))),
                   ("indices", dict(N=2, C=3, D=2, H=2, W=3),
                    lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(kernel_size=2, return_indices=True)))],
    # end of conv3d and the transposed convolutions
    "avg_pool1d": [("", ACT, _act(kernel_size=2))],
    "max_pool1d": [("", ACT, _act(kernel_size=2)), ("indices", ACT, _act(kernel_size=2, return_indices=True))],
    "adaptive_avg_pool1d": [("", ACT, _act(output_size=2))],
    "avg_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(kernel_size=2)))],
    "max_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(kernel_size=2)))],
    "adaptive_avg_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(output_size=2)))],
    "adaptive_max_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(output_size=2)))],
    # more pooling (one block)
    "avg_pool3d": [("", dict(N=2, C=3, D=2, H=4, W=3),
                    lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(kernel_size=2, padding=1, count_include_pad=False)))],
    "adaptive_avg_pool3d": [("", dict(N=2, C=3, D=2, H=4, W=3),
                             lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(output_size=(2, 3, 2))))],
    "adaptive_max_pool1d": [("", ACT, _act(output_size=2)), ("indices", ACT, _act(output_size=3, return_indices=True))],
    "adaptive_max_pool3d": [("indices", dict(N=2, C=3, D=2, H=4, W=3),
                             lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(output_size=2, return_indices=True)))],
    "lp_pool1d": [("", ACT, _act(norm_type=2, kernel_size=2))],
    "lp_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(norm_type=2, kernel_size=2))),
                  ("inf", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(norm_type=float("inf"), kernel_size=2)))],
    "lp_pool3d": [("", dict(N=2, C=3, D=2, H=4, W=3),
                   lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(norm_type=2, kernel_size=2)))],
    "max_unpool1d": [("", ACT, lambda N, C, L: ((x(N, C, L), _unpool_indices(N, C, L)), dict(kernel_size=2)))],
    "max_unpool2d": [("", dict(ACT, W=3),
                      lambda N, C, L, W: ((x(N, C, L, W), _unpool_indices(N, C, L, W)), dict(kernel_size=2)))],
    "max_unpool3d": [("", dict(N=2, C=3, D=2, H=3, W=2),
                      lambda N, C, D, H, W: ((x(N, C, D, H, W), _unpool_indices(N, C, D, H, W)), dict(kernel_size=2)))],
    "fractional_max_pool2d": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W), 2), dict(output_size=(L, W - 1)))),
                              ("ratio-indices", dict(ACT, W=4),
                               lambda N, C, L, W: ((x(N, C, L, W), 2), dict(output_ratio=(0.5, 0.5), return_indices=True)))],
    "fractional_max_pool3d": [("", dict(N=2, C=3, D=2, H=4, W=3),
                               lambda N, C, D, H, W: ((x(N, C, D, H, W), (1, 2, 2)), dict(output_ratio=0.5)))],
    # end of more pooling
    # padding
    "pad": [(mode, dict(ACT, W=4), lambda N, C, L, W, mode=mode: ((x(N, C, L, W),), dict(pad=(1, 2, 2, -1), mode=mode)))
            for mode in ("constant", "reflect", "replicate", "circular")] + [
        ("constant-value", ACT, _act(pad=(-1, 2), value=3.0))],
    # resampling
    "interpolate": [(f"{mode}-{len(S)}d", dict(N=2, C=3, **dict(zip("DHW"[-len(S):], S))),
                     lambda N, C, mode=mode, **S: ((x(N, C, *S.values()),), dict(size=(3,) * len(S), mode=mode)))
                    for mode, S in (("nearest", (4,)), ("nearest-exact", (2, 3)), ("linear", (4,)),
                                    ("bilinear", (2, 3)), ("bicubic", (2, 3)), ("trilinear", (2, 2, 3)),
                                    ("area", (2, 3)), ("area", (2, 2, 3)))] + [
        ("bicubic-antialias", dict(N=2, C=3, H=5, W=4),
         lambda N, C, H, W: ((x(N, C, H, W),), dict(size=(2, 3), mode="bicubic", antialias=True))),
        # lanczos (vision branch)
        ("lanczos", dict(N=2, C=3, H=5, W=4),
         lambda N, C, H, W: ((x(N, C, H, W),), dict(size=(2, 7), mode="lanczos", antialias=True)))],
    "grid_sample": [(f"{mode}-{pad}", dict(N=2, C=3, H=3, W=4, Ho=2, Wo=3),
                     lambda N, C, H, W, Ho, Wo, mode=mode, pad=pad: (
                         (x(N, C, H, W), x(N, Ho, Wo, 2)), dict(mode=mode, padding_mode=pad, align_corners=False)))
                    for mode, pad in (("bilinear", "zeros"), ("nearest", "border"), ("bicubic", "reflection"))] + [
        ("3d", dict(N=2, C=3, D=2, H=3, W=2, Do=2),
         lambda N, C, D, H, W, Do: ((x(N, C, D, H, W), x(N, Do, 2, 1, 3)), dict(align_corners=True)))],
    "affine_grid": [("2d", dict(N=2, C=3, H=3, W=4),
                     lambda N, C, H, W: ((x(N, 2, 3), (N, C, H, W)), dict(align_corners=False))),
                    ("3d", dict(N=2, C=3, D=2, H=3, W=4),
                     lambda N, C, D, H, W: ((x(N, 3, 4), (N, C, D, H, W)), dict(align_corners=True)))],
    # end of resampling
    # rearrangements
    "pixel_shuffle": [("", dict(N=2, C=2, H=2, W=3), lambda N, C, H, W: ((x(N, 4 * C, H, W), 2), {}))],
    "pixel_unshuffle": [("", dict(N=2, C=2, H=2, W=3), lambda N, C, H, W: ((x(N, C, 2 * H, 2 * W), 2), {}))],
    "channel_shuffle": [("", dict(N=2, C=2, L=3), lambda N, C, L: ((x(N, 2 * C, L), 2), {}))],
    "unfold": [("", dict(N=2, C=2, H=3, W=4), lambda N, C, H, W: ((x(N, C, H, W), 2), dict(padding=1)))],
    "fold": [("", dict(N=2, C=2, H=3, W=4),
              lambda N, C, H, W: ((x(N, 4 * C, (H + 1) * (W + 1)), (H, W), 2), dict(padding=1)))],
    "batch_norm": [
        ("train", ACT, _bn(True)), ("train-2d", ACT, _bn(True, spatial=False)),
        ("train-no-stats", ACT, _bn(True, stats=False)), ("train-no-affine", ACT, _bn(True, affine=False)),
        ("eval", ACT, _bn(False)), ("eval-2d", ACT, _bn(False, spatial=False)),
    ],
    "group_norm": [
        ("", dict(N=2, C=4, L=3), lambda N, C, L: ((x(N, C, L), 2, x(C), x(C)), {})),
        ("2d", dict(N=2, C=4), lambda N, C: ((x(N, C), 2, x(C), x(C)), {})),
        ("no-affine", dict(N=2, C=4, L=3), lambda N, C, L: ((x(N, C, L), 2), {})),
    ],
    # instance norm
    "instance_norm": [
        ("train", ACT, lambda N, C, L: ((x(N, C, L), torch.randn(C), torch.rand(C) + 0.5, x(C), x(C)), {})),
        ("no-stats", ACT, lambda N, C, L: ((x(N, C, L),), {})),
        ("eval", ACT, lambda N, C, L: ((x(N, C, L), torch.randn(C), torch.rand(C) + 0.5, x(C), x(C)),
                                       dict(use_input_stats=False))),
    ],
    # end of instance norm
    # local response norm
    "local_response_norm": [("", ACT, _act(size=3)),
                            ("4d", dict(ACT, W=2), lambda N, C, L, W: ((x(N, C, L, W),), dict(size=2)))],
    # end of local response norm
    "layer_norm": [
        ("", ACT, lambda N, C, L: ((x(N, C, L), (L,), x(L), x(L)), {})),
        ("2 dims", ACT, lambda N, C, L: ((x(N, C, L), (C, L), x(C, L), x(C, L)), {})),
        ("no-affine", ACT, lambda N, C, L: ((x(N, C, L), (L,)), {})),
    ],
    "rms_norm": [
        ("", ACT, lambda N, C, L: ((x(N, C, L), (L,), x(L)), {})),
        ("2 dims", ACT, lambda N, C, L: ((x(N, C, L), (C, L), x(C, L)), {})),
    ],
    "scaled_dot_product_attention": [
        ("", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa()),
        ("bool mask", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa("bool")),
        ("float mask", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa("float")),
        ("causal", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa(is_causal=True)),
        ("scale", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa(scale=0.3)),
        # (p = 1: the dropout path, without randomness: O = 0)
        ("dropout", dict(B=2, L=3, S=4, E=5, Ev=6), _sdpa("float", dropout_p=1.0)),
    ],
    "embedding": [
        ("", dict(N=2, L=3, V=5, D=4), lambda N, L, V, D: ((classes((N, L), V), x(V, D)), {})),
        ("padding_idx", dict(N=2, L=3, V=5, D=4),
         lambda N, L, V, D: ((classes((N, L), V), x(V, D)), dict(padding_idx=0))),
        ("scale_grad_by_freq", dict(N=2, L=3, V=5, D=4),
         lambda N, L, V, D: ((classes((N, L), V), x(V, D)), dict(scale_grad_by_freq=True))),
        ("max_norm", dict(N=2, L=3, V=5, D=4),
         lambda N, L, V, D: ((classes((N, L), V), x(V, D) * 3), dict(max_norm=1.0))),
        ("sparse", dict(N=2, L=3, V=5, D=4),
         lambda N, L, V, D: ((classes((N, L), V), x(V, D)), dict(sparse=True, padding_idx=1))),
    ],
    # embedding bags (one block): B bags of N indices into V rows of D, as a 2-D input or 1-D with offsets
    # (D = 0 only with a padding_idx: without one torch's sum and mean kernels index past a table of
    #  width 0 and raise, with one they give the empty (B, 0) result manualgrad gives for all)
    "embedding_bag": [
        *[(f"2-d {mode}", dict(B=2, N=3, V=5),
           lambda B, N, V, mode=mode: ((classes((B, N), V), x(V, 4)), dict(mode=mode)))
          for mode in ("sum", "mean", "max")],
        *[(f"offsets {mode}", dict(B=2, N=3, V=5, D=4),
           lambda B, N, V, D, mode=mode: ((classes((B * N,), V), x(V, D), torch.arange(B) * N),
                                          dict(mode=mode, padding_idx=0)))
          for mode in ("sum", "mean", "max")],
        ("offsets sparse max_norm", dict(B=2, N=3, V=5, D=4),
         lambda B, N, V, D: ((classes((B * N,), V), x(V, D) * 3, torch.arange(B) * N),
                             dict(mode="sum", padding_idx=0, sparse=True, max_norm=1.0))),
        ("per_sample_weights include_last_offset", dict(B=2, N=3, V=5),
         lambda B, N, V: ((classes((B * N,), V), x(V, 4), torch.arange(B + 1) * N),
                          dict(mode="sum", per_sample_weights=x(B * N), include_last_offset=True))),
    ],
    # end of embedding bags
    # weight normalization (one block): v of a conv weight, the norm over all dims but dim (-1: all)
    # (no size 0 along dim: torch's kernel then raises or dies of a division by zero, SIGFPE;
    #  manualgrad raises RuntimeError, tests/ops/test_weight_norm.py)
    "weight_norm": [
        ("dim=0", dict(I=3, K=4), lambda I, K: ((x(2, I, K), x(2, 1, 1)), dict(dim=0))),
        ("dim=2", dict(O=2, I=3), lambda O, I: ((x(O, I, 4), x(1, 1, 4)), dict(dim=2))),
        ("dim=-1", dict(O=2, I=3, K=4), lambda O, I, K: ((x(O, I, K), x()), dict(dim=-1))),
    ],
    # end of weight normalization
    "multi_head_attention_forward": [("", dict(L=3, S=4, N=2, E=4), _mha)],
    "mm": [("", dict(M=2, K=3, N=4), lambda M, K, N: ((x(M, K), x(K, N)), {}))],
    "bmm": [("", dict(B=2, M=2, K=3, N=4), lambda B, M, K, N: ((x(B, M, K), x(B, K, N)), {}))],
    "addmm": [("", dict(M=2, K=3, N=4), lambda M, K, N: ((x(M, N), x(M, K), x(K, N)), dict(beta=0.5, alpha=2))),
              ("broadcast", dict(M=2, K=3, N=4), lambda M, K, N: ((x(N), x(M, K), x(K, N)), {}))],
    "baddbmm": [("", dict(B=2, M=2, K=3, N=4),
                 lambda B, M, K, N: ((x(B, M, N), x(B, M, K), x(B, K, N)), dict(beta=0.5, alpha=2)))],
    # more activations (ops/activation_more.py)
    **{name: [("", ACT, _act())] for name in ("hardsigmoid", "hardtanh", "logsigmoid", "relu6", "selu", "softshrink",
                                               "hardshrink", "softsign", "tanhshrink", "celu")},
    "threshold": [("", ACT, _act(threshold=0.1, value=2.0))],
    "softmin": [("dim=1", ACT, _act(dim=1)), ("dim=-1", ACT, _act(dim=-1))],
    "prelu": [("one", ACT, lambda N, C, L: ((x(N, C, L), x(1)), {})),
              ("channels", ACT, lambda N, C, L: ((x(N, C, L), x(C)), {}))],
    "rrelu": [("train", ACT, _act(training=True)), ("eval", ACT, _act())],
    # in place: on a tensor that does not require grad (a leaf that does is refused by both)
    **{name: [("", ACT, lambda N, C, L: ((torch.randn(N, C, L),), {}))]
       for name in ("hardtanh_", "selu_", "celu_", "rrelu_")},
    "threshold_": [("", ACT, lambda N, C, L: ((torch.randn(N, C, L), 0.1, 2.0), {}))],
    # distances and normalization (ops/distance.py)
    "normalize": [("dim=1", ACT, _act()), ("p=1 dim=-1", ACT, _act(p=1.0, dim=-1))],
    "cosine_similarity": [("", ACT, lambda N, C, L: ((x(N, C, L), x(N, C, L)), {})),
                          ("broadcast", ACT, lambda N, C, L: ((x(N, C, L), x(C, 1)), {}))],
    "pairwise_distance": [("", dict(N=3, D=4), lambda N, D: ((x(N, D), x(N, D)), {})),
                          ("p=inf keepdim", dict(N=3, D=4), lambda N, D: ((x(N, D), x(D)), dict(p=float("inf"), keepdim=True)))],
    # (no N = 0: torch's pdist backward segfaults on zero rows; tests/ops/test_distance.py covers it)
    "pdist": [("", dict(D=4), lambda D: ((x(3, D),), {})), ("p=1", dict(D=4), lambda D: ((x(3, D),), dict(p=1.0)))],
    # more dropouts (ops/dropout_more.py)
    "alpha_dropout": [("train", ACT, _act(p=0.5, training=True)), ("eval", ACT, _act(p=0.5))],
    "feature_alpha_dropout": [("train", ACT, _act(p=0.5, training=True)), ("eval", ACT, _act(p=0.5))],
    "dropout1d": [("train", ACT, _act(p=0.5)), ("unbatched", dict(C=3, L=4), lambda C, L: ((x(C, L),), dict(p=0.5)))],
    "dropout2d": [("train", dict(ACT, W=2), lambda N, C, L, W: ((x(N, C, L, W),), dict(p=0.5)))],
    "dropout3d": [("train", dict(ACT, W=2), lambda N, C, L, W: ((x(N, C, L, W, 2),), dict(p=0.5))),
                  ("unbatched", dict(ACT, W=2), lambda N, C, L, W: ((x(N, C, L, W),), dict(p=0.5)))],
    # metric-learning losses (ops/loss_metric.py)
    "cosine_embedding_loss": [(r, dict(N=3, D=4), lambda N, D, r=r: ((x(N, D), x(N, D), torch.tensor([1.0, -1.0, 1.0])[:N]),
                                                                    dict(margin=0.2, reduction=r)))
                              for r in ("mean", "sum", "none")],
    "triplet_margin_loss": [(f"{r} swap={s}", dict(N=3, D=4), lambda N, D, r=r, s=s: ((x(N, D), x(N, D), x(N, D)),
                                                                                       dict(swap=s, reduction=r)))
                            for r in ("mean", "sum", "none") for s in (False, True)],
    "triplet_margin_with_distance_loss": [(r, dict(N=3, D=4), lambda N, D, r=r: ((x(N, D), x(N, D), x(N, D)),
                                                                               dict(swap=True, reduction=r)))
                                          for r in ("mean", "sum", "none")],
    # end of metric-learning losses
    # functional leftovers: in-place activations, upsample aliases, *_with_indices, gumbel_softmax,
    # native_channel_shuffle, conv_tbc
    **{name: [("", ACT, lambda N, C, L: ((torch.randn(N, C, L),), {}))] for name in ("relu_", "elu_", "leaky_relu_")},
    "upsample": [("nearest-1d", ACT, _act(scale_factor=2)),
                 ("bilinear-2d", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(size=(3, 5), mode="bilinear")))],
    "upsample_nearest": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(scale_factor=2)))],
    "upsample_bilinear": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(size=(3, 5))))],
    "max_pool1d_with_indices": [("", ACT, _act(kernel_size=2))],
    "max_pool2d_with_indices": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(kernel_size=2)))],
    "max_pool3d_with_indices": [("", dict(N=2, C=3, D=2, H=2, W=3),
                                 lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(kernel_size=2)))],
    "adaptive_max_pool1d_with_indices": [("", ACT, _act(output_size=3))],
    "adaptive_max_pool2d_with_indices": [("", dict(ACT, W=4), lambda N, C, L, W: ((x(N, C, L, W),), dict(output_size=2)))],
    "adaptive_max_pool3d_with_indices": [("", dict(N=2, C=3, D=2, H=4, W=3),
                                          lambda N, C, D, H, W: ((x(N, C, D, H, W),), dict(output_size=2)))],
    "fractional_max_pool2d_with_indices": [("", dict(ACT, W=4),
                                            lambda N, C, L, W: ((x(N, C, L, W), 2), dict(output_ratio=(0.5, 0.5))))],
    "fractional_max_pool3d_with_indices": [("", dict(N=2, C=3, D=2, H=4, W=3),
                                            lambda N, C, D, H, W: ((x(N, C, D, H, W), (1, 2, 2)), dict(output_ratio=0.5)))],
    "gumbel_softmax": [("soft", ACT, _act(dim=1)), ("hard", ACT, _act(tau=0.5, hard=True))],
    "native_channel_shuffle": [("", dict(N=2, C=2, L=3), lambda N, C, L: ((x(N, 2 * C, L), 2), {}))],
    "conv_tbc": [(f"pad={p}", dict(T=5, B=2, Ci=3, Co=4), lambda T, B, Ci, Co, p=p: ((x(T, B, Ci), x(2, Ci, Co), x(Co), p), {}))
                 for p in (0, 1)],
    # end of functional leftovers
    # ctc_loss (ops/ctc.py): torch refuses empty log_probs (T, N or C = 0); S = 0 is empty targets
    "ctc_loss": [(r, dict(T=4, N=2, C=3, S=2), lambda T, N, C, S, r=r: (
        (x(T, N, C).log_softmax(2).detach().requires_grad_(), torch.randint(1, max(C, 2), (N, S)),
         torch.full((N,), T), torch.full((N,), S)), dict(reduction=r))) for r in ("mean", "sum", "none")],
    # end of ctc_loss
    "matmul": [
        ("2d", dict(M=2, K=3, N=4), lambda M, K, N: ((x(M, K), x(K, N)), {})),
        ("1d", dict(K=3), lambda K: ((x(K), x(K)), {})),
        ("batched", dict(B=2, M=2, K=3, N=4), lambda B, M, K, N: ((x(B, 1, M, K), x(3, K, N)), {})),
        ("vector", dict(B=2, M=2, K=3), lambda B, M, K: ((x(B, M, K), x(K)), {})),
    ],
}


# Where torch's gradient is not the sum over nothing: manualgrad gives that sum, 0. The test checks
# that torch still does what is written here (when torch changes, the entry goes).
TORCH_DIFFERS = {
    # torch's backward kernel refuses the channel-less gradient of the output its forward made
    ("adaptive_avg_pool1d", "", "C"): "raises",
    ("adaptive_avg_pool2d", "", "C"): "raises",
    ("interpolate", "area-2d", "C"): "raises",  # resampling: area is adaptive_avg_pool2d
    # rearrangements: torch's pixel_(un)shuffle return an empty input in its own shape, which its
    # backward then refuses; its channel_shuffle backward asks for C / g = 0 groups
    **{(name, "", dim): "raises" for name in ("pixel_shuffle", "pixel_unshuffle") for dim in "NCHW"},
    ("channel_shuffle", "", "C"): "raises",
    # torch's native_channel_shuffle has no derivative at all: its backward raises for any input
    **{("native_channel_shuffle", "", dim): "raises" for dim in "NCL"},
    # torch's dW of groups without elements is nan (its 1/std of nothing, times an empty sum)
    ("group_norm", "", "L"): "nan",
    # multi_margin_loss, multilabel_margin_loss: torch's kernels reduce no rows to memory they never
    # wrote (a different value from run to run); manualgrad gives the sum of nothing, 0, and its mean, nan
    **{(name, variant, "N"): "uninitialized" for name, variant in [
        ("multi_margin_loss", "mean"), ("multi_margin_loss", "sum"), ("multi_margin_loss", "p=2-weight"),
        ("multilabel_margin_loss", "mean"), ("multilabel_margin_loss", "sum")]},
}


def _torch_fn(name):
    return TORCH.get(name) or getattr(TF, name, None) or getattr(torch, name)


def _params():
    for name, cases in sorted(CASES.items()):
        for variant, sizes, build in cases:
            for dim in sizes:
                yield pytest.param(name, variant, sizes, build, dim, id=f"{name}-{variant}-{dim}=0".replace("--", "-"))


def test_every_functional_op_has_empty_cases():
    assert sorted(F.__all__) == sorted(CASES), "add the new op's sample inputs to CASES"


def _copy(obj, memo):
    """Fresh leaves with the same values; a tensor passed twice stays one tensor."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().clone().requires_grad_(obj.requires_grad)
        return memo[id(obj)]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(o, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _copy(v, memo) for k, v in obj.items()}
    return obj


def _run(fn, args, kwargs, grad_outputs=None):
    """Outputs, the gradient of every leaf that requires grad, and every other tensor argument
    after the call (the buffers an op updates in place: batch_norm's running stats, embedding's
    max_norm weight)."""
    memo = {}
    args, kwargs = _copy(args, memo), _copy(kwargs, memo)
    torch.manual_seed(0)
    out = fn(*args, **kwargs)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if grad_outputs is None:
        grad_outputs = [torch.randn_like(o) if isinstance(o, torch.Tensor) and o.requires_grad else None
                        for o in outputs]
    leaves = [t for t in memo.values() if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    buffers = [t for t in memo.values() if not t.requires_grad]
    return outputs, grads, buffers, grad_outputs


def _same(a, b, what):
    assert (a is None) == (b is None), f"{what}: manualgrad gives {a}, torch gives {b}"
    if b is not None:
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)}, torch's {tuple(b.shape)}"
        # (float32 tolerances: a non-empty result, e.g. linear's bias for 0 input features, is
        #  computed by other kernels than torch's)
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name, variant, sizes, build, dim", list(_params()))
def test_zero_size_input_behaves_like_torch(name, variant, sizes, build, dim):
    args, kwargs = build(**dict(sizes, **{dim: 0}))
    mg_fn, th_fn = getattr(F, name), _torch_fn(name)
    differs = TORCH_DIFFERS.get((name, variant, dim))
    if differs is not None:
        _assert_torch_differs_and_gradients_are_zero(mg_fn, th_fn, args, kwargs, differs)
        return
    try:
        th_out, th_grads, th_buffers, dys = _run(th_fn, args, kwargs)
    except Exception:  # noqa: BLE001 - torch refuses this input, in forward or backward: so must manualgrad
        assert_raises_like_torch(lambda: _run(mg_fn, args, kwargs), lambda: _run(th_fn, args, kwargs))
        return
    mg_out, mg_grads, mg_buffers, _ = _run(mg_fn, args, kwargs, dys)
    assert len(mg_out) == len(th_out)
    for i, (a, b) in enumerate(zip(mg_out, th_out)):
        _same(a, b, f"output {i}")
    for i, (a, b) in enumerate(zip(mg_grads, th_grads)):
        _same(a, b, f"gradient of leaf {i}")
    for i, (a, b) in enumerate(zip(mg_buffers, th_buffers)):
        _same(a, b, f"tensor argument {i} after the call")


def _assert_torch_differs_and_gradients_are_zero(mg_fn, th_fn, args, kwargs, differs):
    if differs == "uninitialized":  # nothing of torch's to compare: the reduction of nothing
        th_fn = lambda *a, reduction="mean", **k: torch.tensor(0.0 if reduction == "sum" else torch.nan)  # noqa: E731
    elif differs == "raises":
        with pytest.raises(RuntimeError):
            _run(th_fn, args, kwargs)
    else:
        _, th_grads, _, _ = _run(th_fn, args, kwargs)
        assert any(g is not None and g.isnan().any() for g in th_grads), "torch's gradient is no longer nan"
    memo = {}
    th_out = th_fn(*_copy(args, memo), **_copy(kwargs, memo))
    mg_out, mg_grads, _, _ = _run(mg_fn, args, kwargs)
    _same(mg_out[0], th_out, "output")
    memo = {}
    _copy((args, kwargs), memo)  # the leaves, in _run's order
    leaves = [t for t in memo.values() if t.requires_grad]
    assert len(mg_grads) == len(leaves)
    for i, (g, leaf) in enumerate(zip(mg_grads, leaves)):
        _same(g, torch.zeros_like(leaf), f"gradient of leaf {i}")
