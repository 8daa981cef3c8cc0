"""The public front: :func:`cct_loss.cct_loss`, :func:`cct_loss.cct_loss_multiview`, the
modules, the checks of their arguments and the one route every call takes."""
