"""Shared fixtures: small PyHealth datasets and models in the formats the adapter supports.

Importing ``pyhealth.datasets`` takes seconds, so it happens once per test session, here.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
import torch

from captum_chefer.synthetic import quiet_pyhealth

warnings.filterwarnings("ignore", category=UserWarning, module="pyhealth")


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
            model = StageAttentionNet(dataset=dataset, embedding_dim=16, chunk_size=8, levels=2, num_heads=heads, **kwargs)
    return model.eval()


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
