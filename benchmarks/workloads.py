"""Real training workloads on data that ships with a package: no downloads.

* ``digits_mlp``: an MLP on scikit-learn's 8x8 digits (64 pixels, 10 classes).
* ``digits_convnet``: a small conv net on the same images.
* ``char_transformer``: a GPT-style character-level language model on the text of Python's own
  documentation (``pydoc_data.topics``, ~465k characters, shipped with every CPython).

Each builder returns a :class:`Workload`: a model and a list of (input, target) mini-batches on
the device, plus the loss. ``scale`` grows the models for GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(xb), yb)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, opt, xb: torch.Tensor, yb: torch.Tensor) -> int:
        """One training step on (xb, yb) with a torch optimizer or a closure optimizer (SaLSA,
        the published package); returns the number of forward passes it took."""
        if isinstance(opt, (torch.optim.Adam, torch.optim.SGD)):
            opt.zero_grad()
            self.loss(xb, yb).backward()
            opt.step()
            return 1
        calls = 0

        def closure(backwards=False):
            nonlocal calls
            calls += 1
            loss = self.loss(xb, yb)
            if backwards:
                loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        return calls


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: pixels scaled to [0, 1] as N x 64 fp32, labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def sample(n_items: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_items, (batch,), generator=g) for _ in range(steps)]


def digits_mlp(device, steps: int, batch: int = 128, width: int = 256, seed: int = 0) -> Workload:
    x, y = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    batches = [(x[i].to(device), y[i].to(device)) for i in sample(len(x), steps, batch, seed + 1)]
    return Workload(f"digits_mlp_{width}", model.to(device), batches, nn.functional.cross_entropy)


class DigitsConvNet(nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * c * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def digits_convnet(device, steps: int, batch: int = 128, channels: int = 16, seed: int = 0) -> Workload:
    x, y = digits()
    torch.manual_seed(seed)
    model = DigitsConvNet(channels)
    batches = [(x[i].to(device), y[i].to(device)) for i in sample(len(x), steps, batch, seed + 1)]
    return Workload(f"digits_convnet_{channels}", model.to(device), batches, nn.functional.cross_entropy)


def python_docs_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def char_corpus() -> tuple[torch.Tensor, int]:
    """The Python documentation as a tensor of character ids, and the vocabulary size."""
    text = python_docs_text()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), len(vocab)


class CharGPT(nn.Module):
    """A small GPT: token and position embeddings, pre-norm causal transformer blocks, LM head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        nn.init.normal_(self.pos, std=0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def char_transformer(
    device,
    steps: int,
    batch: int = 32,
    seq: int = 64,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.0,
    seed: int = 0,
) -> Workload:
    ids, vocab = char_corpus()
    torch.manual_seed(seed)
    model = CharGPT(vocab, width, layers, heads, seq, dropout)
    starts = sample(len(ids) - seq - 1, steps, batch, seed + 1)
    offsets = torch.arange(seq + 1)
    batches = []
    for s in starts:
        window = ids[s[:, None] + offsets]
        batches.append((window[:, :-1].to(device), window[:, 1:].to(device)))
    name = f"char_transformer_{width}x{layers}"
    return Workload(name, model.to(device), batches, _lm_loss)


def standard(device: torch.device, steps: int, quick: bool) -> list[Callable[[], Workload]]:
    """The benchmark set: small on CPU (smaller with ``quick``), scaled up on a GPU."""
    if device.type == "cuda":
        return [
            lambda: digits_mlp(device, steps, batch=512, width=4096),
            lambda: digits_convnet(device, steps, batch=512, channels=64),
            lambda: char_transformer(device, steps, batch=32, seq=256, width=512, layers=8, heads=8),
        ]
    if quick:
        return [
            lambda: digits_mlp(device, steps, width=256),
            lambda: digits_convnet(device, steps, channels=16),
            lambda: char_transformer(device, steps, batch=16, seq=32, width=64, layers=2, heads=2),
        ]
    return [
        lambda: digits_mlp(device, steps, width=1024),
        lambda: digits_convnet(device, steps, channels=32),
        lambda: char_transformer(device, steps, batch=32, seq=64, width=128, layers=4, heads=4),
    ]
