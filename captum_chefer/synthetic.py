"""Synthetic PyHealth cohorts made by the package itself (no downloads are possible or needed).

Two kinds of cohort live here:

* ``toy_samples`` / ``toy_model_and_batch``: an untrained model and one batch, for examples and
  docstrings.
* ``make_cohort`` / ``default_cohort``: a seeded generator of PyHealth samples with **planted ground
  truth**. Each sample's label is computed from rules over its codes (a single trigger code, ``k`` of a
  risk set, an interaction ``A and B``, an order ``A before B``), and each sample carries the set of
  codes that truly made its label, so an attribution method can be scored against the truth.

Codes live in feature streams: flat code lists (``"sequence"``), visits of codes
(``"nested_sequence"``) or timed visits (``"stagenet"``). Background codes are drawn at random from a
stream vocabulary; rule codes and decoy codes are planted on top. Decoys are codes that look like rule
codes and are frequent, but are planted independently of the label, so a model gains nothing from
them. Negatives receive *near misses* (one code of an interaction, ``k - 1`` codes of a risk set, the
two codes of an order rule in the wrong order), so a rule can only be learnt as the rule.

Example:
    >>> cohort = make_cohort(
    ...     n=40, rules=[Trigger("conditions", "C_TRIGGER")], seed=1,
    ...     streams=[StreamSpec("conditions", "sequence", prefix="C")])
    >>> all(("C_TRIGGER" in s["conditions"]) == bool(s["label"]) for s in cohort.samples)
    True
    >>> [cohort.relevant[i] for i in range(4)] == [
    ...     frozenset({("conditions", "C_TRIGGER")}) if s["label"] else frozenset()
    ...     for s in cohort.samples[:4]]
    True
"""

from __future__ import annotations

import contextlib
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch

__all__ = [
    "quiet_pyhealth",
    "toy_samples",
    "toy_model_and_batch",
    "StreamSpec",
    "Rule",
    "Trigger",
    "KOf",
    "Interaction",
    "Order",
    "SyntheticCohort",
    "make_cohort",
    "default_cohort",
    "train_transformer",
]

StreamKind = Literal["sequence", "nested_sequence", "stagenet"]
Task = Literal["binary", "multiclass"]
Code = tuple[str, str]  # (feature key, code)


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


# ---------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamSpec:
    """One feature stream of the synthetic cohort.

    Args:
        key: the feature key (a PyHealth input schema key).
        kind: ``"sequence"`` (a flat code list), ``"nested_sequence"`` (visits of codes) or
            ``"stagenet"`` (visits of codes with visit times, PyHealth's ``(times, visits)`` tuple).
        prefix: background codes are ``f"{prefix}{i:03d}"``.
        vocab_size: number of background codes.
        length: inclusive range of the number of codes (flat) or visits (nested, stagenet).
        codes_per_visit: inclusive range of codes per visit (nested, stagenet).
    """

    key: str
    kind: StreamKind = "sequence"
    prefix: str = "X"
    vocab_size: int = 50
    length: tuple[int, int] = (4, 12)
    codes_per_visit: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        if self.kind not in ("sequence", "nested_sequence", "stagenet"):
            raise ValueError(f"stream {self.key!r}: kind must be 'sequence', 'nested_sequence' or 'stagenet', got {self.kind!r}")
        for name in ("length", "codes_per_visit"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"stream {self.key!r}: {name} must be (low, high) with 1 <= low <= high, got {(low, high)}")
        if self.vocab_size < 1:
            raise ValueError(f"stream {self.key!r}: vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def nested(self) -> bool:
        return self.kind != "sequence"

    @property
    def schema(self) -> str:
        return self.kind

    def background(self, rng: random.Random) -> list:
        """Random background codes: a list (flat) or a list of visits."""

        def codes(n: int) -> list[str]:
            return [f"{self.prefix}{rng.randrange(self.vocab_size):03d}" for _ in range(n)]

        if not self.nested:
            return codes(rng.randint(*self.length))
        return [codes(rng.randint(*self.codes_per_visit)) for _ in range(rng.randint(*self.length))]


def _events(stream: list, nested: bool) -> list[tuple[int, str]]:
    """``(time step, code)`` pairs: the position for flat streams, the visit index for nested ones."""
    if not nested:
        return list(enumerate(stream))
    return [(v, code) for v, visit in enumerate(stream) for code in visit]


def _insert(stream: list, nested: bool, code: str, rng: random.Random, step: Optional[int] = None) -> None:
    """Insert ``code`` at a random place (in visit ``step`` for nested streams when given)."""
    if not nested:
        stream.insert(rng.randint(0, len(stream)) if step is None else step, code)
        return
    visit = stream[rng.randrange(len(stream)) if step is None else step]
    visit.insert(rng.randint(0, len(visit)), code)


# ------------------------------------------------------------------------------------------ rules


class Rule(ABC):
    """A rule that reads a sample's codes; the label comes from which rules fire.

    A rule must be able to *read* a sample (``fires``, ``evidence``) and to *write* one: plant its
    codes so that it fires (``plant``) or plant a near miss that does not fire (``plant_near_miss``).
    """

    name: str = "rule"

    @abstractmethod
    def codes(self) -> set[Code]:
        """Every ``(feature key, code)`` the rule reads."""

    @abstractmethod
    def fires(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> bool:
        """Whether the rule holds for a sample's streams."""

    def evidence(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> frozenset[Code]:
        """The rule's codes present in the sample: what makes it fire when it fires."""
        present = {(key, code) for key, stream in streams.items() for _, code in _events(stream, nested[key])}
        return frozenset(self.codes() & present)

    @abstractmethod
    def plant(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        """Modify the streams in place so that the rule fires."""

    @abstractmethod
    def plant_near_miss(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        """Modify the streams in place with partial evidence that does not make the rule fire."""

    def describe(self) -> str:
        return self.name


def _present(streams: Mapping[str, list], nested: Mapping[str, bool], key: str, code: str) -> bool:
    return any(c == code for _, c in _events(streams[key], nested[key]))


@dataclass(frozen=True)
class Trigger(Rule):
    """Fires when ``code`` appears in stream ``key`` (a single trigger code). Has no near miss."""

    key: str
    code: str
    name: str = "trigger"

    def codes(self) -> set[Code]:
        return {(self.key, self.code)}

    def fires(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> bool:
        return _present(streams, nested, self.key, self.code)

    def plant(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        _insert(streams[self.key], nested[self.key], self.code, rng)

    def plant_near_miss(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        return None

    def describe(self) -> str:
        return f"{self.name}: {self.key}:{self.code}"


@dataclass(frozen=True)
class KOf(Rule):
    """Fires when at least ``k`` distinct codes of the risk set ``risk_set`` appear in stream ``key``."""

    key: str
    risk_set: tuple[str, ...]
    k: int = 2
    name: str = "k_of"

    def __post_init__(self) -> None:
        if not 1 <= self.k <= len(self.risk_set):
            raise ValueError(f"KOf needs 1 <= k <= len(risk_set), got k={self.k} for {len(self.risk_set)} codes")

    def codes(self) -> set[Code]:
        return {(self.key, c) for c in self.risk_set}

    def _count(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> int:
        return sum(_present(streams, nested, self.key, c) for c in self.risk_set)

    def fires(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> bool:
        return self._count(streams, nested) >= self.k

    def plant(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        for code in rng.sample(list(self.risk_set), rng.randint(self.k, len(self.risk_set))):
            _insert(streams[self.key], nested[self.key], code, rng)

    def plant_near_miss(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        if self.k > 1:
            for code in rng.sample(list(self.risk_set), rng.randint(1, self.k - 1)):
                _insert(streams[self.key], nested[self.key], code, rng)

    def describe(self) -> str:
        return f"{self.name}: {self.k} of {self.key}:{{{', '.join(self.risk_set)}}}"


@dataclass(frozen=True)
class Interaction(Rule):
    """Fires when code ``a`` and code ``b`` both appear (each a ``(feature key, code)``, streams may differ)."""

    a: Code
    b: Code
    name: str = "interaction"

    def codes(self) -> set[Code]:
        return {self.a, self.b}

    def fires(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> bool:
        return _present(streams, nested, *self.a) and _present(streams, nested, *self.b)

    def plant(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        for key, code in (self.a, self.b):
            _insert(streams[key], nested[key], code, rng)

    def plant_near_miss(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        key, code = self.a if rng.random() < 0.5 else self.b
        _insert(streams[key], nested[key], code, rng)

    def describe(self) -> str:
        return f"{self.name}: {self.a[0]}:{self.a[1]} and {self.b[0]}:{self.b[1]}"


@dataclass(frozen=True)
class Order(Rule):
    """Fires when ``first`` occurs strictly before ``then`` in stream ``key``: in an earlier visit for
    nested streams, at an earlier position for flat ones. A near miss plants them the other way round
    (or, for nested streams, in the same visit)."""

    key: str
    first: str
    then: str
    name: str = "order"

    def codes(self) -> set[Code]:
        return {(self.key, self.first), (self.key, self.then)}

    def fires(self, streams: Mapping[str, list], nested: Mapping[str, bool]) -> bool:
        events = _events(streams[self.key], nested[self.key])
        first = [t for t, c in events if c == self.first]
        then = [t for t, c in events if c == self.then]
        return bool(first and then and min(first) < max(then))

    def _plant_pair(
        self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random, earlier: str, later: str,
        same_visit: bool = False,
    ) -> None:
        stream, is_nested = streams[self.key], nested[self.key]
        if is_nested:
            if len(stream) < 2 and not same_visit:
                stream.append([])  # a new last visit, which receives the later code
            i = rng.randrange(len(stream) - (0 if same_visit else 1))
            j = i if same_visit else rng.randrange(i + 1, len(stream))
            if not stream[-1]:
                j = len(stream) - 1
            stream[i].insert(rng.randint(0, len(stream[i])), earlier)
            stream[j].insert(rng.randint(0, len(stream[j])), later)
        else:
            i = rng.randint(0, len(stream))
            stream.insert(i, earlier)
            stream.insert(rng.randint(i + 1, len(stream)), later)

    def plant(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        self._plant_pair(streams, nested, rng, self.first, self.then)

    def plant_near_miss(self, streams: dict[str, list], nested: Mapping[str, bool], rng: random.Random) -> None:
        same = nested[self.key] and rng.random() < 0.3
        self._plant_pair(streams, nested, rng, self.then, self.first, same_visit=same)

    def describe(self) -> str:
        return f"{self.name}: {self.key}:{self.first} before {self.key}:{self.then}"


# ----------------------------------------------------------------------------------------- cohort


@dataclass
class SyntheticCohort:
    """Samples with planted ground truth.

    Attributes:
        samples: PyHealth samples (``patient_id``, ``visit_id``, one entry per stream, ``label``).
        relevant: per sample, the ``(feature key, code)`` pairs that truly made its label: the codes
            of the rule(s) that fired. Empty for negatives of a binary task and for class 0 of a
            multiclass task (no rule fired, nothing present decides the label).
        fired: per sample, the names of the rules that fired.
        streams, rules, task: how the cohort was made. For ``"multiclass"``, class ``i + 1`` is rule
            ``i`` and class 0 is "no rule".
        decoys: the decoy codes, planted independently of the label.
    """

    samples: list[dict[str, Any]]
    relevant: list[frozenset[Code]]
    fired: list[tuple[str, ...]]
    streams: tuple[StreamSpec, ...]
    rules: tuple[Rule, ...]
    task: Task
    decoys: frozenset[Code] = field(default_factory=frozenset)

    @property
    def input_schema(self) -> dict[str, str]:
        return {s.key: s.schema for s in self.streams}

    @property
    def output_schema(self) -> dict[str, str]:
        return {"label": self.task}

    @property
    def num_classes(self) -> int:
        return 2 if self.task == "binary" else len(self.rules) + 1

    def relevant_by_patient(self) -> dict[str, frozenset[Code]]:
        """``{patient_id: relevant codes}``, to look up the ground truth of a batch."""
        return {s["patient_id"]: r for s, r in zip(self.samples, self.relevant)}

    def dataset(self, dataset_name: str = "synthetic") -> Any:
        """The samples as a PyHealth ``SampleDataset`` (in memory)."""
        from pyhealth.datasets import create_sample_dataset

        with quiet_pyhealth():
            return create_sample_dataset(
                samples=self.samples,
                input_schema=self.input_schema,
                output_schema=self.output_schema,
                dataset_name=dataset_name,
            )

    def ground_truth(self, adapter: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Boolean masks shaped like the batch's code ids, ``True`` on every truly relevant code.

        Args:
            adapter: a :class:`captum_chefer.PyHealthAdapter` of a model trained on this cohort (its
                processors decode the ids).
            batch: a batch of this cohort from ``pyhealth.datasets.get_dataloader`` (it carries the
                ``patient_id`` of each sample).
        """
        if "patient_id" not in batch:
            raise KeyError("the batch has no 'patient_id'; the ground truth is looked up by patient")
        lookup = self.relevant_by_patient()
        missing = [p for p in batch["patient_id"] if p not in lookup]
        if missing:
            raise KeyError(f"patients {missing[:3]} are not in this cohort")
        truths = [lookup[p] for p in batch["patient_id"]]
        inputs, _ = adapter.captum_inputs(batch, level="token")
        masks = {}
        for key, ids in zip(adapter.feature_keys, inputs):
            vocab = adapter.model.dataset.input_processors[key].code_vocab
            wanted = [{vocab[c] for k, c in truth if k == key and c in vocab} for truth in truths]
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for i, codes in enumerate(wanted):
                for code_id in codes:
                    mask[i] |= ids[i] == code_id
            masks[key] = mask
        return masks


def make_cohort(
    n: int = 600,
    *,
    streams: Sequence[StreamSpec],
    rules: Sequence[Rule],
    task: Task = "binary",
    decoys: Sequence[Code] = (),
    decoy_rate: float = 0.3,
    near_miss_rate: float = 0.6,
    positive_rate: float = 0.5,
    seed: int = 0,
) -> SyntheticCohort:
    """Generate ``n`` samples whose labels are determined by ``rules``.

    Labels: ``"binary"``: 1 when any rule fires (each positive is made by planting one rule, chosen
    uniformly, and its relevant codes are the codes of the rules that fire). ``"multiclass"``: class
    ``i + 1`` when rule ``i`` fires, 0 when none does; exactly one rule fires per sample of classes
    ``1..K``, and classes are drawn uniformly.

    Args:
        n: number of samples (patients ``p00000``, ``p00001``, ...).
        streams: the feature streams; every rule and decoy must name one of them.
        rules: the rules; their code sets must be disjoint and disjoint from decoys and background.
        task: ``"binary"`` or ``"multiclass"``.
        decoys: ``(feature key, code)`` pairs planted with probability ``decoy_rate`` each, whatever
            the label.
        near_miss_rate: probability, per sample and non-firing rule, of planting a near miss.
        positive_rate: fraction of positives (binary only).
        seed: the seed; the same arguments give the same cohort.

    Returns:
        A :class:`SyntheticCohort`. The rule that labels a sample is re-checked on the final sample,
        so ``label`` always equals what the rules say about the codes.

    Example:
        >>> cohort = make_cohort(30, streams=[StreamSpec("dx", "nested_sequence", prefix="D")],
        ...                      rules=[Order("dx", "D_A", "D_B")], seed=3)
        >>> s = next(s for s in cohort.samples if s["label"] == 1)
        >>> first = min(v for v, visit in enumerate(s["dx"]) if "D_A" in visit)
        >>> then = max(v for v, visit in enumerate(s["dx"]) if "D_B" in visit)
        >>> first < then
        True
    """
    streams = tuple(streams)
    rules = tuple(rules)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if task not in ("binary", "multiclass"):
        raise ValueError(f"task must be 'binary' or 'multiclass', got {task!r}")
    if not streams:
        raise ValueError("at least one stream is needed")
    if not rules:
        raise ValueError("at least one rule is needed")
    if task == "binary" and not 0.0 < positive_rate < 1.0:
        raise ValueError(f"positive_rate must be in (0, 1), got {positive_rate}")
    for name, rate in (("decoy_rate", decoy_rate), ("near_miss_rate", near_miss_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    by_key = {s.key: s for s in streams}
    if len(by_key) != len(streams):
        raise ValueError(f"stream keys must be unique, got {[s.key for s in streams]}")
    seen: dict[Code, str] = {}
    for rule in rules:
        for key, code in rule.codes():
            if key not in by_key:
                raise ValueError(f"rule {rule.describe()!r} reads stream {key!r}, which is not among {sorted(by_key)}")
            if (key, code) in seen:
                raise ValueError(f"code {key}:{code} is read by two rules ({seen[(key, code)]!r} and {rule.describe()!r})")
            seen[(key, code)] = rule.describe()
    for key, code in decoys:
        if key not in by_key:
            raise ValueError(f"decoy {key}:{code} names stream {key!r}, which is not among {sorted(by_key)}")
        if (key, code) in seen:
            raise ValueError(f"decoy {key}:{code} is also read by rule {seen[(key, code)]!r}")
    for key, code in list(seen) + list(decoys):
        spec = by_key[key]
        if code.startswith(spec.prefix) and code[len(spec.prefix):].isdigit():
            raise ValueError(f"planted code {key}:{code} looks like a background code of prefix {spec.prefix!r}; rename it")
    rng = random.Random(seed)
    nested = {s.key: s.nested for s in streams}
    samples, relevant, fired_all = [], [], []
    for i in range(n):
        if task == "binary":
            chosen = rng.randrange(len(rules)) if rng.random() < positive_rate else None
        else:
            cls = rng.randrange(len(rules) + 1)
            chosen = cls - 1 if cls else None
        values = {s.key: s.background(rng) for s in streams}
        for index, rule in enumerate(rules):
            if index == chosen:
                rule.plant(values, nested, rng)
            elif rng.random() < near_miss_rate:
                rule.plant_near_miss(values, nested, rng)
        for key, code in decoys:
            if rng.random() < decoy_rate:
                _insert(values[key], nested[key], code, rng)
        fired = [index for index, rule in enumerate(rules) if rule.fires(values, nested)]
        expected = [] if chosen is None else [chosen]
        if fired != expected:  # the planting contract of a rule was broken: never silently mislabel
            raise RuntimeError(
                f"sample {i}: planted rule {expected} but rules {fired} fire; a custom Rule's plant or "
                "plant_near_miss is inconsistent with its fires"
            )
        label = (1 if fired else 0) if task == "binary" else (fired[0] + 1 if fired else 0)
        truth = frozenset().union(*(rules[j].evidence(values, nested) for j in fired)) if fired else frozenset()
        sample: dict[str, Any] = {"patient_id": f"p{i:05d}", "visit_id": "v0"}
        for spec in streams:
            value: Any = values[spec.key]
            if spec.kind == "stagenet":  # StageNet streams carry a time per visit: (times, visits)
                times: list[float] = []
                t = 0.0
                for _ in value:
                    times.append(round(t, 2))
                    t += rng.uniform(0.5, 30.0)
                value = (times, value)
            sample[spec.key] = value
        sample["label"] = label
        samples.append(sample)
        relevant.append(truth)
        fired_all.append(tuple(rules[j].name for j in fired))
    return SyntheticCohort(samples, relevant, fired_all, streams, rules, task, frozenset(decoys))


DEFAULT_STREAMS = (
    StreamSpec("conditions", "sequence", prefix="C", vocab_size=60, length=(4, 12)),
    StreamSpec("procedures", "nested_sequence", prefix="P", vocab_size=40, length=(1, 4), codes_per_visit=(1, 3)),
)


def default_cohort(n: int = 1200, seed: int = 0, task: Task = "binary") -> SyntheticCohort:
    """The embedded default cohort of ``python -m captum_chefer compare``.

    Two streams: ``conditions`` (a flat list of diagnosis-like codes) and ``procedures`` (visits of
    procedure-like codes). Three rules: a trigger (``C_TRIGGER``), 2 of a 4-code risk set
    (``C_RISK1..4``), and an interaction across streams (``C_INT_A`` and ``P_INT_B``). Decoys
    ``C_DECOY1``, ``C_DECOY2`` and ``P_DECOY`` appear in 30% of patients whatever the label.

    Example:
        >>> cohort = default_cohort(n=50)
        >>> len(cohort.samples), sorted(cohort.input_schema)
        (50, ['conditions', 'procedures'])
    """
    rules = (
        Trigger("conditions", "C_TRIGGER"),
        KOf("conditions", ("C_RISK1", "C_RISK2", "C_RISK3", "C_RISK4"), k=2),
        Interaction(("conditions", "C_INT_A"), ("procedures", "P_INT_B")),
    )
    decoys = (("conditions", "C_DECOY1"), ("conditions", "C_DECOY2"), ("procedures", "P_DECOY"))
    return make_cohort(n, streams=DEFAULT_STREAMS, rules=rules, task=task, decoys=decoys, seed=seed)


# --------------------------------------------------------------------------------------- training


def train_transformer(
    dataset: Any,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    embedding_dim: int = 32,
    heads: int = 2,
    num_layers: int = 2,
    dropout: float = 0.1,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    device: Optional[str | torch.device] = None,
) -> Any:
    """Train a PyHealth ``Transformer`` on ``dataset`` with Adam, a progress bar per run.

    Returns the model in evaluation mode, on ``device`` (default: the CPU). Training is seeded
    (initialisation and shuffling).

    Example:
        >>> cohort = default_cohort(n=64)
        >>> model = train_transformer(cohort.dataset(), epochs=1, progress=False)
        >>> model.training
        False
    """
    from pyhealth.datasets import get_dataloader
    from pyhealth.models import Transformer
    from tqdm import tqdm

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    with quiet_pyhealth():
        model = Transformer(dataset=dataset, embedding_dim=embedding_dim, heads=heads, num_layers=num_layers, dropout=dropout)
    if device is not None:
        model.to(device)
    loader = get_dataloader(dataset, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(total=epochs * len(loader), desc="training Transformer", unit="batch", disable=not progress)
    try:
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad()
                loss = model(**batch)["loss"]
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    return model.eval()
