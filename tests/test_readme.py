"""The README (the landing page) and the guides in docs/: their examples run as written, in order, the README stays
short and links every guide, and every link points at a file that exists."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# How many python examples each page has; the tests below, tests/test_readme_beyond.py and
# tests/test_readme_generation.py run every one. A new example needs a test that runs it, and a line here.
EXAMPLES = {
    "README.md": 4,
    "docs/own-model.md": 4,
    "docs/cohort.md": 1,
    "docs/generation.md": 1,
    "docs/beyond-pyhealth.md": 5,
}


def blocks(path: Path, section: str | None = None, language: str = "python") -> list[str]:
    text = path.read_text()
    if section is not None:
        start = text.index(f"<!-- section: {section} -->")
        text = text[start : text.index(f"<!-- end section: {section} -->", start)]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def run(block: str, name: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(compile(block, name, "exec"), namespace)
    return namespace


def test_every_example_is_counted():
    found = {str(p.relative_to(ROOT)): len(blocks(p)) for p in PAGES}
    assert {k: v for k, v in found.items() if v} == EXAMPLES


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300, "the README is the landing page: move details to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_is_closed(page):
    text = page.read_text()
    opened = re.findall(r"<!-- section: ([\w-]+)", text)
    closed = re.findall(r"<!-- end section: ([\w-]+)", text)
    assert opened == closed and len(set(opened)) == len(opened)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files(page):
    """Relative links resolve from the page's folder, as on a code host; the site keeps them (docs/hooks.py)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_readme_links_every_guide():
    text = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        assert f"](docs/{page.name})" in text, f"the README does not link the guide docs/{page.name}"


def test_shell_commands_exist():
    from captum_chefer.cli import build_parser

    commands = [line for block in blocks(README, "install", "bash") for line in block.splitlines()]
    assert [line.split()[:2] for line in commands] == [["make", "demo"], ["make", "test"]]
    for line in commands:
        target = line.split()[1]
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), flags=re.M), target
    for target in ("docs", "lint"):  # named in the README and the guides
        assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), flags=re.M), target
    assert "compare" in build_parser().format_help()


def test_pyhealth_example_runs(capsys):
    (block,) = blocks(README, "example-pyhealth")
    namespace = run(block, "README.md (A PyHealth model)")
    inputs, chefer, ig, batch = namespace["inputs"], namespace["chefer"], namespace["ig"], namespace["batch"]
    assert [c.shape for c in chefer] == [x.shape for x in inputs] == [g.shape for g in ig]
    assert namespace["scores"]["conditions"].shape == batch["conditions"].shape
    assert namespace["adapter"].model is namespace["model"]
    assert re.match(r"tensor\(\[", capsys.readouterr().out)


def test_huggingface_example_runs(capsys):
    (block,) = blocks(README, "example-huggingface")
    namespace = run(block, "README.md (A HuggingFace classifier)")
    relevance, mask = namespace["relevance"], namespace["encoding"]["attention_mask"]
    assert relevance.shape == mask.shape and (relevance[mask == 0] == 0).all() and (relevance[mask == 1] != 0).any()
    assert namespace["model"].config._attn_implementation == "sdpa"  # left as found
    assert capsys.readouterr().out.startswith("tensor([[")


def test_torch_example_runs():
    (block,) = blocks(README, "example-torch")
    namespace = run(block, "README.md (Any PyTorch transformer)")
    relevance = namespace["relevance"]
    assert relevance.shape == (2, 4) and (relevance[1, 2:] == 0).all() and (relevance[0] != 0).any()
    assert namespace["saliency"].shape == (2, 4, 16)


def test_readme_quotes_the_report_table():
    """The README's headline numbers are the demo table's of docs/report.md, rounded."""
    table = (DOCS / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in table.splitlines() if line.startswith("| ")}
    readme = " ".join(README.read_text().split())

    def p_at_k(method: str) -> str:
        mean, low, high = (
            Decimal(x).quantize(Decimal("0.01"), ROUND_HALF_UP) for x in re.findall(r"-?\d+\.\d+", rows[method][4])
        )
        return f"{mean} [{low}, {high}]"

    assert f"make up {p_at_k('Chefer (recommended)')} of the recommended" in readme
    assert f"against {p_at_k('Integrated Gradients')} of Integrated Gradients'" in readme
    times = re.search(r"Chefer recommended\s+([\d.]+), .*?Integrated Gradients ([\d.]+)", " ".join(table.split()))
    assert times and f"at {times[1]} against {times[2]} ms per patient" in readme


def test_own_model_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    """The path from a Trainer-trained model and a dataloader to explanations and a report, as written."""
    code = blocks(DOCS / "own-model.md")
    assert len(code) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(code):
        run(block, f"docs/own-model.md (block {i + 1})", namespace)
    out = capsys.readouterr().out
    assert re.search(r"^Chefer tensor\(\[", out, flags=re.M) and re.search(r"^IG tensor\(\[", out, flags=re.M)
    model, adapter = namespace["model"], namespace["adapter"]
    assert namespace["scores"]["conditions"].shape == namespace["batch"]["conditions"].shape
    page = (tmp_path / "reports" / "mine" / "patients.html").read_text()
    assert page.count("<td class='method'>Chefer</td>") == page.count("<td class='method'>IG</td>") == 64
    report = namespace["report"]
    assert report.html_path == Path("reports/mine/report.html") and report.html_path.exists()
    assert report.model_check.above_chance  # the stand-in model learnt something
    assert "accuracy" in out and "Random" in out
    from captum_chefer.comparison import Evaluation

    saved = Evaluation.load(tmp_path / "reports" / "mine" / "per_patient.parquet")
    assert saved.methods == report.evaluation.methods and saved.n_samples == report.evaluation.n_samples == 80
    assert adapter.model is model


def test_own_model_prose_names_what_the_blocks_use():
    text = (DOCS / "own-model.md").read_text()
    for name in ("compare_methods", "code_rows", "Comparison.load", "ground_truth", "exclude_self", "ig_baselines"):
        assert name in text, name


def test_demo_table_is_there():
    table = [line for line in (DOCS / "report.md").read_text().splitlines() if line.startswith("| Chefer")]
    assert table and "[" in table[0], "the demo table carries intervals"


@pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning")  # one epoch on 60 patients
def test_cohort_example_runs(tmp_path, monkeypatch, capsys):
    from captum_chefer.cohort import read_cohort
    from captum_chefer.synthetic import default_cohort, train_transformer

    (block,) = blocks(DOCS / "cohort.md")
    dataset = default_cohort(60, seed=1).dataset()
    model = train_transformer(dataset, epochs=1, progress=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    block = block.replace('"n_steps": 50', '"n_steps": 4')
    namespace = run(block, "docs/cohort.md", {"model": model, "dataset": dataset})
    run_, summary = namespace["run"], namespace["summary"]
    methods = ["Chefer (recommended)", "Chefer (PyHealth)", "IG"]
    assert run_.manifest["complete"] and run_.manifest["n_samples"] == 60
    rows = read_cohort(tmp_path / "reports" / "cohort_api")
    assert set(rows["method"]) == set(methods) and rows.height == run_.rows == namespace["rows"].height
    assert summary.methods == methods
    assert "{'preset': 'recommended'}" in run_.manifest["methods"][0]["options"]  # the recommended setting runs
    assert (tmp_path / "reports" / "top_codes.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "Spearman" in out and "accuracy" in out
