"""The LSTM's fast form for eager CPU: the same steps as ``lstm_forward`` / ``lstm_backward`` in
recurrent.py (the readable reference, which tests/ops/test_recurrent_fast.py compares this
against), for the common case: a padded batch (every step has B rows), no projection, float32 or
float64, outside torch.func transforms and torch.compile, and (backward) not recording a graph.

Where the time goes (benchmarks/bench_rnn.py, default sizes; its docstring has the figures): about
3/4 is the products, the rest elementwise work and Python + dispatch (1-1.5 us per op on a
(B, H) step). So this form
- runs each product on oneDNN where torch has it (float32; torch.backends.mkldnn enabled): the
  per-step product with the weight packed once per call (oneDNN's layout), the products over all
  steps as oneDNN linears. On CPUs where MKL's sgemm takes a slower path (AMD: half the flops of
  oneDNN's AVX-512 kernels) this is most of the gain; torch's own CPU LSTM runs on oneDNN too.
  Elsewhere (float64, oneDNN off) the products are torch.addmm / mm, as in the reference.
- cuts the ops per step: one product (the input projection added in it), one sigmoid over all
  four gates (tanh z = 2 sigmoid(2 z) - 1, with g's rows of the weights and bias doubled,
  which is exact in floating point), the cell update and h' = o tanh(c') in place into
  preallocated outputs; backward forms the local derivatives of all steps before its loop (as
  the reference does) and writes every step's gate gradients into one (N, 4H) buffer, the
  next step's dy added in the product that carries dh back.
torch.tanh is about 7x slower than torch.sigmoid on a (B, H) step here, hence the identity.
"""
import functools

import torch

try:  # oneDNN's linear (a forward-only product; absent when torch is built without oneDNN)
    _LINEAR = torch.ops.mkldnn._linear_pointwise
    _PACK = torch.ops.mkldnn._reorder_linear_weight
except (AttributeError, RuntimeError):
    _LINEAR = _PACK = None


def lstm_fast_applies(batch_sizes, w_hr, x, *tensors):
    """Whether the fast form runs this call (else the reference does): ``tensors`` are the other
    tensor arguments (None for an absent bias), and in backward the incoming gradients."""
    if (w_hr is not None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or any(n != batch_sizes[0] for n in batch_sizes) or x.numel() == 0):
        return False
    tensors = [x] + [t for t in tensors if t is not None]
    return (x.dtype in (torch.float32, torch.float64)
            and all(t.dtype == x.dtype and t.device.type == "cpu" and t.layout == torch.strided
                    and type(t) in (torch.Tensor, torch.nn.Parameter) and t.numel() > 0
                    and not torch._C._functorch.is_legacy_batchedtensor(t) for t in tensors))


@functools.cache
def _onednn_works():
    """Once: whether this build's oneDNN linear runs and agrees with torch.addmm (its overloads are
    internal to torch, so an unexpected signature on another version or CPU means: not used)."""
    try:
        x, w, add = (torch.arange(float(n)).sin().view(r, n // r) for n, r in ((15, 3), (20, 4), (12, 3)))
        ok = [(_LINEAR.binary(x, add, _PACK(w, 3), None, "add"), torch.addmm(add, x, w.t())),
              (_LINEAR(x, w.t().t(), add[0], "none", [], ""), torch.addmm(add[0], x, w.t())),
              (_LINEAR(add.t(), x.t(), None, "none", [], ""), add.t().mm(x))]
        return all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in ok)
    except Exception:  # noqa: BLE001  (any failure: the products stay torch.addmm / mm)
        return False


def _onednn(t):
    return (_LINEAR is not None and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _onednn_works())


def _linear(x, w, b=None):
    """x w^T + b: one product over all steps."""
    if _onednn(x):
        return _LINEAR(x, w, b, "none", [], "")
    return x.mm(w.t()) if b is None else torch.addmm(b, x, w.t())


def _pack(w, rows):
    """w (O, K) made ready for ``_addmm``'s many products with a (rows, K) operand."""
    return _PACK(w.contiguous(), rows) if _onednn(w) else w.t()


def _addmm(add, x, packed):
    """add + x w^T with w packed by ``_pack``: one per-step product."""
    if packed.layout == torch._mkldnn:
        return _LINEAR.binary(x, add, packed, None, "add")
    return torch.addmm(add, x, packed)


def _time_order(steps, reverse):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def lstm_forward_fast(x, steps, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """lstm_forward (without projection) on a padded batch: y (N, H), h_n, c_n, act (N, 4H), cs (N, H)."""
    B, H, N = h0.shape[0], w_hh.shape[0] // 4, x.shape[0]
    # g's rows doubled: sigmoid then gives sigmoid(2 a_g), and tanh a_g = 2 sigmoid(2 a_g) - 1   (4H, 1)
    two_g = x.new_ones(4 * H, 1)
    two_g[2 * H: 3 * H] = 2
    b = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
    # input projections of all steps, both biases; the buffer becomes the activations      (N, 4H)
    act = _linear(x, w_ih * two_g, None if b is None else b * two_g[:, 0])
    w = _pack(w_hh * two_g, B)
    y, cs = x.new_empty(N, H), x.new_empty(N, H)
    # per-step views, made once: act_t (B, 4H), its gates i, f, g, o (B, H) each, y_t, c_t (B, H)
    acts, ys, cs_t = act.view(steps, B, 4 * H).unbind(0), y.view(steps, B, H).unbind(0), cs.view(steps, B, H).unbind(0)
    i_t, f_t, g_t, o_t = (act.view(steps, B, 4, H)[:, :, k].unbind(0) for k in range(4))
    minus_one = x.new_full((), -1)  # 2 s - 1 as one op: minus_one + 2 s (alpha is no tensor to make)
    h, c = h0.contiguous(), c0
    for t in _time_order(steps, reverse):
        a = acts[t]
        # [i, f, g, o] = sigmoid(gi_t + h W_hh^T), g's column doubled     (B, 4H)
        torch.sigmoid(_addmm(a, h, w), out=a)
        # g = 2 sigmoid(2 a_g) - 1 = tanh(a_g)                 (B, H)
        g = torch.add(minus_one, g_t[t], alpha=2, out=g_t[t])
        # c' = f c + i g                                       (B, H)
        c = torch.mul(f_t[t], c, out=cs_t[t]).addcmul_(i_t[t], g)
        # h' = o tanh(c') = o (2 sigmoid(2 c') - 1)            (B, H)
        h = torch.add(c, c, out=ys[t]).sigmoid_()
        h = torch.add(minus_one, h, alpha=2, out=h).mul_(o_t[t])
    return y, h.clone(), c.clone(), act, cs


def lstm_backward_fast(dy, dh_n, dc_n, x, steps, reverse, h0, c0, w_ih, w_hh, y, act, cs, needs):
    """lstm_backward (without projection) on a padded batch: gradients of
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh), ``needs`` says which are wanted."""
    B, H, N = h0.shape[0], w_hh.shape[0] // 4, x.shape[0]

    def shifted(states, first):  # the state each step starts from   (N, *)
        return torch.cat([states[B:], first] if reverse else [first, states[: N - B]])

    i, f, g, o = act.chunk(4, 1)
    one, minus_one = x.new_ones(()), x.new_full((), -1)  # 1 - t^2 and 2 s - 1 as one op each
    # tanh c_t = 2 sigmoid(2 c_t) - 1                                           (N, H)
    tanh_c = torch.add(cs, cs).sigmoid_()
    tanh_c = torch.add(minus_one, tanh_c, alpha=2, out=tanh_c)
    # the local derivatives of every step (the reference's k and m):
    #   k = o (1 - tanh^2 c_t)                                                    (N, H)
    k = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)
    #   m = [g i (1 - i), c_{t-1} f (1 - f), i (1 - g^2), tanh(c_t) o (1 - o)]     (N, 4H)
    m = torch.addcmul(act, act, act, value=-1)  # s (1 - s) for every gate
    m_i, m_f, m_g, m_o = m.chunk(4, 1)
    m_i.mul_(g), m_o.mul_(tanh_c)
    torch.addcmul(one, g, g, value=-1, out=m_g).mul_(i)
    # c_{t-1}: c of the step before (in the order the steps ran), c0 for the first
    first, rest = (slice(N - B, N), slice(0, N - B)) if reverse else (slice(0, B), slice(B, N))
    m_f[first].mul_(c0), m_f[rest].mul_(cs[B:] if reverse else cs[: N - B])
    dgates = torch.empty_like(act)  # every step's [di, df, dg, do]            (N, 4H)
    w = _pack(w_hh.t(), B)
    dy = dy.contiguous()
    per_step = lambda t, *cols: t.view(steps, B, *cols).unbind(0)  # noqa: E731
    m3, m_o, k, f = per_step(m.view(N, 4, H)[:, :3], 3, H), per_step(m_o, H), per_step(k, H), per_step(f, H)
    dg3, dg_o, dgs, dys = per_step(dgates.view(N, 4, H)[:, :3], 3, H), per_step(dgates[:, 3 * H:], H), \
        per_step(dgates, 4 * H), per_step(dy, H)
    order = list(_time_order(steps, reverse))[::-1]
    # carried: dh_t = dy_t + dh from the step after, dc (updated in place)     (B, H)
    dh, dc = dys[order[0]] + dh_n, dc_n.clone(memory_format=torch.contiguous_format)
    dc3 = dc.unsqueeze(1)  # dc as (B, 1, H): a view, follows dc's in-place updates
    for s, t in enumerate(order):
        # dc_t = dc carried + dh_t k_t                          (B, H)
        dc.addcmul_(dh, k[t])
        # [di, df, dg] = dc_t [m_i, m_f, m_g],  do = dh_t m_o   (B, 4H)
        torch.mul(m3[t], dc3, out=dg3[t])
        torch.mul(m_o[t], dh, out=dg_o[t])
        # dh_{t-1} = dy_{t-1} + dG_t W_hh  (no dy before the first step)    (B, H)
        dh = _addmm(dys[order[s + 1]], dgs[t], w) if s + 1 < steps else dgs[t].mm(w_hh)
        # dc_{t-1} = dc_t f_t                                   (B, H)
        dc.mul_(f[t])
    # dx = dG W_ih,  dW_ih = dG^T x,  dW_hh = dG^T h_{t-1},  db = sum over rows of dG
    # (oneDNN copies a transposed operand on every call: dG^T made contiguous once)
    dx = _linear(dgates, w_ih.t()) if needs[0] else None
    dgates_t = dgates.t().contiguous() if needs[3] or needs[4] else None
    dw_ih = _linear(dgates_t, x.t().contiguous()) if needs[3] else None
    dw_hh = _linear(dgates_t, shifted(y, h0).t().contiguous()) if needs[4] else None
    db = dgates.sum(0) if needs[5] or needs[6] else None
    return (dx, dh if needs[1] else None, dc if needs[2] else None, dw_ih, dw_hh,
            db if needs[5] else None, (db.clone() if needs[5] else db) if needs[6] else None)
