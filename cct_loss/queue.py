"""A FIFO queue of negative keys for MoCo-style training."""

from __future__ import annotations

import operator
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn

from . import distributed
from .checks import as_int, check_float_tensor, check_labels, shape_str
from .distributed import all_gather_no_grad


class NegativeQueue(nn.Module):
    """FIFO of the ``size`` most recent keys, the negatives of a MoCo trainer.

    The keys live in a registered buffer (``state_dict`` saves and ``load_state_dict``
    restores the contents, the write position and the fill level exactly; ``.to(device)`` and
    ``.to(dtype)`` move them). Enqueued keys are detached.

    **Before the queue is full, :meth:`negatives` returns only the keys written so far**, never
    uninitialised memory and never placeholder vectors (MoCo fills its queue with random unit
    vectors; those are not negatives of anything, so we do not). Its length therefore grows
    from 0 to ``size`` over the first steps; it is known on the host from the batch sizes, so
    reading it costs no device synchronisation. **An empty queue gives ``(0, dim)``**, and
    :func:`cct_loss.cct_loss` takes no shared negatives to mean "no queue yet": the other rows'
    keys of the batch are the negatives (docs/queue.md). So the loop
    ``loss = cct_loss(q, k, queue.negatives()); queue.enqueue(k)`` needs no first-step case.

    Args:
        size: capacity ``K >= 1``.
        dim: key dimension ``D >= 1``.
        gather_distributed: under an initialised process group, :meth:`enqueue` first gathers
            the keys (and labels) of all ranks (in rank order), so every rank holds the same
            queue. Ranks may enqueue different numbers of keys (one small all-gather of
            the counts per call).
        dtype: dtype of the stored keys (default float32).
        with_labels: also keep each key's integer label (``enqueue(keys, labels=...)``,
            :meth:`labels`), for ``cct_loss(q, k, queue.negatives(), labels=y,
            negative_labels=queue.labels())``. The labels are a buffer too, so they are in the
            ``state_dict`` only when ``with_labels=True`` (checkpoints of a queue without
            labels load as before).
        device: where the buffers are created (default: PyTorch's default device); the
            queue moves with ``.to(device)`` like any module.

    Examples:
        >>> import torch
        >>> from cct_loss import NegativeQueue, cct_loss
        >>> queue = NegativeQueue(4096, 128)
        >>> q, k = torch.randn(32, 128), torch.randn(32, 128)
        >>> queue.enqueue(torch.randn(32, 128))  # keys of an earlier step
        >>> loss = cct_loss(q, k, queue.negatives())
        >>> queue.enqueue(k)
    """

    keys: Tensor
    key_labels: Tensor
    write_position: Tensor
    fill_level: Tensor

    def __init__(
        self,
        size: SupportsIndex,
        dim: SupportsIndex,
        *,
        gather_distributed: bool = False,
        dtype: torch.dtype = torch.float32,
        with_labels: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            number = as_int(value)
            if number is None:
                raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
            if number < 1:
                raise ValueError(f"{name} must be an int >= 1, got {number}")
        size, dim = operator.index(size), operator.index(dim)
        for name, flag in (
            ("gather_distributed", gather_distributed),
            ("with_labels", with_labels),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.size, self.dim = size, dim
        self.gather_distributed, self.with_labels = gather_distributed, with_labels
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype, device=device))
        if with_labels:
            self.register_buffer("key_labels", torch.zeros(size, dtype=torch.long, device=device))
        self.register_buffer("write_position", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("fill_level", torch.zeros((), dtype=torch.long, device=device))
        # The fill level decides negatives()'s shape: mirrored on the host (restored on load), so
        # reading it never synchronises. The write position lives on the device only, so a
        # compiled step that enqueues does not guard on it.
        self._filled = 0
        self.register_load_state_dict_post_hook(_sync_host_counters)  # type: ignore[no-untyped-call]

    def __len__(self) -> int:
        """Number of keys currently held (``<= size``)."""
        return self._filled

    @property
    def is_full(self) -> bool:
        return self._filled == self.size

    @torch.no_grad()
    def enqueue(
        self, keys: Tensor, labels: Tensor | None = None, *, check_finite: bool = True
    ) -> None:
        """Append ``keys`` (detached), overwriting the oldest once full.

        Args:
            keys: ``(B, dim)`` floating-point keys, any ``B >= 0``; when ``B > size`` only the
                newest ``size`` keys are kept. With ``gather_distributed=True`` under an
                initialised process group, the keys of all ranks are gathered first (rank
                order) and all of them are enqueued on every rank.
            labels: ``(B,)`` integer labels of the keys; required with ``with_labels=True``,
                refused without.
            check_finite: refuse keys with a NaN or infinite value (``ValueError``; the queue is
                left unchanged), so that one bad batch cannot poison the next ``size / B``
                steps. It costs one device synchronisation per call (and a graph break under
                ``torch.compile``); ``check_finite=False`` skips it.

        Raises:
            ValueError: keys or labels of the wrong shape or device, labels missing or
                unexpected, or non-finite keys (with ``check_finite``).
        """
        if self.gather_distributed and distributed.is_active():
            with distributed.gathering_call():  # every rank fails where one does
                self._enqueue(keys, labels, check_finite, gathering=True)
        else:
            self._enqueue(keys, labels, check_finite, gathering=False)

    def _enqueue(
        self, keys: Tensor, labels: Tensor | None, check_finite: bool, *, gathering: bool
    ) -> None:
        keys = check_float_tensor("keys", keys, (2,), f"(B, dim) = (B, {self.dim})")
        if keys.shape[1] != self.dim:
            raise ValueError(
                f"keys must have shape (B, dim) = (B, {self.dim}), got {shape_str(keys)}"
            )
        if keys.device != self.keys.device:
            raise ValueError(
                f"keys is on device {keys.device} but the queue is on {self.keys.device}; "
                "move the queue with .to(device)"
            )
        if self.with_labels:
            if labels is None:
                raise ValueError(
                    "this queue keeps labels (with_labels=True): call enqueue(keys, labels=...)"
                )
            labels = check_labels("labels", labels, keys.shape[0], "B")
            if labels.device != self.keys.device:
                raise ValueError(
                    f"labels is on device {labels.device} but the queue is on {self.keys.device}"
                )
        elif labels is not None:
            raise ValueError(
                "labels given to a queue without labels: build it with "
                "NegativeQueue(size, dim, with_labels=True)"
            )
        keys = keys.detach()
        if (
            not torch.compiler.is_compiling()  # a trace cannot ask
            and self.keys.is_inference()
            and not torch.is_inference_mode_enabled()
        ):
            raise RuntimeError(
                "this queue was created under torch.inference_mode(), so its buffers can only "
                "be written inside inference_mode: create the queue outside it (for example in "
                "the model's __init__), or move it into a fresh one, e.g. "
                "fresh = NegativeQueue(size, dim); fresh.load_state_dict(queue.state_dict())"
            )
        if gathering:
            fields = distributed.agreement("NegativeQueue.enqueue", keys, {"labels": labels})
            counts = distributed.gathered_counts(keys, fields=fields)  # keys and labels
            keys = all_gather_no_grad(keys, counts)
            if labels is not None:
                labels = all_gather_no_grad(labels, counts)
        batch = keys.shape[0]
        if batch == 0:
            return
        keys = keys.to(self.keys.dtype)  # checked as stored: 1e5 is finite, but not in float16
        if check_finite and not bool(torch.isfinite(keys).all()):  # one synchronisation
            raise ValueError(
                f"keys hold a NaN or infinite value in the queue's dtype {self.keys.dtype} "
                f"(shape {shape_str(keys)}); the queue is left unchanged (a diverged step, or "
                "keys too large for that dtype? pass check_finite=False to skip this check)"
            )
        start = self.write_position
        if batch > self.size:
            # Keep the newest `size`; they land where a sequential write would leave them.
            start = (start + (batch - self.size)) % self.size
            keys, batch = keys[-self.size :], self.size
            labels = None if labels is None else labels[-self.size :]
        index = (torch.arange(batch, device=keys.device) + start) % self.size
        self.keys.index_copy_(0, index, keys)
        if labels is not None:
            self.key_labels.index_copy_(0, index, labels.to(torch.long))
        self.write_position.copy_((start + batch) % self.size)
        self._filled = min(self._filled + batch, self.size)
        self.fill_level.fill_(self._filled)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (keys zeroed, write position 0): :meth:`negatives` is ``(0, dim)``
        again until keys are enqueued."""
        self.keys.zero_()
        if self.with_labels:
            self.key_labels.zero_()
        self.write_position.zero_()
        self.fill_level.zero_()
        self._filled = 0

    def negatives(self) -> Tensor:
        """The keys held, ``(len(self), dim)``, ready for ``cct_loss(q, k, queue.negatives())``;
        ``(0, dim)`` while the queue is empty, which that call reads as "no queue yet: the other
        rows' keys are the negatives".

        Returns a copy, so that :meth:`enqueue` may run before the backward pass (as MoCo's
        forward does) without touching tensors saved for it.
        """
        return self.keys[: self._filled].clone()

    def labels(self) -> Tensor:
        """The labels of :meth:`negatives`, ``(len(self),)`` int64, in the same order (a copy).

        ``(0,)`` while empty. Raises ``ValueError`` for a queue built without
        ``with_labels=True``.
        """
        if not self.with_labels:
            raise ValueError("this queue keeps no labels: build it with with_labels=True")
        return self.key_labels[: self._filled].clone()

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, filled={self._filled}, "
            f"gather_distributed={self.gather_distributed}, with_labels={self.with_labels}"
        )


def _sync_host_counters(module: nn.Module, _incompatible: Any) -> None:
    assert isinstance(module, NegativeQueue)
    position, filled = int(module.write_position), int(module.fill_level)
    if not (0 <= position < module.size and 0 <= filled <= module.size):
        raise ValueError(
            f"loaded queue counters out of range for size {module.size}: "
            f"write_position={position}, fill_level={filled}"
        )
    module._filled = filled
