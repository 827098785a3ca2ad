"""The word-level LSTM language model (Zaremba et al. 2014; the PyTorch word_language_model example).

Embedding, dropout, a multi-layer LSTM (dropout between layers), dropout, and a linear decoder
to the vocabulary. With ``tie_weights`` the decoder shares the embedding matrix (Press and Wolf
2017; Inan et al. 2017), which needs ``emsize == nhid``; the shared tensor is one parameter.
The defaults are the WikiText-2 set-up of the compression papers (3 x 650, dropout 0.4, tied:
28,949,319 parameters for a 28,869-word vocabulary); the classic small Penn Treebank one is
``emsize=nhid=200, nlayers=2, dropout=0, tie_weights=False``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import dropout_rate, positive_int
from .registry import register_model

__all__ = ["LSTMLanguageModel", "Hidden"]

Hidden = tuple[torch.Tensor, torch.Tensor]
INIT_RANGE = 0.1


@register_model("lstm_lm")
class LSTMLanguageModel(nn.Module):
    """Input ``[seq, batch]`` token ids; output ``[seq, batch, vocab]`` logits and the new state."""

    def __init__(self, vocab_size: int, emsize: int = 650, nhid: int = 650, nlayers: int = 3, dropout: float = 0.4,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.emsize = positive_int("emsize", emsize)
        self.nhid = positive_int("nhid", nhid)
        self.nlayers = positive_int("nlayers", nlayers)
        self.dropout = dropout_rate("dropout", dropout)
        if tie_weights and self.emsize != self.nhid:
            raise ValueError(f"tie_weights needs emsize == nhid, got emsize={emsize!r}, nhid={nhid!r}")
        self.tie_weights = bool(tie_weights)

        self.encoder = nn.Embedding(self.vocab_size, self.emsize)
        self.drop = nn.Dropout(self.dropout)
        # nn.LSTM applies dropout between layers only; with one layer it would only warn.
        self.rnn = nn.LSTM(self.emsize, self.nhid, self.nlayers, dropout=self.dropout if self.nlayers > 1 else 0.0)
        self.decoder = nn.Linear(self.nhid, self.vocab_size)
        with torch.no_grad():
            nn.init.uniform_(self.encoder.weight, -INIT_RANGE, INIT_RANGE)
            nn.init.zeros_(self.decoder.bias)
            if self.tie_weights:
                self.decoder.weight = self.encoder.weight
            else:
                nn.init.uniform_(self.decoder.weight, -INIT_RANGE, INIT_RANGE)

    def forward(self, input: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """``input`` [seq, batch] (long); ``hidden`` as from :meth:`init_hidden` (zeros when None)."""
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero (h, c), each [nlayers, batch_size, nhid], on the model's device and dtype."""
        weight = self.decoder.bias  # plain zeros even when it is a sharded parameter (FSDP's DTensor)
        shape = (self.nlayers, batch_size, self.nhid)
        return (torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    @staticmethod
    def detach_hidden(hidden: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """The state cut from its history (truncated backpropagation through time)."""
        if isinstance(hidden, torch.Tensor):
            return hidden.detach()
        return tuple(LSTMLanguageModel.detach_hidden(h) for h in hidden)
