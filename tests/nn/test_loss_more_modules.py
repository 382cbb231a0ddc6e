"""The loss modules of manualgrad/nn/loss_more.py: drop-ins for torch.nn's (same repr, state_dict,
isinstance; outputs and gradients as torch's for their options), swapped by convert(strict=True)."""
import copy
import warnings

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch

pytestmark = pytest.mark.usefixtures("one_thread")

N, C = 5, 7


def _x(*shape):
    return torch.randn(shape, requires_grad=True)


def _pos(*shape):
    return (torch.rand(shape) + 0.1).requires_grad_()


def _signs(*shape):
    return torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)


def _multilabel_target():
    # row n: classes n and n + 1, then -1 (and a class after it, to be ignored)
    t = torch.full((N, C), -1)
    t[:, 0], t[:, 1], t[:, 3] = torch.arange(N), torch.arange(1, N + 1) % C, 2
    return t


def _log_probs(*shape):
    return torch.randn(shape).log_softmax(1).requires_grad_()


# (class name, constructor kwargs, () -> forward inputs)
MODULES = [
    ("PoissonNLLLoss", {}, lambda: (_x(N, C), torch.rand(N, C) * 3)),
    ("PoissonNLLLoss", dict(log_input=False, full=True, eps=1e-3, reduction="none"),
     lambda: (_pos(N, C), _pos(N, C) * 3)),
    ("GaussianNLLLoss", {}, lambda: (_x(N, C), _x(N, C), _pos(N, C))),
    ("GaussianNLLLoss", dict(full=True, eps=0.2, reduction="sum"), lambda: (_x(N, C), _x(N, C), _pos(N))),
    ("MarginRankingLoss", dict(margin=0.3), lambda: (_x(N), _x(N), _signs(N))),
    ("MarginRankingLoss", dict(reduction="none"), lambda: (_x(N, C), _x(N, C), _signs(N, C))),
    ("HingeEmbeddingLoss", {}, lambda: (_x(N, C), _signs(N, C))),
    ("HingeEmbeddingLoss", dict(margin=0.5, reduction="sum"), lambda: (_x(N, C), _signs(N, C))),
    ("SoftMarginLoss", {}, lambda: (_x(N, C), _signs(N, C))),
    ("SoftMarginLoss", dict(reduction="none"), lambda: (_x(N, C), _signs(N, C))),
    ("MultiLabelSoftMarginLoss", {}, lambda: (_x(N, C), torch.rand(N, C).round())),
    ("MultiLabelSoftMarginLoss", dict(weight=torch.rand(C), reduction="none"), lambda: (_x(N, C), torch.rand(N, C))),
    ("MultiLabelMarginLoss", {}, lambda: (_x(N, C), _multilabel_target())),
    ("MultiLabelMarginLoss", dict(reduction="none"), lambda: (_x(N, C), _multilabel_target())),
    ("NLLLoss2d", {}, lambda: (_log_probs(N, C, 3, 4), torch.randint(0, C, (N, 3, 4)))),
    ("NLLLoss2d", dict(weight=torch.rand(C), ignore_index=1, reduction="sum"),
     lambda: (_log_probs(N, C, 3, 4), torch.randint(0, C, (N, 3, 4)))),
    ("MultiMarginLoss", {}, lambda: (_x(N, C), torch.randint(0, C, (N,)))),
    ("MultiMarginLoss", dict(p=2, margin=0.5, weight=torch.rand(C) + 0.1, reduction="sum"),
     lambda: (_x(N, C), torch.randint(0, C, (N,)))),
]
IDS = [f"{m[0]}-{i}" for i, m in enumerate(MODULES)]


def _pair(name, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NLLLoss2d's deprecation
        theirs = getattr(torch.nn, name)(**copy.deepcopy(kwargs))
        ours = getattr(mnn, name)(**copy.deepcopy(kwargs))
    return ours, theirs


@pytest.mark.parametrize("name, kwargs, make_inputs", MODULES, ids=IDS)
def test_loss_module_matches_torch(name, kwargs, make_inputs):
    ours, theirs = _pair(name, kwargs)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, type(theirs)) and type(ours).__bases__[0] is type(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert_same_as_torch(ours, theirs, *make_inputs())


@pytest.mark.filterwarnings("ignore:`NLLLoss2d` has been deprecated:FutureWarning")  # torch's, on deepcopy
@pytest.mark.parametrize("name, kwargs, make_inputs", MODULES, ids=IDS)
def test_convert_swaps_the_loss_module_and_the_result_is_torchs(name, kwargs, make_inputs):
    holder = torch.nn.ModuleDict({"loss": _pair(name, kwargs)[1]})
    reference = copy.deepcopy(holder)
    mg.convert(holder, strict=True)
    assert type(holder["loss"]) is getattr(mnn, name)
    assert_same_as_torch(holder["loss"], reference["loss"], *make_inputs())


def test_nllloss2d_warns_like_torch_and_is_manualgrads_nllloss():
    with pytest.warns(FutureWarning, match="NLLLoss2d` has been deprecated") as ours:
        mnn.NLLLoss2d()
    with pytest.warns(FutureWarning) as theirs:
        torch.nn.NLLLoss2d()
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert issubclass(mnn.NLLLoss2d, mnn.NLLLoss) and issubclass(mnn.NLLLoss2d, torch.nn.NLLLoss2d)
    x = _log_probs(N, C, 3, 4)
    with pytest.warns(FutureWarning):
        loss = mnn.NLLLoss2d()(x, torch.randint(0, C, (N, 3, 4)))
    assert type(loss.grad_fn).__name__ == "NLLLossFunctionBackward"
