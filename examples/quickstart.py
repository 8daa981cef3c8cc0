"""Thirty seconds with cct-loss: fit a small encoder with CCT on synthetic data.

Run with ``python examples/quickstart.py``. Each sample is a random vector; two noisy views of
the same sample are positives, every other sample's views are negatives (the SimCLR layout).
The diagnostics show attraction falling and the contrastive accuracy rising.
"""

from __future__ import annotations

import argparse

import torch

from cct_loss import cct_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def views(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.randn(batch, 32)
        return base + 0.5 * torch.randn_like(base), base + 0.5 * torch.randn_like(base)

    for step in range(args.steps + 1):
        x1, x2 = views(128)
        out = cct_loss(model(x1), model(x2), t_neg=2.0, return_details=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 50 == 0:
            print(
                f"step {step:4d}  loss {out.loss.item():+.4f}  attraction {out.attraction.item():.4f}"
                f"  repulsion {out.repulsion.item():+.4f}  accuracy {out.accuracy.item():.3f}"
                f"  effective negatives {out.neg_entropy.exp().item():.1f}"
            )


if __name__ == "__main__":
    main()
