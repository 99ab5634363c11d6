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


class RedrawOnEval(torch.nn.Module):
    """Mixout-like eval-time reset: every ``.eval()`` draws a new keep-mask over the weight, so the
    eval-mode function changes from one ``.eval()`` to the next."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.register_buffer("keep", torch.ones(3, 5))

    def train(self, mode=True):
        super().train(mode)
        if not mode:
            self.keep = (torch.rand(3, 5) < 0.5).to(self.lin.weight.dtype)
        return self

    def forward(self, x):
        return F.linear(x, self.lin.weight * self.keep, self.lin.bias)


class NoisyForward(torch.nn.Module):
    """A forward that draws noise whatever the mode."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn_like(x))


class TiedNet(torch.nn.Module):
    """One Linear registered as two attributes (``shared`` and ``alias``, one module) and a decoder whose
    weight is the embedding's (two modules, one Parameter): canonical names emb.weight, shared.*."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 4)
        self.shared = torch.nn.Linear(4, 4)
        self.alias = self.shared
        self.dec = torch.nn.Linear(4, 6, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.shared(self.emb(ids).mean(1)))
        return self.dec(torch.tanh(self.alias(h)))


def tied_case():
    """A seeded float64 :class:`TiedNet` and one batch of token ids and labels."""
    torch.manual_seed(0)
    batch = {
        "ids": torch.tensor([[0, 1, 2], [3, 4, 5], [5, 1, 0], [2, 2, 3]]),
        "y": torch.tensor([0, 5, 3, 1]),
    }
    return TiedNet().double(), batch


def random_eval_case(model_class):
    """A seeded float64 model whose eval-mode forward is random, and one batch for ``mlp_loss``."""
    torch.manual_seed(0)
    return model_class().double(), {
        "x": torch.randn(4, 5, dtype=torch.float64),
        "y": torch.tensor([0, 1, 2, 1]),
    }


def snapshot(model):
    """Every parameter under every name (tied ones included): the object and a copy of its value."""
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}


def assert_untouched(model, before):
    """The model holds the very same Parameter objects, bit-identical, under the same names."""
    now = dict(model.named_parameters(remove_duplicate=False))
    assert list(now) == list(before)
    for name, param in now.items():
        obj, value = before[name]
        assert param is obj and isinstance(param, torch.nn.Parameter) and torch.equal(param, value)


def tied_loss(model, batch):
    return F.cross_entropy(model(batch["ids"]), batch["y"])


def tied_reference_hessian(model, batch):
    """Dense Hessian of ``tied_loss`` in (emb.weight, shared.weight, shared.bias), from the forward written
    out with the ties explicit (no functional_call, no module)."""
    params = dict(model.named_parameters())
    names = ["emb.weight", "shared.weight", "shared.bias"]
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        emb, weight, bias = (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))
        h = torch.tanh(F.linear(F.embedding(batch["ids"], emb).mean(1), weight, bias))
        return F.cross_entropy(F.linear(torch.tanh(F.linear(h, weight, bias)), emb), batch["y"])

    return torch.autograd.functional.hessian(f, flat0)
