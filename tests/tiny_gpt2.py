"""A tiny GPT-2 built from a config (no downloads), and Python's documentation to train it on,
for the ``SaLSATrainer`` tests (one process, and the torchrun worker)."""

import torch
import transformers

SEQ = 32


class CharDataset(torch.utils.data.Dataset):
    """``n`` disjoint windows of ``SEQ`` characters of pydoc's topics, as token ids."""

    def __init__(self, n=512):
        import pydoc_data.topics

        text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[: n * SEQ + 1]
        vocab = sorted(set(text))
        self.vocab = len(vocab)
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text])
        self.items = [ids[i * SEQ : (i + 1) * SEQ] for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def tiny_gpt2(vocab, dropout=0.1):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(config)
