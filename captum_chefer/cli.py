"""``python -m captum_chefer compare`` (console script ``captum-chefer``).

``compare`` generates the embedded synthetic cohort (planted ground truth), trains a PyHealth
``Transformer`` on it, explains held-out patients with Chefer (``preset="recommended"``, and PyHealth's
setting with and without its self term), Integrated Gradients, Saliency, NoiseTunnel and a random
baseline (:func:`captum_chefer.report.default_methods`), and writes ``report.html``, the figures (PNG)
and the results (CSV, JSON) to ``--out``. ``demo`` is the same with defaults.

Set ``CAPTUM_CHEFER_SMALL=1`` (or pass ``--small``) for a tiny, fast run (tests). Its model is too small
to learn the task; like any model not better than chance on the explained patients, it is flagged
(``captum-chefer: warning: ...`` on stderr, and on the report page) rather than refused (the run still
checks the whole pipeline). ``cohort`` flags such a model the same way.

Bad arguments, an ``--out`` that cannot be a folder, or a ``--device`` torch cannot use stop the command
before any training, with one line on stderr and exit code 2.

``cohort`` attributes every sample of a dataset (your model and data from ``--build FILE.py:FUNC``, or
the synthetic cohort with ``--synthetic N``) with the chosen methods and writes a Parquet dataset and a
summary to ``--out``; it runs alone or under ``torchrun --nproc_per_node N -m captum_chefer cohort ...``
(see :func:`cohort_command` and :mod:`captum_chefer.cohort`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "compare", "cohort_command", "build_parser", "SMALL_ENV"]

SMALL_ENV = "CAPTUM_CHEFER_SMALL"

DEFAULTS = dict(patients=1500, epochs=10, explain=96, ig_steps=50, nt_samples=10, show=4, sensitivity_samples=3, infidelity_samples=10)
SMALL = dict(patients=160, epochs=2, explain=12, ig_steps=4, nt_samples=2, show=2, sensitivity_samples=1, infidelity_samples=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captum-chefer", description="Chefer relevance for PyHealth, side by side with Captum's methods.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("compare", "train on the synthetic cohort, compare methods, write the report"), ("demo", "compare with defaults")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", type=Path, default=Path("reports/demo"), help="output folder (default: reports/demo)")
        p.add_argument("--patients", type=int, help=f"patients in the cohort (default {DEFAULTS['patients']})")
        p.add_argument("--epochs", type=int, help=f"training epochs (default {DEFAULTS['epochs']})")
        p.add_argument("--explain", type=int, help=f"held-out patients explained and evaluated (default {DEFAULTS['explain']})")
        p.add_argument("--ig-steps", type=int, help=f"Integrated Gradients steps (default {DEFAULTS['ig_steps']})")
        p.add_argument("--nt-samples", type=int, help=f"NoiseTunnel samples (default {DEFAULTS['nt_samples']})")
        p.add_argument("--show", type=int, help=f"patients shown code by code in the report (default {DEFAULTS['show']})")
        p.add_argument("--sensitivity-samples", type=int, help="perturbations per patient for Captum sensitivity, 0 skips (default 3)")
        p.add_argument("--infidelity-samples", type=int, help="perturbations per patient for Captum infidelity, 0 skips (default 10)")
        p.add_argument("--task", choices=("binary", "multiclass"), default="binary", help="label type of the cohort (default binary)")
        p.add_argument("--seed", type=int, default=0, help="seed of the cohort, the training and the metrics (default 0)")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this small model)")
        p.add_argument("--device", default=None, help="train and explain on this torch device, e.g. cuda, cuda:1 (default: cpu)")
        p.add_argument("--small", action="store_true", help=f"tiny sizes for a quick check (also: {SMALL_ENV}=1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_cohort_parser(sub)
    return parser


def _fail(message: str) -> None:
    """One line on stderr and exit code 2 (argparse's convention for bad arguments)."""
    print(f"captum-chefer: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_out(out: Path) -> Optional[str]:
    """Why ``out`` cannot be the output folder, or ``None`` when it can (nothing is created here)."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: {out} is a file, not a folder; choose a folder (it is created if missing)"
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"--out {out}: {existing} is a file, so no folder can be made inside it; choose another --out"
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write in {existing} (permission denied); choose a folder you can write to"
    return None


def _check_device(device: Optional[str]) -> Optional[str]:
    """Why torch cannot use ``device``, or ``None`` when it can."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"--device {device}: not a torch device; use e.g. cpu, cuda or cuda:1"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: torch sees no CUDA device on this machine; use --device cpu or leave it out"
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return None


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    small = args.small or os.environ.get(SMALL_ENV, "") not in ("", "0")
    sizes = dict(SMALL if small else DEFAULTS)
    for key in sizes:
        value = getattr(args, key, None)
        if value is not None:
            sizes[key] = value
    for key, value in sizes.items():
        minimum = 0 if key in ("show", "sensitivity_samples", "infidelity_samples") else 1
        if value < minimum:
            _fail(f"--{key.replace('_', '-')} must be >= {minimum}, got {value}")
    if sizes["explain"] >= sizes["patients"]:
        _fail(f"--explain ({sizes['explain']}) must be smaller than --patients ({sizes['patients']})")
    return sizes


def compare(
    out: Path,
    *,
    patients: int,
    epochs: int,
    explain: int,
    ig_steps: int,
    nt_samples: int,
    show: int,
    sensitivity_samples: int,
    infidelity_samples: int,
    task: str = "binary",
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
) -> Any:
    """The ``compare`` command as a function: returns the :class:`captum_chefer.report.ComparisonReport`.

    Warns (once) with a :class:`~captum_chefer.comparison.chance.ChanceLevelWarning` when the model is not
    better than chance on the explained patients; :func:`main` prints it as a line on stderr.
    """
    from .comparison import ChanceLevelWarning, warn_if_chance_level

    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning, module="pyhealth")
    with warnings.catch_warnings():
        # the cohort run, its summary and the comparison each check the model: said once below
        warnings.simplefilter("ignore", ChanceLevelWarning)
        report = _compare(out, patients=patients, epochs=epochs, explain=explain, ig_steps=ig_steps, nt_samples=nt_samples,
                          show=show, sensitivity_samples=sensitivity_samples, infidelity_samples=infidelity_samples,
                          task=task, seed=seed, device=device, progress=progress, started=started)
    warn_if_chance_level(report.model_check, stacklevel=2)
    return report


def _compare(
    out: Path, *, patients: int, epochs: int, explain: int, ig_steps: int, nt_samples: int, show: int,
    sensitivity_samples: int, infidelity_samples: int, task: str, seed: int, device: Optional[str], progress: bool,
    started: float,
) -> Any:
    import torch

    from .adapters import PyHealthAdapter
    from .cohort import attribute_dataset, summarize
    from .report import default_methods, run_comparison
    from .synthetic import default_cohort, quiet_pyhealth, train_transformer

    with quiet_pyhealth():
        from pyhealth.datasets import get_dataloader

        cohort = default_cohort(patients, seed=seed, task=task)  # type: ignore[arg-type]
        dataset = cohort.dataset()
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        test_ids, train_ids = order[:explain], order[explain:]
        train, test = dataset.subset(train_ids), dataset.subset(test_ids)
        model = train_transformer(train, epochs=epochs, seed=seed, progress=progress, device=device)
        batch = next(iter(get_dataloader(test, batch_size=len(test_ids), shuffle=False)))
    adapter = PyHealthAdapter(model)
    fired_rules = dict(zip((s["patient_id"] for s in cohort.samples), cohort.fired))

    def describe(b: Any, i: int) -> str:
        pid = b["patient_id"][i]
        rules = fired_rules.get(pid, ())
        truth = sorted(f"{k}:{c}" for k, c in cohort.relevant_by_patient().get(pid, ()))
        return f"rule that fired: {', '.join(rules) or 'none'}; planted codes: {', '.join(truth) or 'none'}"

    settings = {
        "cohort": f"{patients} synthetic patients ({task}), seed {seed}",
        "rules": "; ".join(r.describe() for r in cohort.rules),
        "decoys": ", ".join(f"{k}:{c}" for k, c in sorted(cohort.decoys)),
        "model": f"PyHealth Transformer, 2 layers x 2 heads, dim 32, trained {epochs} epochs on {len(train_ids)} patients",
        "explained patients": explain,
        "Integrated Gradients steps": ig_steps,
        "NoiseTunnel samples": nt_samples,
        "sensitivity / infidelity perturbations": f"{sensitivity_samples} / {infidelity_samples}",
        "torch threads": torch.get_num_threads(),
    }
    # The cohort section: every method but the random baseline over the explained patients, as `cohort` runs them.
    cohort_methods = [m for m in default_methods(adapter, ig_steps=ig_steps, nt_samples=nt_samples, seed=seed) if m[0] != "Random"]
    attribute_dataset(adapter, test, cohort_methods, Path(out) / "cohort", overwrite=True, seed=seed, progress=False)
    report = run_comparison(
        adapter, batch, ground_truth=lambda b: cohort.ground_truth(adapter, b), out=out, cohort=summarize(Path(out) / "cohort"),
        title="Chefer relevance side by side: synthetic cohort with planted ground truth",
        show_patients=show, ig_steps=ig_steps, nt_samples=nt_samples, infidelity_samples=infidelity_samples,
        sensitivity_samples=sensitivity_samples, settings=settings, describe_patient=describe, seed=seed, progress=progress,
    )
    if report.model_check is not None:
        report.settings["held-out accuracy"] = report.model_check.accuracy
    report.settings["total seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m captum_chefer`` and the ``captum-chefer`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "cohort":
        return cohort_command(args)
    sizes = _sizes(args)
    if args.threads < 1:
        _fail(f"--threads must be >= 1, got {args.threads}")
    for problem in (_check_out(args.out), _check_device(args.device)):
        if problem:
            _fail(problem)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"captum_chefer {args.command}: cohort {sizes['patients']} patients, {sizes['epochs']} epochs, "
          f"{sizes['explain']} explained, IG {sizes['ig_steps']} steps -> {args.out}", flush=True)
    from .comparison import ChanceLevelWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ChanceLevelWarning)  # printed below, in this command's words
            report = compare(args.out, task=args.task, seed=args.seed, device=args.device, progress=not args.no_progress, **sizes)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests, notebooks)
    print()
    print(report.table(intervals=False))
    print()
    check = report.model_check
    if check is not None:
        print(f"model: {check.describe()}")
    print(f"finished in {time.perf_counter() - started:.1f} s")
    print(f"report: {report.html_path.resolve()}")
    for key in ("csv", "json"):
        print(f"{key}: {report.files[key].resolve()}")
    if check is not None and not check.above_chance:
        print(f"captum-chefer: warning: {check.warning()}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- cohort

# --methods names -> the names of captum_chefer.report.default_methods (one definition of each method).
COHORT_METHODS = {
    "chefer": "Chefer (recommended)",
    "chefer-pyhealth": "Chefer (PyHealth)",
    "chefer-pyhealth-exclude-self": "Chefer (PyHealth, exclude_self)",
    "ig": "Integrated Gradients",
    "saliency": "Saliency",
    "smoothgrad": "NoiseTunnel (SmoothGrad)",
    "random": "Random",
}
COHORT_DEFAULT = ("chefer", "ig")

# Names of the previous release, accepted until the next one with a note on stderr: {old: (new, note)}.
RENAMED_METHODS = {
    "chefer-recommended": ("chefer", "--methods chefer-recommended is now called chefer (the default)"),
    "chefer-exclude-self": (
        "chefer-pyhealth-exclude-self", "--methods chefer-exclude-self is now called chefer-pyhealth-exclude-self"
    ),
}
CHEFER_NOTE = (
    "--methods chefer now runs the recommended setting (CheferAttribution(adapter, preset=\"recommended\")); "
    "chefer-pyhealth runs PyHealth's CheferRelevance setting, which chefer ran before this release"
)


def _add_cohort_parser(sub: Any) -> None:
    text = "attribute every sample of a dataset, alone or under torchrun; Parquet out, cohort summary"
    p = sub.add_parser(
        "cohort", help=text, description=text + ". Under torchrun each process takes its share of the parts "
        "(torchrun --nproc_per_node N -m captum_chefer cohort ...); a rerun resumes.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--build", metavar="FILE.py[:FUNC]",
        help="your model and data: a function (default name: build) in a Python file, or MODULE:FUNC, that takes no "
        "arguments and returns (model or adapter, dataset) or (adapter, dataset, methods); every process calls it "
        "and must get the same model and the same dataset in the same order",
    )
    source.add_argument(
        "--synthetic", type=int, metavar="N",
        help="the embedded synthetic cohort of N patients and a PyHealth Transformer trained on it (seeded, in every process)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory: Parquet parts, _manifest.json, _summary/")
    p.add_argument(
        "--methods", help=f"comma-separated, of {', '.join(COHORT_METHODS)} (default: {','.join(COHORT_DEFAULT)}, or the "
        "methods build() returns); chefer is CheferAttribution(adapter, preset='recommended'), chefer-pyhealth is "
        "PyHealth's CheferRelevance setting",
    )
    p.add_argument("--batch-size", type=int, default=32, help="samples per attribution batch (default 32)")
    p.add_argument("--chunk-size", type=int, default=512, help="samples per part file, the unit of sharing and resuming (default 512)")
    p.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (default 50)")
    p.add_argument("--nt-samples", type=int, default=10, help="SmoothGrad samples (default 10)")
    p.add_argument("--target", choices=("predicted", "label"), default="predicted", help="the explained class (default predicted)")
    p.add_argument("--baseline", choices=("unk", "zero"), default="unk", help="Integrated Gradients reference (default unk)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU of this process (LOCAL_RANK) when CUDA is available, else the CPU")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of --synthetic (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic and of the methods' noise (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--top", type=int, default=10, help="codes per method in the summary (default 10)")
    p.add_argument("--min-samples", type=int, default=1, help="fewest samples a code needs to be ranked (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of resuming it")
    p.add_argument("--no-summary", action="store_true", help="write the Parquet dataset only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cohort_command(args: argparse.Namespace) -> int:
    """The ``cohort`` command: returns the exit code (2 with a one-line message for bad arguments).

    Every process of a ``torchrun`` job runs this; :func:`captum_chefer.cohort.attribute_dataset` shares
    the work, and rank 0 writes the manifest and the summary (``_summary/``: ``summary.html``,
    ``top_codes.png``, ``codes.csv``, ``agreement.csv``).
    """

    def refuse(message: str) -> int:
        print(f"captum-chefer cohort: error: {message}", file=sys.stderr)
        return 2

    out: Path = args.out
    if out.exists() and not out.is_dir():
        return refuse(f"--out {out} is an existing file; pass a directory (it is created if missing)")
    for key in ("batch_size", "chunk_size", "ig_steps", "nt_samples", "epochs", "threads", "top", "min_samples"):
        if getattr(args, key) < 1:
            return refuse(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.synthetic is not None and args.synthetic < 2:
        return refuse(f"--synthetic needs at least 2 patients, got {args.synthetic}")
    names = None
    notes = []
    if args.methods is not None:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in COHORT_METHODS and n not in RENAMED_METHODS]
        if unknown or not names:
            return refuse(f"--methods {args.methods!r}: unknown {unknown or 'empty'}; choose from {', '.join(COHORT_METHODS)}")
        notes = [RENAMED_METHODS[n][1] + "; the old name is accepted until the next release" for n in names if n in RENAMED_METHODS]
        if "chefer" in names:
            notes.append(CHEFER_NOTE)
        names = list(dict.fromkeys(RENAMED_METHODS[n][0] if n in RENAMED_METHODS else n for n in names))
    device = _cohort_device(args.device)
    if isinstance(device, str):
        return refuse(device)
    build = None
    if args.build is not None:
        build = _load_build(args.build)
        if isinstance(build, str):
            return refuse(build)
    rank = int(os.environ.get("RANK", "0"))
    progress = not args.no_progress
    if rank == 0:
        for note in notes:
            print(f"captum-chefer cohort: note: {note}", file=sys.stderr)

    import torch

    from .comparison import ChanceLevelWarning

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        from .adapters import adapter_for
        from .cohort import attribute_dataset, summarize
        from .report import default_methods

        if build is None:
            model, dataset, methods = _synthetic_build(args.synthetic, args.epochs, args.seed, progress and rank == 0)
        else:
            built = build()
            parts = _unpack_build(built, args.build)
            if isinstance(parts, str):
                return refuse(parts)
            model, dataset, methods = parts
        adapter = adapter_for(model)
        adapter.to(device)
        if names is None and methods is not None:
            specs = list(methods)
        else:
            by_name = {name: (name, method, kwargs) for name, method, kwargs in default_methods(
                adapter, ig_steps=args.ig_steps, nt_samples=args.nt_samples, seed=args.seed)}
            specs = [by_name[COHORT_METHODS[n]] for n in (names or COHORT_DEFAULT)]
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ChanceLevelWarning)  # said once below, in this command's words
            run = attribute_dataset(
                adapter, dataset, specs, out, args.batch_size, chunk_size=args.chunk_size, target_mode=args.target,
                baseline=args.baseline, overwrite=args.overwrite, seed=args.seed, progress=progress,
            )
        if rank != 0:
            return 0
        info = run.manifest["this_run"]
        print(
            f"captum-chefer cohort: {run.manifest['n_samples']} samples, {len(run.parts)} parts "
            f"({len(info['computed'])} computed, {len(info['skipped'])} already complete) by {run.world_size} "
            f"process(es) in {time.perf_counter() - started:.1f} s; {run.rows} rows -> {out.resolve()}",
            flush=True,
        )
        if not args.no_summary:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ChanceLevelWarning)
                summary = summarize(out, top_k=args.top, min_samples=args.min_samples)
            files = _write_cohort_summary(summary, out / "_summary")
            print()
            print(summary.table())
            print()
            print(f"summary: {files['html'].resolve()}")
        check = run.model_check
        if check is not None and not check.above_chance:
            print(f"captum-chefer cohort: warning: {check.warning()}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return 0


def _load_build(spec: str) -> Any:
    """The function ``FILE.py[:FUNC]`` or ``MODULE:FUNC`` names, or a message saying why not."""
    import importlib
    import importlib.util

    target, _, func = spec.rpartition(":") if ":" in spec else (spec, "", "build")
    func = func or "build"
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            return f"--build {spec}: no file {path}"
        module_spec = importlib.util.spec_from_file_location(f"captum_chefer_build_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            return f"--build {spec}: cannot load {path} as Python"
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as error:
            return f"--build {spec}: {error}; name a file ending in .py or an importable module"
    function = getattr(module, func, None)
    if not callable(function):
        return f"--build {spec}: {target} defines no function {func!r}"
    return function


def _unpack_build(built: Any, spec: str) -> Any:
    """``(model, dataset, methods or None)`` from what build() returned, or a message."""
    if isinstance(built, tuple) and len(built) in (2, 3):
        return built[0], built[1], (built[2] if len(built) == 3 else None)
    return (
        f"--build {spec} returned {type(built).__name__}; it must return (model or adapter, dataset) or "
        "(adapter, dataset, methods)"
    )


def _synthetic_build(n: int, epochs: int, seed: int, progress: bool) -> tuple[Any, Any, None]:
    from .synthetic import default_cohort, quiet_pyhealth, train_transformer

    warnings.filterwarnings("ignore", category=UserWarning, module="pyhealth")
    with quiet_pyhealth():
        dataset = default_cohort(n, seed=seed).dataset()
        model = train_transformer(dataset, epochs=epochs, seed=seed, progress=progress)
    return model, dataset, None


def _cohort_device(choice: str) -> Any:
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return "--device cuda but CUDA is not available; use --device cpu or auto"
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _write_cohort_summary(summary: Any, folder: Path) -> dict[str, Path]:
    from .report import cohort_page
    from .visualization import method_colors

    folder.mkdir(parents=True, exist_ok=True)
    files = {"codes": folder / "codes.csv", "agreement": folder / "agreement.csv", "figure": folder / "top_codes.png",
             "html": folder / "summary.html"}
    summary.codes.write_csv(files["codes"])
    summary.agreement.write_csv(files["agreement"])
    summary.figure(colors=method_colors(summary.methods)).savefig(files["figure"], dpi=110)
    files["html"].write_text(cohort_page(summary), encoding="utf-8")
    return files


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
