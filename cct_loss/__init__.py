"""cct-loss: Contrastive Conditional Transport (CCT / CACR) for PyTorch, a drop-in replacement
for InfoNCE: ``cct_loss(z1, z2)`` in a SimCLR trainer, ``cct_loss(q, k, queue.T)`` in MoCo; ``CCTClipLoss`` and ``CCTMetricLoss`` for open_clip's and
pytorch-metric-learning's trainers.

The folders are the layers, each using only those below it: ``front`` (the public API and the
one route), ``implementations``, ``problem`` (who is a query, a positive, a negative) and
``maths``; above them ``clients`` (the losses called as other libraries call theirs); beside
them the options, the shortcuts, the queue and the process groups
(docs/development.md)."""

from .clients.clip import CCTClipLoss
from .clients.metric_learning import CCTMetricLoss
from .front.functional import cct_loss, cct_loss_moco, cct_loss_multicrop, cct_loss_multiview
from .front.modules import CCTLoss, CCTMultiviewLoss
from .maths.reduction import CCTDetails
from .queue import NegativeQueue

__all__ = [
    "CCTClipLoss",
    "CCTDetails",
    "CCTLoss",
    "CCTMetricLoss",
    "CCTMultiviewLoss",
    "NegativeQueue",
    "cct_loss",
    "cct_loss_moco",
    "cct_loss_multicrop",
    "cct_loss_multiview",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """A public name that does not exist names the one it most likely misspells: an
    ``ImportError`` for ``from cct_loss import CCTMultiViewLoss`` (Python 3.11 would drop the
    hint of an ``AttributeError`` there), an ``AttributeError`` for ``cct_loss.CCTMultiViewLoss``
    (so ``hasattr`` and ``getattr`` with a default work as ever)."""
    import dis
    import sys

    from .checks import closest_name

    lowered = {public.lower(): public for public in __all__}
    close = None if name.startswith("__") else closest_name(name, list(lowered))
    hint = (
        f"did you mean {lowered[close]!r}?"
        if close is not None
        else f"its public names are {', '.join(__all__)}"
    )
    caller = sys._getframe(1)
    instruction = caller.f_code.co_code[caller.f_lasti] if caller.f_lasti >= 0 else None
    if instruction == dis.opmap["IMPORT_FROM"]:
        raise ImportError(f"cannot import name {name!r} from 'cct_loss': {hint}", name=__name__)
    raise AttributeError(f"module 'cct_loss' has no attribute {name!r}: {hint}", name=name)
