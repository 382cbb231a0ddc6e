"""The networks the training command builds, from manualgrad.nn or torch.nn alike.

Both implementations draw the same initial weights for the same seed (manualgrad's modules
are torch's classes with another forward), so their runs can be compared curve for curve.
"""
import torch

import manualgrad.nn as mnn


def modules_for(impl):
    return {"manualgrad": mnn, "torch": torch.nn}[impl]


def seed_mlp(in_features=784, width=1024, depth=3, classes=10, nn=mnn):
    """784-1024-1024-1024-10 with ReLU: the classic seed network. Flatten is a view: no Function."""
    layers = [torch.nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def lenet(image_size=28, classes=10, nn=mnn):
    """A small LeNet-style CNN: two conv + ReLU + max-pool stages, then three linear layers."""
    missing = [n for n in ("Conv2d", "MaxPool2d", "Flatten") if not hasattr(nn, n)]
    if missing:
        raise NotImplementedError(
            f"--model cnn needs manualgrad's {', '.join(missing)}, which are not implemented yet; use --model mlp"
        )
    pad = 2 if image_size >= 28 else 1
    kernel = 5 if image_size >= 28 else 3
    features = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, image_size)),  # (N, H, W) images -> (N, 1, H, W): a view
        nn.Conv2d(1, 6, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel, padding=pad if image_size < 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, image_size, image_size)).shape[1]
    return torch.nn.Sequential(
        features, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes)
    )


def build_model(name, impl, image_shape, classes=10):
    nn = modules_for(impl)
    if name == "mlp":
        in_features = 1
        for s in image_shape:
            in_features *= s
        return seed_mlp(in_features, classes=classes, nn=nn)
    if name == "cnn":
        return lenet(image_shape[-1], classes, nn=nn)
    raise ValueError(f"unknown model {name!r}")
