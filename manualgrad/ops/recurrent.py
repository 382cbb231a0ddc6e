"""Recurrent layers, one layer and one direction over a whole sequence: LSTM, GRU, RNN (tanh/relu).

Layout (torch's packed layout, which also covers a padded batch): the sequence is x (N, I), the
rows of time step t stacked after those of step t - 1, and ``batch_sizes`` (T ints) says how
many rows step t has. A padded (T, B, I) input is x.reshape(T * B, I) with batch_sizes (B,) * T;
a PackedSequence is its ``data`` and ``batch_sizes`` (non-increasing: at step t only the first
batch_sizes[t] sequences are active, so no padded step is ever computed). The carried states
h, c are (B, *) with B = batch_sizes[0]: a step updates their first batch_sizes[t] rows and
leaves the others as they are, so after the last step every row holds its sequence's final
state. ``reverse`` runs the steps from T - 1 down to 0 (the backward direction of a
bidirectional layer): then rows join as the batch grows, starting from h0.

Weights as torch names them (G gates: LSTM 4 (i, f, g, o), GRU 3 (r, z, n), RNN 1):
w_ih (G H, I), w_hh (G H, P), b_ih, b_hh (G H,) or None, and for an LSTM with proj_size P < H
w_hr (P, H) (else None and P = H). Outputs: y (N, P) in the packed layout, h_n (B, P), c_n (B, H).

Forward: the input projection of every step is one product before the loop; the loop adds
h W_hh^T and applies the gates; it keeps what backward needs: the gate activations (and for
an LSTM the cell states; y is the output). Backward walks the steps in reverse carrying dh
(and dc), stacks every step's gate gradients, and after the loop forms dx, dW_ih, dW_hh and the
bias gradients each in one product / sum over all steps.

Fast form: on a padded batch without projections (float32 / float64, eager CPU) LSTMFunction
runs recurrent_fast.py, the same steps with fewer ops per step and oneDNN's products; the functions
here are its reference (tests/ops/test_recurrent_fast.py) and run everywhere else.

Double backward: the backward is written with differentiable torch ops. The saved activations
are not connected to the inputs in autograd's graph, so when the backward itself is being
recorded (create_graph) it recomputes them from x, h0 and the outputs, which are: the gate
pre-activations of all steps in two products (h_{t-1} is y of the previous step or h0), and the
LSTM cell states by their (elementwise) recurrence. vmap: ``generate_vmap_rule`` (every op here
is a torch op with a batching rule).

Autocast follows torch's CPU code paths, which differ (see ``_apply_autocast``): the matmul
operands (x, the weights) may arrive in bfloat16 while the states h0, c0 stay float32. Then
every product runs in the weights' dtype (the states are cast to it where they enter one, as
torch's per-step cells do) and the elementwise state updates promote: the gates are bfloat16,
an LSTM's c and a GRU's h float32. Without autocast every dtype is the same and the casts are
no-ops.
"""
import torch

from ._apply import INPUT, LOWER, apply, autocast_on
from .linear import linear_forward
from .recurrent_fast import lstm_backward_fast, lstm_fast_applies, lstm_forward_fast


# ---------------------------------------------------------------------------------------------
# the schedule and the states each step starts from

def _steps(batch_sizes, reverse):
    """(rows, n) per step in the order the recurrence runs: the step's slice of the packed layout
    and its number of active sequences."""
    steps, start = [], 0
    for n in batch_sizes:
        steps.append((slice(start, start + n), n))
        start += n
    return steps[::-1] if reverse else steps


def _merge(new, carry, n):
    """The carried state after a step that updated its first n rows to ``new``."""
    return new if n == carry.shape[0] else torch.cat([new, carry[n:]])


def _previous(states, first, batch_sizes, reverse):
    """The state each step starts from, (N, *) in the packed layout: for a forward run step t
    starts from step t - 1 (its first batch_sizes[t] rows) and step 0 from ``first``; for a reverse
    run step t starts from step t + 1, and the rows that join at step t from ``first``."""
    b = batch_sizes[0]
    if all(n == b for n in batch_sizes):  # a padded batch: one shift of the whole sequence
        return torch.cat([first, states[: states.shape[0] - b]] if not reverse else [states[b:], first])
    starts = [0]
    for n in batch_sizes:
        starts.append(starts[-1] + n)
    parts = []
    for t, n in enumerate(batch_sizes):
        if not reverse:
            parts.append(first[:n] if t == 0 else states[starts[t - 1]: starts[t - 1] + n])
        else:
            m = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
            parts += [states[starts[t + 1]: starts[t + 1] + m], first[m:n]]
    return torch.cat(parts)


def _in_time_order(per_step, reverse):
    return torch.cat(per_step[::-1] if reverse else per_step)


def _bias_sum(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def _apply_autocast(fn, args, lowered):
    """apply(fn, *args) with torch's CPU autocast dtypes for a recurrent layer.

    torch's CPU LSTM, GRU and RNN (outside oneDNN) are not on autocast's lists: they run per-step
    cells whose linear/matmul calls are autocast, so x and the weights compute in the autocast
    dtype and the states keep theirs. Under autocast the arguments at positions ``lowered`` (the
    matmul operands, or every tensor for a path torch casts whole) are cast to the autocast dtype
    and the Function runs with autocast off. On other devices torch's fused kernels are cast whole.
    """
    device = args[0].device.type
    if not autocast_on(device):
        return apply(fn, *args)
    dtype = torch.get_autocast_dtype(device)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and (k in lowered or device != "cpu")
            else a for k, a in enumerate(args)]
    with torch.autocast(device, enabled=False):
        return apply(fn, *args)


def _tangent_proj(x, dx, w, dw, db=None):
    """Tangent of x W^T + b: dx W^T + x dW^T + db, skipping absent tangents (None if all are)."""
    out = _sum(None if dx is None else dx.mm(w.t()), None if dw is None else x.mm(dw.t()))
    if db is not None:
        out = db.expand(x.shape[0], db.shape[0]) if out is None else out + db
    return out


def _sum(*terms):
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _zeros_for_none(grads, likes):
    """Zeros for the outputs that received no gradient (h_n unused, say)."""
    return tuple(torch.zeros_like(t) if d is None else d for d, t in zip(grads, likes))


def _weight_grads(dgi, dgh, x, h_prev, needs):
    """dW_ih, dW_hh, db_ih, db_hh from the stacked gate gradients of all steps, dG_i of the input
    projection and dG_h of the hidden one (the same tensor for an LSTM and an RNN).

    ``needs`` says which of (x, w_ih, w_hh, b_ih, b_hh) want a gradient (x's is the caller's)."""
    # dW_ih = dG_i^T x                                    (G H, I)
    # dW_hh = dG_h^T h_prev                               (G H, P)
    # db_ih = sum over rows of dG_i, db_hh of dG_h        (G H,)
    return (dgi.t().mm(x) if needs[1] else None,
            dgh.t().mm(h_prev) if needs[2] else None,
            dgi.sum(0) if needs[3] else None,
            dgh.sum(0) if needs[4] else None)


# ---------------------------------------------------------------------------------------------
# LSTM: i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x W_ih^T + b_ih + h W_hh^T + b_hh)
#       c' = f * c + i * g,  h' = o * tanh(c')  (then h' W_hr^T with proj_size)

def lstm_forward(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    """Returns y (N, P), h_n (B, P), c_n (B, H), the gate activations (N, 4H) and cell states (N, H)."""
    H = w_hh.shape[0] // 4
    # input projections of all steps, both biases: x W_ih^T + b_ih + b_hh     (N, 4H)
    gi = linear_forward(x, w_ih, _bias_sum(b_ih, b_hh))
    h, c = h0, c0
    ys, acts, cs = [], [], []
    for rows, n in _steps(batch_sizes, reverse):
        # pre-activations: gi_t + h W_hh^T                 (n, 4H)
        a = torch.addmm(gi[rows], h[:n].to(w_hh.dtype), w_hh.t())
        g = a[:, 2 * H: 3 * H].tanh()
        act = a.sigmoid_()
        act[:, 2 * H: 3 * H] = g  # i, f, g, o             (n, 4H)
        i, f, o = act[:, :H], act[:, H: 2 * H], act[:, 3 * H:]
        # c' = f c + i g                                   (n, H)
        c_t = f * c[:n] + i * g
        # h' = o tanh(c')  (W_hr^T with proj_size)         (n, P)
        h_t = o * c_t.tanh()
        if w_hr is not None:
            h_t = h_t.to(w_hr.dtype).mm(w_hr.t())
        ys.append(h_t), acts.append(act), cs.append(c_t)
        h, c = _merge(h_t, h, n), _merge(c_t, c, n)
    return (_in_time_order(ys, reverse), h, c, _in_time_order(acts, reverse), _in_time_order(cs, reverse))


def _lstm_recompute(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, y):
    """The gate activations and cell states, as differentiable functions of the inputs and y."""
    H = w_hh.shape[0] // 4
    # all pre-activations at once: h_{t-1} is y of the previous step (or h0)     (N, 4H)
    h_prev = _previous(y, h0, batch_sizes, reverse).to(w_hh.dtype)
    a = linear_forward(x, w_ih, b_ih) + linear_forward(h_prev, w_hh, b_hh)
    act = torch.cat([a[:, :2 * H].sigmoid(), a[:, 2 * H: 3 * H].tanh(), a[:, 3 * H:].sigmoid()], 1)
    c, cs = c0, []
    for rows, n in _steps(batch_sizes, reverse):
        c_t = act[rows, H: 2 * H] * c[:n] + act[rows, :H] * act[rows, 2 * H: 3 * H]
        cs.append(c_t)
        c = _merge(c_t, c, n)
    return act, _in_time_order(cs, reverse)


def lstm_backward(dy, dh_n, dc_n, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, w_hr, y, act, cs, needs):
    """Gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); ``needs`` says which are wanted."""
    H = w_hh.shape[0] // 4
    c_prev = _previous(cs, c0, batch_sizes, reverse)  # c_{t-1} of every step    (N, H)
    tanh_c = cs.tanh()  #                                                    (N, H)
    i, f, g, o = act.chunk(4, 1)
    # The local derivatives of every step, all steps at once (they need no carried gradient):
    #   dc_t = dc carried + dh_t * o (1 - tanh^2 c_t)                         k  (N, H)
    #   pre-activation gradients [di, df, dg, do] = [dc_t, dc_t, dc_t, dh_t] * m     (N, 4H)
    #   with m = [g i (1 - i), c_{t-1} f (1 - f), i (1 - g^2), tanh(c_t) o (1 - o)]
    #   (sigma' = s (1 - s), tanh' = 1 - t^2)
    k = o * (1 - tanh_c * tanh_c)
    m = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], 1)
    dh, dc = dh_n, dc_n  # carried: dL/dh, dL/dc of the state after the step   (B, P), (B, H)
    dgates, dhs = [], []
    for rows, n in reversed(_steps(batch_sizes, reverse)):
        # dh_t = dy_t + dh carried from the step after     (n, P)
        dh_t = dy[rows] + dh[:n]
        if w_hr is not None:
            dhs.append(dh_t)
            # through the projection: dh_t W_hr             (n, H)
            dh_t = dh_t.to(w_hr.dtype).mm(w_hr)
        # dc_t = dc carried + dh_t k_t                      (n, H)
        dc_t = dc[:n] + dh_t * k[rows]
        # [di, df, dg, do] = [dc_t, dc_t, dc_t, dh_t] m_t    (n, 4H)  in the gates' dtype
        da = (torch.cat([dc_t, dc_t, dc_t, dh_t], 1) * m[rows]).to(act.dtype)
        dgates.append(da)
        # dh_{t-1} = da W_hh,  dc_{t-1} = dc_t f            (n, P), (n, H)
        dh, dc = _merge(da.mm(w_hh), dh, n), _merge(dc_t * f[rows], dc, n)
    dgates = _in_time_order(dgates[::-1], reverse)  #                         (N, 4H)
    # dx = dG W_ih                                          (N, I)
    dx = dgates.mm(w_ih) if needs[0] else None
    h_prev = _previous(y, h0, batch_sizes, reverse).to(w_hh.dtype) if needs[4] else None
    dw_ih, dw_hh, db_ih, db_hh = _weight_grads(dgates, dgates, x, h_prev, needs[:1] + needs[3:7])
    dw_hr = None
    if w_hr is not None and needs[7]:
        # dW_hr = dH^T (o tanh c) over all steps            (P, H)
        dw_hr = _in_time_order(dhs[::-1], reverse).t().to(w_hr.dtype).mm((o * tanh_c).to(w_hr.dtype))
    return (dx, dh if needs[1] else None, dc if needs[2] else None, dw_ih, dw_hh, db_ih, db_hh, dw_hr)


def lstm_jvp(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, x, batch_sizes, reverse, h0, c0,
             w_ih, w_hh, w_hr, y, act, cs):
    """Forward mode: the tangents of y, h_n, c_n, linearizing each step around the saved one."""
    H = w_hh.shape[0] // 4
    h_prev = _previous(y, h0, batch_sizes, reverse).to(w_hh.dtype)
    c_prev, tanh_c = _previous(cs, c0, batch_sizes, reverse), cs.tanh()
    # every term that does not carry the state's tangent, for all steps at once:
    #   dx W_ih^T + x dW_ih^T + db_ih + db_hh + h_{t-1} dW_hh^T               (N, 4H)
    da_in = _sum(_tangent_proj(x, dx, w_ih, dw_ih, _sum(db_ih, db_hh)), _tangent_proj(h_prev, None, w_hh, dw_hh))
    dh = torch.zeros_like(h0) if dh0 is None else dh0
    dc = torch.zeros_like(c0) if dc0 is None else dc0
    dys = []
    for rows, n in _steps(batch_sizes, reverse):
        # da = (terms above) + dh_{t-1} W_hh^T               (n, 4H)
        dh_prev = dh[:n].to(w_hh.dtype)
        da = dh_prev.mm(w_hh.t()) if da_in is None else torch.addmm(da_in[rows], dh_prev, w_hh.t())
        i, f, g, o = act[rows].chunk(4, 1)
        da_i, da_f, da_g, da_o = da.chunk(4, 1)
        # dc_t = df c_{t-1} + f dc_{t-1} + di g + i dg, with df = da_f f (1 - f) ...   (n, H)
        dc_t = (da_f * f * (1 - f) * c_prev[rows] + f * dc[:n] + da_i * i * (1 - i) * g + i * da_g * (1 - g * g))
        tc = tanh_c[rows]
        # dh_t = do tanh(c_t) + o (1 - tanh^2 c_t) dc_t        (n, H)
        dh_t = da_o * o * (1 - o) * tc + o * (1 - tc * tc) * dc_t
        if w_hr is not None:
            # (projection) dh_t W_hr^T + (o tanh c_t) dW_hr^T    (n, P)
            out = (o * tc).to(w_hr.dtype)
            dh_t = _sum(dh_t.to(w_hr.dtype).mm(w_hr.t()), None if dw_hr is None else out.mm(dw_hr.t()))
        dys.append(dh_t)
        dh, dc = _merge(dh_t, dh, n), _merge(dc_t, dc, n)
    return _in_time_order(dys, reverse), dh, dc


class LSTMFunction(torch.autograd.Function):
    """(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) -> y, h_n, c_n (+ the saved
    gate activations and cell states, outputs only so that setup_context and jvp can see them)."""

    autocast = INPUT  # autocast: the dtypes lstm() casts to, torch's per code path (_apply_autocast)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        if lstm_fast_applies(batch_sizes, w_hr, x, h0, c0, w_ih, w_hh, b_ih, b_hh):  # recurrent_fast.py
            return lstm_forward_fast(x, len(batch_sizes), reverse, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return lstm_forward(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.batch_sizes, ctx.reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
        y, _, _, act, cs = output
        ctx.mark_non_differentiable(act, cs)
        ctx.set_materialize_grads(False)  # no zeros for act and cs; the others are made below
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, act, cs)
        ctx.save_for_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, act, cs)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _act, _cs):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, act, cs = ctx.saved_tensors
        dy, dh_n, dc_n = _zeros_for_none((dy, dh_n, dc_n), (y, h0, c0))
        if torch.is_grad_enabled():  # double backward: the saved activations, as functions of the inputs
            act, cs = _lstm_recompute(x, ctx.batch_sizes, ctx.reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, y)
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4, 5, 6, 7, 8, 9)]
        if not torch.is_grad_enabled() and lstm_fast_applies(ctx.batch_sizes, w_hr, x, h0, c0, w_ih, w_hh,
                                                             b_ih, b_hh, dy, dh_n, dc_n):
            grads = lstm_backward_fast(dy, dh_n, dc_n, x, len(ctx.batch_sizes), ctx.reverse, h0, c0, w_ih, w_hh,
                                       y, act, cs, needs)
            return grads[:1] + (None, None) + grads[1:] + (None,)
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = lstm_backward(
            dy, dh_n, dc_n, x, ctx.batch_sizes, ctx.reverse, h0, c0, w_ih, w_hh, w_hr, y, act, cs, needs)
        return dx, None, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr

    @staticmethod
    def jvp(ctx, dx, _bs, _rev, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr):
        x, h0, c0, w_ih, w_hh, _, _, w_hr, y, act, cs = ctx.saved_tensors
        dy, dh_n, dc_n = lstm_jvp(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, x, ctx.batch_sizes,
                                  ctx.reverse, h0, c0, w_ih, w_hh, w_hr, y, act, cs)
        return dy, dh_n, dc_n, None, None


def lstm(x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, onednn=False):
    """One LSTM layer, one direction, over a whole sequence: y (N, P), h_n (B, P), c_n (B, H).

    ``onednn``: the layer is on torch's oneDNN path (a padded LSTM without projections), which CPU
    autocast casts whole, states included; otherwise only x and the weights are cast."""
    args = (x, tuple(batch_sizes), reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    y, h_n, c_n, _, _ = _apply_autocast(LSTMFunction, args, range(10) if onednn else (0, 5, 6, 7, 8, 9))
    return y, h_n, c_n


# ---------------------------------------------------------------------------------------------
# GRU (torch's form): r, z = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr), sigmoid(... z ...)
#       n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),  h' = (1 - z) n + z h = (h - n) z + n

def gru_forward(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih, b_hh):
    """Returns y (N, H), h_n (B, H) and, per row, (r, z, n, h W_hn^T + b_hn)  (N, 4H)."""
    H = w_hh.shape[0] // 3
    # input projections of all steps: x W_ih^T + b_ih        (N, 3H)
    gi = linear_forward(x, w_ih, b_ih)
    h, ys, saved = h0, [], []
    for rows, n in _steps(batch_sizes, reverse):
        hp = h[:n]
        # h W_hh^T + b_hh                                  (n, 3H)
        gh = linear_forward(hp.to(w_hh.dtype), w_hh, b_hh)
        gi_t = gi[rows]
        # r, z = sigmoid(gi + gh) on the first 2H columns  (n, 2H)
        rz = (gi_t[:, : 2 * H] + gh[:, : 2 * H]).sigmoid()
        r, z, hn = rz[:, :H], rz[:, H:], gh[:, 2 * H:]
        # n = tanh(gi_n + r hn)                            (n, H)
        nt = (gi_t[:, 2 * H:] + r * hn).tanh()
        # h' = (h - n) z + n                               (n, H)
        h_t = (hp - nt) * z + nt
        ys.append(h_t), saved.append(torch.cat([rz, nt, hn], 1))
        h = _merge(h_t, h, n)
    return _in_time_order(ys, reverse), h, _in_time_order(saved, reverse)


def _gru_recompute(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih, b_hh, y):
    """(r, z, n, hn) of every step, all steps at once from y (h_{t-1} is y of the previous step)."""
    H = w_hh.shape[0] // 3
    gi = linear_forward(x, w_ih, b_ih)
    gh = linear_forward(_previous(y, h0, batch_sizes, reverse).to(w_hh.dtype), w_hh, b_hh)
    rz = (gi[:, : 2 * H] + gh[:, : 2 * H]).sigmoid()
    nt = (gi[:, 2 * H:] + rz[:, :H] * gh[:, 2 * H:]).tanh()
    return torch.cat([rz, nt, gh[:, 2 * H:]], 1)


def gru_backward(dy, dh_n, x, batch_sizes, reverse, h0, w_ih, w_hh, y, saved, needs):
    """Gradients of (x, h0, w_ih, w_hh, b_ih, b_hh); ``needs`` says which are wanted."""
    h_prev = _previous(y, h0, batch_sizes, reverse)  # h_{t-1} of every step     (N, H)
    r, z, nt, hn = saved.chunk(4, 1)
    # The local derivatives of every step, all steps at once (they need no carried gradient):
    #   n's pre-activation:  da_n = dh_t (1 - z) (1 - n^2)
    #   z's:                 da_z = dh_t (h_{t-1} - n) z (1 - z)
    #   r's:                 da_r = da_n hn r (1 - r)
    #   so [da_r, da_z, da_n] = [dh_t, dh_t, dh_t] * m,  m = [k_n hn r (1 - r), k_z, k_n]     (N, 3H)
    k_n = (1 - z) * (1 - nt * nt)
    m = torch.cat([k_n * hn * r * (1 - r), (h_prev - nt) * z * (1 - z), k_n], 1)
    # the hidden projection's gradient scales n's part by r: dGh = dGi * [1, 1, r]       (N, 3H)
    scale_h = torch.cat([torch.ones_like(r), torch.ones_like(z), r], 1)
    dh, dgi, dgh = dh_n, [], []
    for rows, n in reversed(_steps(batch_sizes, reverse)):
        # dh_t = dy_t + dh carried from the step after     (n, H)
        dh_t = dy[rows] + dh[:n]
        # gate gradients of the input projection [da_r, da_z, da_n] and the hidden one  (n, 3H)
        dgi_t = (torch.cat([dh_t, dh_t, dh_t], 1) * m[rows]).to(saved.dtype)  # in the gates' dtype
        dgh_t = dgi_t * scale_h[rows]
        dgi.append(dgi_t), dgh.append(dgh_t)
        # dh_{t-1} = dh_t z + dGh W_hh                        (n, H)
        dh = _merge(dh_t * z[rows] + dgh_t.mm(w_hh), dh, n)
    dgi, dgh = _in_time_order(dgi[::-1], reverse), _in_time_order(dgh[::-1], reverse)  # (N, 3H) each
    # dx = dGi W_ih                                       (N, I)
    dx = dgi.mm(w_ih) if needs[0] else None
    h_prev = h_prev.to(w_hh.dtype)
    return (dx, dh if needs[1] else None) + _weight_grads(dgi, dgh, x, h_prev, needs[:1] + needs[2:])


def gru_jvp(dx, dh0, dw_ih, dw_hh, db_ih, db_hh, x, batch_sizes, reverse, h0, w_ih, w_hh, y, saved):
    H = w_hh.shape[0] // 3
    h_prev = _previous(y, h0, batch_sizes, reverse)
    # tangents of the projections without the state's tangent, all steps at once      (N, 3H)
    dgi = _tangent_proj(x, dx, w_ih, dw_ih, db_ih)
    dgh_in = _tangent_proj(h_prev.to(w_hh.dtype), None, w_hh, dw_hh, db_hh)
    dh, dys = (torch.zeros_like(h0) if dh0 is None else dh0), []
    for rows, n in _steps(batch_sizes, reverse):
        r, z, nt, hn = saved[rows].chunk(4, 1)
        # dGh = (terms above) + dh_{t-1} W_hh^T              (n, 3H)
        dh_prev = dh[:n].to(w_hh.dtype)
        dgh = dh_prev.mm(w_hh.t()) if dgh_in is None else torch.addmm(dgh_in[rows], dh_prev, w_hh.t())
        dgi_t = torch.zeros_like(dgh) if dgi is None else dgi[rows]
        # dr, dz = (dGi + dGh) s (1 - s)                      (n, H) each
        dr = (dgi_t[:, :H] + dgh[:, :H]) * r * (1 - r)
        dz = (dgi_t[:, H: 2 * H] + dgh[:, H: 2 * H]) * z * (1 - z)
        # dn = (dGi_n + dr hn + r dGh_n) (1 - n^2)            (n, H)
        dn = (dgi_t[:, 2 * H:] + dr * hn + r * dgh[:, 2 * H:]) * (1 - nt * nt)
        # dh_t = (dh_{t-1} - dn) z + (h_{t-1} - n) dz + dn    (n, H)
        dh_t = (dh[:n] - dn) * z + (h_prev[rows] - nt) * dz + dn
        dys.append(dh_t)
        dh = _merge(dh_t, dh, n)
    return _in_time_order(dys, reverse), dh


class GRUFunction(torch.autograd.Function):
    """(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih, b_hh) -> y, h_n (+ the saved gates)."""

    autocast = INPUT  # autocast: the dtypes gru() casts to, torch's per-step cells' (_apply_autocast)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih, b_hh):
        return gru_forward(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.batch_sizes, ctx.reverse, h0, w_ih, w_hh, b_ih, b_hh = inputs
        y, _, saved = output
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # no zeros for the saved gates; the others are made below
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, y, saved)
        ctx.save_for_forward(x, h0, w_ih, w_hh, b_ih, b_hh, y, saved)

    @staticmethod
    def backward(ctx, dy, dh_n, _saved):
        x, h0, w_ih, w_hh, b_ih, b_hh, y, saved = ctx.saved_tensors
        dy, dh_n = _zeros_for_none((dy, dh_n), (y, h0))
        if torch.is_grad_enabled():  # double backward: the saved gates, as functions of the inputs
            saved = _gru_recompute(x, ctx.batch_sizes, ctx.reverse, h0, w_ih, w_hh, b_ih, b_hh, y)
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4, 5, 6, 7)]
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = gru_backward(
            dy, dh_n, x, ctx.batch_sizes, ctx.reverse, h0, w_ih, w_hh, y, saved, needs)
        return dx, None, None, dh0, dw_ih, dw_hh, db_ih, db_hh

    @staticmethod
    def jvp(ctx, dx, _bs, _rev, dh0, dw_ih, dw_hh, db_ih, db_hh):
        x, h0, w_ih, w_hh, _, _, y, saved = ctx.saved_tensors
        dy, dh_n = gru_jvp(dx, dh0, dw_ih, dw_hh, db_ih, db_hh, x, ctx.batch_sizes, ctx.reverse,
                           h0, w_ih, w_hh, y, saved)
        return dy, dh_n, None


def gru(x, batch_sizes, reverse, h0, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU layer, one direction, over a whole sequence: y (N, H), h_n (B, H)."""
    args = (x, tuple(batch_sizes), reverse, h0, w_ih, w_hh, b_ih, b_hh)
    y, h_n, _ = _apply_autocast(GRUFunction, args, (0, 4, 5, 6, 7))  # x and the weights
    return y, h_n


# ---------------------------------------------------------------------------------------------
# RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)  (or relu)

def rnn_forward(x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, b_ih, b_hh):
    """Returns y (N, H) and h_n (B, H); y is all backward needs (tanh' = 1 - y^2, relu' = [y > 0])."""
    # input projections of all steps, both biases          (N, H)
    gi = linear_forward(x, w_ih, _bias_sum(b_ih, b_hh))
    h, ys = h0, []
    for rows, n in _steps(batch_sizes, reverse):
        # h' = act(gi_t + h W_hh^T)                          (n, H)
        a = torch.addmm(gi[rows], h[:n], w_hh.t())
        h_t = a.tanh_() if nonlinearity == "tanh" else a.relu_()
        ys.append(h_t)
        h = _merge(h_t, h, n)
    return _in_time_order(ys, reverse), h


def _rnn_act_grad(y, nonlinearity):
    # tanh' = 1 - y^2, relu' = [y > 0], both from the output  (*) like y
    return 1 - y * y if nonlinearity == "tanh" else (y > 0).to(y.dtype)


def rnn_backward(dy, dh_n, x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, y, needs):
    """Gradients of (x, h0, w_ih, w_hh, b_ih, b_hh); ``needs`` says which are wanted."""
    act_grad = _rnn_act_grad(y, nonlinearity)  #                                 (N, H)
    dh, da = dh_n, []
    for rows, n in reversed(_steps(batch_sizes, reverse)):
        # da_t = (dy_t + dh carried) act'                     (n, H)
        da_t = (dy[rows] + dh[:n]) * act_grad[rows]
        da.append(da_t)
        # dh_{t-1} = da_t W_hh                                (n, H)
        dh = _merge(da_t.mm(w_hh), dh, n)
    da = _in_time_order(da[::-1], reverse)  #                                   (N, H)
    dx = da.mm(w_ih) if needs[0] else None
    h_prev = _previous(y, h0, batch_sizes, reverse) if needs[3] else None
    return (dx, dh if needs[1] else None) + _weight_grads(da, da, x, h_prev, needs[:1] + needs[2:])


def rnn_jvp(dx, dh0, dw_ih, dw_hh, db_ih, db_hh, x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, y):
    act_grad = _rnn_act_grad(y, nonlinearity)
    h_prev = _previous(y, h0, batch_sizes, reverse)
    # dx W_ih^T + x dW_ih^T + db_ih + db_hh + h_{t-1} dW_hh^T, all steps       (N, H)
    da_in = _sum(_tangent_proj(x, dx, w_ih, dw_ih, _sum(db_ih, db_hh)), _tangent_proj(h_prev, None, w_hh, dw_hh))
    dh, dys = (torch.zeros_like(h0) if dh0 is None else dh0), []
    for rows, n in _steps(batch_sizes, reverse):
        # dh_t = ((terms above) + dh_{t-1} W_hh^T) act'        (n, H)
        da = dh[:n].mm(w_hh.t()) if da_in is None else torch.addmm(da_in[rows], dh[:n], w_hh.t())
        dh_t = da * act_grad[rows]
        dys.append(dh_t)
        dh = _merge(dh_t, dh, n)
    return _in_time_order(dys, reverse), dh


class RNNFunction(torch.autograd.Function):
    """(x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, b_ih, b_hh) -> y, h_n."""

    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list has rnn_tanh/relu)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, b_ih, b_hh):
        return rnn_forward(x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.batch_sizes, ctx.reverse, ctx.nonlinearity, h0, w_ih, w_hh, _, _ = inputs
        y, _ = output  # y is an output: connected to the inputs, so double backward needs no recomputation
        ctx.save_for_backward(x, h0, w_ih, w_hh, y)
        ctx.save_for_forward(x, h0, w_ih, w_hh, y)

    @staticmethod
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, y = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 4, 5, 6, 7, 8)]
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = rnn_backward(
            dy, dh_n, x, ctx.batch_sizes, ctx.reverse, ctx.nonlinearity, h0, w_ih, w_hh, y, needs)
        return dx, None, None, None, dh0, dw_ih, dw_hh, db_ih, db_hh

    @staticmethod
    def jvp(ctx, dx, _bs, _rev, _nl, dh0, dw_ih, dw_hh, db_ih, db_hh):
        x, h0, w_ih, w_hh, y = ctx.saved_tensors
        return rnn_jvp(dx, dh0, dw_ih, dw_hh, db_ih, db_hh, x, ctx.batch_sizes, ctx.reverse,
                       ctx.nonlinearity, h0, w_ih, w_hh, y)


def rnn(x, batch_sizes, reverse, nonlinearity, h0, w_ih, w_hh, b_ih=None, b_hh=None):
    """One Elman RNN layer (tanh or relu), one direction, over a whole sequence: y (N, H), h_n (B, H)."""
    return apply(RNNFunction, x, tuple(batch_sizes), reverse, nonlinearity, h0, w_ih, w_hh, b_ih, b_hh)
