"""Logistic regression: one linear layer (the convex study of the "rethinking" paper).

Binary labels (``num_classes=2``) get a single output, returned as logits [N] for
``BCEWithLogitsLoss``; more classes get [N, num_classes] logits for ``CrossEntropyLoss``.
Weights and bias start at zero, the usual start for this convex problem, so runs do not
depend on the seed. Inputs may be dense or sparse (COO or CSR) [N, num_features] tensors, as
read from LIBSVM files.
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["LogisticRegression"]


@register_model("logreg")
class LogisticRegression(nn.Module):
    """Linear(num_features, 1 if num_classes == 2 else num_classes)."""

    def __init__(self, num_features: int, num_classes: int = 2) -> None:
        super().__init__()
        num_features = positive_int("num_features", num_features)
        num_classes = positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        self.binary = num_classes == 2
        self.linear = nn.Linear(num_features, 1 if self.binary else num_classes)
        with torch.no_grad():
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.strided:
            out = self.linear(x)
        else:
            out = torch.sparse.mm(x, self.linear.weight.t()) + self.linear.bias
        return out.squeeze(-1) if self.binary else out
