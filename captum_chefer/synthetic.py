"""Synthetic PyHealth cohorts made by the package itself (no downloads are possible or needed).

``toy_model_and_batch`` gives an untrained model and one batch, for examples and docstrings.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Iterator

import torch

__all__ = ["quiet_pyhealth", "toy_samples", "toy_model_and_batch"]


@contextlib.contextmanager
def quiet_pyhealth() -> Iterator[None]:
    """Silence PyHealth's INFO logging (label vocabularies, dataset sizes) for the duration."""
    logger = logging.getLogger("pyhealth")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def toy_samples(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` samples with a flat ``conditions`` and a nested ``procedures`` stream and a binary label."""
    rng = random.Random(seed)
    return [
        {
            "patient_id": f"p{i}",
            "visit_id": "v0",
            "conditions": [f"C{rng.randrange(12)}" for _ in range(rng.randint(1, 6))],
            "procedures": [[f"P{rng.randrange(8)}" for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 4))],
            "label": i % 2,
        }
        for i in range(n)
    ]


def toy_model_and_batch(batch_size: int = 4, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An untrained two-layer, two-head PyHealth ``Transformer`` and one batch of its toy dataset.

    Example:
        >>> model, batch = toy_model_and_batch()
        >>> type(model).__name__, batch["conditions"].shape[0]
        ('Transformer', 4)
    """
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=toy_samples(max(batch_size, 2), seed),
            input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
            output_schema={"label": "binary"},
            dataset_name="toy",
        )
        torch.manual_seed(seed)
        model = Transformer(dataset=dataset, embedding_dim=16, heads=2, num_layers=2)
    batch = next(iter(get_dataloader(dataset, batch_size=batch_size, shuffle=False)))
    return model, batch
