"""Models made of the layers that landed with the recurrent, vision and rest-of-torch.nn work,
each built from torch.nn, converted with manualgrad.convert(strict=True), and trained a few steps
next to the same torch model: a small U-Net, an ESPCN-style super-resolution net, a SimCLR-style
contrastive step, and a speech model (Conv1d + LSTM + CTC loss).

What holds: the loss and every parameter gradient match torch's at every step (float32
tolerance), buffers too, and no torch backward node with FLOPs is left in the converted graph.
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

import manualgrad
from manualgrad.coverage import graph_nodes

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.trajectory]

RTOL, ATOL = 1e-4, 1e-5


class UNet(nn.Module):
    """Two levels: conv blocks with InstanceNorm/GroupNorm, max-pool down, ConvTranspose2d up on
    one side and bilinear upsampling on the other, skip connections by concatenation."""

    def __init__(self, c=4):
        super().__init__()

        def block(cin, cout, norm):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect"), norm(cout), nn.LeakyReLU(0.1))

        self.enc1 = block(3, c, lambda n: nn.InstanceNorm2d(n, affine=True))
        self.enc2 = block(c, 2 * c, lambda n: nn.GroupNorm(2, n))
        self.mid = block(2 * c, 4 * c, lambda n: nn.InstanceNorm2d(n, affine=True, track_running_stats=True))
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = block(4 * c, 2 * c, lambda n: nn.GroupNorm(2, n))
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(2 * c + c, c, lambda n: nn.InstanceNorm2d(n, affine=True))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)                                   # (N, c, H, W)
        e2 = self.enc2(self.pool(e1))                       # (N, 2c, H/2, W/2)
        m = self.mid(self.pool(e2))                         # (N, 4c, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))     # (N, 2c, H/2, W/2)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))    # (N, c, H, W)
        return self.head(d1)


class ESPCN(nn.Module):
    """Super-resolution by sub-pixel convolution (Shi et al. 2016): convolutions on the
    low-resolution image, a last one to r^2 channels, PixelShuffle(r) to the high-resolution
    image; mean squared error against it."""

    def __init__(self, r=3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2, padding_mode="reflect"), nn.Tanh(),
            nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(),
            nn.Conv2d(4, r * r, 3, padding=1, padding_mode="replicate"), nn.PixelShuffle(r))
        self.loss = nn.MSELoss()

    def forward(self, low, high):
        return self.loss(self.body(low), high)                          # (N, 1, r H, r W) vs high


class SimCLR(nn.Module):
    """An encoder and a projection head; NT-Xent over two views: normalize, cosine similarities
    of every pair, cross-entropy against the other view of each sample (Chen et al. 2020)."""

    def __init__(self, tau=0.5):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.cos = nn.CosineSimilarity(dim=-1)
        self.loss = nn.CrossEntropyLoss()
        self.tau = tau

    def forward(self, a, b):
        f = self.head(self.encoder(torch.cat([a, b])))                   # (2N, 8)
        z = nn.functional.normalize(f, dim=1)                            # (2N, 8)
        sim = self.cos(z[:, None, :], z[None, :, :]) / self.tau          # (2N, 2N)
        n = a.shape[0]
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), -1e9)  # no sample against itself
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return self.loss(sim, target)


class Speech(nn.Module):
    """Conv1d front end over feature frames, a bidirectional LSTM, a linear layer to characters
    (blank = 0), log-softmax and CTC loss."""

    def __init__(self, feats=6, hidden=8, chars=5):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(feats, hidden, 3, padding=1), nn.GELU())
        self.rnn = nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, chars)
        self.log_softmax = nn.LogSoftmax(dim=-1)
        self.ctc = nn.CTCLoss(zero_infinity=True)

    def forward(self, x, targets, input_lengths, target_lengths):
        h = self.front(x.transpose(1, 2)).transpose(1, 2)                # (N, T, hidden)
        h, _ = self.rnn(h)                                               # (N, T, 2 hidden)
        lp = self.log_softmax(self.out(h)).transpose(0, 1)               # (T, N, chars)
        return self.ctc(lp, targets, input_lengths, target_lengths)


def _torch_nodes_with_flops(loss):
    """Backward nodes of torch's own derivatives that compute something (views, cats and
    adds only move or pass gradients)."""
    passive = ("View", "Reshape", "Cat", "Add", "Transpose", "Permute", "Squeeze", "Unsqueeze", "Expand",
               "Slice", "Select", "Index", "MaskedFill", "Div", "T", "Clone", "AccumulateGrad", "Split", "Unbind",
               "Stack", "Alias", "UnsafeView")
    names = {type(n).__name__ for n in graph_nodes([loss.grad_fn])}
    return {n for n in names if n.endswith("Backward0") and not n.startswith(passive)}


def _train_side_by_side(theirs, make_batch, steps=3, lr=0.1, mode=False):
    """``mode``: run the converted model's forward under manualgrad.enable(), for the functional
    calls a model makes in its own forward (F.normalize, matmul, ...)."""
    ours = manualgrad.convert(copy.deepcopy(theirs), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (ours, theirs)]
    for step in range(steps):
        batch = make_batch()
        with manualgrad.enable() if mode else contextlib.nullcontext():
            loss = ours(*batch)
        losses = [loss, theirs(*batch)]
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} loss: {m}")
        if step == 0:
            assert _torch_nodes_with_flops(losses[0]) == set(), "torch backward nodes left in the converted graph"
        for opt, loss in zip(opts, losses):
            opt.zero_grad()
            loss.backward()
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"step {step} {n}: {m}")
        for opt in opts:
            opt.step()
    for (name, b), c in zip(theirs.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c, b, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"buffer {n}: {m}")
    return ours


def test_unet_converted_strictly_trains_like_torch():
    torch.manual_seed(0)
    theirs = UNet()
    target = torch.randint(0, 2, (2, 12, 16))

    def batch():
        return (torch.randn(2, 3, 12, 16),)

    loss_fn = nn.CrossEntropyLoss()

    class WithLoss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.loss = net, loss_fn

        def forward(self, x):
            return self.loss(self.net(x), target)

    _train_side_by_side(WithLoss(theirs), batch)


def test_espcn_converted_strictly_trains_like_torch():
    torch.manual_seed(3)
    theirs = ESPCN(r=3)

    def batch():
        return (torch.randn(2, 1, 7, 6), torch.randn(2, 1, 21, 18))

    _train_side_by_side(theirs, batch)  # strict: every layer, PixelShuffle too, is manualgrad's


def test_simclr_step_converted_strictly_trains_like_torch():
    torch.manual_seed(1)
    theirs = SimCLR()

    def batch():
        x = torch.randn(5, 3, 8, 8)
        return (x + 0.1 * torch.randn_like(x), x.flip(-1))  # two views of the same images

    _train_side_by_side(theirs, batch, mode=True)  # its forward calls F.normalize


def test_speech_model_with_lstm_and_ctc_converted_strictly_trains_like_torch():
    torch.manual_seed(2)
    theirs = Speech()

    def batch():
        n, t = 3, 12
        target_lengths = torch.tensor([4, 2, 3])
        return (torch.randn(n, t, 6), torch.randint(1, 5, (n, 4)), torch.tensor([12, 10, 7]), target_lengths)

    _train_side_by_side(theirs, batch)
