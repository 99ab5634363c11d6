"""Tiny random-init transformers models of five families, built from configs (no hub), and batches for them.

Every family: hidden 32, 2 layers, 2 heads, a 40-token vocabulary. The data are full-length rows (no padding)
that together hold every token id (but the padding id) and every position, so that every backbone entry receives a
gradient: then a mask method that trains changes every entry of its budget, and ``changed == budget`` is a sharp
test. The exceptions are known rows of embedding tables (:data:`DEAD_ROWS`, :func:`dead_entries`).
"""

from __future__ import annotations

import pytest
import torch

VOCAB, LENGTH, HIDDEN, LABELS = 40, 12, 32, 3

FAMILIES = ("bert", "roberta", "gpt2", "llama", "gpt2-cls")
CAUSAL = {"gpt2", "llama"}


def tiny_model(family: str, seed: int = 0):
    """A tiny random-init model of ``family`` (see :data:`FAMILIES`), seeded, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "num_labels": LABELS}
    if family == "bert":
        config = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                               max_position_embeddings=LENGTH, type_vocab_size=1, pad_token_id=None, **common)
        return tf.BertForSequenceClassification(config).eval()
    if family == "roberta":
        config = tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                  max_position_embeddings=LENGTH + 1, type_vocab_size=1, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, **common)
        return tf.RobertaForSequenceClassification(config).eval()
    if family in ("gpt2", "gpt2-cls"):
        config = tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=LENGTH, bos_token_id=1, eos_token_id=2,
                               pad_token_id=0, **common)
        model = tf.GPT2LMHeadModel(config) if family == "gpt2" else tf.GPT2ForSequenceClassification(config)
        return model.eval()
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=LENGTH, bos_token_id=1,
                                eos_token_id=2, pad_token_id=None, **common)
        return tf.LlamaForCausalLM(config).eval()
    raise ValueError(family)


def batches(family: str, n: int = 8, batch_size: int = 4, seed: int = 0) -> list[dict]:
    """``n`` rows of ``LENGTH`` tokens as dicts the family's model takes, with labels: class ids for the
    classifiers, the input ids for the causal LMs (their loss shifts them). Row i holds the ids
    (i·LENGTH + j) mod VOCAB, so 8 rows of 12 cover all 40 ids; labels cycle through the classes."""
    generator = torch.Generator().manual_seed(seed)
    ids = (torch.arange(n * LENGTH).view(n, LENGTH) + int(torch.randint(VOCAB, (1,), generator=generator))) % VOCAB
    ids = torch.where(ids == 0, 3, ids) if family in ("roberta", "gpt2-cls") else ids  # id 0 is their padding
    out = []
    for start in range(0, n, batch_size):
        rows = ids[start:start + batch_size]
        labels = rows.clone() if family in CAUSAL else torch.arange(start, start + len(rows)) % LABELS
        out.append({"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": labels})
    return out


DEAD_ROWS = {  # family -> {embedding table: rows that never receive a gradient}
    "roberta": {"embeddings.word_embeddings.weight": {0},  # the padding id: absent from the data
                "embeddings.position_embeddings.weight": {0}},  # positions start at pad_token_id + 1 = 1
    "gpt2": {"wpe.weight": {LENGTH - 1}},  # a causal LM's last position predicts nothing and is seen by nothing
    "gpt2-cls": {"wte.weight": {0}},  # the padding id: absent from the data
}


def dead_entries(family: str, tuned) -> int:
    """Selected entries of a mask method that no batch can change (:data:`DEAD_ROWS`)."""
    indices = tuned.indices()
    return sum(int((indices[table] // HIDDEN == row).sum())
               for table, rows in DEAD_ROWS.get(family, {}).items() if table in indices for row in rows)


def method_config(name: str, **options):
    """Method ``name`` as the tests run it: p = 0.05 where the method takes p, scored on 4 examples,
    DiffPruning projected after 2 steps."""
    from sparse_ft.methods import METHODS

    cls = METHODS[name]
    defaults = {"sparsity": 0.05} if cls.uses_sparsity else {}
    defaults.update({"sam": {"selection_examples": 4}, "childpruning": {"selection_examples": 4},
                     "diffpruning": {"burn_in_steps": 2}}.get(name, {}))
    return cls(**{**defaults, **options})


# (method, family) pairs that refuse with one UserError line, and the words it says
REFUSALS = {("adapter", family): "BERT-style blocks" for family in ("gpt2", "llama", "gpt2-cls")}
REFUSALS[("bitfit", "llama")] = "no bias parameters"


@pytest.fixture(autouse=True, scope="package")
def single_thread():
    """Tiny models run several times faster on one thread (thread start-up dominates their small kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer(model, data: list[dict], tmp_path, max_steps: int = 3, **kwargs):
    """``transformers.Trainer`` with its default arguments on the CPU (default optimizer: fused AdamW), over a
    ``datasets.Dataset`` of ``data``'s rows plus a text column the model does not take (which
    ``remove_unused_columns`` must drop, keeping the model's own columns)."""
    import datasets
    import transformers

    rows = {k: torch.cat([b[k] for b in data]).tolist() for k in data[0]}
    rows["comment"] = ["not a model input"] * len(rows["labels"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=max_steps,
                                          per_device_train_batch_size=4, report_to=[], disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows), **kwargs)


_TRAINED: dict[tuple[str, str], object] = {}


def trained(name: str, family: str, tmp_path_factory):
    """Method ``name`` on a tiny ``family`` model after 3 Trainer steps (with :class:`sparse_ft.SparseCallback`),
    in eval mode, with its Trainer; built once per test session and shared by the tests that read it."""
    import sparse_ft as sft

    if (name, family) not in _TRAINED:
        data = batches(family)
        model = sft.get_sparse_model(tiny_model(family), method_config(name), data=data)
        run = trainer(model, data, tmp_path_factory.mktemp("trainer"), callbacks=[sft.SparseCallback()])
        run.train()
        _TRAINED[(name, family)] = (model.eval(), run)
    return _TRAINED[(name, family)]
