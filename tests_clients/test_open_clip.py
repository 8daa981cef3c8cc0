"""open_clip 3.3: a small CLIP model trained as open_clip's training script does, with
``loss = ClipLoss(...)`` swapped for ``loss = CCTClipLoss.for_model(model, ...)`` (which fixes
``model.logit_scale``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from cct_loss import CCTClipLoss, cct_loss
from cct_loss.baselines import clip_info_nce
from tests.reference import reference_loss

from .common import STEPS, assert_gradient_matches, assert_went_down

BATCH, CONTEXT, VOCAB = 8, 12, 64


def small_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=1),
        output_dict=True,
    )


def both_directions(image: torch.Tensor, text: torch.Tensor, t_neg: float) -> torch.Tensor:
    """ClipLoss's two directions, CCT inside, in float64."""
    to_text = reference_loss(image, text, layout="cross", t_neg=t_neg)
    to_image = reference_loss(text, image, layout="cross", t_neg=t_neg)
    return (to_text + to_image) / 2


def test_open_clip_training_step_with_the_swapped_loss() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    texts = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)
    model = small_clip()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built first, as open_clip does
    # was: loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True,
    #                      rank=0, world_size=1, use_horovod=False)
    loss = CCTClipLoss.for_model(model, local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1, use_horovod=False)  # fmt: skip
    scale_before = model.logit_scale.detach().clone()
    values = []
    for step in range(STEPS):
        noisy = images + 0.1 * torch.randn(images.shape, generator=g)
        model_out = model(noisy, texts)
        losses = loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
        assert isinstance(total_loss, torch.Tensor)
        if step == 0:
            reference = partial(both_directions, t_neg=float(model_out["logit_scale"]) / 2)
            features = [model_out["image_features"], model_out["text_features"]]
            assert_gradient_matches(total_loss, features, reference)
        values.append(total_loss.item())
        total_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # open_clip's clamp after each step
            model.logit_scale.clamp_(0, 4.6052)
    torch.testing.assert_close(model.logit_scale.detach(), scale_before)  # the scale stayed
    assert_went_down(values)


def test_a_learned_scale_is_refused_with_the_fix() -> None:
    model = small_clip()
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, VOCAB, (2, CONTEXT)))
    with pytest.raises(ValueError, match=r"model\.logit_scale\.requires_grad_\(False\)"):
        CCTClipLoss()(**out)


def test_clip_loss_is_the_baseline_and_its_weights_are_cct_repulsion_weights() -> None:
    """The benchmarks' baseline is open_clip's ClipLoss to machine precision, and with
    ``temperature = 1 / logit_scale`` the repulsion weights are its softmax over the other
    captions (the positive left out)."""
    g = torch.Generator().manual_seed(2)
    image = torch.nn.functional.normalize(
        torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1
    )
    text = torch.nn.functional.normalize(
        torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1
    )
    scale = torch.tensor(14.0, dtype=torch.float64)
    ours = (clip_info_nce(image, text, 1 / 14.0) + clip_info_nce(text, image, 1 / 14.0)) / 2
    torch.testing.assert_close(ours, ClipLoss()(image, text, scale))
    details = cct_loss(image, text, layout="cross", temperature=1 / 14.0, return_details="weights")
    logits = (scale * image @ text.T).fill_diagonal_(float("-inf"))
    assert details.neg_weights is not None
    torch.testing.assert_close(details.neg_weights, torch.softmax(logits, dim=1))
