"""A whole cohort explained: attribution over a dataset on ``torch.distributed``, Parquet out, and a summary.

* :func:`attribute_dataset` runs attribution methods over every sample of a dataset and writes a Parquet
  dataset in long form, one row per real code per sample per method (:data:`COLUMNS`). In one process it
  just runs; under ``torchrun`` (``torch.distributed`` initialised from the environment: gloo on CPU, NCCL
  when the model is on a GPU) each process takes its own share of the parts.
* :func:`summarize` reads that dataset with polars and ranks, per method, the codes by their mean score
  over the samples that have them, with the agreement between methods (:class:`CohortSummary`).
* Both check the model against always predicting the most frequent class, on the samples' labels
  (:class:`~captum_chefer.comparison.chance.ModelCheck`, in the manifest), and warn
  (:class:`~captum_chefer.comparison.chance.ChanceLevelWarning`) when it is no better: its explanations
  would explain a model that has not learned the task.

How the work is cut: the samples, in the dataset's order, fall into fixed chunks of ``chunk_size``
(chunk ``k`` holds samples ``k * chunk_size`` up to the next chunk). Chunk ``k`` becomes the part file
``part-<k>.parquet``, whichever process computes it, so the parts do not depend on the number of
processes: a run can resume with more or fewer processes. Rank 0 lists the parts still missing and sends
the list to every process (``broadcast_object_list``); process ``r`` of ``n`` computes every ``n``-th of
them from the ``r``-th. No sample is done twice or dropped (no ``DistributedSampler``, which pads by
repeating samples). Inside a chunk the batches are cut the same way in every run, so the scores do not
depend on the number of processes either.

A part is written to a hidden temporary name, flushed to disk and renamed into place (``os.replace``), so
a killed run leaves no half part under a part's name; a rerun deletes leftover temporary files, and counts
a part as done only when its Parquet footer reads and records the same run (model weights, methods and
their arguments, target, baseline, chunk size, number of samples) and the same chunk. A part of another
run is an error (pass ``overwrite=True`` or another directory), never mixed in. Each process holds one
chunk's rows at a time, so memory stays flat in the size of the cohort. At the end rank 0 checks every
part and writes ``_manifest.json``; Parquet readers skip names that start with ``_`` or ``.``, so ``out``
reads as one Parquet dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._optional import extra
from .adapters import Adapter
from .comparison.chance import ModelCheck, batch_predictions, warn_if_chance_level
from .comparison.methods import MethodSpec, attribute_batch, method_specs

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

__all__ = ["COLUMNS", "MANIFEST", "CohortRun", "CohortSummary", "attribute_dataset", "read_cohort", "summarize"]

FORMAT = "captum_chefer.cohort/1"
MANIFEST = "_manifest.json"
PART = "part-{:06d}.parquet"
_META_KEY = b"captum_chefer.cohort"

#: The columns of every part, in order, with their meaning.
COLUMNS: dict[str, str] = {
    "sample": "index of the sample in the dataset's order (a patient may have several samples, e.g. stays)",
    "patient_id": "the batch's patient_id, or the sample index as text when the batch has none",
    "feature": "the feature key (input stream) of the code",
    "code": "the code as the dataset's vocabulary spells it",
    "visit": "the visit (0-based) of a code of a nested feature; null for flat features",
    "position": "the code's position (0-based) in its flat feature, or within its visit",
    "method": "the attribution method's name",
    "score": "the method's score of the code (summed over the embedding dimension)",
    "target": "the explained class (1 for a single-logit binary model, whose logit is the positive class)",
    "probability": "the model's probability of the explained class (for binary models: PyHealth's y_prob)",
}

TargetMode = Literal["predicted", "label"]
Reference = Literal["unk", "zero"]


def _schema() -> Any:
    with extra("cohort"):
        import pyarrow as pa

    return pa.schema(
        [
            ("sample", pa.int64()),
            ("patient_id", pa.string()),
            ("feature", pa.string()),
            ("code", pa.string()),
            ("visit", pa.int32()),
            ("position", pa.int32()),
            ("method", pa.string()),
            ("score", pa.float32()),
            ("target", pa.int32()),
            ("probability", pa.float32()),
        ]
    )


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class CohortRun:
    """What :func:`attribute_dataset` returns, in every process.

    Attributes:
        out: the Parquet dataset's directory.
        manifest: the contents of ``_manifest.json`` (written by rank 0).
        rank, world_size: this process and the number of processes.
        computed: the chunks this process computed in this call.
    """

    out: Path
    manifest: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    computed: list[int] = field(default_factory=list)

    @property
    def parts(self) -> list[Path]:
        """The part files, in sample order."""
        return [self.out / p["file"] for p in self.manifest["parts"]]

    @property
    def skipped(self) -> list[int]:
        """The chunks found complete when the call started (not recomputed)."""
        return list(self.manifest["this_run"]["skipped"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def model_check(self) -> Optional[ModelCheck]:
        """The model's accuracy on the samples against the most frequent class; ``None`` without labels
        (multilabel models, datasets without the label, adapters of other libraries)."""
        return _model_check(self.manifest)


def attribute_dataset(
    adapter: Adapter,
    dataset: Any,
    methods: Sequence[MethodSpec],
    out: str | os.PathLike,
    batch_size: Optional[int] = None,
    *,
    chunk_size: int = 512,
    target_mode: TargetMode = "predicted",
    baseline: Reference = "unk",
    collate_fn: Optional[Callable[[list], Any]] = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> CohortRun:
    """Attribute every sample of ``dataset`` with ``methods``; write a Parquet dataset to ``out``.

    Each batch runs the methods as :func:`~captum_chefer.comparison.compare_methods` does (same target,
    same additional forward args, IG baselines from :func:`~captum_chefer.comparison.ig_baselines` for
    IG-like methods without ``baselines``, padding zero). The rows (:data:`COLUMNS`) hold each real code
    of each sample once per method, named by ``adapter.decode``. Under ``torchrun`` every process calls
    this with the same model and dataset; see the module docstring for how the work is shared, resumed
    and checked.

    Args:
        adapter: the adapter every method wraps (e.g. ``PyHealthAdapter(model)``), on the device to use.
        dataset: a PyHealth ``SampleDataset`` (any dataset with ``len`` and indexing), or a ``DataLoader``
            over one (its dataset, batch size and collate function are used; its sampler is not: samples
            are taken in the dataset's order).
        methods: Captum attribution objects on ``adapter``, or ``(name, method[, kwargs])`` tuples as
            ``compare_methods`` takes them.
        out: the output directory (created if missing; an existing file is an error).
        batch_size: samples per attribution batch (default: the loader's, else 32). It may change
            between a run and its resumption.
        chunk_size: samples per part file; part ``k`` holds samples ``[k * chunk_size, (k + 1) * chunk_size)``.
        target_mode: ``"predicted"`` or ``"label"`` (see ``adapter.captum_target``).
        baseline: the IG reference, ``"unk"`` or ``"zero"``.
        collate_fn: turns a list of samples into a batch (default: the loader's, else PyHealth's
            ``collate_fn_dict_with_padding``).
        overwrite: delete the parts and manifest of an earlier run in ``out`` first, instead of resuming.
        seed: torch's random state is set from ``seed`` and the chunk for each chunk (and restored after),
            so methods that draw from it (``NoiseTunnel``) give the same scores whatever the number of
            processes. Methods with their own generator draw in their own order.
        progress: a progress bar (rank 0, over its own samples).

    Returns:
        A :class:`CohortRun`: the directory, the manifest, what this process computed, and the model's
        accuracy on the samples against always predicting the most frequent class (``model_check``).

    Warns:
        ChanceLevelWarning: (rank 0) the model is not better than always predicting the most frequent
            class on the samples' labels.

    Raises:
        NotADirectoryError: ``out`` is an existing file (checked before any work).
        ValueError: ``out`` holds parts of another run, or the processes disagree on the model or the data.

    Example:
        >>> import tempfile
        >>> from captum.attr import IntegratedGradients
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, _ = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> import warnings
        >>> from captum_chefer.comparison import ChanceLevelWarning
        >>> methods = [("Chefer (recommended)", CheferAttribution(adapter, preset="recommended")),
        ...            ("IG", IntegratedGradients(adapter), {"n_steps": 8})]
        >>> out = tempfile.mkdtemp()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", ChanceLevelWarning)
        ...     run = attribute_dataset(adapter, model.dataset, methods, out, batch_size=2, progress=False)
        ...     again = attribute_dataset(adapter, model.dataset, methods, out, batch_size=2, progress=False)
        >>> run.manifest["complete"], run.manifest["n_samples"], len(run.parts)
        (True, 4, 1)
        >>> table = read_cohort(out)
        >>> table.columns == list(COLUMNS), sorted(set(table["method"]))
        (True, ['Chefer (recommended)', 'IG'])
        >>> again.skipped  # a rerun resumes: nothing to do
        [0]
        >>> run.model_check.correct, run.model_check.n  # the toy model is untrained: no better than chance
        (1, 4)
        >>> [w.category.__name__ for w in caught if issubclass(w.category, ChanceLevelWarning)]
        ['ChanceLevelWarning', 'ChanceLevelWarning']
    """
    started = time.perf_counter()
    out = Path(out)
    _check_out(out)
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"attribute_dataset needs an adapter from captum_chefer.adapters (e.g. PyHealthAdapter(model)), "
            f"got {type(adapter).__name__}"
        )
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size if batch_size is not None else 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if target_mode not in ("predicted", "label"):
        raise ValueError(f"target_mode must be 'predicted' or 'label', got {target_mode!r}")
    if baseline not in ("unk", "zero"):
        raise ValueError(f"baseline must be 'unk' or 'zero', got {baseline!r}")
    specs = method_specs(adapter, methods)
    source = _Source.of(dataset, batch_size, collate_fn)
    if source.n_samples == 0:
        raise ValueError("the dataset holds no samples")
    device = _adapter_device(adapter)
    description = {
        "format": FORMAT,
        "n_samples": source.n_samples,
        "chunk_size": chunk_size,
        "target_mode": target_mode,
        "baseline": baseline,
        "seed": seed,
        "feature_keys": list(adapter.feature_keys),
        "model_sha256": _model_digest(adapter),
        "methods": [_describe_method(name, method, kwargs) for name, method, kwargs in specs],
    }
    n_chunks = -(-source.n_samples // chunk_size)

    group = _ProcessGroup.join(device)
    try:
        group.check_same(description)
        plan = group.from_rank0(lambda: _plan(out, description, n_chunks, overwrite))
        mine = plan["pending"][group.rank :: group.world_size]
        stats = _run_chunks(
            adapter, source, specs, out, description, mine, chunk_size,
            target_mode=target_mode, baseline=baseline, seed=seed, progress=progress and group.rank == 0,
            rank=group.rank, world_size=group.world_size, device=device,
        )
        per_rank = group.gather(stats)
        manifest = group.from_rank0(
            lambda: _write_manifest(out, description, n_chunks, plan, per_rank, group, time.perf_counter() - started)
        )
    finally:
        group.leave()
    run = CohortRun(out, manifest, group.rank, group.world_size, list(mine))
    if group.rank == 0:
        warn_if_chance_level(run.model_check, stacklevel=2)
    return run


def read_cohort(out: str | os.PathLike) -> "pl.DataFrame":
    """The rows of a finished :func:`attribute_dataset` run as a polars DataFrame (all parts, in sample order).

    For cohorts too large for memory, scan the parts lazily instead: ``polars.scan_parquet(f"{out}/part-*.parquet")``.
    """
    with extra("cohort"):
        import polars as pl

    manifest = _read_manifest(Path(out))
    return pl.read_parquet([str(Path(out) / p["file"]) for p in manifest["parts"]])


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _Source:
    """Index access to the samples, in the dataset's order, and how to batch them."""

    dataset: Any
    n_samples: int
    batch_size: int
    collate: Callable[[list], Any]

    @classmethod
    def of(cls, data: Any, batch_size: Optional[int], collate_fn: Optional[Callable[[list], Any]]) -> "_Source":
        from torch.utils.data import DataLoader

        dataset = data
        if isinstance(data, DataLoader):
            dataset = data.dataset
            if batch_size is None and data.batch_size is not None:
                batch_size = int(data.batch_size)
            if collate_fn is None:
                collate_fn = data.collate_fn
        if isinstance(dataset, Mapping):
            raise TypeError("attribute_dataset takes a dataset or a DataLoader, not a batch; use compare_methods for one batch")
        if not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"attribute_dataset reads samples by index; {type(dataset).__name__} has no indexing. Pass a PyHealth "
                "SampleDataset (or a DataLoader over a dataset with len() and indexing)"
            )
        if collate_fn is None:
            from pyhealth.datasets import collate_fn_dict_with_padding

            collate_fn = collate_fn_dict_with_padding
        return cls(dataset, _sample_count(dataset), batch_size or 32, collate_fn)

    def batch(self, start: int, stop: int) -> Any:
        return self.collate([self.dataset[i] for i in range(start, stop)])


def _sample_count(dataset: Any) -> int:
    """The number of samples, the same in every process.

    A disk-backed PyHealth ``SampleDataset`` is a litdata ``StreamingDataset``, whose ``len()`` under
    ``torchrun`` is this process's share of an iteration (``WORLD_SIZE`` is read, the rest dropped), while
    indexing reaches every sample; count its samples from its regions instead.
    """
    try:
        from litdata import StreamingDataset
    except ImportError:  # pragma: no cover - PyHealth installs litdata
        StreamingDataset = None  # type: ignore[assignment,misc]
    if (
        StreamingDataset is not None
        and isinstance(dataset, StreamingDataset)
        and type(dataset).__len__ is StreamingDataset.__len__
    ):
        return int(sum(stop - start for start, stop in dataset.region_of_interest))
    try:
        return len(dataset)
    except TypeError as error:
        raise TypeError(f"attribute_dataset needs the number of samples: {type(dataset).__name__} has no len()") from error


# ---------------------------------------------------------------------------------------------- processes


class _ProcessGroup:
    """This process's place among the ``torchrun`` processes, or a group of one.

    Joins ``torch.distributed`` from the environment when ``WORLD_SIZE`` > 1 and no process group exists
    (gloo for CPU models, NCCL for CUDA models), and leaves only a group it created.
    """

    def __init__(self, rank: int, world_size: int, created: bool, backend: Optional[str]) -> None:
        self.rank, self.world_size, self.created, self.backend = rank, world_size, created, backend

    @classmethod
    def join(cls, device: torch.device) -> "_ProcessGroup":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), False, str(dist.get_backend()))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(0, 1, False, None)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
        return cls(dist.get_rank(), dist.get_world_size(), True, backend)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def check_same(self, description: Mapping[str, Any]) -> None:
        """Every process must attribute the same model, methods and number of samples."""
        described = self.gather(dict(description))
        differing = sorted({k for d in described for k in d if d.get(k) != described[0].get(k)})
        if differing:
            raise ValueError(
                f"the {self.world_size} processes differ in {', '.join(differing)}: every process must build the same "
                "model (load one checkpoint; do not train in each process unless it is seeded and deterministic), "
                "the same dataset in the same order, and the same methods"
            )

    def from_rank0(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result (or its error) in every process."""
        result: Any = None
        error: Optional[BaseException] = None
        if self.rank == 0:
            try:
                result = compute()
            except Exception as e:  # sent to the other processes, raised everywhere
                error = e
        if self.distributed:
            import torch.distributed as dist

            box = [(result, None if error is None else (type(error), str(error)))]
            dist.broadcast_object_list(box, src=0)
            result, sent = box[0]
            if sent is not None and self.rank != 0:
                kind, message = sent
                raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(message)
        if error is not None:
            raise error
        return result

    def leave(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _adapter_device(adapter: Adapter) -> torch.device:
    for tensor in adapter.parameters():
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- parts


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"out {str(out)!r} is an existing file; attribute_dataset writes a directory of Parquet parts there: "
            "pass a directory path (it is created if missing)"
        )


def _plan(out: Path, description: Mapping[str, Any], n_chunks: int, overwrite: bool) -> dict[str, Any]:
    """Rank 0: clean up, check the parts already in ``out``, list the chunks still to compute."""
    with extra("cohort"):
        import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".part-*.tmp"):  # temporary files of a killed run: never done
        leftover.unlink(missing_ok=True)
    existing = sorted(out.glob("part-*.parquet"))
    if overwrite:
        for path in existing + [out / MANIFEST]:
            path.unlink(missing_ok=True)
        existing = []
    wanted = {PART.format(k): k for k in range(n_chunks)}
    done, foreign = [], []
    for path in existing:
        try:
            meta = _part_meta(pq.read_metadata(path))
        except Exception:  # no readable footer: written partly (not by this package's atomic rename)
            path.unlink(missing_ok=True)
            continue
        if meta is None or meta.get("run") != dict(description) or wanted.get(path.name) != meta.get("chunk"):
            foreign.append((path.name, meta))
        else:
            done.append(wanted[path.name])
    if foreign:
        name, meta = foreign[0]
        theirs = (meta or {}).get("run") or {}
        differing = sorted({k for k in set(theirs) | set(description) if theirs.get(k) != description.get(k)})
        why = f"it differs in {', '.join(differing)}" if differing else "it is not a part of this run's chunks"
        raise ValueError(
            f"{out} holds {len(foreign)} part file(s) of another run ({name}: {why}); pass another out directory, "
            "or overwrite=True (--overwrite) to replace them"
        )
    if (out / MANIFEST).exists() and len(done) < n_chunks:
        (out / MANIFEST).unlink()  # the manifest describes complete runs only
    done_set = set(done)
    return {"skipped": sorted(done_set), "pending": [k for k in range(n_chunks) if k not in done_set]}


def _part_meta(metadata: Any) -> Optional[dict[str, Any]]:
    raw = (metadata.metadata or {}).get(_META_KEY)
    return None if raw is None else json.loads(raw)


def _run_chunks(
    adapter: Adapter,
    source: _Source,
    specs: list[tuple[str, Any, dict]],
    out: Path,
    description: Mapping[str, Any],
    chunks: Sequence[int],
    chunk_size: int,
    *,
    target_mode: TargetMode,
    baseline: Reference,
    seed: int,
    progress: bool,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """This process's chunks, one part file each; returns what it did."""
    from tqdm import tqdm

    started = time.perf_counter()
    seconds = {name: 0.0 for name, _, _ in specs}
    total = sum(min(chunk_size, source.n_samples - k * chunk_size) for k in chunks)
    bar = tqdm(
        total=total, unit="sample", disable=not progress, file=sys.stderr,
        desc="attribute_dataset" + (f" (rank 0 of {world_size})" if world_size > 1 else ""),
    )
    written = []
    devices = [device] if device.type == "cuda" else []
    try:
        for k in chunks:
            start, stop = k * chunk_size, min((k + 1) * chunk_size, source.n_samples)
            # rows grouped by method, then in sample order: the same whatever the batch size
            columns: dict[str, dict[str, list]] = {method: {name: [] for name in COLUMNS} for method, _, _ in specs}
            labels: Optional[dict[str, Any]] = {"n": 0, "correct": 0, "counts": {}}
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + k)
                for first in range(start, stop, source.batch_size):
                    last = min(first + source.batch_size, stop)
                    counted = _batch_rows(adapter, source.batch(first, last), specs, first, target_mode, baseline, seconds, columns)
                    labels = _add_counts(labels, counted)
                    bar.update(last - first)
            rows = _write_part(out, k, start, stop, description, {c: [v for m in columns.values() for v in m[c]] for c in COLUMNS},
                               labels)
            written.append({"chunk": k, "rows": rows})
    finally:
        bar.close()
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "chunks": [w["chunk"] for w in written],
        "samples": total,
        "seconds": round(time.perf_counter() - started, 3),
        "method_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }


def _batch_rows(
    adapter: Adapter,
    batch: Any,
    specs: list[tuple[str, Any, dict]],
    first_sample: int,
    target_mode: TargetMode,
    baseline: Reference,
    seconds: dict[str, float],
    columns: dict[str, dict[str, list]],
) -> Optional[tuple[Tensor, Tensor]]:
    """One batch: every method, as compare_methods runs it; its rows appended to ``columns[method]``.

    Returns the batch's true and predicted classes (``None`` without labels), for the model check."""
    embeddings, args = adapter.captum_inputs(batch, level="embedding")
    tokens, _ = adapter.captum_inputs(batch, level="token")
    target = adapter.captum_target(batch, mode=target_mode)
    masks = adapter.token_masks(args)
    with torch.no_grad():
        logits = adapter(*tokens, *args).detach().float().cpu()
    n = int(logits.shape[0])
    predictions = batch_predictions(adapter, batch, logits)
    explained, column = _explained(target, int(logits.shape[1]), n)
    probability = adapter.probabilities(logits).gather(1, column.view(-1, 1))[:, 0].tolist()
    patient_ids = _patient_ids(batch, n, first_sample)

    # The real codes of the batch, once: what every method's rows share.
    shared: dict[str, list] = {"sample": [], "patient_id": [], "feature": [], "code": [], "visit": [], "position": [],
                               "target": [], "probability": []}
    where: dict[str, list[tuple[int, ...]]] = {}
    order: dict[str, list[int]] = {}
    for i, sample_tokens in enumerate(adapter.decode(batch)):
        for token in sample_tokens:
            index = tuple(int(j) for j in token.index)
            code = str(token.code)  # as the vocabulary spells it, without the display's visit
            if len(index) == 1:
                visit, position = None, index[0]
            elif len(index) == 2:
                visit, position = index
            else:
                raise ValueError(
                    f"feature {token.feature!r} has tokens indexed by {len(index)} dims; cohort rows hold a visit and a "
                    "position (flat or nested code features)"
                )
            order.setdefault(token.feature, []).append(len(shared["sample"]))
            where.setdefault(token.feature, []).append((i, *index))
            shared["sample"].append(first_sample + i)
            shared["patient_id"].append(patient_ids[i])
            shared["feature"].append(token.feature)
            shared["code"].append(code)
            shared["visit"].append(visit)
            shared["position"].append(position)
            shared["target"].append(explained[i])
            shared["probability"].append(probability[i])
    n_rows = len(shared["sample"])
    index_tensors = {key: torch.tensor(rows, dtype=torch.long).T for key, rows in where.items()}

    for name, method, kwargs in specs:
        scores = attribute_batch(adapter, method, kwargs, embeddings, tokens, args, masks, target, baseline, seconds, name)
        values = torch.zeros(n_rows, dtype=torch.float32)
        for key, index in index_tensors.items():
            values[torch.tensor(order[key])] = scores[key][tuple(index)].float()
        into = columns[name]
        for column, items in shared.items():
            into[column].extend(items)
        into["method"].extend([name] * n_rows)
        into["score"].extend(values.tolist())
    return predictions


def _add_counts(counts: Optional[dict[str, Any]], predictions: Optional[tuple[Tensor, Tensor]]) -> Optional[dict[str, Any]]:
    """A chunk's label counts (``n``, ``correct``, ``counts`` per true class) with one batch's added;
    ``None`` once a batch has no labels."""
    if counts is None or predictions is None:
        return None
    labels, predicted = predictions
    per_class = dict(counts["counts"])
    for label, count in zip(*torch.unique(labels, return_counts=True)):
        per_class[str(int(label))] = per_class.get(str(int(label)), 0) + int(count)
    return {"n": counts["n"] + int(labels.numel()), "correct": counts["correct"] + int((labels == predicted).sum()),
            "counts": per_class}


def _model_check(manifest: Mapping[str, Any]) -> Optional[ModelCheck]:
    data = manifest.get("model_check")
    return None if data is None else ModelCheck.from_dict(data)


def _explained(target: Any, n_outputs: int, n: int) -> tuple[list[int], Tensor]:
    """The explained class per sample, and the logit column it reads."""
    if target is None:
        if n_outputs != 1:
            raise ValueError("the adapter gave no target for a model with several outputs; use target_mode='predicted'")
        return [1] * n, torch.zeros(n, dtype=torch.long)
    index = torch.as_tensor(target).detach().cpu().reshape(-1).long()
    if index.numel() == 1:
        index = index.expand(n)
    if index.numel() != n:
        raise ValueError(f"the target holds {index.numel()} classes for a batch of {n} samples")
    classes = index.tolist()
    return classes, (index if n_outputs > 1 else torch.zeros(n, dtype=torch.long))


def _patient_ids(batch: Any, n: int, first_sample: int) -> list[str]:
    ids = batch.get("patient_id") if isinstance(batch, Mapping) else None
    if isinstance(ids, (list, tuple)) and len(ids) == n:
        return [str(p) for p in ids]
    return [str(first_sample + i) for i in range(n)]


def _write_part(
    out: Path, chunk: int, start: int, stop: int, description: Mapping[str, Any], columns: dict[str, list],
    labels: Optional[Mapping[str, Any]] = None,
) -> int:
    """One chunk's rows as ``part-<chunk>.parquet``: a temporary file, flushed, then renamed into place.

    The footer records the run, the chunk and its label counts (for the model check of the manifest)."""
    with extra("cohort"):
        import pyarrow as pa
        import pyarrow.parquet as pq

    meta = {"run": dict(description), "chunk": chunk, "start": start, "stop": stop, "labels": labels}
    schema = _schema().with_metadata({_META_KEY: json.dumps(meta).encode()})
    table = pa.Table.from_pydict(columns, schema=schema)
    final = out / PART.format(chunk)
    temporary = out / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return table.num_rows


def _write_manifest(
    out: Path,
    description: Mapping[str, Any],
    n_chunks: int,
    plan: Mapping[str, Any],
    per_rank: list[dict[str, Any]],
    group: _ProcessGroup,
    seconds: float,
) -> dict[str, Any]:
    """Rank 0, after every process has finished: check every part, write ``_manifest.json`` atomically."""
    with extra("cohort"):
        import pyarrow.parquet as pq

    parts, problems, labels = [], [], []
    for k in range(n_chunks):
        path = out / PART.format(k)
        try:
            metadata = pq.read_metadata(path)
            meta = _part_meta(metadata)
        except Exception as error:
            problems.append(f"{path.name}: {type(error).__name__}")
            continue
        if meta is None or meta.get("run") != dict(description) or meta.get("chunk") != k:
            problems.append(f"{path.name}: written by another run")
            continue
        parts.append({"file": path.name, "chunk": k, "start": meta["start"], "stop": meta["stop"], "rows": metadata.num_rows})
        labels.append(meta.get("labels"))
    if problems:
        raise RuntimeError(
            f"after the run, rank 0 finds {len(problems)} of {n_chunks} parts missing or wrong in {out} "
            f"({'; '.join(problems[:3])}). On several nodes, out must be one shared filesystem; rerun to resume"
        )
    manifest = {
        **dict(description),
        "complete": True,
        "columns": COLUMNS,
        "parts": parts,
        "rows": sum(p["rows"] for p in parts),
        "model_check": _check_of_parts(labels),
        "this_run": {
            "world_size": group.world_size,
            "backend": group.backend,
            "computed": sorted(k for r in per_rank for k in r["chunks"]),
            "skipped": list(plan["skipped"]),
            "seconds": round(seconds, 3),
            "per_rank": per_rank,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    temporary = out / f".{MANIFEST}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, out / MANIFEST)
    return manifest


def _check_of_parts(labels: Sequence[Optional[Mapping[str, Any]]]) -> Optional[dict[str, Any]]:
    """The model check over every part's label counts (``None`` when a part has none)."""
    if not labels or any(part is None or not part["n"] for part in labels):
        return None
    counts: dict[str, int] = {}
    for part in labels:
        for label, count in part["counts"].items():  # type: ignore[union-attr]
            counts[label] = counts.get(label, 0) + int(count)
    n, correct = sum(int(p["n"]) for p in labels), sum(int(p["correct"]) for p in labels)  # type: ignore[index]
    return ModelCheck.from_counts(correct, n, counts, unit="samples").as_dict()


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{out} has no {MANIFEST}: attribute_dataset has not finished there (run it again to resume)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a captum_chefer cohort manifest ({FORMAT})")
    return manifest


# ---------------------------------------------------------------------------------------------- fingerprints


def _model_digest(adapter: Adapter) -> str:
    """SHA-256 of the adapter's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(adapter.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe_method(name: str, method: Any, kwargs: Mapping[str, Any]) -> dict[str, str]:
    inner = getattr(method, "attribution_method", None)
    kind = type(method).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
    options = {k: v for k, v in sorted(vars(method).items()) if isinstance(v, (bool, int, float, str)) and not k.startswith("_")}
    return {"name": name, "method": kind, "options": repr(options), "kwargs": repr(dict(sorted(kwargs.items())))}


def _peak_rss_mb() -> float:
    """This process's peak resident memory: Linux's ``VmHWM`` (``ru_maxrss`` would carry the peak of the
    process that forked this one, e.g. torchrun's agent, across ``exec``), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------- summary


@dataclass
class CohortSummary:
    """What :func:`summarize` returns.

    Attributes:
        codes: one row per method and code: ``method``, ``rank`` (1 = highest mean score), ``feature``,
            ``code``, ``mean_score`` (the code's score summed within a sample, averaged over the samples
            that have it), ``samples`` and ``patients`` (how many have it).
        agreement: one row per pair of methods: ``spearman`` (rank correlation of the per-code means over
            the codes both rank), ``top_k_overlap`` (shared codes among both top ``k``, divided by ``k``),
            ``k``, ``codes``.
        methods: the methods, in the run's order.
        n_samples, n_patients, n_rows: the size of the cohort and of the dataset.
        top_k: the ``k`` of the overlap and the default of :meth:`top` and :meth:`figure`.
        model_check: the model's accuracy on the samples against always predicting the most frequent
            class (``None`` without labels); :meth:`table` and the report say when it is no better.
    """

    codes: "pl.DataFrame"
    agreement: "pl.DataFrame"
    methods: list[str]
    n_samples: int
    n_patients: int
    n_rows: int
    top_k: int
    model_check: Optional[ModelCheck] = None

    def top(self, method: str, k: Optional[int] = None) -> "pl.DataFrame":
        """The ``k`` highest-ranked codes of ``method``."""
        with extra("cohort"):
            import polars as pl

        if method not in self.methods:
            raise KeyError(f"no method {method!r} in this cohort; it has {self.methods}")
        return self.codes.filter(pl.col("method") == method).sort("rank").head(k or self.top_k)

    def side_by_side(self, k: Optional[int] = None) -> "pl.DataFrame":
        """The top ``k`` codes per method side by side: one row per rank, one column per method."""
        with extra("cohort"):
            import polars as pl

        k = k or self.top_k
        frame = pl.DataFrame({"rank": list(range(1, k + 1))})
        for method in self.methods:
            top = self.top(method, k)
            labels = [_label(f, c, self._several_features) for f, c in zip(top["feature"], top["code"])]
            frame = frame.with_columns(pl.Series(method, labels + [""] * (k - len(labels))))
        return frame

    @property
    def _several_features(self) -> bool:
        return self.codes["feature"].n_unique() > 1

    def figure(self, k: Optional[int] = None, colors: Optional[Mapping[str, str]] = None) -> "Figure":
        """A bar chart per method, side by side, of its top ``k`` codes by mean score (highest on top).

        Without ``colors``, codes in every method's top ``k`` are drawn in blue, the others in grey. With
        ``colors`` (``{method: colour}``, e.g. :func:`captum_chefer.visualization.method_colors` of
        :attr:`methods`, as the report and the ``cohort`` command pass), each method's bars take its colour,
        solid for codes in every method's top ``k`` and pale for the others.
        """
        from matplotlib.figure import Figure

        k = k or self.top_k
        tops = {m: self.top(m, k) for m in self.methods}
        labels = {m: [_label(f, c, self._several_features) for f, c in zip(t["feature"], t["code"])] for m, t in tops.items()}
        common = set.intersection(*(set(v) for v in labels.values())) if labels else set()
        ncols = min(len(self.methods), 3)
        nrows = -(-len(self.methods) // ncols)
        fig = Figure(figsize=(max(3.6 * ncols, 6.0), nrows * (0.3 * k + 1.0) + 0.6), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = [ax for row in grid for ax in row]
        for ax in axes[len(self.methods):]:
            ax.set_visible(False)
        for ax, method in zip(axes, self.methods):
            values = tops[method]["mean_score"].to_list()
            names = labels[method]
            if colors is None:
                colours: list[Any] = ["tab:blue" if name in common else "tab:gray" for name in names]
            else:
                from matplotlib.colors import to_rgba

                colours = [to_rgba(colors.get(method, "tab:blue"), 1.0 if name in common else 0.35) for name in names]
            ax.barh(range(len(values)), values, color=colours)
            ax.set_yticks(range(len(values)), names, fontsize=8)
            ax.invert_yaxis()
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_title(method, fontsize=10)
            ax.set_xlabel("mean score", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        shared = f"blue: in every method's top {k}" if colors is None else f"solid: in every method's top {k}, pale: not"
        fig.suptitle(
            f"Top {k} codes per method, mean score over the samples that have them\n"
            f"({self.n_samples} samples, {self.n_patients} patients; {shared})",
            fontsize=10,
        )
        return fig

    def table(self, k: Optional[int] = None) -> str:
        """:meth:`side_by_side` and the agreement as plain text, below a line on the model (its accuracy
        against the most frequent class, or the warning of a model no better than chance)."""
        side = self.side_by_side(k)
        lines = [self.model_line(), ""] if self.model_check is not None else []
        lines.append(_text_table(side.columns, side.rows()))
        if self.agreement.height:
            rows = [
                (r["method_a"], r["method_b"], f"{r['spearman']:.3f}", f"{r['top_k_overlap']:.2f}", r["codes"])
                for r in self.agreement.iter_rows(named=True)
            ]
            lines += ["", _text_table(["method A", "method B", "Spearman", f"top-{self.top_k} overlap", "codes"], rows)]
        return "\n".join(lines)


    def model_line(self) -> str:
        """``"model: <accuracy against chance>"``, or ``"warning: <why the model is no better than chance>"``;
        empty without a model check."""
        check = self.model_check
        if check is None:
            return ""
        return f"warning: {check.warning()}" if not check.above_chance else f"model: {check.describe()}"


def summarize(out: str | os.PathLike, *, top_k: int = 10, min_samples: int = 1) -> CohortSummary:
    """Per method, the codes ranked by their mean score; patient counts; the agreement between methods.

    A code's score in a sample is the sum over its occurrences there (a code may appear in several visits);
    its mean score is the mean of that over the samples that have the code. Codes in fewer than
    ``min_samples`` samples are left out of the ranking (a code seen once ranks on one score).

    Args:
        out: the directory of a finished :func:`attribute_dataset` run (read with polars, lazily).
        top_k: the ``k`` of the top-``k`` overlap, and the default length of the top lists.
        min_samples: the fewest samples a ranked code must appear in.

    Warns:
        ChanceLevelWarning: the run's model is not better than always predicting the most frequent class
            on the samples' labels (the manifest's ``model_check``).

    Example:
        >>> import tempfile
        >>> from captum.attr import Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, _ = toy_model_and_batch(batch_size=8)
        >>> adapter = PyHealthAdapter(model)
        >>> import warnings
        >>> from captum_chefer.comparison import ChanceLevelWarning
        >>> out = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", ChanceLevelWarning)  # the toy model is untrained
        ...     _ = attribute_dataset(adapter, model.dataset, [CheferAttribution(adapter), Saliency(adapter)], out,
        ...                           progress=False)
        ...     summary = summarize(out, top_k=3)
        >>> summary.methods, summary.n_samples
        (['Chefer', 'Saliency'], 8)
        >>> summary.top("Chefer").columns
        ['method', 'rank', 'feature', 'code', 'mean_score', 'samples', 'patients']
        >>> summary.agreement.select("method_a", "method_b", "k").row(0)
        ('Chefer', 'Saliency', 3)
    """
    with extra("cohort"):
        import polars as pl

    if top_k < 1 or min_samples < 1:
        raise ValueError(f"top_k and min_samples must be >= 1, got {top_k}, {min_samples}")
    out = Path(out)
    manifest = _read_manifest(out)
    methods = [m["name"] for m in manifest["methods"]]
    rows = pl.scan_parquet([str(out / p["file"]) for p in manifest["parts"]])
    per_sample = rows.group_by("method", "feature", "code", "sample").agg(
        pl.col("score").cast(pl.Float64).sum(), pl.col("patient_id").first()
    )
    codes = (
        per_sample.group_by("method", "feature", "code")
        .agg(
            pl.col("score").mean().alias("mean_score"),
            pl.len().alias("samples"),
            pl.col("patient_id").n_unique().alias("patients"),
        )
        .filter(pl.col("samples") >= min_samples)
        .sort(["method", "mean_score", "feature", "code"], descending=[False, True, False, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over("method").alias("rank"))
        .select("method", "rank", "feature", "code", "mean_score", "samples", "patients")
        .collect()
    )
    codes = codes.with_columns(pl.col("method").cast(pl.Enum(methods))).sort("method", "rank").with_columns(
        pl.col("method").cast(pl.String), pl.col("rank").cast(pl.Int64), pl.col("samples").cast(pl.Int64),
        pl.col("patients").cast(pl.Int64),
    )
    totals = rows.select(pl.len().alias("rows"), pl.col("patient_id").n_unique().alias("patients")).collect().row(0)
    summary = CohortSummary(
        codes=codes,
        agreement=_agreement(codes, methods, top_k),
        methods=methods,
        n_samples=int(manifest["n_samples"]),
        n_patients=int(totals[1]),
        n_rows=int(totals[0]),
        top_k=top_k,
        model_check=_model_check(manifest),
    )
    warn_if_chance_level(summary.model_check, stacklevel=2)
    return summary


def _agreement(codes: "pl.DataFrame", methods: Sequence[str], k: int) -> "pl.DataFrame":
    with extra("cohort"):
        import polars as pl

    out = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            left = codes.filter(pl.col("method") == a).select("feature", "code", pl.col("mean_score").alias("a"), pl.col("rank").alias("rank_a"))
            right = codes.filter(pl.col("method") == b).select("feature", "code", pl.col("mean_score").alias("b"), pl.col("rank").alias("rank_b"))
            both = left.join(right, on=["feature", "code"], how="inner")
            kk = min(k, left.height, right.height)
            top_a = set(left.filter(pl.col("rank_a") <= kk).select("feature", "code").iter_rows())
            top_b = set(right.filter(pl.col("rank_b") <= kk).select("feature", "code").iter_rows())
            out.append(
                {
                    "method_a": a,
                    "method_b": b,
                    "spearman": _spearman(both["a"].to_list(), both["b"].to_list()),
                    "top_k_overlap": len(top_a & top_b) / kk if kk else float("nan"),
                    "k": kk,
                    "codes": both.height,
                }
            )
    schema = {"method_a": pl.String, "method_b": pl.String, "spearman": pl.Float64, "top_k_overlap": pl.Float64,
              "k": pl.Int64, "codes": pl.Int64}
    return pl.DataFrame(out, schema=schema)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, ties given their average rank; NaN when undefined."""
    with extra("cohort"):
        import polars as pl

    if len(x) < 2:
        return float("nan")
    frame = pl.DataFrame({"x": x, "y": y}, schema={"x": pl.Float64, "y": pl.Float64})
    ranks = frame.select(pl.col("x").rank("average"), pl.col("y").rank("average"))
    if ranks["x"].std() == 0 or ranks["y"].std() == 0:
        return float("nan")
    return float(ranks.select(pl.corr("x", "y")).item())


def _label(feature: str, code: str, several: bool) -> str:
    return f"{feature}:{code}" if several else code


def _text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
