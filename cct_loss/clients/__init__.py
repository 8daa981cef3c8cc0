"""Drop-in losses for the trainers of other libraries, each called exactly as the loss it
replaces: open_clip's ``ClipLoss`` (:mod:`.clip`) and pytorch-metric-learning's losses
(:mod:`.metric_learning`). They sit above ``front`` and take its one route; none of them
imports the library it serves."""
