import re

from train import demo


def test_demo_trains_the_seed_mlp_on_digits_and_the_loss_falls(tmp_path, capsys):
    # An empty data dir: no MNIST, so the demo falls back to scikit-learn's real 8x8 digits.
    acc = demo.main(["--data-dir", str(tmp_path), "--seed", "0"])
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert "8x8 digits" in out and len(losses) >= 3
    assert losses[-1] < 0.5 * losses[0]  # starts near ln(10) = 2.30
    assert acc > 0.8  # chance is 0.1
    assert out.strip().splitlines()[-1] == f"final eval accuracy: {acc:.4f}"


def test_seed_mlp_is_784_1024_1024_1024_10_of_manualgrad_layers():
    import manualgrad.nn as mnn

    model = demo.seed_mlp()
    linears = [m for m in model if isinstance(m, mnn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1024), (1024, 1024), (1024, 1024), (1024, 10)]
    assert sum(isinstance(m, mnn.ReLU) for m in model) == 3
