"""Two small models built from torch.nn only, shared by tests/test_models.py and
benchmarks/bench_blocks.py: a ResNet-style CNN and a GPT-style decoder.

Both are written so that ``manualgrad.convert(model, strict=True)`` can swap every layer:
the user modules here (``BasicBlock``, ``ResNet``, ``DecoderBlock``, ``GPT``) hold no
parameters of their own, only torch.nn submodules, and their forwards add nothing heavier
than residual additions, views and an ``arange``. Attention is ``nn.MultiheadAttention``
(which has a twin) with a causal mask, not a functional ``scaled_dot_product_attention`` call,
which ``convert`` could not reach.

    model = resnet_small()                        # (N, 3, H, W) -> (N, 10) logits
    model = gpt_small(vocab=256, d=32, heads=4, layers=2, ctx=16)
    loss = model(idx, targets)                    # idx, targets: (N, T) token ids
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
    """y = relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), shortcut a 1x1 conv + bn when the
    shape changes (He et al. 2016, option B)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))  # residual add: torch's AddBackward0


class ResNet(nn.Module):
    """stem (conv 3x3, bn, relu, maxpool 2) -> residual blocks -> adaptive avg pool -> linear."""

    def __init__(self, channels=(16, 32), num_classes=10, in_channels=3):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        blocks, cin = [], c0
        for i, c in enumerate(channels):
            blocks.append(BasicBlock(cin, c, stride=1 if i == 0 else 2))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def resnet_small(channels=(16, 32), num_classes=10, in_channels=3):
    """A 2-block ResNet (16 -> 32 channels by default) for (N, 3, H, W) images, H, W >= 4."""
    return ResNet(channels, num_classes, in_channels)


class DecoderBlock(nn.Module):
    """Pre-norm GPT block: x + attn(ln1(x)) causal, then x + mlp(ln2(x)), mlp = Linear 4d, GELU, Linear."""

    def __init__(self, d, heads, ctx):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        # float mask, -inf above the diagonal; is_causal=True tells the attention it is causal
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x):
        T = x.shape[1]
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=self.causal_mask[:T, :T], is_causal=True, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + learned position embedding -> decoder blocks -> layernorm -> tied LM head.

    ``forward(idx)`` gives logits (N, T, vocab); ``forward(idx, targets)`` the mean
    cross-entropy over all N * T positions.
    """

    def __init__(self, vocab, d, heads, layers, ctx):
        super().__init__()
        self.ctx = ctx
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(ctx, d)  # a module, not a bare Parameter, so convert can swap it
        self.blocks = nn.Sequential(*[DecoderBlock(d, heads, ctx) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one Parameter, two uses
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        if T > self.ctx:
            raise ValueError(f"sequence length {T} exceeds the context {self.ctx}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (N, T, d)
        x = self.ln_f(self.blocks(x))
        logits = self.lm_head(x)  # (N, T, vocab)
        if targets is None:
            return logits
        return self.loss_fn(logits.flatten(0, 1), targets.flatten())


def gpt_small(vocab=256, d=32, heads=4, layers=2, ctx=16):
    """A GPT-style decoder; defaults are test-sized."""
    return GPT(vocab, d, heads, layers, ctx)
