"""A DLRM-style recommender converted with manualgrad.convert(strict=True) against the same torch model.

Dense features go through a bottom MLP; each sparse feature is a bag of ids (1-D input with
offsets, bags of different lengths, some empty) through its own EmbeddingBag (sum with
per-sample weights, mean with a padding id, max); the pairwise dot products of the feature
vectors (the interaction, run under manualgrad.enable() so its bmm is hand-written too) and the
dense vector feed a top MLP whose logit meets BCEWithLogitsLoss.

What holds: the loss and every parameter gradient match torch over a few SGD steps, and the
graph holds manualgrad's embedding-bag Functions, not torch's EmbeddingBagBackward.
"""
import copy

import pytest
import torch

import manualgrad
import manualgrad.nn as mnn
from manualgrad.coverage import graph_nodes

pytestmark = pytest.mark.usefixtures("one_thread")

D, DENSE, ROWS = 8, 5, (11, 7, 13)


class DLRM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = torch.nn.Sequential(torch.nn.Linear(DENSE, 16), torch.nn.ReLU(), torch.nn.Linear(16, D),
                                          torch.nn.ReLU())
        self.tables = torch.nn.ModuleList([
            torch.nn.EmbeddingBag(ROWS[0], D, mode="sum"),
            torch.nn.EmbeddingBag(ROWS[1], D, mode="mean", padding_idx=0),
            torch.nn.EmbeddingBag(ROWS[2], D, mode="max", include_last_offset=True),
        ])
        pairs = (len(ROWS) + 1) * len(ROWS) // 2
        self.top = torch.nn.Sequential(torch.nn.Linear(D + pairs, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.loss = torch.nn.BCEWithLogitsLoss()

    def forward(self, dense, bags, weights, target):
        x = self.bottom(dense)  #                                          (B, D)
        feats = [x] + [
            table(ids, offsets, per_sample_weights=weights if table.mode == "sum" else None)
            for table, (ids, offsets) in zip(self.tables, bags)
        ]
        t = torch.stack(feats, 1)  #                                       (B, F, D)
        z = torch.bmm(t, t.transpose(1, 2))  #                             (B, F, F) pairwise dots
        i, j = torch.tril_indices(t.shape[1], t.shape[1], offset=-1)
        logit = self.top(torch.cat([x, z[:, i, j]], 1)).squeeze(1)  #      (B,)
        return self.loss(logit, target)


def _batch(b):
    dense = torch.randn(b, DENSE)
    bags = []
    for k, rows in enumerate(ROWS):
        lengths = torch.randint(0, 4, (b,))  # some bags empty
        ids = torch.randint(0, rows, (int(lengths.sum()),))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        bags.append((ids, offsets if k == 2 else offsets[:-1]))  # the max table takes the last offset too
    weights = torch.rand(bags[0][0].shape)
    target = torch.randint(0, 2, (b,)).float()
    return dense, bags, weights, target


def test_dlrm_converted_strictly_trains_like_torch():
    theirs = DLRM()
    ours = manualgrad.convert(copy.deepcopy(theirs), strict=True)
    assert all(type(t) is mnn.EmbeddingBag for t in ours.tables)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs)]
    for step in range(4):
        batch = _batch(6)
        with manualgrad.enable():
            loss = ours(*batch)
        loss_t = theirs(*batch)
        names = {type(n).__name__ for n in graph_nodes([loss.grad_fn])}
        assert {"EmbeddingBagSumFunctionBackward", "EmbeddingBagMaxFunctionBackward"} <= names
        assert not any(n.startswith("EmbeddingBag") and n.endswith("Backward0") for n in names)
        for m, l, opt in ((ours, loss, opts[0]), (theirs, loss_t, opts[1])):
            opt.zero_grad()
            l.backward()
        torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-6)
        grads_t = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            # float32: the same sums in other orders (bag means, matrix products): a few ulps of
            # each gradient's scale, compounded over the steps
            torch.testing.assert_close(p.grad, grads_t[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for opt in opts:
            opt.step()
