"""Unit tests of captum_chefer/cohort.py, fast enough for mutation testing.

Each function of the module is called directly on tiny inputs whose expected values are worked out by hand
(or with plain Python): the rows of a batch, the chunks and batches of a run, the part files and their
footers, the plan of a resumed run, the manifest, the process-group helpers (with ``torch.distributed``'s
calls replaced by fakes, in one process), the data sources, the summary and its tables and figure, the
fingerprints and the argument checks with their messages. The model is ``Toy``, an adapter of a linear
model over two code streams (one flat, one nested) whose scores, logits and labels are known exactly;
no PyHealth model is built and nothing is trained. ``tests/test_cohort.py`` runs real models end to end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import resource
import socket
import struct
import sys
import time
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from captum.attr import Attribution, LayerIntegratedGradients
from torch import nn
from torch.utils.data import DataLoader

from captum_chefer import cohort
from captum_chefer.adapters.base import Adapter, DecodedToken
from captum_chefer.cohort import COLUMNS, MANIFEST, CohortRun, CohortSummary, attribute_dataset, read_cohort, summarize
from captum_chefer.comparison.chance import ChanceLevelWarning, ModelCheck
from conftest import points_at

# most toy runs are of a model no better than chance; the tests of that warning use pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning")

FORMAT = "captum_chefer.cohort/1"
META_KEY = b"captum_chefer.cohort"

# Five samples: "dx" holds flat codes D<id>, "px" visits of codes P<id>; id 0 is padding.
SAMPLES = [
    {"i": 0, "patient_id": "pA", "dx": [3, 1], "px": [[2], [5, 4]], "label": 1},
    {"i": 1, "patient_id": "pA", "dx": [2], "px": [[1, 1]], "label": 0},
    {"i": 2, "patient_id": "pB", "dx": [4, 4, 6], "px": [[3]], "label": 1},
    {"i": 3, "patient_id": "pC", "dx": [5], "px": [[6], [2], [1]], "label": 0},
    {"i": 4, "patient_id": "pC", "dx": [1, 2], "px": [[7]], "label": 1},
]
# The toy model's logit is the sum of (id - 4) over a sample's codes (weights (1, -4) on the embedding (id, 1)):
# s0: -1 - 3 - 2 + 1 + 0; s1: -2 - 3 - 3; s2: 0 + 0 + 2 - 1; s3: 1 + 2 - 2 - 3; s4: -3 - 2 + 3
LOGITS = [-5, -8, 1, -2, -2]
# predicted classes (logit >= 0) 0, 0, 1, 0, 0 against the labels 1, 0, 1, 0, 1: samples 1, 2 and 3 are right
N_ROWS = [5, 3, 4, 4, 3]  # real codes per sample
TOY_CHECK = {"n": 5, "correct": 3, "majority_rate": 0.6}
# chunks of 2: (0, 1), (2, 3), (4,)
CHUNK_LABELS = [
    {"n": 2, "correct": 1, "counts": {"1": 1, "0": 1}},
    {"n": 2, "correct": 2, "counts": {"1": 1, "0": 1}},
    {"n": 1, "correct": 0, "counts": {"1": 1}},
]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def exact(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


def collate(samples: list[dict]) -> dict:
    """The samples as one padded batch."""
    width = max(len(s["dx"]) for s in samples)
    visits = max(len(s["px"]) for s in samples)
    codes = max(len(v) for s in samples for v in s["px"])
    dx = torch.zeros(len(samples), width, dtype=torch.long)
    px = torch.zeros(len(samples), visits, codes, dtype=torch.long)
    for b, s in enumerate(samples):
        dx[b, : len(s["dx"])] = torch.tensor(s["dx"])
        for v, visit in enumerate(s["px"]):
            px[b, v, : len(visit)] = torch.tensor(visit)
    return {"dx": dx, "px": px, "label": torch.tensor([s["label"] for s in samples]),
            "patient_id": [s["patient_id"] for s in samples]}


def collate_unlabelled(samples: list[dict]) -> dict:
    batch = collate(samples)
    del batch["label"]
    return batch


def embed(ids: torch.Tensor) -> torch.Tensor:
    """Each code id as the vector (id, 1) (zero for padding)."""
    return torch.stack([ids.float(), (ids != 0).float()], dim=-1)


class Toy(Adapter):
    """Two code streams, "dx" flat ``[B, L]`` and "px" nested ``[B, V, C]``; the logits are a linear map of
    the sum of the real codes' embeddings (:func:`embed`)."""

    def __init__(self, weight=((1.0, -4.0),), prefix: bool = True) -> None:
        super().__init__()
        self.feature_keys = ["dx", "px"]
        self.head = nn.Linear(2, len(weight), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))
        self.label_key = "label"
        self.model = SimpleNamespace(mode="binary" if len(weight) == 1 else "multiclass")
        self.prefix = prefix
        self.references: list = []

    def captum_inputs(self, batch, level):  # no default level: a call must say which
        ids = (batch["dx"], batch["px"])
        args = tuple(i != 0 for i in ids)
        if level == "token":
            return ids, args
        if level == "embedding":
            return tuple(embed(i) for i in ids), args
        raise ValueError(f"unknown level {level!r}")

    def forward(self, dx, px, dx_mask, px_mask):
        dx, px = (x if x.is_floating_point() else embed(x) for x in (dx, px))
        pooled = (dx * dx_mask[..., None]).sum(1) + (px * px_mask[..., None]).sum((1, 2))
        return self.head(pooled)

    def captum_target(self, batch, mode):
        if mode not in ("predicted", "label"):
            raise ValueError(f"unknown mode {mode!r}")
        if self.head.out_features == 1:
            return None
        if mode == "label":
            return batch["label"].long()
        tokens, args = self.captum_inputs(batch, "token")
        with torch.no_grad():
            return self(*tokens, *args).argmax(1)

    def token_masks(self, args):
        return args

    def baselines(self, inputs, args, reference):
        """IG baselines: zero (``"zero"``) or the embedding (1, 1) of every code (``"unk"``)."""
        self.references.append(reference)
        if reference not in ("unk", "zero"):
            raise ValueError(f"unknown reference {reference!r}")
        return tuple(torch.zeros_like(x) if reference == "zero" else torch.ones_like(x) for x in inputs)

    def to_feature_dict(self, attributions):
        return {"dx": attributions[0].sum(-1), "px": attributions[1].sum(-1)}

    def decode(self, batch):
        out = []
        for b in range(batch["dx"].shape[0]):
            tokens = [DecodedToken("dx", f"D{int(c)}", (j,)) for j, c in enumerate(batch["dx"][b]) if c]
            for v, visit in enumerate(batch["px"][b]):
                for j, c in enumerate(visit):
                    if c:
                        text = f"v{v + 1}:P{int(c)}" if self.prefix else f"P{int(c)}"
                        tokens.append(DecodedToken("px", text, (v, j), code=f"P{int(c)}"))
            out.append(tokens)
        return out


class Scores(Attribution):
    """Each input times ``scale * factor``: a code's score is ``(id + 1) * scale * factor``."""

    def __init__(self, forward_func, scale: float = 1.0) -> None:
        super().__init__(forward_func)
        self.scale = scale
        self.targets: list = []
        self.args: list = []

    def attribute(self, inputs, target=None, additional_forward_args=None, factor=1.0):
        self.targets.append(target)
        self.args.append(additional_forward_args)
        return tuple(x * self.scale * factor for x in inputs)


class IntegratedGradients(Scores):
    """IG-like by its name (as compare_methods tells them): the input minus its baseline, which it is given."""

    def attribute(self, inputs, target=None, additional_forward_args=None, baselines=None):
        return tuple(x - b for x, b in zip(inputs, baselines, strict=True))


class Draw(Attribution):
    """One draw ``r`` of torch's random generator per call: every real code scores ``2 * r``."""

    def attribute(self, inputs, target=None, additional_forward_args=None):
        r = torch.rand(()).item()
        return tuple(torch.full_like(x, r) for x in inputs)


def toy_rows(method: str, factor: float, samples=SAMPLES, first: int = 0) -> list[tuple]:
    """The rows (in COLUMNS order) of ``samples`` under a ``Scores`` method of the single-logit ``Toy``."""
    rows = []
    for i, s in enumerate(samples):
        sample = first + i
        probability = sigmoid(LOGITS[s["i"]])
        for j, c in enumerate(s["dx"]):
            rows.append((sample, s["patient_id"], "dx", f"D{c}", None, j, method, (c + 1) * factor, 1, probability))
        for v, visit in enumerate(s["px"]):
            for j, c in enumerate(visit):
                rows.append((sample, s["patient_id"], "px", f"P{c}", v, j, method, (c + 1) * factor, 1, probability))
    return rows


def toy_codes(samples=SAMPLES) -> list[tuple]:
    """(sample, feature, position, id) of every code, in row order."""
    codes = []
    for i, s in enumerate(samples):
        codes += [(i, "dx", j, c) for j, c in enumerate(s["dx"])]
        codes += [(i, "px", j, c) for visit in s["px"] for j, c in enumerate(visit)]
    return codes


def approx_rows(rows: list[tuple]) -> list[tuple]:
    """Rows with their float32 score and probability compared approximately."""
    return [(*r[:7], pytest.approx(r[7], rel=1e-6), r[8], pytest.approx(r[9], rel=1e-6)) for r in rows]


def toy_methods(adapter):
    return [Scores(adapter), ("Double", Scores(adapter, 2.0), {"factor": 1.5})]


def toy_digest(weight=(1.0, -4.0)) -> str:
    """SHA-256 of Toy's one parameter, as the manifest documents it: name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    digest.update(f"head.weight|torch.float32|(1, {len(weight)})|".encode())
    digest.update(struct.pack(f"<{len(weight)}f", *weight))
    return digest.hexdigest()


def run_toy(out, adapter=None, methods=None, **kwargs):
    adapter = adapter or Toy()
    settings = {"chunk_size": 2, "collate_fn": collate, "progress": False, **kwargs}
    return attribute_dataset(adapter, SAMPLES, methods or toy_methods(adapter), out, **settings)


@pytest.fixture
def toy_run(tmp_path):
    """A finished run of Toy over SAMPLES: chunks of 2, two methods. Made for each test that reads it: mutmut
    runs a mutant only against the tests that called its function while they ran, not from a cached fixture."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChanceLevelWarning)
        return run_toy(out)


def description(**changes) -> dict:
    """A run description as attribute_dataset records it (values chosen by hand)."""
    return {"format": FORMAT, "n_samples": 5, "chunk_size": 2, "target_mode": "predicted", "baseline": "unk",
            "seed": 0, "feature_keys": ["dx", "px"], "model_sha256": "abc",
            "methods": [{"name": "M", "method": "Scores", "options": "{}", "kwargs": "{}"}], **changes}


SCHEMA = pa.schema([("sample", pa.int64()), ("patient_id", pa.string()), ("feature", pa.string()),
                    ("code", pa.string()), ("visit", pa.int32()), ("position", pa.int32()), ("method", pa.string()),
                    ("score", pa.float32()), ("target", pa.int32()), ("probability", pa.float32())])


def write_part_by_hand(out: Path, name: str, meta=None, rows=()) -> Path:
    """A Parquet file with ``rows`` and, when given, the cohort footer ``meta``."""
    schema = SCHEMA if meta is None else SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()})
    table = pa.Table.from_pylist([dict(zip(SCHEMA.names, r, strict=True)) for r in rows], schema=schema)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / name)
    return out / name


def part_meta(chunk: int, run=None, labels=None) -> dict:
    return {"run": run or description(), "chunk": chunk, "start": 2 * chunk, "stop": 2 * chunk + 2, "labels": labels}


# ---------------------------------------------------------------------------------------------- schema, CohortRun


def test_schema_names_and_types_in_column_order():
    schema = cohort._schema()
    assert [(f.name, str(f.type)) for f in schema] == [
        ("sample", "int64"), ("patient_id", "string"), ("feature", "string"), ("code", "string"), ("visit", "int32"),
        ("position", "int32"), ("method", "string"), ("score", "float"), ("target", "int32"), ("probability", "float"),
    ]
    assert schema.names == list(COLUMNS)
    assert schema.metadata is None


def test_cohort_run_reads_its_manifest():
    manifest = {"parts": [{"file": "part-000000.parquet"}, {"file": "part-000001.parquet"}], "rows": "7",
                "this_run": {"skipped": (1, 3)}}
    run = CohortRun(Path("/x"), manifest)
    assert (run.rank, run.world_size, run.computed) == (0, 1, [])
    assert run.parts == [Path("/x/part-000000.parquet"), Path("/x/part-000001.parquet")]
    assert run.skipped == [1, 3] and isinstance(run.skipped, list)
    assert run.rows == 7 and isinstance(run.rows, int)
    assert run.model_check is None
    manifest["model_check"] = {"n": 4, "correct": 3, "majority_rate": 0.5, "p_value": 0.3125, "above_chance": False,
                               "unit": "samples"}
    assert run.model_check == ModelCheck(4, 3, 0.5, 0.3125, False, "samples")
    other = CohortRun(Path("/y"), {})
    other.computed.append(1)
    assert CohortRun(Path("/z"), {}).computed == []  # a list of its own


def test_model_check_of_a_manifest():
    assert cohort._model_check({}) is None
    assert cohort._model_check({"model_check": None}) is None
    data = {"n": "10", "correct": 9, "majority_rate": "0.5", "p_value": 0.01, "above_chance": 1}
    assert cohort._model_check(data | {"unit": "samples"}) is None  # the check sits under "model_check"
    assert cohort._model_check({"model_check": data}) == ModelCheck(10, 9, 0.5, 0.01, True, "explained patients")


# ---------------------------------------------------------------------------------------------- attribute_dataset


def test_run_rows_parts_and_dtypes(toy_run):
    table = read_cohort(toy_run.out)
    assert table.columns == list(COLUMNS)
    assert table.dtypes == [pl.Int64, pl.String, pl.String, pl.String, pl.Int32, pl.Int32, pl.String, pl.Float32,
                            pl.Int32, pl.Float32]
    # each part: the rows of its samples, the first method's, then the second's
    expected = []
    for start in (0, 2, 4):
        chunk = SAMPLES[start : start + 2]
        expected += toy_rows("Scores", 1.0, chunk, start) + toy_rows("Double", 3.0, chunk, start)
    assert table.rows() == approx_rows(expected)
    assert [pq.read_metadata(p).num_rows for p in toy_run.parts] == [16, 16, 6]
    assert toy_run.parts == [toy_run.out / f"part-00000{k}.parquet" for k in range(3)]
    assert toy_run.rows == 38 == table.height


def test_run_manifest(toy_run):
    manifest = json.loads((toy_run.out / MANIFEST).read_text())
    assert manifest == toy_run.manifest
    assert {k: manifest[k] for k in ("format", "n_samples", "chunk_size", "target_mode", "baseline", "seed")} == {
        "format": FORMAT, "n_samples": 5, "chunk_size": 2, "target_mode": "predicted", "baseline": "unk", "seed": 0}
    assert manifest["feature_keys"] == ["dx", "px"]
    assert manifest["model_sha256"] == toy_digest()
    assert manifest["methods"] == [
        {"name": "Scores", "method": "Scores", "options": "{'scale': 1.0}", "kwargs": "{}"},
        {"name": "Double", "method": "Scores", "options": "{'scale': 2.0}", "kwargs": "{'factor': 1.5}"},
    ]
    assert manifest["complete"] is True and manifest["columns"] == COLUMNS and manifest["rows"] == 38
    assert manifest["parts"] == [
        {"file": "part-000000.parquet", "chunk": 0, "start": 0, "stop": 2, "rows": 16},
        {"file": "part-000001.parquet", "chunk": 1, "start": 2, "stop": 4, "rows": 16},
        {"file": "part-000002.parquet", "chunk": 2, "start": 4, "stop": 5, "rows": 6},
    ]
    check = manifest["model_check"]
    assert {k: check[k] for k in TOY_CHECK} == TOY_CHECK and check["unit"] == "samples"
    assert check["above_chance"] is False
    this_run = manifest["this_run"]
    assert (this_run["world_size"], this_run["backend"], this_run["computed"], this_run["skipped"]) == (
        1, None, [0, 1, 2], [])
    (stats,) = this_run["per_rank"]
    assert (stats["rank"], stats["chunks"], stats["samples"]) == (0, [0, 1, 2], 5)
    assert sorted(stats["method_seconds"]) == ["Double", "Scores"]
    assert (toy_run.rank, toy_run.world_size, toy_run.computed, toy_run.skipped) == (0, 1, [0, 1, 2], [])


def test_run_model_check_and_its_warning(tmp_path):
    adapter = Toy()
    with pytest.warns(ChanceLevelWarning) as caught:  # called here, not through run_toy: the warning names this line
        run = attribute_dataset(adapter, SAMPLES, toy_methods(adapter), tmp_path / "run", chunk_size=2,
                                collate_fn=collate, progress=False)
    expected = ModelCheck.from_counts(3, 5, {0: 2, 1: 3}, unit="samples")
    assert run.model_check == expected
    (warning,) = [w for w in caught if w.category is ChanceLevelWarning]
    assert points_at(warning, __file__)
    assert str(warning.message) == expected.warning()
    assert str(warning.message).startswith("The model is not better than chance on the samples: accuracy 0.600 (3 of 5")


def test_run_without_labels_has_no_model_check_and_no_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_toy(tmp_path / "run", collate_fn=collate_unlabelled)
    assert run.model_check is None and run.manifest["model_check"] is None
    assert not [w for w in caught if issubclass(w.category, ChanceLevelWarning)]
    assert read_cohort(tmp_path / "run").height == 38


def test_run_settings_go_into_the_manifest_and_the_rows(tmp_path):
    adapter = Toy(weight=((1.0, -4.0), (0.0, 0.0), (-1.0, 4.0)))  # logits (L, 0, -L): predicted 2, 2, 0, 2, 2
    run = attribute_dataset(adapter, SAMPLES, [Scores(adapter)], tmp_path / "run", 4, chunk_size=3,
                            target_mode="label", baseline="zero", seed=5, collate_fn=collate, progress=False)
    manifest = run.manifest
    assert (manifest["target_mode"], manifest["baseline"], manifest["seed"], manifest["chunk_size"]) == (
        "label", "zero", 5, 3)
    assert manifest["model_sha256"] != toy_digest() and len(manifest["parts"]) == 2
    table = read_cohort(tmp_path / "run")
    labels = [s["label"] for s in SAMPLES]
    assert table.unique("sample", maintain_order=True)["target"].to_list() == labels  # the labels are explained
    probability = [softmax([L, 0, -L])[y] for L, y in zip(LOGITS, labels, strict=True)]
    got = table.unique("sample", maintain_order=True)["probability"].to_list()
    assert got == pytest.approx(probability, rel=1e-5)
    # the model check: predicted 2, 2, 0, 2, 2 against the labels 1, 0, 1, 0, 1: none right
    assert (run.model_check.n, run.model_check.correct, run.model_check.majority_rate) == (5, 0, 0.6)


def test_run_predicted_targets_of_a_multiclass_model(tmp_path):
    adapter = Toy(weight=((1.0, -4.0), (0.0, 0.0), (-1.0, 4.0)))
    methods = [Scores(adapter)]
    attribute_dataset(adapter, SAMPLES, methods, tmp_path / "run", chunk_size=5, collate_fn=collate, progress=False)
    table = read_cohort(tmp_path / "run")
    assert table.unique("sample", maintain_order=True)["target"].to_list() == [2, 2, 0, 2, 2]
    assert [t.tolist() for t in methods[0].targets] == [[2, 2, 0, 2, 2]]  # one batch of 5 (default 32)


def test_run_seeds_each_chunk_and_restores_the_random_state(tmp_path):
    adapter = Toy()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    run_toy(tmp_path / "run", adapter, [Draw(adapter)], seed=7, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    table = read_cohort(tmp_path / "run")
    for k, first in enumerate((0, 2, 4)):
        torch.manual_seed(7 * 1_000_003 + k)  # the chunk's seed: one batch, one draw
        expected = 2 * torch.rand(()).item()
        scores = table.filter(pl.col("sample").is_between(first, first + 1))["score"].to_list()
        assert scores == [pytest.approx(expected, rel=1e-6)] * len(scores)


def test_run_cuts_batches_inside_chunks(tmp_path):
    batches = []

    def recording(samples):
        batches.append([s["i"] for s in samples])
        return collate(samples)

    run_toy(tmp_path / "run", collate_fn=recording, chunk_size=3, batch_size=2)
    assert batches == [[0, 1], [2], [3, 4]]
    batches.clear()
    run_toy(tmp_path / "run2", collate_fn=recording, chunk_size=1)  # the smallest chunk; batches of 32
    assert batches == [[0], [1], [2], [3], [4]]
    batches.clear()
    run_toy(tmp_path / "run3", collate_fn=recording, chunk_size=4, batch_size=1)
    assert batches == [[0], [1], [2], [3], [4]]


def test_run_chunk_count_rounds_up(tmp_path):
    assert len(run_toy(tmp_path / "a", chunk_size=5).parts) == 1
    assert len(run_toy(tmp_path / "b", chunk_size=4).parts) == 2
    assert len(run_toy(tmp_path / "c", chunk_size=6).parts) == 1


def test_run_resumes_and_overwrites(tmp_path):
    out = tmp_path / "run"
    run_toy(out)
    before = read_cohort(out)
    again = run_toy(out)
    assert (again.computed, again.skipped) == ([], [0, 1, 2])
    assert again.manifest["this_run"]["computed"] == [] and again.manifest["this_run"]["skipped"] == [0, 1, 2]
    (out / "part-000001.parquet").unlink()
    third = run_toy(out)
    assert (third.computed, third.skipped) == ([1], [0, 2])
    assert read_cohort(out).equals(before)
    fresh = run_toy(out, overwrite=True)
    assert (fresh.computed, fresh.skipped) == ([0, 1, 2], [])


def test_run_refuses_parts_of_another_run(tmp_path):
    out = tmp_path / "run"
    run_toy(out)
    with pytest.raises(ValueError, match=r"holds 3 part file\(s\) of another run \(part-000000.parquet: it differs in "
                                         r"seed\)"):
        run_toy(out, seed=1)


def test_run_time_and_progress(tmp_path, capsys):
    started = time.perf_counter()
    run = run_toy(tmp_path / "run", progress=True)
    elapsed = time.perf_counter() - started
    assert 0 < run.manifest["this_run"]["seconds"] <= elapsed + 0.001
    err = capsys.readouterr().err
    assert "attribute_dataset: 100%" in err and "| 5/5 [" in err and "sample/s]" in err
    run_toy(tmp_path / "quiet")
    assert capsys.readouterr().err == ""


class FakeGroup:
    """A process group of two (``rank``) in this one process: ``gather`` adds what the other rank sends."""

    def __init__(self, rank, other_stats=None, on_gather=None, plan=None, manifest=None):
        self.rank, self.world_size, self.backend = rank, 2, "gloo"
        self.other_stats, self.on_gather, self.plan, self.manifest = other_stats, on_gather, plan, manifest
        self.calls = []

    def check_same(self, description):
        self.calls.append("check_same")

    def gather(self, value):
        self.calls.append("gather")
        if self.on_gather:
            self.on_gather()
        return [value, self.other_stats] if self.rank == 0 else [self.other_stats, value]

    def from_rank0(self, compute):
        self.calls.append("from_rank0")
        if self.rank == 0:
            return compute()
        return self.plan if self.calls.count("from_rank0") == 1 else self.manifest

    def leave(self):
        self.calls.append("leave")


def test_run_as_rank_0_of_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_toy(out)
    saved = (out / "part-000002.parquet").read_bytes()
    for name in ("part-000000.parquet", "part-000002.parquet", MANIFEST):
        (out / name).unlink()
    # pending chunks 0 and 2: rank 0 takes 0, rank 1 takes 2 (written here when the ranks gather)
    other = {"rank": 1, "chunks": [2]}
    group = FakeGroup(0, other, on_gather=lambda: (out / "part-000002.parquet").write_bytes(saved))
    monkeypatch.setattr(cohort._ProcessGroup, "join", classmethod(lambda cls, device: group))
    with pytest.warns(ChanceLevelWarning):
        run = run_toy(out, progress=True)
    assert group.calls == ["check_same", "from_rank0", "gather", "from_rank0", "leave"]
    assert (run.rank, run.world_size, run.computed, run.skipped) == (0, 2, [0], [1])
    this_run = run.manifest["this_run"]
    assert (this_run["world_size"], this_run["backend"], this_run["computed"]) == (2, "gloo", [0, 2])
    assert this_run["per_rank"][1] == other and this_run["per_rank"][0]["chunks"] == [0]
    assert this_run["per_rank"][0]["samples"] == 2
    err = capsys.readouterr().err
    assert "attribute_dataset (rank 0 of 2): 100%" in err and "| 2/2 [" in err


def test_run_as_rank_1_of_2(tmp_path, monkeypatch, capsys):
    manifest = {"parts": [], "rows": 0, "this_run": {"skipped": []},
                "model_check": ModelCheck.from_counts(1, 4, {0: 2, 1: 2}, unit="samples").as_dict()}
    group = FakeGroup(1, plan={"skipped": [], "pending": [0, 1, 2]}, manifest=manifest)
    monkeypatch.setattr(cohort._ProcessGroup, "join", classmethod(lambda cls, device: group))
    out = tmp_path / "run"
    out.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_toy(out, progress=True)
    assert not caught  # rank 0 warns, not the others
    assert (run.rank, run.world_size, run.computed, run.manifest) == (1, 2, [1], manifest)
    assert sorted(p.name for p in out.iterdir()) == ["part-000001.parquet"]
    assert capsys.readouterr().err == ""  # rank 0 shows the progress
    assert group.calls[-1] == "leave"


def test_run_leaves_the_group_when_it_fails(tmp_path, monkeypatch):
    group = FakeGroup(0)
    monkeypatch.setattr(cohort._ProcessGroup, "join", classmethod(lambda cls, device: group))
    write_part_by_hand(tmp_path / "run", "part-000000.parquet")
    with pytest.raises(ValueError, match="of another run"):
        run_toy(tmp_path / "run")
    assert group.calls == ["check_same", "from_rank0", "leave"]


def test_run_checks_its_arguments(tmp_path):
    adapter = Toy()
    methods = [Scores(adapter)]
    out = tmp_path / "out"

    def refused(error, message, *args, **kwargs):
        with pytest.raises(error, match=exact(message)):
            attribute_dataset(*args, **kwargs)

    refused(TypeError, "attribute_dataset needs an adapter from captum_chefer.adapters (e.g. PyHealthAdapter(model)), "
            "got Linear", nn.Linear(2, 1), SAMPLES, methods, out)
    for bad in (0, -1, True, 2.0, None):
        refused(ValueError, f"chunk_size must be a positive int, got {bad!r}", adapter, SAMPLES, methods, out,
                chunk_size=bad)
    for bad in (0, -3, False, 1.0):
        refused(ValueError, f"batch_size must be a positive int, got {bad!r}", adapter, SAMPLES, methods, out, bad)
    refused(ValueError, "target_mode must be 'predicted' or 'label', got 'labels'", adapter, SAMPLES, methods, out,
            target_mode="labels")
    refused(ValueError, "baseline must be 'unk' or 'zero', got 'mean'", adapter, SAMPLES, methods, out,
            baseline="mean")
    refused(ValueError, "the dataset holds no samples", adapter, [], methods, out, collate_fn=collate)
    assert not out.exists()  # nothing was written
    taken = tmp_path / "taken"
    taken.write_text("x")
    refused(NotADirectoryError, f"out {str(taken)!r} is an existing file; attribute_dataset writes a directory of "
            "Parquet parts there: pass a directory path (it is created if missing)", adapter, SAMPLES, methods, taken)


def test_run_defaults(tmp_path, capsys):
    adapter = Toy()
    run = attribute_dataset(adapter, SAMPLES, [Scores(adapter)], tmp_path / "run", collate_fn=collate)
    manifest = run.manifest
    assert (manifest["chunk_size"], manifest["target_mode"], manifest["baseline"], manifest["seed"]) == (
        512, "predicted", "unk", 0)
    assert len(run.parts) == 1 and run.computed == [0]
    assert "attribute_dataset: 100%" in capsys.readouterr().err  # a progress bar


def test_run_gives_ig_like_methods_baselines_of_the_reference(tmp_path):
    adapter = Toy()
    ig = IntegratedGradients(adapter)
    run_toy(tmp_path / "unk", adapter, [ig], chunk_size=5)  # the default: "unk", the embedding (1, 1)
    assert adapter.references == ["unk"]
    assert read_cohort(tmp_path / "unk")["score"].to_list() == [c - 1 for _, _, _, c in toy_codes()]
    run_toy(tmp_path / "zero", adapter, [ig], chunk_size=5, baseline="zero")
    assert adapter.references == ["unk", "zero"]
    assert read_cohort(tmp_path / "zero")["score"].to_list() == [c + 1 for _, _, _, c in toy_codes()]


def test_run_joins_and_leaves_a_group_on_the_adapters_device(tmp_path, fake_dist, monkeypatch):
    dist, calls = fake_dist
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's environment; the faked group is one process
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    run = run_toy(tmp_path / "run")
    assert calls == [("init", {"backend": "gloo", "init_method": "env://"}), ("destroy",)]
    assert run.manifest["this_run"]["backend"] == "gloo" and run.computed == [0, 1, 2]


def test_run_accepts_the_smallest_sizes(tmp_path):
    run = run_toy(tmp_path / "run", chunk_size=1, batch_size=1)
    assert len(run.parts) == 5 and run.rows == 38


# ---------------------------------------------------------------------------------------------- rows of a batch


def empty_columns(*methods):
    return {m: {c: [] for c in COLUMNS} for m in methods}


def as_rows(columns: dict) -> list[tuple]:
    return list(zip(*(columns[c] for c in COLUMNS), strict=True))


def test_batch_rows_of_a_single_logit_model():
    adapter = Toy()
    specs = [("A", Scores(adapter), {}), ("B", Scores(adapter, 2.0), {"factor": 1.5})]
    columns = empty_columns("A", "B")
    seconds = {"A": 0.0, "B": 0.0}
    labels, predicted = cohort._batch_rows(adapter, collate(SAMPLES[1:3]), specs, 7, "predicted", "unk", seconds,
                                           columns)
    assert as_rows(columns["A"]) == approx_rows(toy_rows("A", 1.0, SAMPLES[1:3], first=7))
    assert as_rows(columns["B"]) == approx_rows(toy_rows("B", 3.0, SAMPLES[1:3], first=7))
    assert columns["A"]["visit"][:2] == [None, 0] and columns["A"]["code"][:3] == ["D2", "P1", "P1"]
    assert labels.tolist() == [0, 1] and predicted.tolist() == [0, 1]  # logits -8 and 1
    assert seconds["A"] > 0 and seconds["B"] > 0
    assert specs[0][1].targets == [None]
    (args,) = specs[0][1].args  # the masks of the real codes
    assert [a.tolist() for a in args] == [[[True, False, False], [True, True, True]],
                                          [[[True, True]], [[True, False]]]]
    # a second batch appends to the same columns
    cohort._batch_rows(adapter, collate(SAMPLES[4:]), specs, 4, "predicted", "unk", seconds, columns)
    expected = toy_rows("A", 1.0, SAMPLES[1:3], 7) + toy_rows("A", 1.0, SAMPLES[4:], 4)
    assert as_rows(columns["A"]) == approx_rows(expected)


def test_batch_rows_run_the_model_once_per_batch():
    """The logits of the rows' probabilities also give the model check's predictions: one forward pass."""

    class Counting(Toy):
        calls = 0

        def forward(self, *args):
            Counting.calls += 1
            return super().forward(*args)

    adapter = Counting()
    labels, predicted = cohort._batch_rows(adapter, collate(SAMPLES[:3]), [("A", Scores(adapter), {})], 0,
                                           "predicted", "unk", {"A": 0.0}, empty_columns("A"))
    assert Counting.calls == 1
    assert labels.tolist() == [1, 0, 1] and predicted.tolist() == [0, 0, 1]  # logits -5, -8, 1


class TokenScores(LayerIntegratedGradients):
    """A method on code ids, as LayerIntegratedGradients is: each id's score is the sum of its embedding, id + 1."""

    def __init__(self, adapter) -> None:
        super().__init__(adapter, adapter.head)
        self.inputs: list = []

    def attribute(self, inputs, target=None, additional_forward_args=None, baselines=None):
        self.inputs.append(inputs)
        return tuple(embed(ids) for ids in inputs)


def test_batch_rows_give_a_method_on_code_ids_the_ids():
    adapter = Toy()
    method = TokenScores(adapter)
    batch = collate(SAMPLES[:2])
    columns = empty_columns("T")
    cohort._batch_rows(adapter, batch, [("T", method, {})], 0, "predicted", "unk", {"T": 0.0}, columns)
    ((dx, px),) = method.inputs
    assert dx.tolist() == batch["dx"].tolist() and px.tolist() == batch["px"].tolist()
    assert as_rows(columns["T"]) == approx_rows(toy_rows("T", 1.0, SAMPLES[:2]))


def test_batch_rows_name_patients_by_sample_index_without_ids():
    adapter = Toy()
    batch = collate(SAMPLES[:2])
    del batch["patient_id"]
    columns = empty_columns("A")
    cohort._batch_rows(adapter, batch, [("A", Scores(adapter), {})], 7, "predicted", "unk", {"A": 0.0}, columns)
    assert columns["A"]["patient_id"] == ["7"] * 5 + ["8"] * 3


def test_batch_rows_of_a_multiclass_model():
    adapter = Toy(weight=((1.0, -4.0), (0.0, 0.0), (-1.0, 4.0)))  # logits (L, 0, -L)
    method = Scores(adapter)
    batch = collate(SAMPLES[:3])  # L = -5, -8, 1: predicted 2, 2, 0; labels 1, 0, 1
    for mode, classes in (("predicted", [2, 2, 0]), ("label", [1, 0, 1])):
        columns = empty_columns("A")
        cohort._batch_rows(adapter, batch, [("A", method, {})], 0, mode, "unk", {"A": 0.0}, columns)
        assert method.targets[-1].tolist() == classes
        pairs = zip(columns["A"]["target"], columns["A"]["probability"], strict=True)
        per_sample = dict(zip(columns["A"]["sample"], pairs, strict=True))
        assert [per_sample[i][0] for i in range(3)] == classes
        expected = [softmax([L, 0, -L])[c] for L, c in zip(LOGITS, classes, strict=False)]
        assert [per_sample[i][1] for i in range(3)] == pytest.approx(expected, rel=1e-6)


def test_batch_rows_read_the_code_not_the_display_text():
    class Displayed(Toy):
        def decode(self, batch):  # text a row must not parse: the code is given apart from it
            return [[DecodedToken(t.feature, f"[{t.text}]", t.index, code=t.code) for t in row]
                    for row in super().decode(batch)]

    adapter, columns = Displayed(), empty_columns("A")
    cohort._batch_rows(adapter, collate(SAMPLES[:1]), [("A", Scores(adapter), {})], 0, "predicted", "unk",
                       {"A": 0.0}, columns)
    assert columns["A"]["code"] == ["D3", "D1", "P2", "P5", "P4"]


def test_batch_rows_keep_a_nested_code_without_the_visit_prefix():
    adapter = Toy(prefix=False)
    columns = empty_columns("A")
    cohort._batch_rows(adapter, collate(SAMPLES[:1]), [("A", Scores(adapter), {})], 0, "predicted", "unk",
                       {"A": 0.0}, columns)
    assert columns["A"]["code"] == ["D3", "D1", "P2", "P5", "P4"]
    assert columns["A"]["visit"] == [None, None, 0, 1, 1] and columns["A"]["position"] == [0, 1, 0, 0, 1]


def test_batch_rows_refuse_tokens_of_three_dims():
    class Cube(Toy):
        def decode(self, batch):
            return [[DecodedToken("img", "x", (0, 1, 2))]]

    adapter = Cube()
    with pytest.raises(ValueError, match=exact("feature 'img' has tokens indexed by 3 dims; cohort rows hold a visit "
                                               "and a position (flat or nested code features)")):
        cohort._batch_rows(adapter, collate(SAMPLES[:1]), [("A", Scores(adapter), {})], 0, "predicted", "unk",
                           {"A": 0.0}, empty_columns("A"))


def test_batch_rows_of_a_batch_without_codes_or_labels():
    class Blank(Toy):
        def decode(self, batch):
            return [[] for _ in range(batch["dx"].shape[0])]

    adapter = Blank()
    columns = empty_columns("A")
    out = cohort._batch_rows(adapter, collate_unlabelled(SAMPLES[:2]), [("A", Scores(adapter), {})], 0, "predicted",
                             "unk", {"A": 0.0}, columns)
    assert out is None and columns == empty_columns("A")


def test_explained_classes_and_columns():
    classes, column = cohort._explained(None, 1, 3)
    assert classes == [1, 1, 1] and column.tolist() == [0, 0, 0] and column.dtype == torch.long
    classes, column = cohort._explained(torch.tensor([2, 0, 1]), 3, 3)
    assert classes == [2, 0, 1] and column.tolist() == [2, 0, 1] and column.dtype == torch.long
    classes, column = cohort._explained(torch.tensor(1), 2, 3)  # one class for the batch
    assert classes == [1, 1, 1] and column.tolist() == [1, 1, 1]
    classes, column = cohort._explained([[1], [0]], 1, 2)  # a single logit reads column 0 whatever the class
    assert classes == [1, 0] and column.tolist() == [0, 0] and column.dtype == torch.long
    classes, column = cohort._explained([1.0], 2, 1)
    assert classes == [1] and column.tolist() == [1] and column.dtype == torch.long
    with pytest.raises(ValueError, match=exact("the adapter gave no target for a model with several outputs; use "
                                               "target_mode='predicted'")):
        cohort._explained(None, 2, 3)
    with pytest.raises(ValueError, match=exact("the target holds 2 classes for a batch of 3 samples")):
        cohort._explained(torch.tensor([0, 1]), 2, 3)
    with pytest.raises(ValueError, match=exact("the target holds 0 classes for a batch of 1 samples")):
        cohort._explained(torch.tensor([]), 2, 1)


def test_patient_ids_from_the_batch_or_the_sample_index():
    assert cohort._patient_ids({"patient_id": ["a", 7]}, 2, 5) == ["a", "7"]
    assert cohort._patient_ids({"patient_id": ("a", "b")}, 2, 5) == ["a", "b"]
    assert cohort._patient_ids({"patient_id": ["a"]}, 2, 5) == ["5", "6"]  # not one per sample
    assert cohort._patient_ids({"patient_id": "ab"}, 2, 5) == ["5", "6"]  # not a list
    assert cohort._patient_ids({}, 3, 0) == ["0", "1", "2"]
    assert cohort._patient_ids([["a", "b"]], 2, 1) == ["1", "2"]  # not a dict
    assert cohort._patient_ids({"patient_id": []}, 0, 4) == []


def test_add_counts_sums_batches():
    start = {"n": 0, "correct": 0, "counts": {}}
    first = cohort._add_counts(start, (torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])))
    assert first == {"n": 3, "correct": 2, "counts": {"0": 1, "1": 2}}
    assert start == {"n": 0, "correct": 0, "counts": {}}  # not changed in place
    second = cohort._add_counts(first, (torch.tensor([[2], [1]]), torch.tensor([0, 1])))
    assert second == {"n": 5, "correct": 3, "counts": {"0": 1, "1": 3, "2": 1}}
    assert first["counts"] == {"0": 1, "1": 2}
    assert cohort._add_counts(first, None) is None
    assert cohort._add_counts(None, (torch.tensor([1]), torch.tensor([1]))) is None


# ---------------------------------------------------------------------------------------------- chunks


def test_run_chunks_writes_a_part_per_chunk_and_reports(tmp_path):
    adapter = Toy()
    batches = []

    def recording(samples):
        batches.append([s["i"] for s in samples])
        return collate(samples)

    source = cohort._Source(SAMPLES, 5, 2, recording)
    specs = [("A", Scores(adapter), {}), ("B", Scores(adapter, 2.0), {})]
    started = time.perf_counter()
    stats = cohort._run_chunks(adapter, source, specs, tmp_path, description(), [1, 0], 3, target_mode="predicted",
                               baseline="unk", seed=0, progress=False, rank=3, world_size=4,
                               device=torch.device("cpu"))
    assert batches == [[3, 4], [0, 1], [2]]  # chunk 1, then chunk 0 in batches of 2
    assert set(stats) == {"rank", "host", "chunks", "samples", "seconds", "method_seconds", "peak_rss_mb",
                          "peak_cuda_mb"}
    assert (stats["rank"], stats["host"], stats["chunks"], stats["samples"]) == (3, socket.gethostname(), [1, 0], 5)
    assert stats["peak_cuda_mb"] is None
    elapsed = time.perf_counter() - started
    assert isinstance(stats["seconds"], float) and 0 < stats["seconds"] <= elapsed + 0.0005
    assert stats["seconds"] == round(stats["seconds"], 3)
    assert sorted(stats["method_seconds"]) == ["A", "B"]
    assert all(isinstance(v, float) and v == round(v, 3) >= 0 for v in stats["method_seconds"].values())
    assert isinstance(stats["peak_rss_mb"], float) and stats["peak_rss_mb"] == round(stats["peak_rss_mb"], 1)
    assert abs(stats["peak_rss_mb"] - cohort._peak_rss_mb()) < 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    part = pl.read_parquet(tmp_path / "part-000001.parquet")
    assert part.rows() == approx_rows(toy_rows("A", 1.0, SAMPLES[3:], 3) + toy_rows("B", 2.0, SAMPLES[3:], 3))
    meta = json.loads(pq.read_metadata(tmp_path / "part-000000.parquet").metadata[META_KEY])
    assert meta == {"run": description(), "chunk": 0, "start": 0, "stop": 3,
                    "labels": {"n": 3, "correct": 2, "counts": {"1": 2, "0": 1}}}
    meta = json.loads(pq.read_metadata(tmp_path / "part-000001.parquet").metadata[META_KEY])
    assert (meta["start"], meta["stop"], meta["labels"]) == (3, 5, {"n": 2, "correct": 1, "counts": {"0": 1, "1": 1}})


def test_run_chunks_counts_the_samples_of_a_short_last_chunk(tmp_path, capsys):
    adapter = Toy()
    source = cohort._Source(SAMPLES, 5, 32, collate)
    stats = cohort._run_chunks(adapter, source, [("A", Scores(adapter), {})], tmp_path, description(), [2], 2,
                               target_mode="predicted", baseline="unk", seed=0, progress=True, rank=0, world_size=1,
                               device=torch.device("cpu"))
    assert stats["samples"] == 1 and stats["chunks"] == [2]
    assert pl.read_parquet(tmp_path / "part-000002.parquet")["sample"].to_list() == [4, 4, 4]
    err = capsys.readouterr().err
    assert "attribute_dataset: 100%" in err and "| 1/1 [" in err and "rank" not in err
    stats = cohort._run_chunks(adapter, source, [("A", Scores(adapter), {})], tmp_path, description(), [], 2,
                               target_mode="predicted", baseline="unk", seed=0, progress=False, rank=0, world_size=1,
                               device=torch.device("cpu"))
    assert (stats["samples"], stats["chunks"], stats["method_seconds"]) == (0, [], {"A": 0.0})


def test_run_chunks_without_labels_record_none(tmp_path):
    adapter = Toy()
    source = cohort._Source(SAMPLES, 5, 1, collate_unlabelled)
    cohort._run_chunks(adapter, source, [("A", Scores(adapter), {})], tmp_path, description(), [0], 2,
                       target_mode="predicted", baseline="unk", seed=0, progress=False, rank=0, world_size=1,
                       device=torch.device("cpu"))
    assert json.loads(pq.read_metadata(tmp_path / "part-000000.parquet").metadata[META_KEY])["labels"] is None


# ---------------------------------------------------------------------------------------------- data sources


def test_source_of_a_dataset():
    source = cohort._Source.of(SAMPLES, None, collate)
    assert (source.dataset, source.n_samples, source.batch_size, source.collate) == (SAMPLES, 5, 32, collate)
    assert cohort._Source.of(SAMPLES, 3, collate).batch_size == 3
    assert cohort._Source.of(SAMPLES, 1, collate).batch_size == 1


def test_source_batch_collates_a_range():
    source = cohort._Source.of(SAMPLES, None, list)
    assert source.batch(1, 3) == [SAMPLES[1], SAMPLES[2]]
    assert source.batch(4, 5) == [SAMPLES[4]]
    assert source.batch(2, 2) == []


def test_source_of_a_loader_takes_its_dataset_batch_size_and_collate():
    loader = DataLoader(SAMPLES, batch_size=4, shuffle=True, collate_fn=collate)
    source = cohort._Source.of(loader, None, None)
    assert (source.dataset, source.n_samples, source.batch_size, source.collate) == (SAMPLES, 5, 4, collate)
    assert cohort._Source.of(loader, 2, None).batch_size == 2  # the argument wins
    assert cohort._Source.of(loader, None, list).collate is list
    unbatched = DataLoader(SAMPLES, batch_size=None, collate_fn=collate)
    assert cohort._Source.of(unbatched, None, None).batch_size == 32
    assert cohort._Source.of(unbatched, 3, None).batch_size == 3


def test_source_defaults_to_pyhealths_collate(monkeypatch):
    def padding_collate(samples):
        return samples

    package = types.ModuleType("pyhealth")
    datasets = types.ModuleType("pyhealth.datasets")
    datasets.collate_fn_dict_with_padding = padding_collate
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "pyhealth", package)
    monkeypatch.setitem(sys.modules, "pyhealth.datasets", datasets)
    assert cohort._Source.of(SAMPLES, None, None).collate is padding_collate
    assert cohort._Source.of(DataLoader(SAMPLES, batch_size=2), None, None).collate is not padding_collate


def test_source_refuses_a_batch_and_unindexable_data():
    with pytest.raises(TypeError, match=exact("attribute_dataset takes a dataset or a DataLoader, not a batch; use "
                                              "compare_methods for one batch")):
        cohort._Source.of(collate(SAMPLES), None, collate)
    with pytest.raises(TypeError, match=exact("attribute_dataset reads samples by index; set has no indexing. Pass a "
                                              "PyHealth SampleDataset (or a DataLoader over a dataset with len() and "
                                              "indexing)")):
        cohort._Source.of({1, 2}, None, collate)

    class Endless:
        def __getitem__(self, index):
            return index

    with pytest.raises(TypeError, match=exact("attribute_dataset needs the number of samples: Endless has no len()")):
        cohort._Source.of(Endless(), None, collate)


def test_sample_count_of_a_streaming_dataset_sums_its_regions():
    from litdata import StreamingDataset

    dataset = StreamingDataset.__new__(StreamingDataset)
    dataset.region_of_interest = [(0, 3), (10, 15)]
    assert cohort._sample_count(dataset) == 8 and isinstance(cohort._sample_count(dataset), int)

    class Own(StreamingDataset):  # its own len() is used
        def __len__(self):
            return 2

    own = Own.__new__(Own)
    own.region_of_interest = [(0, 3)]
    assert cohort._sample_count(own) == 2
    assert cohort._sample_count(SAMPLES) == 5 and cohort._sample_count([]) == 0


# ---------------------------------------------------------------------------------------------- process group


@pytest.fixture
def fake_dist(monkeypatch):
    """torch.distributed's calls that _ProcessGroup makes, recorded; no group is initialised."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return dist, calls


def group_state(group):
    return (group.rank, group.world_size, group.created, group.backend)


def test_join_alone_makes_a_group_of_one(fake_dist, monkeypatch):
    _, calls = fake_dist
    assert group_state(cohort._ProcessGroup.join(torch.device("cpu"))) == (0, 1, False, None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    group = cohort._ProcessGroup.join(torch.device("cpu"))
    assert group_state(group) == (0, 1, False, None) and not group.distributed
    assert calls == []


def test_join_initialises_gloo_or_nccl_from_the_environment(fake_dist, monkeypatch):
    _, calls = fake_dist
    monkeypatch.setenv("WORLD_SIZE", "2")
    group = cohort._ProcessGroup.join(torch.device("cpu"))
    assert group_state(group) == (1, 2, True, "gloo") and group.distributed
    assert calls == [("init", {"backend": "gloo", "init_method": "env://"})]
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    calls.clear()
    group = cohort._ProcessGroup.join(torch.device("cuda", 1))
    assert group_state(group) == (1, 2, True, "nccl")
    assert calls == [("init", {"backend": "nccl", "init_method": "env://"})]
    assert devices == [torch.device("cuda", 1)]


def test_join_an_initialised_group(fake_dist, monkeypatch):
    dist, calls = fake_dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    group = cohort._ProcessGroup.join(torch.device("cpu"))
    assert group_state(group) == (3, 4, False, "gloo")
    group.leave()
    assert calls == []  # neither created nor destroyed here


def test_join_without_torch_distributed(fake_dist, monkeypatch):
    dist, _ = fake_dist
    monkeypatch.setattr(dist, "is_available", lambda: False)
    assert group_state(cohort._ProcessGroup.join(torch.device("cpu"))) == (0, 1, False, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=exact("WORLD_SIZE > 1 but this torch build has no torch.distributed")):
        cohort._ProcessGroup.join(torch.device("cpu"))


def test_leave_destroys_only_a_group_it_created(fake_dist):
    _, calls = fake_dist
    cohort._ProcessGroup(0, 2, False, "gloo").leave()
    assert calls == []
    cohort._ProcessGroup(0, 2, True, "gloo").leave()
    assert calls == [("destroy",)]


def test_gather_alone_and_among_several(fake_dist, monkeypatch):
    dist, _ = fake_dist
    assert cohort._ProcessGroup(0, 1, False, None).gather({"a": 1}) == [{"a": 1}]
    seen = []

    def all_gather_object(values, value):
        seen.append(list(values))
        values[:] = [value, "from 1", "from 2"]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert cohort._ProcessGroup(0, 3, False, "gloo").gather("mine") == ["mine", "from 1", "from 2"]
    assert seen == [[None, None, None]]


def test_check_same_names_every_differing_key():
    group = cohort._ProcessGroup(0, 3, False, "gloo")
    mine = {"n_samples": 5, "seed": 0, "model_sha256": "a"}
    sent = []

    def gather(value):
        sent.append(value)
        return [value, dict(value, seed=1, extra=True), dict(value, n_samples=6)]

    group.gather = gather
    with pytest.raises(ValueError, match=exact(
        "the 3 processes differ in extra, n_samples, seed: every process must build the same model (load one "
        "checkpoint; do not train in each process unless it is seeded and deterministic), the same dataset in the "
        "same order, and the same methods"
    )):
        group.check_same(mine)
    assert sent == [mine] and type(sent[0]) is dict
    group.gather = lambda value: [value, dict(value), dict(value)]
    group.check_same(mine)  # the same everywhere


def test_from_rank0_alone():
    group = cohort._ProcessGroup(0, 1, False, None)
    assert group.from_rank0(lambda: "plan") == "plan"
    error = KeyError("x")

    def fail():
        raise error

    with pytest.raises(KeyError) as caught:
        group.from_rank0(fail)
    assert caught.value is error


def test_from_rank0_sends_rank_0s_result_or_error(fake_dist, monkeypatch):
    dist, _ = fake_dist
    sent = []
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: sent.append((list(box), src)))
    group = cohort._ProcessGroup(0, 2, False, "gloo")
    assert group.from_rank0(lambda: {"pending": [1]}) == {"pending": [1]}
    assert sent == [([({"pending": [1]}, None)], 0)]
    sent.clear()
    error = ValueError("out holds parts of another run")

    def fail():
        raise error

    with pytest.raises(ValueError) as caught:
        group.from_rank0(fail)
    assert caught.value is error
    assert sent == [([(None, (ValueError, "out holds parts of another run"))], 0)]


class Halt(BaseException):
    """Not an ``Exception`` (as ``KeyboardInterrupt``, which would stop pytest if a mutant raised it)."""


def test_from_rank0_on_another_rank_receives(fake_dist, monkeypatch):
    dist, _ = fake_dist
    group = cohort._ProcessGroup(1, 2, False, "gloo")

    def never():
        raise AssertionError("computed on rank 1")

    def receive(message):
        def broadcast(box, src):
            assert src == 0 and box == [(None, None)]
            box[0] = message

        monkeypatch.setattr(dist, "broadcast_object_list", broadcast)

    receive(({"pending": [2]}, None))
    assert group.from_rank0(never) == {"pending": [2]}
    receive((None, (ValueError, "bad parts")))
    with pytest.raises(ValueError, match=exact("bad parts")):
        group.from_rank0(never)
    receive((None, (Halt, "stopped")))  # not an Exception: a RuntimeError
    with pytest.raises(RuntimeError, match=exact("stopped")):
        group.from_rank0(never)
    receive((None, ("ValueError", "as text")))
    with pytest.raises(RuntimeError, match=exact("as text")):
        group.from_rank0(never)


def test_distributed_means_more_than_one_process():
    assert not cohort._ProcessGroup(0, 1, False, None).distributed
    assert cohort._ProcessGroup(0, 2, False, None).distributed


def test_adapter_device():
    class Bare(Adapter):
        pass

    assert cohort._adapter_device(Bare()) == torch.device("cpu")
    on_meta = Bare()
    on_meta.w = nn.Parameter(torch.zeros(1, device="meta"))
    assert cohort._adapter_device(on_meta) == torch.device("meta")
    buffered = Bare()
    buffered.register_buffer("b", torch.zeros(1, device="meta"))
    assert cohort._adapter_device(buffered) == torch.device("cpu")  # parameters only


def test_check_out(tmp_path):
    cohort._check_out(tmp_path)
    cohort._check_out(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(NotADirectoryError, match=exact(
        f"out {str(taken)!r} is an existing file; attribute_dataset writes a directory of Parquet parts there: pass a "
        "directory path (it is created if missing)"
    )):
        cohort._check_out(taken)


# ---------------------------------------------------------------------------------------------- parts and plan


def test_plan_of_a_new_directory(tmp_path):
    out = tmp_path / "a" / "b"
    assert cohort._plan(out, description(), 3, False) == {"skipped": [], "pending": [0, 1, 2]}
    assert out.is_dir()
    assert cohort._plan(out, description(), 1, False) == {"skipped": [], "pending": [0]}  # an existing directory


def test_plan_skips_complete_parts_and_deletes_temporary_files(tmp_path):
    for k in (2, 0):
        write_part_by_hand(tmp_path, f"part-00000{k}.parquet", part_meta(k))
    (tmp_path / ".part-000001.parquet.77.tmp").write_bytes(b"half")
    (tmp_path / ".part-000003.parquet.8.tmp").write_bytes(b"")
    (tmp_path / ".keep").write_text("not ours")
    (tmp_path / MANIFEST).write_text("{}")
    assert cohort._plan(tmp_path, description(), 4, False) == {"skipped": [0, 2], "pending": [1, 3]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "part-000000.parquet", "part-000002.parquet"]


def test_plan_keeps_the_manifest_of_a_complete_run(tmp_path):
    for k in (0, 1):
        write_part_by_hand(tmp_path, f"part-00000{k}.parquet", part_meta(k))
    (tmp_path / MANIFEST).write_text("{}")
    assert cohort._plan(tmp_path, description(), 2, False) == {"skipped": [0, 1], "pending": []}
    assert (tmp_path / MANIFEST).exists()


def test_plan_deletes_unreadable_parts(tmp_path):
    (tmp_path / "part-000000.parquet").write_bytes(b"PAR1 cut short")
    (tmp_path / "part-000001.parquet").write_bytes(b"")
    write_part_by_hand(tmp_path, "part-000002.parquet", part_meta(2))
    assert cohort._plan(tmp_path, description(), 3, False) == {"skipped": [2], "pending": [0, 1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000002.parquet"]


def test_plan_tolerates_files_that_another_process_removes_meanwhile(tmp_path, monkeypatch):
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0))
    (tmp_path / "part-000001.parquet").write_bytes(b"PAR1 cut short")
    real_glob, real_read = Path.glob, pq.read_metadata

    def glob(self, pattern):  # a temporary file listed, then removed by its own process before the unlink
        return [self / ".part-000002.parquet.5.tmp"] if pattern == ".part-*.tmp" else real_glob(self, pattern)

    def read_metadata(path):  # the broken part: removed by another process while this one reads it
        if Path(path).name == "part-000001.parquet":
            Path(path).unlink()
        return real_read(path)

    monkeypatch.setattr(Path, "glob", glob)
    monkeypatch.setattr(pq, "read_metadata", read_metadata)
    assert cohort._plan(tmp_path, description(), 3, False) == {"skipped": [0], "pending": [1, 2]}


def test_plan_overwrite_deletes_parts_and_manifest(tmp_path):
    for k in (0, 1):
        write_part_by_hand(tmp_path, f"part-00000{k}.parquet", part_meta(k, run=description(seed=9)))
    write_part_by_hand(tmp_path, "part-000007.parquet")
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert cohort._plan(tmp_path, description(), 2, True) == {"skipped": [], "pending": [0, 1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0))
    assert cohort._plan(tmp_path, description(), 2, True) == {"skipped": [], "pending": [0, 1]}  # no manifest there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_plan_refuses_a_part_of_another_run(tmp_path):
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0))
    write_part_by_hand(tmp_path, "part-000001.parquet", part_meta(1, run=description(seed=3, baseline="zero")))
    write_part_by_hand(tmp_path, "part-000002.parquet", part_meta(2, run=description(chunk_size=4)))
    with pytest.raises(ValueError, match=exact(
        f"{tmp_path} holds 2 part file(s) of another run (part-000001.parquet: it differs in baseline, seed); pass "
        "another out directory, or overwrite=True (--overwrite) to replace them"
    )):
        cohort._plan(tmp_path, description(), 3, False)
    assert len(list(tmp_path.iterdir())) == 3  # nothing deleted


def test_plan_refuses_a_part_of_another_chunk_or_without_a_footer(tmp_path):
    out = tmp_path / "chunk"
    write_part_by_hand(out, "part-000001.parquet", part_meta(0))  # chunk 0's rows under part 1's name
    with pytest.raises(ValueError, match=r"holds 1 part file\(s\) of another run \(part-000001.parquet: it is not a "
                                         r"part of this run's chunks\)"):
        cohort._plan(out, description(), 3, False)
    out = tmp_path / "beyond"
    write_part_by_hand(out, "part-000003.parquet", part_meta(3))  # a chunk this run does not have
    with pytest.raises(ValueError, match=r"\(part-000003.parquet: it is not a part of this run's chunks\)"):
        cohort._plan(out, description(), 3, False)
    out = tmp_path / "plain"
    write_part_by_hand(out, "part-000000.parquet")  # a Parquet file without the cohort footer
    keys = ", ".join(sorted(description()))
    with pytest.raises(ValueError, match=re.escape(f"(part-000000.parquet: it differs in {keys})")):
        cohort._plan(out, description(), 3, False)


def test_part_meta_reads_the_footer():
    assert cohort._part_meta(SimpleNamespace(metadata=None)) is None
    assert cohort._part_meta(SimpleNamespace(metadata={b"other": b"{}"})) is None
    assert cohort._part_meta(SimpleNamespace(metadata={META_KEY: b'{"chunk": 2}'})) == {"chunk": 2}


def test_write_part_atomically_with_its_footer(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rows = toy_rows("A", 1.0, SAMPLES[:1])
    columns = {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}
    labels = {"n": 1, "correct": 0, "counts": {"1": 1}}
    assert cohort._write_part(tmp_path, 12, 6, 7, description(), columns, labels) == 5
    path = tmp_path / "part-000012.parquet"
    assert replaced == [(tmp_path / f".part-000012.parquet.{os.getpid()}.tmp", path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000012.parquet"]
    metadata = pq.read_metadata(path)
    assert json.loads(metadata.metadata[META_KEY]) == {"run": description(), "chunk": 12, "start": 6, "stop": 7,
                                                        "labels": labels}
    assert metadata.schema.to_arrow_schema().remove_metadata().equals(SCHEMA)
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    assert pl.read_parquet(path).rows() == approx_rows(rows)
    assert cohort._write_part(tmp_path, 1234567, 0, 0, description(), {c: [] for c in COLUMNS}) == 0
    assert json.loads(pq.read_metadata(tmp_path / "part-1234567.parquet").metadata[META_KEY])["labels"] is None


def test_write_part_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        cohort._write_part(tmp_path, 0, 0, 0, description(), {c: [] for c in COLUMNS})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- manifest


def test_write_manifest_of_checked_parts(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for k, labels in enumerate(CHUNK_LABELS):
        rows = [(2 * k, "p", "dx", "D1", None, 0, "M", 1.0, 1, 0.5)] * (k + 1)
        write_part_by_hand(tmp_path, f"part-00000{k}.parquet", part_meta(k, labels=labels), rows)
    per_rank = [{"rank": 0, "chunks": [2, 0]}, {"rank": 1, "chunks": [1]}]
    group = cohort._ProcessGroup(0, 2, False, "gloo")
    manifest = cohort._write_manifest(tmp_path, description(), 3, {"skipped": (4,), "pending": []}, per_rank, group,
                                      1.23456)
    assert replaced == [(tmp_path / f".{MANIFEST}.{os.getpid()}.tmp", tmp_path / MANIFEST)]  # written, then renamed
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest
    assert (tmp_path / MANIFEST).read_text().startswith('{\n  "format": "captum_chefer.cohort/1",\n  "n_samples": 5,')
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST] + [f"part-00000{k}.parquet" for k in range(3)]
    assert {k: manifest[k] for k in description()} == description()
    assert manifest["complete"] is True and manifest["columns"] == COLUMNS
    assert manifest["parts"] == [
        {"file": f"part-00000{k}.parquet", "chunk": k, "start": 2 * k, "stop": 2 * k + 2, "rows": k + 1}
        for k in range(3)
    ]
    assert manifest["rows"] == 6
    assert manifest["model_check"] == ModelCheck.from_counts(3, 5, {"0": 2, "1": 3}, unit="samples").as_dict()
    this_run = manifest["this_run"]
    assert set(this_run) == {"world_size", "backend", "computed", "skipped", "seconds", "per_rank", "python", "torch",
                             "finished"}
    assert (this_run["world_size"], this_run["backend"], this_run["computed"], this_run["skipped"]) == (
        2, "gloo", [0, 1, 2], [4])
    assert this_run["seconds"] == 1.235 and this_run["per_rank"] == per_rank
    assert this_run["python"] == platform.python_version() and this_run["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", this_run["finished"])


def test_write_manifest_without_labels_has_no_model_check(tmp_path):
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0, labels=CHUNK_LABELS[0]))
    write_part_by_hand(tmp_path, "part-000001.parquet", part_meta(1))
    group = cohort._ProcessGroup(0, 1, False, None)
    manifest = cohort._write_manifest(tmp_path, description(), 2, {"skipped": []}, [{"chunks": []}], group, 0.0)
    assert manifest["model_check"] is None and manifest["rows"] == 0 and manifest["this_run"]["computed"] == []


def test_write_manifest_refuses_missing_or_foreign_parts(tmp_path):
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0, run=description(seed=2)))
    write_part_by_hand(tmp_path, "part-000001.parquet", part_meta(0))  # chunk 0's footer
    write_part_by_hand(tmp_path, "part-000002.parquet")  # no footer
    write_part_by_hand(tmp_path, "part-000004.parquet", part_meta(4))
    group = cohort._ProcessGroup(0, 1, False, None)
    with pytest.raises(RuntimeError, match=exact(
        f"after the run, rank 0 finds 4 of 5 parts missing or wrong in {tmp_path} (part-000000.parquet: written by "
        "another run; part-000001.parquet: written by another run; part-000002.parquet: written by another run). On "
        "several nodes, out must be one shared filesystem; rerun to resume"
    )):
        cohort._write_manifest(tmp_path, description(), 5, {"skipped": []}, [], group, 0.0)
    for k in range(3):
        (tmp_path / f"part-00000{k}.parquet").unlink()
    write_part_by_hand(tmp_path, "part-000000.parquet", part_meta(0))
    with pytest.raises(RuntimeError, match=re.escape(
        "finds 3 of 5 parts missing or wrong in "
        f"{tmp_path} (part-000001.parquet: FileNotFoundError; part-000002.parquet: FileNotFoundError; "
        "part-000003.parquet: FileNotFoundError). On several")):
        cohort._write_manifest(tmp_path, description(), 5, {"skipped": []}, [], group, 0.0)
    assert not (tmp_path / MANIFEST).exists()


def test_check_of_parts_sums_every_part():
    assert cohort._check_of_parts([]) is None
    assert cohort._check_of_parts([CHUNK_LABELS[0], None]) is None
    assert cohort._check_of_parts([CHUNK_LABELS[0], {"n": 0, "correct": 0, "counts": {}}]) is None
    check = cohort._check_of_parts(CHUNK_LABELS)
    assert (check["n"], check["correct"], check["majority_rate"], check["unit"]) == (5, 3, 0.6, "samples")
    assert check == ModelCheck.from_counts(3, 5, {"0": 2, "1": 3}, unit="samples").as_dict()
    check = cohort._check_of_parts([{"n": "4", "correct": "4", "counts": {"0": "1", "1": "3"}}])
    assert (check["n"], check["correct"], check["majority_rate"]) == (4, 4, 0.75)


def test_read_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=exact(
        f"{tmp_path} has no _manifest.json: attribute_dataset has not finished there (run it again to resume)"
    )):
        cohort._read_manifest(tmp_path)
    path = tmp_path / MANIFEST
    for manifest in ({"format": "captum_chefer.cohort/2"}, {}):
        path.write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=exact(f"{path} is not a captum_chefer cohort manifest ({FORMAT})")):
            cohort._read_manifest(tmp_path)
    path.write_text(json.dumps({"format": FORMAT, "rows": 3}))
    assert cohort._read_manifest(tmp_path) == {"format": FORMAT, "rows": 3}


def test_read_cohort_reads_the_manifests_parts_in_order(tmp_path):
    write_part_by_hand(tmp_path, "part-000000.parquet", rows=[(0, "a", "dx", "D1", None, 0, "M", 1.0, 1, 0.5)])
    write_part_by_hand(tmp_path, "part-000001.parquet", rows=[(1, "b", "px", "P2", 3, 1, "M", -2.0, 0, 0.25)])
    write_part_by_hand(tmp_path, "part-000002.parquet", rows=[(2, "c", "dx", "D3", None, 0, "M", 0.0, 1, 0.5)])
    manifest = {"format": FORMAT, "parts": [{"file": "part-000001.parquet"}, {"file": "part-000000.parquet"}]}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    table = read_cohort(str(tmp_path))
    assert table.rows() == [(1, "b", "px", "P2", 3, 1, "M", -2.0, 0, 0.25),
                            (0, "a", "dx", "D1", None, 0, "M", 1.0, 1, 0.5)]
    with pytest.raises(FileNotFoundError, match=re.escape("has no _manifest.json")):
        read_cohort(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- fingerprints


class Bare(Adapter):
    pass


def test_model_digest_hashes_names_dtypes_shapes_and_bytes():
    adapter = Bare()
    adapter.w = nn.Parameter(torch.tensor([[0.5, -2.0]]))
    adapter.register_buffer("b", torch.tensor([1, 2], dtype=torch.int16))
    expected = hashlib.sha256()
    for text, data in (("b|torch.int16|(2,)|", struct.pack("<2h", 1, 2)),
                       ("w|torch.float32|(1, 2)|", struct.pack("<2f", 0.5, -2.0))):  # in name order
        expected.update(text.encode())
        expected.update(data)
    assert cohort._model_digest(adapter) == expected.hexdigest()
    assert cohort._model_digest(Toy()) == toy_digest()
    assert cohort._model_digest(Toy(weight=((1.0, -3.0),))) == toy_digest((1.0, -3.0))
    assert cohort._model_digest(Bare()) == hashlib.sha256().hexdigest()


def test_describe_method_lists_plain_public_options_in_order():
    adapter = Toy()
    method = Scores(adapter, 2.0)
    method.flag, method.count, method.label, method._hidden, method.nothing = True, 3, "x", 1, None
    assert cohort._describe_method("Mine", method, {"b": 1, "a": [2]}) == {
        "name": "Mine", "method": "Scores", "options": "{'count': 3, 'flag': True, 'label': 'x', 'scale': 2.0}",
        "kwargs": "{'a': [2], 'b': 1}",
    }

    class Wrapper(Attribution):
        pass

    wrapper = Wrapper(adapter)
    wrapper.attribution_method = Draw(adapter)
    assert cohort._describe_method("W", wrapper, {}) == {"name": "W", "method": "Wrapper(Draw)", "options": "{}",
                                                           "kwargs": "{}"}


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_peak_rss_is_linuxs_vmhwm():
    before = vm_hwm_mb()
    assert before <= cohort._peak_rss_mb() <= vm_hwm_mb()


def test_peak_rss_reads_vmhwm_else_ru_maxrss(monkeypatch):
    read = []

    def status(text):
        def path(name):
            read.append(name)
            return SimpleNamespace(read_text=lambda: text)

        return path

    monkeypatch.setattr(cohort, "Path", status("Name:\tpython\nVmPeak:\t  9999 kB\nVmHWM:\t  3072 kB\nVmRSS:\t 1 kB\n"))
    assert cohort._peak_rss_mb() == 3.0 and read == ["/proc/self/status"]
    usage = []
    monkeypatch.setattr(resource, "getrusage", lambda who: usage.append(who) or SimpleNamespace(ru_maxrss=2**21))
    monkeypatch.setattr(cohort, "Path", status("Name:\tpython\nVmRSS:\t 1 kB\n"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert cohort._peak_rss_mb() == 2048.0 and usage == [resource.RUSAGE_SELF]  # KiB on Linux

    def unreadable(name):
        raise OSError("no /proc")

    monkeypatch.setattr(cohort, "Path", lambda name: SimpleNamespace(read_text=lambda: unreadable(name)))
    assert cohort._peak_rss_mb() == 2048.0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cohort._peak_rss_mb() == 2.0  # bytes on macOS


# ---------------------------------------------------------------------------------------------- summarize


def write_run(out: Path, parts: list[list[tuple]], methods: list[str], n_samples: int, model_check=None) -> None:
    """A finished run written by hand: a part file per list of rows ``(sample, patient, feature, code, method,
    score)``, and its manifest."""
    for k, rows in enumerate(parts):
        full = [(s, p, f, c, None, 0, m, score, 1, 0.5) for s, p, f, c, m, score in rows]
        write_part_by_hand(out, f"part-00000{k}.parquet", rows=full)
    manifest = {"format": FORMAT, "n_samples": n_samples, "methods": [{"name": m} for m in methods],
                "parts": [{"file": f"part-00000{k}.parquet"} for k in range(len(parts))], "model_check": model_check}
    (out / MANIFEST).write_text(json.dumps(manifest))


# Method Z: X (dx) scores 1 + 2 in sample 0 and 1 in sample 1: mean 2; Y (px) 2 and 2: mean 2, a tie that the
# feature breaks (dx before px); W -1 once. Method A: Y 3 once; W 1 and 0, X 0.5 and 0.5: means 0.5, a tie that
# the code breaks (W before X). Samples 0 and 1 are patient p1's, sample 2 patient p2's.
HAND = [
    [(0, "p1", "dx", "X", "Z", 1.0), (0, "p1", "dx", "X", "Z", 2.0), (1, "p1", "dx", "X", "Z", 1.0),
     (0, "p1", "px", "Y", "Z", 2.0), (2, "p2", "px", "Y", "Z", 2.0), (2, "p2", "dx", "W", "Z", -1.0)],
    [(0, "p1", "dx", "X", "A", 0.5), (1, "p1", "dx", "X", "A", 0.5), (0, "p1", "px", "Y", "A", 3.0),
     (2, "p2", "dx", "W", "A", 1.0), (1, "p1", "dx", "W", "A", 0.0)],
]


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hand")
    write_run(out, HAND, ["Z", "A"], 4)
    write_part_by_hand(out, "part-000009.parquet", rows=[(9, "p9", "dx", "Q", None, 0, "Z", 9.0, 1, 0.5)])  # unlisted
    return out


def test_summarize_ranks_codes_by_mean_score(hand_run):
    summary = summarize(hand_run, top_k=2)
    assert summary.codes.columns == ["method", "rank", "feature", "code", "mean_score", "samples", "patients"]
    assert summary.codes.dtypes == [pl.String, pl.Int64, pl.String, pl.String, pl.Float64, pl.Int64, pl.Int64]
    assert summary.codes.rows() == [
        ("Z", 1, "dx", "X", 2.0, 2, 1), ("Z", 2, "px", "Y", 2.0, 2, 2), ("Z", 3, "dx", "W", -1.0, 1, 1),
        ("A", 1, "px", "Y", 3.0, 1, 1), ("A", 2, "dx", "W", 0.5, 2, 2), ("A", 3, "dx", "X", 0.5, 2, 1),
    ]
    assert summary.methods == ["Z", "A"]
    assert (summary.n_samples, summary.n_patients, summary.n_rows, summary.top_k) == (4, 2, 11, 2)
    assert summary.model_check is None


def test_summarize_agreement_by_hand(hand_run):
    summary = summarize(hand_run, top_k=2)
    # over X, Y, W: Z's means (2, 2, -1) rank (2.5, 2.5, 1), A's (0.5, 3, 0.5) rank (1.5, 3, 1.5); deviations from
    # the mean rank 2: (.5, .5, -1) and (-.5, 1, -.5): r = .75 / sqrt(1.5 * 1.5) = 0.5. Top 2: {X, Y} and {Y, W}.
    assert summary.agreement.rows() == [("Z", "A", pytest.approx(0.5), 0.5, 2, 3)]
    default = summarize(hand_run)
    assert default.top_k == 10
    assert default.agreement.rows() == [("Z", "A", pytest.approx(0.5), 1.0, 3, 3)]  # k: the 3 codes there are


def test_summarize_min_samples(hand_run):
    summary = summarize(hand_run, min_samples=2)
    assert summary.codes.rows() == [
        ("Z", 1, "dx", "X", 2.0, 2, 1), ("Z", 2, "px", "Y", 2.0, 2, 2),
        ("A", 1, "dx", "W", 0.5, 2, 2), ("A", 2, "dx", "X", 0.5, 2, 1),
    ]
    (row,) = summary.agreement.rows()  # X alone is in both: no correlation; top 2 {X, Y} and {W, X}
    assert row[:2] == ("Z", "A") and math.isnan(row[2]) and row[3:] == (0.5, 2, 1)
    assert summarize(hand_run, min_samples=3).codes.height == 0
    assert summarize(hand_run, top_k=1, min_samples=1).agreement.select("top_k_overlap", "k").row(0) == (0.0, 1)


def test_summarize_checks_its_arguments(hand_run):
    for top_k, min_samples in ((0, 1), (1, 0), (-1, -2)):
        with pytest.raises(ValueError, match=exact(f"top_k and min_samples must be >= 1, got {top_k}, {min_samples}")):
            summarize(hand_run, top_k=top_k, min_samples=min_samples)
    with pytest.raises(FileNotFoundError, match=re.escape("has no _manifest.json")):
        summarize(hand_run / "missing")


def test_summarize_warns_on_a_chance_level_model(tmp_path):
    chance = ModelCheck.from_counts(2, 4, {0: 2, 1: 2}, unit="samples")
    write_run(tmp_path / "chance", [[(0, "p", "dx", "X", "M", 1.0)]], ["M"], 1, chance.as_dict())
    with pytest.warns(ChanceLevelWarning) as caught:
        summary = summarize(tmp_path / "chance")
    (warning,) = [w for w in caught if w.category is ChanceLevelWarning]
    assert points_at(warning, __file__) and str(warning.message) == chance.warning()
    assert summary.model_check == chance
    good = ModelCheck.from_counts(30, 30, {0: 15, 1: 15}, unit="samples")
    write_run(tmp_path / "good", [[(0, "p", "dx", "X", "M", 1.0)]], ["M"], 1, good.as_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceLevelWarning)
        assert summarize(tmp_path / "good").model_check == good


def test_summarize_a_method_without_codes(tmp_path):
    write_run(tmp_path, [[(0, "p", "dx", "X", "M", 1.0), (1, "q", "dx", "Y", "M", 2.0)]], ["M", "N", "O"], 2)
    summary = summarize(tmp_path)
    assert summary.codes.rows() == [("M", 1, "dx", "Y", 2.0, 1, 1), ("M", 2, "dx", "X", 1.0, 1, 1)]
    rows = summary.agreement.rows()
    assert [r[:2] for r in rows] == [("M", "N"), ("M", "O"), ("N", "O")]
    assert all(math.isnan(r[2]) and math.isnan(r[3]) and r[4:] == (0, 0) for r in rows)


# ---------------------------------------------------------------------------------------------- agreement


def codes_frame(rows):
    return pl.DataFrame(rows, schema={"method": pl.String, "rank": pl.Int64, "feature": pl.String, "code": pl.String,
                                      "mean_score": pl.Float64, "samples": pl.Int64, "patients": pl.Int64},
                        orient="row")


def test_agreement_of_each_pair_in_order():
    codes = codes_frame([
        ("a", 1, "f", "X", 3.0, 1, 1), ("a", 2, "f", "Y", 2.0, 1, 1), ("a", 3, "f", "Z", 1.0, 1, 1),
        ("b", 1, "f", "Y", 5.0, 1, 1), ("b", 2, "g", "X", 4.0, 1, 1),
        ("c", 1, "f", "Z", 9.0, 1, 1), ("c", 2, "f", "Y", 8.0, 1, 1), ("c", 3, "f", "X", 7.0, 1, 1),
    ])
    frame = cohort._agreement(codes, ["a", "b", "c"], 2)
    assert dict(frame.schema) == ({"method_a": pl.String, "method_b": pl.String, "spearman": pl.Float64,
                                      "top_k_overlap": pl.Float64, "k": pl.Int64, "codes": pl.Int64})
    rows = frame.rows()
    assert [r[:2] for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    # a-b: only f:Y is shared (g:X is another feature): no correlation; top 2 {X, Y} and {Y, g:X}: 1 of 2
    assert math.isnan(rows[0][2]) and rows[0][3:] == (0.5, 2, 1)
    # a-c: X, Y, Z in opposite orders; top 2 {X, Y} and {Z, Y}
    assert rows[1][2] == pytest.approx(-1.0) and rows[1][3:] == (0.5, 2, 3)
    # b-c: f:Y alone is shared; k is b's 2 codes
    assert math.isnan(rows[2][2]) and rows[2][3:] == (0.5, 2, 1)
    assert cohort._agreement(codes, ["a", "c"], 3).rows() == [("a", "c", pytest.approx(-1.0), 1.0, 3, 3)]
    assert cohort._agreement(codes, ["b", "a"], 5).rows()[0][3:] == (0.5, 2, 1)  # k: b's 2 codes
    assert cohort._agreement(codes, ["a", "b"], 1).rows()[0][3:] == (0.0, 1, 1)
    assert cohort._agreement(codes, ["a"], 2).height == 0
    empty = cohort._agreement(codes, [], 2)
    assert empty.height == 0 and empty.columns == ["method_a", "method_b", "spearman", "top_k_overlap", "k", "codes"]


def test_spearman_by_hand():
    assert cohort._spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert cohort._spearman([1.0, 2.0], [5.0, 7.0]) == pytest.approx(1.0)  # two codes are enough
    assert cohort._spearman([1, 2.5, 4], [3, 2, 1.5]) == pytest.approx(-1.0)  # ints and floats mixed
    assert math.isnan(cohort._spearman([1.0], [2.0]))
    assert math.isnan(cohort._spearman([], []))
    assert math.isnan(cohort._spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(cohort._spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    # ties take their average rank: x ranks (1, 2.5, 2.5, 4), y (1, 3, 2, 4); Pearson's of those by hand
    rx, ry = [1, 2.5, 2.5, 4], [1, 3, 2, 4]
    dx, dy = [r - 2.5 for r in rx], [r - 2.5 for r in ry]
    covariance = sum(a * b for a, b in zip(dx, dy, strict=True))
    expected = covariance / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    assert cohort._spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expected, abs=1e-12)
    assert isinstance(cohort._spearman([1, 2, 3], [1, 3, 2]), float)
    assert cohort._spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_label_names_the_feature_when_there_are_several():
    assert cohort._label("dx", "A1", True) == "dx:A1"
    assert cohort._label("dx", "A1", False) == "A1"


def test_text_table_pads_columns_to_their_widest_cell():
    assert cohort._text_table(["rank", "M1", "M2"], [(1, "A", "B"), (2, "BCDEF", "")]) == (
        "rank  M1     M2\n"
        "1     A      B \n"
        "2     BCDEF    "
    )
    assert cohort._text_table(["ab", "c"], []) == "ab  c"
    assert cohort._text_table(["x"], [(12345,)]) == "x    \n12345"


# ---------------------------------------------------------------------------------------------- CohortSummary


def small_summary(model_check=None, second_feature="dx", agreement=True):
    """M1 ranks A (1.0) then B (0.5), M2 only B (2.0); its rows out of rank order; top_k 2."""
    codes = codes_frame([("M1", 2, second_feature, "B", 0.5, 1, 1), ("M1", 1, "dx", "A", 1.0, 2, 1),
                         ("M2", 1, "dx", "B", 2.0, 1, 1)])
    rows = [("M1", "M2", 0.123456, 0.5, 2, 3)] if agreement else []
    frame = pl.DataFrame(rows, schema=["method_a", "method_b", "spearman", "top_k_overlap", "k", "codes"],
                         orient="row")
    return CohortSummary(codes, frame, ["M1", "M2"], 3, 2, 5, 2, model_check)


def test_summary_top():
    summary = small_summary()
    assert summary.top("M1").select("rank", "code").rows() == [(1, "A"), (2, "B")]
    assert summary.top("M1", 1).select("rank", "code").rows() == [(1, "A")]
    assert summary.top("M1", 0).height == 2  # 0: the default
    assert summary.top("M2", 5).select("method", "code").rows() == [("M2", "B")]
    assert summary.top("M1").columns == ["method", "rank", "feature", "code", "mean_score", "samples", "patients"]
    with pytest.raises(KeyError) as caught:
        summary.top("M3")
    assert caught.value.args == ("no method 'M3' in this cohort; it has ['M1', 'M2']",)


def test_summary_side_by_side():
    summary = small_summary()
    side = summary.side_by_side()
    assert side.columns == ["rank", "M1", "M2"] and side.schema["rank"] == pl.Int64
    assert side.rows() == [(1, "A", "B"), (2, "B", "")]
    assert summary.side_by_side(3).rows() == [(1, "A", "B"), (2, "B", ""), (3, "", "")]
    assert summary.side_by_side(1).rows() == [(1, "A", "B")]
    several = small_summary(second_feature="px")
    assert several.side_by_side().rows() == [(1, "dx:A", "dx:B"), (2, "px:B", "")]
    assert several._several_features and not summary._several_features


SIDE = "rank  M1  M2\n1     A   B \n2     B     "
AGREEMENT = ("method A  method B  Spearman  top-2 overlap  codes\n"
             "M1        M2        0.123     0.50           3    ")


def test_summary_table():
    assert small_summary().table() == SIDE + "\n\n" + AGREEMENT
    assert small_summary().table(1) == "rank  M1  M2\n1     A   B \n\n" + AGREEMENT  # the overlap's k stays top_k
    assert small_summary(agreement=False).table() == SIDE
    check = ModelCheck.from_counts(30, 30, {0: 15, 1: 15}, unit="samples")
    assert small_summary(check).table() == f"model: {check.describe()}\n\n{SIDE}\n\n{AGREEMENT}"


def test_summary_model_line():
    assert small_summary().model_line() == ""
    good = ModelCheck(10, 10, 0.5, 0.001, True, "samples")
    assert small_summary(good).model_line() == "model: " + good.describe()
    bad = ModelCheck(10, 5, 0.5, 0.62, False, "samples")
    assert small_summary(bad).model_line() == "warning: " + bad.warning()
    assert small_summary(bad).model_line().startswith("warning: The model is not better than chance on the samples")


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_summary_figure():
    import matplotlib
    from matplotlib.colors import to_rgba
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    with matplotlib.rc_context({"font.size": 5}):  # a default size unlike every size the figure sets
        fig = small_summary().figure()
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    assert tuple(fig.get_size_inches()) == pytest.approx((7.2, 2.2))  # (max(2 * 3.6, 6), 1 * (2 * 0.3 + 1) + 0.6)
    assert fig._suptitle.get_text() == ("Top 2 codes per method, mean score over the samples that have them\n"
                                        "(3 samples, 2 patients; blue: in every method's top 2)")
    assert fig._suptitle.get_fontsize() == 10
    first, second = visible_axes(fig)
    assert len(fig.axes) == 2
    assert (first.get_title(), second.get_title()) == ("M1", "M2")
    assert first.title.get_fontsize() == 10
    assert [p.get_width() for p in first.patches] == [1.0, 0.5]
    assert [p.get_y() + p.get_height() / 2 for p in first.patches] == [0, 1]
    assert [p.get_facecolor() for p in first.patches] == [to_rgba("tab:gray"), to_rgba("tab:blue")]  # B is in both
    assert [p.get_facecolor() for p in second.patches] == [to_rgba("tab:blue")]
    assert list(first.get_yticks()) == [0, 1]
    assert [t.get_text() for t in first.get_yticklabels()] == ["A", "B"]
    assert [t.get_fontsize() for t in first.get_yticklabels()] == [8, 8]
    assert first.yaxis_inverted()
    (line,) = first.lines
    assert list(line.get_xdata()) == [0, 0] and line.get_color() == "black" and line.get_linewidth() == 0.6
    assert first.get_xlabel() == "mean score" and first.xaxis.label.get_fontsize() == 8
    assert first.xaxis.get_major_ticks()[0].label1.get_fontsize() == 7


def test_summary_figure_with_colours_and_k():
    from matplotlib.colors import to_rgba

    fig = small_summary().figure(colors={"M1": "red"})
    first, second = visible_axes(fig)
    assert [p.get_facecolor() for p in first.patches] == [to_rgba("red", 0.35), to_rgba("red", 1.0)]
    assert [p.get_facecolor() for p in second.patches] == [to_rgba("tab:blue", 1.0)]  # no colour given: blue
    assert fig._suptitle.get_text().endswith("(3 samples, 2 patients; solid: in every method's top 2, pale: not)")
    fig = small_summary(second_feature="px").figure(1)
    first, second = visible_axes(fig)
    assert [t.get_text() for t in first.get_yticklabels()] == ["dx:A"]
    assert [p.get_facecolor() for p in first.patches + second.patches] == [to_rgba("tab:gray")] * 2  # none shared
    assert tuple(fig.get_size_inches()) == pytest.approx((7.2, 1.9))
    assert fig._suptitle.get_text().startswith("Top 1 codes per method")


def test_summary_figure_grid():
    codes = codes_frame([(m, 1, "dx", "A", 1.0, 1, 1) for m in "abcd"])
    empty = pl.DataFrame()
    fig = CohortSummary(codes, empty, list("abcd"), 1, 1, 4, 3).figure()
    assert [ax.get_visible() for ax in fig.axes] == [True] * 4 + [False] * 2
    assert [ax.get_title() for ax in visible_axes(fig)] == list("abcd")
    assert tuple(fig.get_size_inches()) == pytest.approx((10.8, 2 * 1.9 + 0.6))  # 3 columns, 2 rows, k 3
    fig = CohortSummary(codes_frame([("a", 1, "dx", "A", 1.0, 1, 1)]), empty, ["a"], 1, 1, 1, 1).figure()
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == pytest.approx((6.0, 1.3 + 0.6))
    assert [p.get_facecolor() for p in fig.axes[0].patches] == [pytest.approx((0.12156862745098039, 0.4666666666666667,
                                                                                0.7058823529411765, 1.0))]
