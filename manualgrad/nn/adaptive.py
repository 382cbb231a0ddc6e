"""AdaptiveLogSoftmaxWithLoss: torch's module (Grave et al., "Efficient softmax approximation
for GPUs", 2016) with every product and softmax run by manualgrad.functional.

The head scores the shortlist classes [0, cutoffs[0]) and one logit per tail cluster; cluster i
scores its classes [cutoffs[i], cutoffs[i + 1]) through two bias-free projections. For a target
c in cluster i:

    log p(c | x) = log_softmax(head(x))[shortlist + i] + log_softmax(tail_i(x))[c - cutoffs[i]]

and for a shortlist target just the first term. Each log-probability is read at the target with
nll_loss(reduction="none") (-logp[target], a gather whose backward is hand-written), in torch's
order, so the values are torch's to the bit. Only the row bookkeeping (index_select of a
cluster's rows, index_copy_ of their results, the final mean) stays torch's indexing.
"""
import torch
from torch.nn.modules.adaptive import _ASMoutput

from .. import functional as F


def _gather(logprob, index):
    # logprob[n, index[n]] = -nll_loss(logprob, index)[n]       (N,)
    return -F.nll_loss(logprob, index, reduction="none")


class AdaptiveLogSoftmaxWithLoss(torch.nn.AdaptiveLogSoftmaxWithLoss):
    """Drop-in for torch.nn.AdaptiveLogSoftmaxWithLoss with hand-written backwards: forward
    (output, loss), ``log_prob`` and ``predict`` give torch's values and gradients."""

    covers_submodules = True  # head and tail run through F.linear on their weights

    def _head(self, input):
        return F.linear(input, self.head.weight, self.head.bias)

    def _tail(self, i, input):
        # tail[i] = Sequential(Linear(in, h, bias=False), Linear(h, size, bias=False))
        proj, out = self.tail[i][0], self.tail[i][1]
        return F.linear(F.linear(input, proj.weight, proj.bias), out.weight, out.bias)

    def forward(self, input_, target_):
        # torch's checks, messages and order (torch/nn/modules/adaptive.py)
        targ_dim = target_.dim()
        if targ_dim == 1:
            if input_.size(0) != target_.size(0):
                raise RuntimeError("Input and target should have the same size in the batch dimension.")
            if input_.dim() != 2:
                raise RuntimeError(f"1D target tensor expects 2D input tensors, but found inputs with size {input_.size()}")
        elif targ_dim == 0:
            if input_.dim() != 1:
                raise RuntimeError(f"0D target tensor expects 1D input tensors, but found inputs with size {input_.size()}")
        else:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")

        is_batched = targ_dim > 0
        input = input_ if is_batched else input_.unsqueeze(0)
        target = target_ if is_batched else target_.unsqueeze(0)

        used_rows = 0
        batch_size = target.size(0)
        output = input.new_zeros(batch_size)
        gather_inds = target.new_empty(batch_size)
        cutoff_values = [0] + self.cutoffs
        for i in range(len(cutoff_values) - 1):
            low_idx, high_idx = cutoff_values[i], cutoff_values[i + 1]
            target_mask = (target >= low_idx) & (target < high_idx)
            row_indices = target_mask.nonzero().squeeze()
            if row_indices.numel() == 0:
                continue
            if i == 0:
                gather_inds.index_copy_(0, row_indices, target[target_mask])
            else:
                relative_target = target[target_mask] - low_idx
                input_subset = input.index_select(0, row_indices)
                cluster_output = self._tail(i - 1, input_subset)
                gather_inds.index_fill_(0, row_indices, self.shortlist_size + i - 1)
                # log p(c | cluster) at the target's place in the cluster        (rows,)
                cluster_logprob = F.log_softmax(cluster_output, dim=1)
                output.index_copy_(0, row_indices, _gather(cluster_logprob, relative_target))
            used_rows += row_indices.numel()

        if used_rows != batch_size:
            raise RuntimeError(
                f"Target values should be in [0, {self.n_classes - 1}], "
                f"but values in range [{target.min().item()}, {target.max().item()}] were found. "
            )

        # + log p(shortlist class or cluster | x)                                  (N,)
        head_logprob = F.log_softmax(self._head(input), dim=1)
        output = output + _gather(head_logprob, gather_inds)
        loss = (-output).mean()
        if not is_batched:
            output = output.squeeze(0)
        return _ASMoutput(output, loss)

    def _get_full_log_prob(self, input, head_output):
        """log p(c | x) for every class c: (N, n_classes), as torch's, assembled with cat."""
        head_logprob = F.log_softmax(head_output, dim=1)
        parts = [head_logprob[:, : self.shortlist_size]]
        for i in range(len(self.cutoffs) - 1):
            cluster_logprob = F.log_softmax(self._tail(i, input), dim=1)
            # log p(c | cluster i) + log p(cluster i)                             (N, cluster size)
            parts.append(cluster_logprob + head_logprob[:, self.shortlist_size + i].unsqueeze(1))
        return torch.cat(parts, dim=1)

    def log_prob(self, input):
        return self._get_full_log_prob(input, self._head(input))

    def predict(self, input):
        head_output = self._head(input)
        output = torch.argmax(head_output, dim=1)
        not_in_shortlist = output >= self.shortlist_size
        if not not_in_shortlist.any():
            return output
        if not_in_shortlist.all():
            return torch.argmax(self._get_full_log_prob(input, head_output), dim=1)
        log_prob = self._get_full_log_prob(input[not_in_shortlist], head_output[not_in_shortlist])
        output[not_in_shortlist] = torch.argmax(log_prob, dim=1)
        return output
