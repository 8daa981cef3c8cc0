"""cct-loss: Contrastive Conditional Transport (CCT / CACR) for PyTorch.

A drop-in replacement for InfoNCE / NT-Xent: ``loss = cct_loss(z1, z2)`` in a SimCLR trainer,
``loss = cct_loss(q, k, queue.T)`` in a MoCo trainer.
"""

from .details import CCTDetails
from .functional import cct_loss, cct_loss_multiview
from .modules import CCTLoss, CCTMultiviewLoss
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
