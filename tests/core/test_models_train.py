import math

import numpy as np
import pytest
import torch

from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.metrics import compute_metrics
from sparse_ft.tasks import get_task
from sparse_ft.train import NonFiniteLoss, TrainConfig, evaluate, linear_warmup_decay, train
from tests.conftest import task_loader, tiny_task_model


@pytest.mark.parametrize("task_name,shape", [("cb", (4, 3)), ("stsb", (4,)), ("copa", (4, 2)), ("wsc", (4, 2)),
                                             ("cola", (4, 2))])
def test_heads_give_one_output_per_example(task_name, shape, tokenizer, data_dir):
    model = tiny_task_model(task_name, vocab_size=len(tokenizer))
    batch = next(iter(task_loader(task_name, tokenizer, data_dir, n=4)))
    logits = model(batch)
    assert logits.shape == shape
    assert torch.isfinite(model.loss(batch))


def test_head_is_apart_from_backbone_and_seeded():
    a, b = tiny_task_model("cb"), tiny_task_model("cb")
    m = backbone_size(a)
    assert m == sum(p.numel() for p in a.backbone.parameters())
    assert m < sum(p.numel() for p in a.parameters())
    from sparse_ft.models import TaskModel

    h1 = TaskModel(a.backbone, get_task("cb"), head_seed=1).head.dense.weight
    h2 = TaskModel(a.backbone, get_task("cb"), head_seed=1).head.dense.weight
    h3 = TaskModel(a.backbone, get_task("cb"), head_seed=2).head.dense.weight
    assert torch.equal(h1, h2) and not torch.equal(h1, h3)
    assert torch.equal(a.head.dense.weight, b.head.dense.weight)


def test_schedule_warms_up_then_decays_to_zero():
    assert linear_warmup_decay(0, 10, 100) == 0.0
    assert linear_warmup_decay(5, 10, 100) == 0.5
    assert linear_warmup_decay(10, 10, 100) == 1.0
    assert linear_warmup_decay(55, 10, 100) == pytest.approx(0.5)
    assert linear_warmup_decay(100, 10, 100) == 0.0


def _small_config(**kw):
    settings = {"batch_size": 4, "lr": 3e-3, "eval_every": 5, "patience": 100, "min_steps": 0, "max_steps": 30, "check_every": 5,
                    "warmup_ratio": 0.0}
    settings.update(kw)
    return TrainConfig(**settings)


def test_full_fine_tuning_fits_a_small_training_set(tokenizer, data_dir):
    model = tiny_task_model("cb", vocab_size=len(tokenizer))
    tuned = make_method_config("full").build(model, BuildContext())
    loader = task_loader("cb", tokenizer, data_dir, n=8, batch_size=4)
    outcome = train(tuned, loader, loader, _small_config(), torch.device("cpu"), progress=False)
    assert outcome.losses[-1]["loss"] < 0.5 * outcome.losses[0]["loss"]
    gold = torch.cat([b["labels"] for b in loader]).numpy()
    perfect = compute_metrics(get_task("cb"), gold, gold)["major"]  # < 100 when a class is absent from the 8
    assert max(h["val"] for h in outcome.history) == pytest.approx(perfect)  # it fits the 8 it trains on
    assert outcome.steps == 30 and len(outcome.history) == 6
    report = tuned.sparsity_report()
    assert report.budget == report.backbone_params and 0 < report.changed <= report.budget


def test_best_checkpoint_is_restored(tokenizer, data_dir):
    model = tiny_task_model("cb", vocab_size=len(tokenizer))
    tuned = make_method_config("full").build(model, BuildContext())
    train_loader = task_loader("cb", tokenizer, data_dir, n=8)
    val_loader = task_loader("cb", tokenizer, data_dir, n=8, split="val")
    outcome = train(tuned, train_loader, val_loader, _small_config(lr=1e-2), torch.device("cpu"), progress=False)
    best = max(h["val"] for h in outcome.history)
    best_step = next(h["step"] for h in outcome.history if h["val"] == best)
    assert outcome.best_step == best_step
    assert evaluate(tuned, val_loader, torch.device("cpu"))["major"] == pytest.approx(best)


def test_early_stopping_after_patience(tokenizer, data_dir):
    model = tiny_task_model("cb", vocab_size=len(tokenizer))
    tuned = make_method_config("full").build(model, BuildContext())
    loader = task_loader("cb", tokenizer, data_dir, n=8)
    config = _small_config(lr=1e-12, patience=2, max_steps=200)  # nothing improves after the first eval
    outcome = train(tuned, loader, loader, config, torch.device("cpu"), progress=False)
    assert outcome.steps == 15  # evals at 5 (best), 10, 15 (two without improvement)


def test_non_finite_loss_stops_training(tokenizer, data_dir):
    model = tiny_task_model("cb", vocab_size=len(tokenizer))
    with torch.no_grad():
        model.head.out_proj.weight.fill_(math.inf)
    tuned = make_method_config("full").build(model, BuildContext())
    loader = task_loader("cb", tokenizer, data_dir, n=8)
    with pytest.raises(NonFiniteLoss, match="training loss became nan"):
        train(tuned, loader, loader, _small_config(), torch.device("cpu"), progress=False)


@pytest.mark.parametrize("task_name", ["cb", "copa", "wsc"])
def test_per_example_gradients_by_vmap_match_the_loop(task_name, tokenizer, data_dir):
    """Under torch.func transforms the task model hands the encoder a prebuilt 4-D mask, so vmap runs
    over padded batches (transformers' own mask builder branches on data) and equals the exact loop."""
    from theory.lipschitz import per_sample_grad_norms

    model = tiny_task_model(task_name, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = list(task_loader(task_name, tokenizer, data_dir, n=6, batch_size=3))
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)  # padding present

    def loss(m, batch):
        return m.loss(batch)

    by_vmap = per_sample_grad_norms(model, loss, batches, method="vmap")
    by_loop = per_sample_grad_norms(model, loss, batches, method="loop")
    assert by_vmap.method == "vmap"
    np.testing.assert_allclose(by_vmap.norms, by_loop.norms, rtol=1e-4)


@pytest.mark.parametrize("task_name", ["cb", "stsb", "copa"])
def test_float64_model_loss_is_float64_exact(task_name, tokenizer, data_dir):
    """A float64 model's loss is computed in float64 (bf16/fp16 logits are widened to float32, never
    float64 narrowed), so Hessians and gradients of float64 checks keep ~1e-16 precision."""
    import torch.nn.functional as F

    from sparse_ft.models import example_losses, loss_dtype

    model = tiny_task_model(task_name, vocab_size=len(tokenizer)).double().eval()
    batch = next(iter(task_loader(task_name, tokenizer, data_dir, n=4)))
    logits = model(batch)
    assert logits.dtype == torch.float64
    if task_name == "stsb":
        reference = (logits - batch["labels"].double()) ** 2
    else:
        reference = -torch.log_softmax(logits, -1).gather(1, batch["labels"][:, None]).squeeze(1)
    losses = example_losses(model.task, logits, batch["labels"])
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, reference, rtol=0, atol=1e-15)
    assert abs(float(model.loss(batch).detach()) - float(reference.mean().detach())) < 1e-15
    assert loss_dtype(logits.bfloat16()) == loss_dtype(logits.half()) == torch.float32
    low = example_losses(model.task, logits.bfloat16(), batch["labels"])
    assert low.dtype == torch.float32
    if task_name != "stsb":
        torch.testing.assert_close(low, F.cross_entropy(logits.bfloat16().float(), batch["labels"], reduction="none"))


# ----------------------------------------------------------------------------- decoder (causal) backbones
def _gpt2(**kw):
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                      eos_token_id=0, attn_implementation="eager", **kw)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=37, vocab_size=100, max_position_embeddings=64, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0, attn_implementation="eager", **kw)


def _decoder_model(config, task_name="cola", seed=0):
    from sparse_ft.models import TaskModel, backbone_from_config

    torch.manual_seed(seed)
    return TaskModel(backbone_from_config(config), get_task(task_name), head_seed=seed).eval()


DECODERS = {"gpt2": _gpt2, "llama": _llama}


def test_causal_backbones_are_detected():
    from transformers import BertConfig

    from sparse_ft.models import backbone_from_config, is_causal_backbone

    assert is_causal_backbone(backbone_from_config(_gpt2()))
    assert is_causal_backbone(backbone_from_config(_llama()))
    bert = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
    assert not is_causal_backbone(backbone_from_config(BertConfig(**bert)))
    assert is_causal_backbone(backbone_from_config(BertConfig(is_decoder=True, **bert)))
    assert not tiny_task_model("cb").causal


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_pools_the_last_non_padding_token(family):
    """Same first token, different later tokens: different logits (the first token of a causal model
    sees nothing else, so pooling it gave every example the same logits). Right padding leaves an
    example's logits as they are alone; with left padding the last real token is still the one pooled."""
    from sparse_ft.models import pooled_token

    model = _decoder_model(DECODERS[family]())
    ids = torch.tensor([[5, 7, 9, 11], [5, 7, 9, 12], [5, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        logits = model({"input_ids": ids, "attention_mask": mask})
        assert not torch.allclose(logits[0], logits[1], atol=1e-4)  # only the last token differs
        alone = model({"input_ids": ids[2:, :2], "attention_mask": mask[2:, :2]})
        torch.testing.assert_close(logits[2:], alone)
        hidden = model.encode({"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(pooled_token(hidden, mask, True), hidden[[0, 1, 2], [3, 3, 1]])
        left = torch.tensor([[0, 0, 1, 1]])
        torch.testing.assert_close(pooled_token(hidden[2:], left, True), hidden[2:, 3])
        torch.testing.assert_close(pooled_token(hidden, None, True), hidden[:, -1])
        torch.testing.assert_close(pooled_token(hidden, mask, False), hidden[:, 0])


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_classifier_learns_a_task_its_first_token_cannot_solve(family):
    """The label is whether the last token is even; every sequence starts with token 1, lengths vary
    (right padding). Pooled at the first token the logits are one constant; at the last, it fits."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 7, (32,), generator=generator)
    ids = torch.randint(2, 100, (32, 6), generator=generator)
    ids[:, 0] = 1
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    labels = ids.gather(1, (lengths - 1)[:, None]).squeeze(1) % 2
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}

    model = _decoder_model(DECODERS[family](), "cola").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(batch).argmax(-1) == labels).float().mean() == 1.0
        model.causal = False  # what it was before: the first token, the same for all
        first = model(batch)
    assert torch.allclose(first, first[:1].expand_as(first))


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_per_example_gradients_by_vmap_keep_the_causal_mask(family):
    """Under torch.func the model hands the backbone a prebuilt 4-D mask, which replaces transformers'
    causal one: it must hold the causal triangle too, or vmap's gradients see the future."""
    from theory.lipschitz import per_sample_grad_norms

    model = _decoder_model(DECODERS[family](), "cola")
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 10, 11, 0]])
    mask = (ids != 0).long()
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}]
    by_vmap = per_sample_grad_norms(model, lambda m, b: m.loss(b), batches, method="vmap")
    by_loop = per_sample_grad_norms(model, lambda m, b: m.loss(b), batches, method="loop")
    np.testing.assert_allclose(by_vmap.norms, by_loop.norms, rtol=1e-4)


def test_tokenizers_without_a_pad_token_get_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparse_ft.data import Collator
    from sparse_ft.models import ensure_pad_token

    raw = Tokenizer(models.WordLevel({"</s>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    assert tokenizer.pad_token is None  # as GPT-2's and Llama's
    assert ensure_pad_token(tokenizer).pad_token == "</s>" and tokenizer.pad_token_id == 0
    features = [{"input_ids": tokenizer("a b a")["input_ids"], "labels": 0},
                {"input_ids": tokenizer("b")["input_ids"], "labels": 1}]
    assert Collator(tokenizer.pad_token_id)(features)["input_ids"].tolist() == [[1, 2, 1], [2, 0, 0]]
