"""The report is a web page: render it in headless Chromium and check the screenshot is not blank.

Skipped only where Chromium is absent and this is not CI; ``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

CHROMIUM = shutil.which("chromium")
IN_CI = bool(os.environ.get("CI"))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not IN_CI,
    reason="chromium is not installed (apt-get install chromium); .ci/run installs it, so CI always runs this test",
)


def screenshot(page, png, tmp_path, width=1200, height=1600):
    if CHROMIUM is None:
        pytest.fail("CI must have chromium: .ci/run installs it when missing")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and png.exists(), result.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning")  # the untrained toy model
def test_report_renders_in_chromium(tmp_path):
    import numpy as np
    from PIL import Image

    from captum_chefer.report import run_comparison
    from captum_chefer.synthetic import toy_model_and_batch

    model, batch = toy_model_and_batch(batch_size=6)
    result = run_comparison(
        model, batch, out=tmp_path / "report", ig_steps=4, nt_samples=2, infidelity_samples=2,
        sensitivity_samples=0, show_patients=2, progress=False,
    )
    png = tmp_path / "shot.png"
    screenshot(result.html_path, png, tmp_path, height=3000)
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape[:2] == (3000, 1200)
    not_white = (image < 245).any(axis=2)
    assert not_white.mean() > 0.03, "the page rendered (almost) blank"
    # text fills the top of the page: the title and the results table
    assert not_white[:400].mean() > 0.01
    # Captum's highlight colours (green for positive scores) and the embedded figures render
    green = (image[:, :, 1] > image[:, :, 0] + 40) & (image[:, :, 1] > image[:, :, 2] + 40)
    assert green.sum() > 200
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # figures, not flat blocks of colour

    # a control: the same measure on a blank page is (near) zero, so the check above can fail
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_png = tmp_path / "blank.png"
    screenshot(blank, blank_png, tmp_path, height=600)
    blank_image = np.asarray(Image.open(blank_png).convert("RGB")).astype(int)
    assert (blank_image < 245).any(axis=2).mean() < 0.001
