"""cct-loss: Contrastive Conditional Transport (CCT / CACR) for PyTorch, a drop-in replacement
for InfoNCE: ``cct_loss(z1, z2)`` in a SimCLR trainer, ``cct_loss(q, k, queue.T)`` in MoCo.

The folders are the layers, each using only those below it: ``front`` (the public API and the
one route), ``implementations``, ``problem`` (who is a query, a positive, a negative) and
``maths``; beside them the options, the shortcuts, the queue and the process groups
(docs/development.md)."""

from .front.functional import cct_loss, cct_loss_multiview
from .front.modules import CCTLoss, CCTMultiviewLoss
from .maths.reduction import CCTDetails
from .queue import NegativeQueue

__all__ = [
    "CCTDetails",
    "CCTLoss",
    "CCTMultiviewLoss",
    "NegativeQueue",
    "cct_loss",
    "cct_loss_multiview",
]

__version__ = "0.1.0"
