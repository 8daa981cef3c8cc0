"""cct-loss: Contrastive Conditional Transport (CCT / CACR) for PyTorch.

A drop-in replacement for InfoNCE / NT-Xent: ``loss = cct_loss(z1, z2)`` in a SimCLR trainer,
``loss = cct_loss(q, k, queue.T)`` in a MoCo trainer.

The package's folders are its layers, each using only those below it: ``front`` (the public
functions and modules, and the one route every call takes), ``implementations`` (dense,
chunked, sdpa, triton, and the table that is the only door to them), ``problem`` (who is a
query, a positive and a negative) and ``maths`` (costs, precision, the conditional expectation
and the one reduction); beside them the options, the shortcuts, the queue and the process-group
helpers. docs/development.md draws them.
"""

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
