"""Scaling of ``captum-chefer cohort``: 1 vs 2 processes, Chefer and Integrated Gradients, a synthetic cohort.

This script trains a PyHealth ``Transformer`` on the embedded synthetic cohort once
(``captum_chefer.synthetic.default_cohort``), saves its weights, and then runs the command line as a user
would, once per method and number of processes:

* 1 process: ``python -m captum_chefer cohort --build benchmarks/cohort.py:build ...``;
* N processes: ``python -m torch.distributed.run --nproc_per_node N -m captum_chefer cohort ...`` (gloo
  on CPU), each process with one torch thread.

``build()`` below is what every process loads: the same cohort (regenerated from its seed) and the saved
weights. Read from each run's ``_manifest.json``:

* **patients / s**: cohort size / the seconds of ``attribute_dataset`` on rank 0 (from its start to the
  manifest, so it waits for the slowest process; process start-up, imports and ``build()`` excluded);
* **end to end**: the wall time of the whole command, start-up included;
* **peak memory per process**: each process's peak resident set (Linux ``VmHWM``: imports, model,
  dataset and the attribution; the importing alone is most of it).

A last run repeats the single-process Chefer run on the first third of the same cohort (the whole cohort
is generated and held in both): equal peak memory shows that the attribution holds no more for a larger
cohort.

Usage::

    nice -n 10 .venv/bin/python benchmarks/cohort.py                 # 3000 patients, writes benchmarks/COHORT.md
    .venv/bin/python benchmarks/cohort.py --patients 200 --ig-steps 8 --results /tmp/c.md   # a quick check
    .venv/bin/python benchmarks/cohort.py --device cuda --processes 1   # the GPU row, where a GPU is lent
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = "CAPTUM_CHEFER_COHORT_BENCH"  # the work folder: settings.json and model.pt
# captum_chefer.synthetic.train_transformer's settings
MODEL = {"embedding_dim": 32, "heads": 2, "num_layers": 2, "dropout": 0.1}


def build() -> tuple[Any, Any]:
    """The benchmark's model and cohort, the same in every process (``--build benchmarks/cohort.py:build``)."""
    import torch
    from pyhealth.models import Transformer

    from captum_chefer.synthetic import default_cohort, quiet_pyhealth

    work = Path(os.environ[ENV])
    settings = json.loads((work / "settings.json").read_text())
    with quiet_pyhealth():
        dataset = default_cohort(settings["patients"], seed=settings["seed"]).dataset()
        model = Transformer(dataset=dataset, **MODEL)
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    if settings.get("first") is not None:  # the first patients only (same vocabulary, same model)
        dataset = dataset.subset(list(range(settings["first"])))
    return model.eval(), dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(work: Path, patients: int, seed: int, epochs: int) -> float:
    """Train once and save the weights; returns the accuracy on the training cohort (a sanity check)."""
    import torch

    from captum_chefer.synthetic import default_cohort, quiet_pyhealth, train_transformer

    torch.set_num_threads(1)
    (work / "settings.json").write_text(json.dumps({"patients": patients, "seed": seed}))
    with quiet_pyhealth():
        dataset = default_cohort(patients, seed=seed).dataset()
    model = train_transformer(dataset, epochs=epochs, seed=seed, progress=False, **MODEL)
    torch.save(model.state_dict(), work / "model.pt")
    from pyhealth.datasets import get_dataloader

    correct = total = 0
    with torch.no_grad():
        for batch in get_dataloader(dataset, batch_size=256, shuffle=False):
            predicted = (model(**batch)["y_prob"].view(-1) >= 0.5).long()
            correct += int((predicted == batch["label"].view(-1).long()).sum())
            total += len(predicted)
    return correct / total


def _run(work: Path, method: str, processes: int, patients: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    out = work / f"run-{method}-{processes}-{tag}"
    cohort_args = [
        "cohort", "--build", f"{Path(__file__).resolve()}:build", "--out", str(out), "--methods", method,
        "--ig-steps", str(args.ig_steps), "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
        "--device", args.device, "--threads", "1", "--no-progress", "--no-summary", "--overwrite",
    ]
    if processes == 1:
        command = [sys.executable, "-m", "captum_chefer", *cohort_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "captum_chefer", *cohort_args,
        ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{ENV: str(work)})
    if patients != args.patients:  # the first patients of the same cohort
        settings = json.loads((work / "settings.json").read_text())
        sub = work / f"first-{patients}"
        sub.mkdir(exist_ok=True)
        (sub / "settings.json").write_text(json.dumps(dict(settings, first=patients)))
        (sub / "model.pt").write_bytes((work / "model.pt").read_bytes())
        env[ENV] = str(sub)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    run = manifest["this_run"]
    return {
        "method": {"chefer": "Chefer", "ig": f"Integrated Gradients ({args.ig_steps} steps)"}[method],
        "processes": processes,
        "patients": patients,
        "seconds": run["seconds"],
        "patients_per_second": patients / run["seconds"],
        "end_to_end": wall,
        "peak_mb": [r["peak_rss_mb"] for r in run["per_rank"]],
        "peak_cuda_mb": [r["peak_cuda_mb"] for r in run["per_rank"]],
        "rows": manifest["rows"],
        "device": args.device,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | processes | patients | attribution s | patients / s | speed-up | end to end s "
        "| peak memory per process (MB) | load (1 min) before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    single = {(r["method"], r["patients"]): r["patients_per_second"] for r in rows if r["processes"] == 1}
    for r in rows:
        key = (r["method"], r["patients"])
        speedup = r["patients_per_second"] / single[key] if key in single else float("nan")
        memory = ", ".join(f"{m:.0f}" for m in r["peak_mb"])
        if any(c is not None for c in r["peak_cuda_mb"]):
            memory += " (GPU: " + ", ".join(f"{c:.0f}" for c in r["peak_cuda_mb"]) + ")"
        lines.append(
            f"| {r['method']} | {r['processes']} | {r['patients']} | {r['seconds']:.1f} | "
            f"{r['patients_per_second']:.1f} | "
            f"{speedup:.2f} | {r['end_to_end']:.1f} | {memory} | {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--methods", default="chefer,ig", help="of chefer, ig (default both)")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the model (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "COHORT.md")
    args = parser.parse_args()
    processes = [int(p) for p in args.processes.split(",")]
    methods = args.methods.split(",")

    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        accuracy = _prepare(work, args.patients, args.seed, args.epochs)
        print(
            f"trained on {args.patients} patients in {time.perf_counter() - started:.0f} s "
            f"(training accuracy {accuracy:.3f})",
            flush=True,
        )
        rows = []
        for method in methods:
            for n in processes:
                rows.append(_run(work, method, n, args.patients, args, "full"))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
        if "chefer" in methods and 1 in processes:  # memory against cohort size
            rows.append(_run(work, "chefer", 1, args.patients // 3, args, "third"))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import torch

    command = " ".join(["benchmarks/cohort.py", *sys.argv[1:]])
    epochs = args.epochs

    text = f"""# Cohort attribution: 1 vs {max(processes)} processes

`{command}`, {time.strftime('%Y-%m-%d %H:%M')}: {args.patients} synthetic
patients (`default_cohort`, seed {args.seed}), a PyHealth `Transformer` (2 layers, 2 heads, dim 32) trained {epochs}
epochs, batches of {args.batch_size}, parts of {args.chunk_size} patients, one torch thread per process, device
{args.device}; {os.cpu_count()} logical CPUs ({cpu}), torch {torch.__version__}, Python {platform.python_version()}.
The load columns are the machine's 1-minute load average before and after each run (other work shares it).

{_table(rows)}

Attribution seconds: `attribute_dataset` on rank 0, from its start to the manifest (process start-up, imports and
`build()` excluded; they are in the end-to-end column). Peak memory: each process's peak resident set (`VmHWM`).
"""
    args.results.write_text(text)
    print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
