import torch

import manualgrad.nn as mnn
from train.models import build_model, seed_mlp


def test_seed_mlp_is_784_1024_1024_1024_10_of_manualgrad_layers():
    model = seed_mlp()
    linears = [m for m in model if isinstance(m, mnn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1024), (1024, 1024), (1024, 1024), (1024, 10)]
    assert sum(type(m) is mnn.ReLU for m in model) == 3


def test_both_implementations_start_from_the_same_weights():
    torch.manual_seed(5)
    a = build_model("cnn", "manualgrad", (28, 28))
    torch.manual_seed(5)
    b = build_model("cnn", "torch", (28, 28))
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    assert any(type(m) is mnn.Conv2d for m in a.modules())
    assert not any(type(m).__module__.startswith("manualgrad") for m in b.modules())
    x = torch.randn(3, 28, 28)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert build_model("cnn", "manualgrad", (8, 8))(torch.randn(2, 8, 8)).shape == (2, 10)
