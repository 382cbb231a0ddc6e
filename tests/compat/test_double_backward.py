"""Double backward through converted models: a WGAN-GP critic (Gulrajani et al. 2017).

The gradient penalty ``lambda * mean_i (||dD(x_hat_i)/dx_hat_i||_2 - 1)^2``, with x_hat a random
interpolation between real and fake samples, needs the input gradient as a differentiable
graph (``create_graph=True``): its backward runs every op's backward of the backward. GP
critics avoid batch norm (it mixes samples, and the penalty is per sample), so the critics
here use Linear, LeakyReLU, LayerNorm, and Conv2d for the image one.

What holds: the critic loss, the penalty and every parameter gradient after backward through
the penalty equal torch's (float32 tolerance), the penalty's parameter gradient is nonzero
(so the second-order path is really exercised) and a few Adam steps follow torch's trajectory.
"""
import pytest
import torch
from torch import nn

from tests.compat._models import converted_pair

pytestmark = pytest.mark.trajectory  # follows a trajectory: run again under other CPUs' kernels

torch.set_num_threads(1)
RTOL, ATOL = 1e-4, 1e-5
GP_WEIGHT = 10.0


def mlp_critic():
    return nn.Sequential(
        nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.LayerNorm(16),
        nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1),
    )


def conv_critic():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.LayerNorm([8, 3, 3]), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 1),
    )


CRITICS = {"mlp": (mlp_critic, (8, 6)), "conv": (conv_critic, (8, 2, 6, 6))}


def gradient_penalty(critic, real, fake, alpha):
    """mean_i (||d critic(x_hat)_i / d x_hat_i||_2 - 1)^2, x_hat = alpha real + (1 - alpha) fake."""
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat)
    (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)  # (N, *) per-sample, samples independent
    return ((g.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def critic_step(critic, real, fake, alpha):
    """The critic loss E[D(fake)] - E[D(real)] + lambda GP, backpropagated; returns (loss, gp)."""
    gp = gradient_penalty(critic, real, fake, alpha)
    loss = critic(fake).mean() - critic(real).mean() + GP_WEIGHT * gp
    loss.backward()
    return loss.detach(), gp.detach()


def _batch(shape):
    real, fake = torch.randn(shape) + 1.0, torch.randn(shape)
    alpha = torch.rand(shape[0], *[1] * (len(shape) - 1))
    return real, fake, alpha


def _assert_grads_equal(ours, theirs, what):
    """Every parameter gradient equal, and None exactly where torch's is None: a parameter the
    penalty reaches only through a piecewise-linear op's mask gets zeros in both (an optimizer
    treats a None gradient differently from a zero one: it skips weight decay and momentum)."""
    mine = dict(ours.named_parameters())
    assert mine.keys() == dict(theirs.named_parameters()).keys()
    for name, p in theirs.named_parameters():
        assert (mine[name].grad is None) == (p.grad is None), f"{what} {name}: None in one model only"
        if p.grad is not None:
            torch.testing.assert_close(
                mine[name].grad, p.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}"
            )


@pytest.mark.parametrize("name", list(CRITICS))
def test_gradient_penalty_loss_and_every_parameter_gradient_match_torch(name):
    build, shape = CRITICS[name]
    ours, theirs = converted_pair(build())
    real, fake, alpha = _batch(shape)

    loss, gp = critic_step(ours, real, fake, alpha)
    ref_loss, ref_gp = critic_step(theirs, real, fake, alpha)

    torch.testing.assert_close(gp, ref_gp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    _assert_grads_equal(ours, theirs, "gradient")
    assert all(p.grad is not None for p in ours.parameters()), "the full critic loss reaches every parameter"


@pytest.mark.parametrize("name", list(CRITICS))
def test_penalty_alone_has_second_order_parameter_gradients_equal_to_torchs(name):
    """Backward of the penalty alone: only the backward-of-backward path reaches the parameters."""
    build, shape = CRITICS[name]
    ours, theirs = converted_pair(build())
    real, fake, alpha = _batch(shape)
    for model in (ours, theirs):
        gradient_penalty(model, real, fake, alpha).backward()
    _assert_grads_equal(ours, theirs, "penalty gradient")
    first = next(theirs.parameters())
    assert first.grad.abs().sum() > 0, "the penalty gives the first layer no gradient: the check is empty"


@pytest.mark.parametrize("name", list(CRITICS))
def test_a_few_sgd_steps_on_the_gradient_penalty_loss_track_torchs_trajectory(name):
    """SGD with momentum rather than WGAN-GP's Adam: Adam's first step is lr * sign(g), so a
    gradient that cancels to exactly 0 in torch (E[D(fake)] - E[D(real)] has no first-order
    term in some biases) and to 1e-9 in manualgrad (rounding) would step by lr in one and not
    at all in the other; a trajectory comparison then measures rounding, not gradients."""
    build, shape = CRITICS[name]
    ours, theirs = converted_pair(build())
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (ours, theirs)]
    start = [p.detach().clone() for p in theirs.parameters()]
    for step in range(4):
        real, fake, alpha = _batch(shape)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad(set_to_none=True)
            losses.append(critic_step(model, real, fake, alpha)[0])
            opt.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} loss: {m}")
        for (n, p), q in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"step {step} {n}: {m}")
    # every weight moved (the last bias need not: E[D(fake)] - E[D(real)] cancels its gradient)
    still = [n for (n, p), s in zip(theirs.named_parameters(), start) if n.endswith("weight") and torch.equal(p, s)]
    assert not still, f"weights that never moved, the trajectory comparison says nothing about them: {still}"
