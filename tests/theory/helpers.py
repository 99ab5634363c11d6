"""Helpers for the theory tests: loss functions, a tiny BERT, dense autograd references."""

import torch
import torch.nn.functional as F


def mlp_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def bert_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def make_bert(attn_implementation="eager"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        attn_implementation=attn_implementation,
    )
    model = BertForSequenceClassification(config)
    return model.double().eval()


def reference_hessian(model, loss_fn, batches, names):
    """Dense Hessian of the size-weighted mean loss w.r.t. the whole tensors ``names`` (concatenated,
    row-major), by ``torch.autograd.functional.hessian``: independent of theory.subspace."""

    params = dict(model.named_parameters())
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    counts = [next(iter(b.values())).shape[0] for b in batches]
    was_training = model.training
    model.eval()

    def f(flat):
        tensors = {n: t.view(params[n].shape) for n, t in zip(names, flat.split(sizes))}
        return sum(c * loss_fn(_Call(model, tensors), b) for c, b in zip(counts, batches)) / sum(counts)

    try:
        return torch.autograd.functional.hessian(f, flat0, vectorize=True)
    finally:
        model.train(was_training)


class _Call:
    """Stand-in for the model inside loss functions: calls it with substituted parameters."""

    def __init__(self, model, tensors):
        self.model, self.tensors = model, tensors

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.model, self.tensors, args, kwargs)


def masked_positions(model, masks):
    """Flat positions of the masked entries inside the concatenation of the masks' whole tensors."""
    params = dict(model.named_parameters())
    positions, offset = [], 0
    for name, mask in masks.items():
        positions.append(mask.reshape(-1).nonzero().squeeze(1) + offset)
        offset += params[name].numel()
    return torch.cat(positions)
