"""``python -m captum_chefer compare`` (console script ``captum-chefer``).

``compare`` generates the embedded synthetic cohort (planted ground truth), trains a PyHealth
``Transformer`` on it, explains held-out patients with Chefer (default and ``exclude_self``),
Integrated Gradients, Saliency, NoiseTunnel and a random baseline, and writes ``report.html``,
the figures (PNG) and the results (CSV, JSON) to ``--out``. ``demo`` is the same with defaults.

Set ``CAPTUM_CHEFER_SMALL=1`` (or pass ``--small``) for a tiny, fast run (tests). Its model is too small
to learn the task; like any model not better than chance on the explained patients, it is flagged in the
output and on the report page rather than refused (the run still checks the whole pipeline).

Bad arguments, an ``--out`` that cannot be a folder, or a ``--device`` torch cannot use stop the command
before any training, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "compare", "build_parser", "SMALL_ENV"]

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
    """The ``compare`` command as a function: returns the :class:`captum_chefer.report.ComparisonReport`."""
    import torch

    from .adapters import PyHealthAdapter
    from .report import run_comparison
    from .synthetic import default_cohort, quiet_pyhealth, train_transformer

    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning, module="pyhealth")
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
    report = run_comparison(
        adapter, batch, ground_truth=lambda b: cohort.ground_truth(adapter, b), out=out,
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
    try:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
