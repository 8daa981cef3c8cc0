"""The scalar options shared by every entry point, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import (
    COSTS,
    IMPLS,
    REDUCTIONS,
    check_choice,
    check_chunk_size,
    check_coefficient,
    check_flag,
    check_sharpness,
)


@dataclass(frozen=True)
class CCTOptions:
    """Validated options of :func:`cct_loss.cct_loss` (see its docstring for meanings)."""

    t_pos: float = 1.0
    t_neg: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    cost: str = "sqeuclidean"
    normalize: bool = True
    detach_weights: bool = True
    reduction: str = "mean"
    impl: str = "auto"
    chunk_size: int | None = None
    return_details: bool = False
    gather_distributed: bool = False

    def __post_init__(self) -> None:
        # Normalise ints to floats and reject bad values with messages naming the argument.
        object.__setattr__(self, "t_pos", check_sharpness("t_pos", self.t_pos))
        object.__setattr__(self, "t_neg", check_sharpness("t_neg", self.t_neg))
        object.__setattr__(self, "alpha", check_coefficient("alpha", self.alpha))
        object.__setattr__(self, "beta", check_coefficient("beta", self.beta))
        check_choice("cost", self.cost, COSTS)
        check_flag("normalize", self.normalize)
        check_flag("detach_weights", self.detach_weights)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("impl", self.impl, IMPLS)
        check_chunk_size(self.chunk_size)
        check_flag("return_details", self.return_details)
        check_flag("gather_distributed", self.gather_distributed)
