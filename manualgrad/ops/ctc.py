"""ctc_loss: connectionist temporal classification (Graves et al. 2006, "Connectionist Temporal
Classification: Labelling Unsegmented Sequence Data with Recurrent Neural Networks").

Shapes: log_probs lp (T, N, C) (log-probabilities over C classes, one of them the blank),
targets l padded to (N, S), input lengths T_n <= T, target lengths S_n <= S.

The extended label sequence l' interleaves blanks with the labels, L = 2 S + 1:

    l' = (blank, l_1, blank, l_2, ..., l_S, blank)                  (N, L)

A path moves through l' one state per time step: stay on s, step to s + 1, or skip the blank
between two labels (s -> s + 2) when l'_{s+2} is a label different from l'_s. In log space,
with both alpha and beta including the emission at t (torch's convention):

    log alpha_0(s)   = lp_0(l'_s) for s = 0, 1;  -inf elsewhere
    log alpha_t(s)   = lp_t(l'_s) + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2) if skip(s))
    log beta_{T_n-1}(s) = lp_{T_n-1}(l'_s) for s = 2 S_n, 2 S_n - 1;  -inf elsewhere
    log beta_t(s)    = lp_t(l'_s) + logsumexp(beta_{t+1}(s), beta_{t+1}(s+1), beta_{t+1}(s+2) if skip(s+2))
    nll              = -log p(l | x) = -logsumexp(alpha_{T_n-1}(2 S_n), alpha_{T_n-1}(2 S_n - 1))

with skip(s) = [l'_s != l'_{s-2}]: Graves's "l'_s is a label other than l'_{s-2}", since for even s
both are blanks. (Written as torch checks it: a target holding the blank index, which torch accepts,
is then a label that may be skipped to.) Gradient (Graves eq. 14-16): alpha_t(s) beta_t(s) / y_t(l'_s)
is the probability mass of the paths through s at t, so

    d nll / d lp_t(c) = -sum_{s: l'_s = c} exp(log alpha_t(s) + log beta_t(s) - lp_t(c) + nll)

Every path is in exactly one state at each t < T_n, so the occupancies gamma_t(s) =
exp(log alpha_t(s) + log beta_t(s) - lp_t(l'_s) + nll) sum to 1 over s. torch's
ctc_loss_backward returns exp(lp_t(c)) plus the sum above: the gradient with respect to the logits
u of lp = log_softmax(u), since log_softmax's backward g - exp(lp) sum_c g adds exp(lp) to a g
summing to -1 and leaves one summing to 0 unchanged. Through a log_softmax both are the same
gradient; on lp itself they differ. manualgrad returns torch's (a drop-in gives the same .grad;
gradchecks go through a log_softmax). For t >= T_n the gradient is 0.
zero_infinity: a loss of inf (no path fits: S_n + repeats > T_n) and its gradient become 0.
Reductions: 'none' (N,), 'sum', 'mean' = mean_n nll_n / max(S_n, 1).
The recursions are written out twice: ctc_alpha and ctc_beta above as the formulas read (the
reference, and what double backward differentiates: with create_graph the backward recomputes
them from lp, slow, for checks), and ctc_alpha_beta_fast, tested equal, which runs both in one
loop of three torch calls per step. With a gradient to come the forward runs both and keeps the
occupancies gamma (T, N, L) and nll, the size of what torch keeps (log alpha and nll); backward is
then one vectorised pass from gamma.
"""
import torch

from ._apply import FLOAT32, apply
from ._checks import can_inspect_values, get_reduction, is_transformed

NEG_INF = float("-inf")


def _logsumexp(*xs):
    """Elementwise log(sum_i exp(x_i)); -inf where every x_i is -inf, with finite gradients there
    (torch.logsumexp's gradient is nan at all -inf, which double backward would spread)."""
    m = xs[0]
    for x in xs[1:]:
        m = torch.maximum(m, x)
    none = m == NEG_INF
    # any finite shift gives the same value and gradient: no gradient through it
    m0 = torch.where(none, 0.0, m).detach()
    total = sum(torch.exp(x - m0) for x in xs)
    return torch.where(none, NEG_INF, m0 + torch.log(torch.where(none, 1.0, total)))


def _shift(x, k):
    """x moved k places along dim 1 (right for k > 0, left for k < 0), -inf filling in."""
    n, length = x.shape
    fill = x.new_full((n, abs(k)), NEG_INF)
    return torch.cat([fill, x], 1)[:, :length] if k > 0 else torch.cat([x, fill], 1)[:, -k:]


def extended_labels(targets, target_lengths, blank):
    """l' (N, L = 2 S + 1) (blanks past 2 S_n), skip(s) and valid s < 2 S_n + 1, each (N, L)."""
    ext = extend(targets, target_lengths, blank)
    s = torch.arange(ext.shape[1], device=targets.device)
    # skip(s): s - 2 -> s allowed when l'_s differs from l'_{s-2} (never for even s: both blank)   (N, L)
    skip = (s >= 2) & (ext != torch.cat([ext[:, :2], ext[:, :-2]], 1))
    valid = s < 2 * target_lengths[:, None] + 1
    return ext, skip, valid


def extend(targets, target_lengths, blank):
    """l' (N, L = 2 S + 1), blanks past 2 S_n."""
    n, s_max = targets.shape
    k = torch.arange(s_max, device=targets.device)
    # labels past S_n are padding: blank, so they never allow a skip       (N, S)
    labels = targets.masked_fill(k >= target_lengths[:, None], blank)
    # l' = (blank, l_1, blank, ..., l_S, blank)                               (N, L)
    ext = torch.stack([torch.full_like(labels, blank), labels], 2).reshape(n, 2 * s_max)
    return torch.cat([ext, ext.new_full((n, 1), blank)], 1)


def ctc_alpha(lp, ext, skip, valid, input_lengths, target_lengths):
    """log alpha (T, N, L) and nll (N,), the recursion above over t, vectorized over n and s."""
    t_max, n, length = lp.shape[0], *ext.shape
    # lp_t(l'_s)                                                             (T, N, L)
    lpe = lp.gather(2, ext.expand(t_max, n, length))
    s = torch.arange(length, device=lp.device)
    # alpha_0: a path starts on the first blank or the first label           (N, L)
    alpha = [torch.where((s <= 1) & valid, lpe[0], NEG_INF)]
    for t in range(1, t_max):
        prev = alpha[-1]
        # alpha_t(s) = lp_t(l'_s) + lse(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2) if skip(s))   (N, L)
        step = _logsumexp(prev, _shift(prev, 1), torch.where(skip, _shift(prev, 2), NEG_INF))
        alpha.append(torch.where(valid, lpe[t] + step, NEG_INF))
    log_alpha = torch.stack(alpha)
    return log_alpha, ctc_nll(log_alpha, input_lengths, target_lengths)


def ctc_nll(log_alpha, input_lengths, target_lengths, lse=_logsumexp):
    """nll (N,) from log alpha (T, N, L): the paths that end on l'_{2 S_n} or l'_{2 S_n - 1} at T_n - 1.
    (lse: torch.logaddexp where no gradient is taken: one call, the same value)"""
    n, length = log_alpha.shape[1:]
    # alpha at each sequence's last step T_n - 1                             (N, L)
    last = log_alpha.gather(0, (input_lengths - 1).clamp_min(0).view(1, n, 1).expand(1, n, length))[0]
    end = 2 * target_lengths[:, None]
    # nll = -lse(alpha(2 S_n), alpha(2 S_n - 1)); the label end only if S_n > 0   (N,)
    a_blank = last.gather(1, end)[:, 0]
    a_label = torch.where(end > 0, last.gather(1, (end - 1).clamp_min(0)), NEG_INF)[:, 0]
    nll = -lse(a_blank, a_label)
    # no time step (T_n = 0): only the empty target fits, with probability 1
    return torch.where(input_lengths == 0, torch.where(target_lengths == 0, 0.0, float("inf")), nll)


def ctc_beta(lp, ext, skip, valid, input_lengths, target_lengths):
    """log beta (T, N, L), the same recursion from each sequence's end T_n - 1 backwards."""
    t_max, n, length = lp.shape[0], *ext.shape
    lpe = lp.gather(2, ext.expand(t_max, n, length))
    s = torch.arange(length, device=lp.device)
    # a path ends on the last blank or the last label                        (N, L)
    ends = ((s == 2 * target_lengths[:, None]) | (s == 2 * target_lengths[:, None] - 1)) & valid
    # skip from s to s + 2 is skip(s + 2)                                     (N, L)
    skip_next = torch.cat([skip, skip.new_zeros(n, 2)], 1)[:, 2:]
    last_t = (input_lengths - 1)[:, None]
    nxt = lpe.new_full((n, length), NEG_INF)
    beta = []
    for t in range(t_max - 1, -1, -1):
        # beta_t(s) = lp_t(l'_s) + lse(beta_{t+1}(s), beta_{t+1}(s+1), beta_{t+1}(s+2) if skip(s+2))   (N, L)
        step = _logsumexp(nxt, _shift(nxt, -1), torch.where(skip_next, _shift(nxt, -2), NEG_INF))
        rec = torch.where(valid, lpe[t] + step, NEG_INF)
        # t = T_n - 1: the end states; t > T_n - 1: past the sequence, -inf   (N, L)
        nxt = torch.where(t == last_t, torch.where(ends, lpe[t], NEG_INF), torch.where(t < last_t, rec, NEG_INF))
        beta.append(nxt)
    return torch.stack(beta[::-1])


def ctc_occupancy(lpe, log_alpha, log_beta, nll):
    """gamma (T, N, L): the probability that a path of l is in state s at t; lpe = lp_t(l'_s) (T, N, L)."""
    # (no path: alpha beta = 0 everywhere; a finite nll there keeps exp and its derivatives nan-free)
    nll = torch.where(torch.isinf(nll), 0.0, nll)
    # gamma_t(s) = alpha_t(s) beta_t(s) / (y_t(l'_s) p(l|x)), <= 1              (T, N, L)
    return (log_alpha + log_beta).sub_(lpe).add_(nll[:, None]).exp_()


def ctc_grad(lp, ext, input_lengths, gamma, nll, zero_infinity):
    """torch's gradient of each nll_n wrt lp (T, N, C), as derived in the module docstring."""
    t_max, n, c = lp.shape
    # sum over the states s with l'_s = c                                     (T, N, C)
    occupancy = torch.zeros_like(lp).scatter_add(2, ext.expand(t_max, n, ext.shape[1]), gamma)
    # d nll / d lp_t(c) = exp(lp_t(c)) - sum_{s: l'_s = c} gamma_t(s)         (T, N, C)
    grad = torch.exp(lp) - occupancy
    # no gradient past each sequence's end t >= T_n; no path (nll = inf): torch's exp(-inf + inf)
    # is nan for every class, with zero_infinity the gradient is 0            (T, N, 1)
    inside = torch.arange(t_max, device=lp.device)[:, None, None] < input_lengths[:, None]
    impossible = torch.isinf(nll)[:, None]
    other = torch.where(inside & impossible, 0.0 if zero_infinity else float("nan"), 0.0).to(grad.dtype)
    return torch.where(inside & ~impossible, grad, other)


# ---------------------------------------------------------------------------------------------
# the fast form: both recursions in one loop of three torch calls per time step
#
# At these sizes (N L ~ 300 numbers per step) a step costs what its torch calls cost in Python
# dispatch (~0.8 us each, ~1.2-1.8 us with the arithmetic at N = 8, L = 41), not arithmetic:
# ctc_alpha's step makes ~25 calls, this one 3, and beta runs in the same loop as N more sequences
# (so a step costs about the same). The plain forms above are the reference (tested equal) and
# run where a graph is recorded (double backward differentiates them) or under a transform (the
# loop writes into one buffer in place).

def can_run_fast(lp):
    return not torch.is_grad_enabled() and not is_transformed(lp)


def _alpha_recursion(lpe, skip, start):
    """log alpha (T, N, L) of lpe = lp_t(l'_s), -inf where s is not valid (T, N, L), and skip (N, L);
    start (N, L): the states a path is in before t = 0 (log 1 there, -inf elsewhere)."""
    t_max, n, length = lpe.shape
    # rows: the start, then alpha_0 .. alpha_{T-1}; two -inf columns in front, so that
    # alpha(s - 2), alpha(s - 1), alpha(s) are views                          (T + 1, N, L + 2)
    buf = lpe.new_full((t_max + 1, n, length + 2), NEG_INF)
    buf[0, :, 2:].masked_fill_(start, 0.0)
    # step t reads row t as (3, N, L): [alpha(s - 2), alpha(s - 1), alpha(s)]
    prev = buf.as_strided((t_max, 3, n, length), (n * (length + 2), 1, length + 2, 1)).unbind(0)
    out = buf[1:, :, 2:].unbind(0)
    # what is added to each: lp_t(l'_s), and -inf to alpha(s - 2) where no skip     (T, 3, N, L)
    no_skip = torch.where(skip, 0.0, NEG_INF).to(lpe.dtype)
    zero = torch.zeros_like(no_skip)
    add = (lpe.unsqueeze(1) + torch.stack([no_skip, zero, zero])).unbind(0)
    x = lpe.new_empty(3, n, length)
    x0, x1, x2 = x.unbind(0)
    u = lpe.new_empty(n, length)
    plus, logaddexp = torch.add, torch.logaddexp  # (looked up once: the loop is all call overhead)
    for prev_t, add_t, alpha_t in zip(prev, add, out):
        # alpha_t(s) = lse(alpha_{t-1}(s-2) if skip(s), alpha_{t-1}(s-1), alpha_{t-1}(s)) + lp_t(l'_s)
        # (lp_t added to each term: the same sum)                                 (N, L)
        plus(prev_t, add_t, out=x)
        logaddexp(x0, x1, out=u)
        logaddexp(u, x2, out=alpha_t)
    return buf[1:, :, 2:]


def ctc_alpha_beta_fast(lpe, skip, valid, input_lengths, target_lengths, with_beta=True):
    """ctc_alpha's log alpha (T, N, L) and nll (N,), and ctc_beta's log beta (T, N, L) (or None),
    from lpe = lp_t(l'_s) (T, N, L).

    beta is alpha with time and states flipped, B_r(j) = beta_{T-1-r}(L-1-j), run next to alpha as
    N more sequences. It starts (at t = T) on s = 2 S_n, and past each sequence (t >= T_n) it keeps
    that start alone: there lp is taken as 0 on s = 2 S_n and -inf elsewhere.
    """
    t_max, n, length = lpe.shape
    s = torch.arange(length, device=lpe.device)
    first = (s == 0).expand(n, length)
    if not with_beta:
        # lp_t(l'_s), -inf past each l'                                      (T, N, L)
        log_alpha = _alpha_recursion(lpe.masked_fill(~valid, NEG_INF), skip, first)
        return log_alpha.contiguous(), ctc_nll(log_alpha, input_lengths, target_lengths, torch.logaddexp), None
    end = s == 2 * target_lengths[:, None]
    after = torch.arange(t_max, device=lpe.device)[:, None, None] >= input_lengths[:, None]
    # alpha's lp: lp_t(l'_s), -inf past each l'; beta's: the same flipped, and past T_n 0 on the
    # end state, -inf elsewhere                                               (T, 2 N, L)
    lpe_both, neg_inf = lpe.new_empty(t_max, 2 * n, length), lpe.new_full((), NEG_INF)
    torch.where(valid, lpe, neg_inf, out=lpe_both[:, :n])
    torch.where(after.flip(0), torch.where(end, 0.0, neg_inf).flip(1), lpe_both[:, :n].flip(0, 2), out=lpe_both[:, n:])
    # beta steps from s + 2 into s where skip(s + 2)                          (N, L)
    skip_beta = torch.cat([skip, skip.new_zeros(n, 2)], 1)[:, 2:]
    both = _alpha_recursion(lpe_both, torch.cat([skip, skip_beta.flip(1)]), torch.cat([first, end.flip(1)]))
    # beta_t(s) = B_{T-1-t}(L-1-s); -inf past T_n                              (T, N, L)
    log_beta = both[:, n:].flip(0, 2).masked_fill_(after, NEG_INF)
    # nll = -log p(l | x) = -lse(beta_0(0), beta_0(1)): every path starts there (with T_n = 0,
    # beta_0 keeps the start on 2 S_n: nll = 0 for an empty target, inf otherwise)   (N,)
    beta_0 = both[-1, n:].flip(1)
    nll = -(beta_0[:, 0] if length == 1 else torch.logaddexp(beta_0[:, 0], beta_0[:, 1]))
    return both[:, :n], nll, log_beta


def _scale(target_lengths, reduction, dtype):
    """d loss / d nll_n: 1 (none, sum) or 1 / (N max(S_n, 1)) (mean).     (N,)"""
    if reduction == "mean":
        return 1 / (target_lengths.clamp_min(1).to(dtype) * target_lengths.numel())
    return torch.ones(target_lengths.shape, dtype=dtype, device=target_lengths.device)


def _reduce(losses, scale, reduction):
    # none: (N,); sum: sum_n l_n; mean: mean_n l_n / max(S_n, 1) = sum_n scale_n l_n   ()
    return losses if reduction == "none" else (losses * scale).sum()


class CTCLossFunction(torch.autograd.Function):
    """Keeps what torch keeps, nll and one (T, N, L) tensor: gamma where the fast form ran both
    recursions in forward (keep_gamma: a gradient is to come), else log alpha."""
    autocast = FLOAT32  # a loss: float32 (torch's autocast lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(lp, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, keep_gamma):
        ext, skip, valid = extended_labels(targets, target_lengths, blank)
        # lp_t(l'_s)                                                           (T, N, L)
        lpe = lp.gather(2, ext.expand(lp.shape[0], *ext.shape))
        if can_run_fast(lp):
            log_alpha, nll, log_beta = ctc_alpha_beta_fast(lpe, skip, valid, input_lengths, target_lengths,
                                                           with_beta=keep_gamma)
        else:
            log_alpha, nll = ctc_alpha(lp, ext, skip, valid, input_lengths, target_lengths)
            log_beta = ctc_beta(lp, ext, skip, valid, input_lengths, target_lengths) if keep_gamma else None
        kept = ctc_occupancy(lpe, log_alpha, log_beta, nll) if keep_gamma else log_alpha
        # zero_infinity: a loss of inf (no path) becomes 0                    (N,)
        # (a copy without it: nll is also an output, marked non-differentiable)
        losses = torch.where(torch.isinf(nll), 0.0, nll) if zero_infinity else nll.clone()
        return _reduce(losses, _scale(target_lengths, reduction, lp.dtype), reduction), kept, nll

    @staticmethod
    def setup_context(ctx, inputs, output):
        lp, targets, input_lengths, target_lengths, blank, ctx.reduction, ctx.zero_infinity, ctx.keep_gamma = inputs
        _, kept, nll = output
        ctx.mark_non_differentiable(kept, nll)
        ctx.blank = blank
        ctx.save_for_backward(lp, targets, input_lengths, target_lengths, kept, nll)
        ctx.save_for_forward(lp, targets, input_lengths, target_lengths, kept, nll)

    @staticmethod
    def _grad(ctx, saved):
        lp, targets, input_lengths, target_lengths, kept, nll = saved
        if ctx.keep_gamma and not torch.is_grad_enabled():
            ext, gamma = extend(targets, target_lengths, ctx.blank), kept
        else:
            ext, skip, valid = extended_labels(targets, target_lengths, ctx.blank)
            # lp_t(l'_s)                                                       (T, N, L)
            lpe = lp.gather(2, ext.expand(lp.shape[0], *ext.shape))
            if can_run_fast(lp):
                log_alpha, nll, log_beta = ctc_alpha_beta_fast(lpe, skip, valid, input_lengths, target_lengths)
            else:
                # with a graph recorded (double backward): alpha and nll as functions of lp
                log_alpha, nll = (ctc_alpha(lp, ext, skip, valid, input_lengths, target_lengths)
                                  if torch.is_grad_enabled() else (kept, nll))
                log_beta = ctc_beta(lp, ext, skip, valid, input_lengths, target_lengths)
            gamma = ctc_occupancy(lpe, log_alpha, log_beta, nll)
        grad = ctc_grad(lp, ext, input_lengths, gamma, nll, ctx.zero_infinity)
        return grad, _scale(target_lengths, ctx.reduction, lp.dtype)

    @staticmethod
    def backward(ctx, dout, _kept, _nll):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        grad, scale = CTCLossFunction._grad(ctx, ctx.saved_tensors)
        # d nll_n = dout_n (none) or dout scale_n (sum, mean)                 (N,)
        dnll = dout * scale
        # dlp = dnll_n d nll_n / d lp                                          (T, N, C)
        return grad * dnll[:, None], None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dlp, *_):
        grad, scale = CTCLossFunction._grad(ctx, ctx.saved_tensors)
        # d nll_n = sum_{t, c} d nll_n / d lp_t(c) dlp_t(c)                   (N,)
        dnll = (grad * dlp).sum((0, 2))
        # gamma or log alpha, and nll are non-differentiable outputs: no tangent
        return _reduce(dnll, scale, ctx.reduction), None, None


def _check_length_types(input_lengths, target_lengths):
    """torch's two overloads: both lengths tensors, or both sequences of ints."""
    tensors = isinstance(input_lengths, torch.Tensor), isinstance(target_lengths, torch.Tensor)
    ints = all(isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v)
               for v in (input_lengths, target_lengths))
    if not (all(tensors) or ints):
        raise TypeError("ctc_loss(): input_lengths and target_lengths must both be tensors or both tuples of "
                        f"ints, got {type(input_lengths).__name__} and {type(target_lengths).__name__}")


def _lengths(lengths, name, n, device):
    t = torch.as_tensor(lengths, device=device)
    if t.is_floating_point() or t.is_complex():
        raise RuntimeError(f"{name} must be integral")
    t = t.reshape(-1).long()
    if t.numel() != n:
        raise RuntimeError(f"{name} must be of size batch_size")
    return t


def _to_padded(targets, target_lengths):
    """Concatenated targets (sum S_n,) as padded (N, max S_n): row n is l_n then zeros."""
    s_max = int(target_lengths.max()) if target_lengths.numel() else 0
    starts = target_lengths.cumsum(0) - target_lengths
    k = torch.arange(s_max, device=targets.device)
    index = (starts[:, None] + k).clamp(max=max(targets.numel() - 1, 0))
    padded = targets[index] if targets.numel() else targets.new_zeros(index.shape)
    return padded.masked_fill(k >= target_lengths[:, None], 0)


def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    """Drop-in for ``torch.nn.functional.ctc_loss`` (log-space alpha/beta written out above)."""
    reduction = get_reduction(None, None, reduction)
    if log_probs.dim() not in (2, 3):
        raise RuntimeError(f"log_probs must be 2-D (T, C) or 3-D (T, N, C), got {log_probs.dim()}-D")
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    if not batched:
        targets = targets.unsqueeze(0)
    if lp.numel() == 0:
        raise RuntimeError("log_probs tensor must not be empty")
    if lp.dtype not in (torch.float32, torch.float64) and not torch.is_autocast_enabled(lp.device.type):
        raise NotImplementedError(f'"ctc_loss" not implemented for {lp.dtype}')
    t_max, n, c = lp.shape
    if not 0 <= blank < c:
        raise RuntimeError("blank must be in label range")
    _check_length_types(input_lengths, target_lengths)
    il = _lengths(input_lengths, "input_lengths", n, lp.device)
    tl = _lengths(target_lengths, "target_lengths", n, lp.device)
    targets = targets.to(lp.device, torch.long)
    if can_inspect_values(il, tl):
        for name, v in (("input_lengths", il), ("target_lengths", tl)):
            if n and int(v.min()) < 0:
                raise RuntimeError(f"Expected {name} to have value at least 0, but got value {int(v.min())}")
        if n and int(il.max()) > t_max:
            raise RuntimeError(f"Expected input_lengths to have value at most {t_max}, but got value {int(il.max())}")
        if targets.dim() == 1 and targets.numel() != int(tl.sum()):
            raise RuntimeError(f"Expected tensor to have size {int(tl.sum())} at dimension 0, but got size "
                               f"{targets.numel()} for argument #2 'targets'")
        if targets.dim() == 2 and n and targets.shape[1] < int(tl.max()):
            raise RuntimeError(f"Expected tensor to have size at least {int(tl.max())} at dimension 1, but got "
                               f"size {targets.shape[1]} for argument #2 'targets'")
    if targets.dim() == 2 and targets.shape[0] != n:
        raise RuntimeError(f"Expected tensor to have size {n} at dimension 0, but got size {targets.shape[0]} "
                           "for argument #2 'targets'")
    if targets.dim() == 1:
        targets = _to_padded(targets, tl)
    elif targets.dim() != 2:
        raise RuntimeError(f"targets must be 1-D (concatenated) or 2-D (N, S), got {targets.dim()}-D")
    # a gradient is to come: the fast form runs beta in forward too and keeps gamma
    keep_gamma = torch.is_grad_enabled() and lp.requires_grad and not is_transformed(lp)
    loss = apply(CTCLossFunction, lp, targets, il, tl, blank, reduction, zero_infinity, keep_gamma)[0]
    return loss.squeeze(0) if reduction == "none" and not batched else loss
