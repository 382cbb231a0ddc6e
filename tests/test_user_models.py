"""Models the project did not design, written the way their users write them: the PyTorch
examples' MNIST network, a classifier on torch.nn.TransformerEncoder, and the PyTorch
examples' VAE. Each runs as a torch model and as a copy under ``manualgrad.convert`` +
``manualgrad.enable()``, from the same weights, inputs and seeds.

What holds, in float32: the loss and every parameter gradient match torch (rtol 1e-4,
atol 1e-5), and the coverage report shows at least 95% of backward FLOPs hand-written.

Dropout: the MNIST network is compared in training mode, dropout on. manualgrad's dropout
draws its mask exactly as torch's CPU dropout does (bernoulli_ on a tensor laid out like the
input), so under the same seed both copies drop the same units; a mismatch in the masks would
show as gradients that differ. The transformer is built with dropout=0.0 as specified.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import manualgrad

torch.set_num_threads(1)

RTOL, ATOL = 1e-4, 1e-5
MIN_SHARE = 0.95  # of backward FLOPs hand-written


# --- the models, as users write them -------------------------------------------------------

class Net(nn.Module):
    """pytorch/examples mnist/main.py."""

    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class TransformerClassifier(nn.Module):
    """A sequence classifier: two encoder layers, mean over the sequence, a linear head."""

    def __init__(self, d_model=32, nhead=4, num_classes=5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(h.mean(dim=1))


class VAE(nn.Module):
    """pytorch/examples vae/main.py."""

    def __init__(self):
        super(VAE, self).__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    """Reconstruction + KL divergence losses summed over all elements and batch (as in the example)."""
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    # see Appendix B from VAE paper: Kingma and Welling. Auto-Encoding Variational Bayes. ICLR, 2014
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


# --- cases: model, inputs, loss of the output ------------------------------------------------

def mnist_case():
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    return Net(), (x,), lambda out: F.nll_loss(out, y)


def transformer_case():
    x, y = torch.randn(4, 7, 32), torch.randint(0, 5, (4,))
    return TransformerClassifier(), (x,), lambda out: F.cross_entropy(out, y)


def vae_case():
    x = torch.rand(4, 1, 28, 28)  # pixel intensities in [0, 1], the targets of the BCE

    def loss_fn(out):
        recon_batch, mu, logvar = out
        return vae_loss(recon_batch, x, mu, logvar)

    return VAE(), (x,), loss_fn


CASES = {"mnist_net": mnist_case, "transformer_encoder": transformer_case, "vae": vae_case}
SEED = 1234  # the same seed before each copy's forward: the same dropout masks and eps


def step(model, inputs, loss_fn):
    """One forward and backward from a fixed seed; the loss and every parameter's gradient."""
    torch.manual_seed(SEED)
    loss = loss_fn(model(*inputs))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    model, inputs, loss_fn = CASES[request.param]()
    model.train()
    ours = manualgrad.convert(copy.deepcopy(model))
    return model, ours, inputs, loss_fn


def test_loss_and_every_gradient_match_torch_under_convert_and_enable(case):
    model, ours, inputs, loss_fn = case
    loss, grads = step(model, inputs, loss_fn)
    with manualgrad.enable():
        our_loss, our_grads = step(ours, inputs, loss_fn)
    torch.testing.assert_close(our_loss, loss, rtol=RTOL, atol=ATOL)
    assert our_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_at_least_95_percent_of_backward_flops_are_hand_written(case):
    _, ours, inputs, loss_fn = case
    report = manualgrad.coverage(ours, *inputs, loss_fn=loss_fn)
    assert report.hand_written_flop_share >= MIN_SHARE, str(report)
