"""Recurrent models converted with manualgrad.convert(strict=True) against the same torch models.

- a text classifier over packed variable-length sequences: Embedding -> bidirectional 2-layer
  LSTM (pack_padded_sequence, enforce_sorted=False) -> Linear on the last layer's final states of
  both directions -> CrossEntropy;
- a character-level language model: Embedding -> 2-layer GRU (dropout between the layers) ->
  Linear -> CrossEntropy over every position.

What holds: the loss and every parameter gradient match torch's (rtol 1e-4, atol 1e-5, as
tests/test_models.py) at each of several optimizer steps, and the converted graph holds no torch
node that does a recurrent layer's work.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import manualgrad
from manualgrad.coverage import graph_nodes

pytestmark = pytest.mark.trajectory  # optimizer steps: run again under other CPUs' kernels by make test

RTOL, ATOL = 1e-4, 1e-5
VOCAB = 30


class TextClassifier(torch.nn.Module):
    def __init__(self, vocab=VOCAB, dim=12, hidden=10, classes=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = torch.nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(2 * hidden, classes)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        # the last layer's final states, forward and reverse direction        (B, 2 hidden)
        return self.head(torch.cat([h_n[-2], h_n[-1]], 1))


class CharLM(torch.nn.Module):
    def __init__(self, vocab=VOCAB, dim=10, hidden=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.gru = torch.nn.GRU(dim, hidden, num_layers=2, dropout=0.2, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.gru(self.emb(tokens))
        return self.head(out)


def _classifier_case():
    batches = []
    for _ in range(4):
        lengths = torch.randint(1, 9, (6,))
        tokens = torch.randint(1, VOCAB, (6, 8)) * (torch.arange(8) < lengths[:, None])  # 0 = padding
        batches.append(((tokens, lengths), torch.randint(0, 4, (6,))))
    return TextClassifier(), lambda m, ce, x, y: ce(m(*x), y), batches


def _char_lm_case():
    text = torch.randint(0, VOCAB, (4, 4, 12))  # 4 batches of 4 sequences of 12 characters

    def loss(m, ce, x, y):
        return ce(m(x).flatten(0, 1), y.flatten())
    return CharLM(), loss, [(t[:, :-1], t[:, 1:]) for t in text]


CASES = {"lstm-classifier": _classifier_case, "gru-char-lm": _char_lm_case}

# torch nodes that do a recurrent layer's work (oneDNN's LSTM, the per-step ATen ops)
RECURRENT_WORK = {"MkldnnRnnLayerBackward0", "AddmmBackward0", "MmBackward0", "SigmoidBackward0",
                  "TanhBackward0", "MulBackward0", "EmbeddingBackward0", "NllLossBackward0", "LogSoftmaxBackward0"}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_match_torch_over_optimizer_steps(case):
    theirs, loss_of, batches = CASES[case]()
    ours = manualgrad.convert(copy.deepcopy(theirs), strict=True)
    ce_ours, ce_theirs = manualgrad.convert(torch.nn.CrossEntropyLoss(), strict=True), torch.nn.CrossEntropyLoss()
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (ours, theirs)]
    for step, (x, y) in enumerate(batches):
        losses = []
        for model, ce, opt in zip((ours, theirs), (ce_ours, ce_theirs), opts):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks in both
            loss = loss_of(model, ce, x, y)
            loss.backward()
            losses.append(loss.detach())
        if step == 0:
            torch.manual_seed(0)
            nodes = {type(n).__name__ for n in graph_nodes([loss_of(ours, ce_ours, x, y).grad_fn])}
            assert not nodes & RECURRENT_WORK, f"torch nodes left in the converted graph: {nodes & RECURRENT_WORK}"
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} loss: {m}")
        th = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, th[name].grad, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"step {step} grad {n}: {m}")
        for opt in opts:
            opt.step()


class LSTMLanguageModel(torch.nn.Module):
    def __init__(self, vocab=VOCAB, dim=8, hidden=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.lstm = torch.nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.head(self.lstm(self.emb(tokens))[0])


@pytest.mark.parametrize("clip", [None, 0.05])
def test_monitor_logs_the_clip_fraction_of_an_lstm_language_model(tmp_path, clip):
    """Recurrent weights scaled up (x3) make the gradient through time larger: the monitor logs
    its norm as computed here, and clipping with manualgrad.utils.clip_grad_norm_ below it shows
    as clip fraction 1 and a logged (clipped) gradient norm of max_norm."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from manualgrad.monitor import GradientMonitor
    from manualgrad.utils import clip_grad_norm_

    model = manualgrad.convert(LSTMLanguageModel(), strict=True)
    with torch.no_grad():
        for name, p in model.lstm.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(3)
    ce = manualgrad.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    text = torch.randint(0, VOCAB, (3, 4, 25))
    writer = SummaryWriter(tmp_path)
    norms = []
    with GradientMonitor(model, writer, optimizer=opt, every=1):
        for t in text:
            opt.zero_grad()
            ce(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten()).backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip)
            opt.step()
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    logged = {e.step: e.value for e in ea.Scalars("global/grad_norm")}
    assert min(norms) > 2 * 0.05  # well above the clip threshold below
    if clip is None:
        assert "global/clip_fraction" not in ea.Tags()["scalars"]
        assert list(logged.values()) == pytest.approx(norms, rel=1e-4)
    else:
        assert set({e.step: e.value for e in ea.Scalars("global/clip_fraction")}.values()) == {1.0}
        assert list(logged.values()) == pytest.approx([clip] * len(norms), rel=1e-4)
