"""NeuMF: neural matrix factorisation (He et al., WWW 2017, "Neural Collaborative Filtering").

Two branches over (user, item) pairs: GMF, the elementwise product of ``factors``-dimensional
user and item embeddings; and an MLP over the concatenation of two more embeddings of
``mlp_layers[0] // 2`` each, through Linear+ReLU layers of sizes ``mlp_layers[1:]``, with
dropout after each (as in NVIDIA's NCF code, whose set-up the compression papers use). A final
Linear over [GMF, MLP] gives one logit per pair; train with ``BCEWithLogitsLoss``.

Initialisation follows the MLPerf NCF reference: embeddings normal(0, 0.01), MLP weights Glorot
uniform, final weights LeCun uniform (limit sqrt(3 / fan_in)); biases keep PyTorch's default.
Parameters: (users + items) (factors + mlp_layers[0] / 2) + sum_i (m_{i-1} + 1) m_i
+ mlp_layers[-1] + factors + 1, which is 31,832,577 on MovieLens-20M (138,493 users, 26,744 items).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import dropout_rate, positive_int
from .registry import register_model

__all__ = ["NeuMF"]


@register_model("neumf")
class NeuMF(nn.Module):
    """``forward(users, items)``: two LongTensors [N] -> logits [N]."""

    def __init__(self, num_users: int, num_items: int, factors: int = 64,
                 mlp_layers: Sequence[int] = (256, 256, 128, 64), dropout: float = 0.5) -> None:
        super().__init__()
        num_users = positive_int("num_users", num_users)
        num_items = positive_int("num_items", num_items)
        factors = positive_int("factors", factors)
        sizes = [positive_int(f"mlp_layers[{i}]", m) for i, m in enumerate(mlp_layers)]
        if not sizes or sizes[0] % 2:
            raise ValueError(f"mlp_layers must be non-empty with an even first size, got {tuple(mlp_layers)!r}")
        self.dropout = dropout_rate("dropout", dropout)

        self.gmf_user = nn.Embedding(num_users, factors)
        self.gmf_item = nn.Embedding(num_items, factors)
        self.mlp_user = nn.Embedding(num_users, sizes[0] // 2)
        self.mlp_item = nn.Embedding(num_items, sizes[0] // 2)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.final = nn.Linear(factors + sizes[-1], 1)

        with torch.no_grad():
            for embedding in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
                nn.init.normal_(embedding.weight, 0.0, 0.01)
            for layer in self.mlp:
                nn.init.xavier_uniform_(layer.weight)
            limit = math.sqrt(3.0 / self.final.in_features)
            nn.init.uniform_(self.final.weight, -limit, limit)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = torch.cat([self.mlp_user(users), self.mlp_item(items)], dim=-1)
        for layer in self.mlp:
            mlp = F.dropout(F.relu(layer(mlp)), self.dropout, self.training)
        return self.final(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)
