"""Shared fixtures: small PyHealth datasets and models in the formats the adapter supports.

Importing ``pyhealth.datasets`` takes seconds, so it happens once per test session, here.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any

import pytest
import torch

from captum_chefer.synthetic import quiet_pyhealth

warnings.filterwarnings("ignore", category=UserWarning, module="pyhealth")


def points_at(warning: warnings.WarningMessage, path: str) -> bool:
    """Whether a caught warning names ``path`` as its source (its ``stacklevel`` reaches the caller).

    Under mutation testing mutmut calls each mutated function through its trampoline, one frame deeper, so
    there the trampoline stands in for the caller.
    """
    return warning.filename == path or warning.filename.endswith(
        ("mutmut/mutation/trampoline.py", "mutmut\\mutation\\trampoline.py")
    )


def _codes(rng: random.Random, prefix: str, vocab: int, low: int, high: int) -> list[str]:
    return [f"{prefix}{rng.randrange(vocab)}" for _ in range(rng.randint(low, high))]


def make_samples(fmt: str, n: int = 12, n_classes: int = 2, seed: int = 0, max_len: int = 7) -> list[dict[str, Any]]:
    """Random samples in one of the formats: 'sequence' (a flat and a nested stream), 'stagenet',
    'stagenet_nested'. Labels cycle through the classes."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        sample: dict[str, Any] = {"patient_id": f"p{i}", "visit_id": f"v{i}", "label": i % n_classes}
        if fmt == "sequence":
            sample["conditions"] = _codes(rng, "C", 15, 1, max_len)
            sample["procedures"] = [_codes(rng, "P", 9, 1, 3) for _ in range(rng.randint(1, 4))]
        else:
            steps = rng.randint(1, max_len)
            if fmt == "stagenet":
                codes: list = [f"C{rng.randrange(15)}" for _ in range(steps)]
            else:
                codes = [_codes(rng, "C", 15, 1, 3) for _ in range(steps)]
            times = [round(rng.uniform(0.0, 3.0), 2) for _ in range(steps)]
            sample["codes"] = (times, codes)
            sample["labs"] = (None, [f"L{rng.randrange(6)}" for _ in range(rng.randint(1, 4))])
        samples.append(sample)
    return samples


def make_dataset(fmt: str, n: int = 12, n_classes: int = 2, seed: int = 0, max_len: int = 7):
    from pyhealth.datasets import create_sample_dataset

    if fmt == "sequence":
        schema = {"conditions": "sequence", "procedures": "nested_sequence"}
    else:
        schema = {"codes": "stagenet", "labs": "stagenet"}
    with quiet_pyhealth():
        return create_sample_dataset(
            samples=make_samples(fmt, n, n_classes, seed, max_len),
            input_schema=schema,
            output_schema={"label": "binary" if n_classes == 2 else "multiclass"},
            dataset_name=f"test-{fmt}",
        )


def make_model(dataset, kind: str = "transformer", layers: int = 2, heads: int = 2, seed: int = 0, **kwargs):
    from pyhealth.models import StageAttentionNet, Transformer

    torch.manual_seed(seed)
    with quiet_pyhealth():
        if kind == "transformer":
            model = Transformer(dataset=dataset, embedding_dim=16, heads=heads, num_layers=layers, **kwargs)
        else:
            model = StageAttentionNet(
                dataset=dataset, embedding_dim=16, chunk_size=8, levels=2, num_heads=heads, **kwargs
            )
    return model.eval()


# A tiny clinical text vocabulary: the tokenizer of save_tiny_bert has [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4,
# then these words from 5.
WORDS = ["fever", "cough", "rash", "pain", "no", "history", "of", "chest", "sepsis", "stable"]
TEXTS = ["fever cough rash", "no history of chest pain", "sepsis", "stable chest"]


def save_tiny_bert(directory, layers: int) -> None:
    """A BERT of ``layers`` layers (hidden size 16, 2 heads) and its tokenizer over :data:`WORDS`, saved into
    ``directory`` for ``from_pretrained`` (no hub access)."""
    import transformers

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab=str(vocab)).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=15, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(directory)


def first_batch(dataset, batch_size: int = 6) -> dict[str, Any]:
    from pyhealth.datasets import get_dataloader

    return next(iter(get_dataloader(dataset, batch_size=batch_size, shuffle=False)))


@pytest.fixture(scope="session")
def seq_dataset():
    return make_dataset("sequence")


@pytest.fixture(scope="session")
def stage_dataset():
    return make_dataset("stagenet")


@pytest.fixture
def seq_model(seq_dataset):
    return make_model(seq_dataset)


@pytest.fixture
def seq_batch(seq_dataset):
    return first_batch(seq_dataset)


def make_planted_samples(n: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """Label 1 exactly when the planted code ``C0`` is among the conditions (at a random position);
    ``procedures`` (nested) is noise."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        conditions = _codes(rng, "C", 20, 2, 7)
        conditions = [c if c != "C0" else "C1" for c in conditions]
        if i % 2:
            conditions.insert(rng.randrange(len(conditions) + 1), "C0")
        procedures = [_codes(rng, "P", 8, 1, 3) for _ in range(rng.randint(1, 3))]
        samples.append({"patient_id": f"p{i}", "visit_id": "v0", "conditions": conditions,
                        "procedures": procedures, "label": i % 2})
    return samples


@pytest.fixture(scope="session")
def planted_model():
    """A two-layer Transformer (two logits, multiclass) trained to accuracy 1 on the planted cohort,
    in eval mode. A few seconds on two cores."""
    return _PLANTED[0] if _PLANTED else train_planted_model()


# Under mutation testing (tools/mutation_report.py), mutmut imports the test files once in a fork server and
# forks a fresh process for each mutant, whose test session would train the planted model again (seconds, for
# each of thousands of mutants). Trained here instead, once, each mutant's process inherits it: the training
# runs only PyHealth and torch, never the mutated package, and a forked process's changes stay its own.
_PLANTED: list[Any] = []


def train_planted_model(epochs: int = 8):
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=make_planted_samples(),
            input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
            output_schema={"label": "multiclass"},
            dataset_name="planted",
        )
        torch.manual_seed(0)
        model = Transformer(dataset=dataset, embedding_dim=16, heads=2, num_layers=2, dropout=0.1)
    batches = list(get_dataloader(dataset, batch_size=32, shuffle=False))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for batch in batches:
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(**b)["y_prob"].argmax(1) == b["label"].view(-1)).sum()) for b in batches)
    assert correct == len(dataset), f"planted model trained to {correct}/{len(dataset)} only"
    return model


if "mutmut" in sys.modules:
    _PLANTED.append(train_planted_model())
