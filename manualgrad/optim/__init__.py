"""Hand-written optimizers: drop-in twins of torch.optim.SGD, RMSprop, Adam and AdamW.

Each is a ``torch.optim.Optimizer`` subclass with torch 2.13's constructor, defaults,
validation, ``param_groups`` keys and ``state`` keys, so ``state_dict`` round-trips with
torch.optim in both directions and ``torch.optim.lr_scheduler`` works unchanged. The update
of one parameter is a plain function (``sgd_update_``, ``rmsprop_update_``, ``adam_update_``)
written one formula per line; it follows torch's for-loop path so results agree bit for bit.

Not implemented (raise NotImplementedError): ``foreach=True``, ``fused=True``,
``capturable=True``, ``differentiable=True`` and hyper-parameter tensors that require grad.
"""
from .adam import Adam, AdamW, adam_update_
from .rmsprop import RMSprop, rmsprop_update_
from .sgd import SGD, sgd_update_

__all__ = ["SGD", "RMSprop", "Adam", "AdamW", "sgd_update_", "rmsprop_update_", "adam_update_"]
