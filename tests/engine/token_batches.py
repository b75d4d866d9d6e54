"""Token batches with padding, their summed loss and a tiny language model, shared by the Engine tests."""

import torch
import torch.nn.functional as F


def summed_loss(model, batch):
    """(sum of token losses over non-padding tokens, their count): padding is label -100."""
    tokens, labels = batch["tokens"], batch["labels"]
    logits = model(tokens).float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def make_batch(rows=6, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30, (rows, length), generator=generator)
    labels = tokens.clone()
    for row in range(rows):  # a different number of real tokens per row
        labels[row, length - row :] = -100
    return {"tokens": tokens, "labels": labels}


class TinyLM(torch.nn.Module):
    """Embedding, one fused Linear with a residual, LayerNorm and a head: every kind of gradient path."""

    def __init__(self, vocab=30, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.norm(h + torch.tanh(self.mix(h))))
