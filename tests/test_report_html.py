"""report.html in a real headless Chromium: the table shows every round, every plot image
decoded (naturalWidth > 0, written into the page by its inline script and read back with
--dump-dom), the examples are there, and a screenshot is taken.

The test installs nothing: the browser comes from the test set-up, `make test`, whose
`test-deps` step installs Debian's `chromium` with apt-get where the machine allows it. The
fixture looks for `chromium` on PATH, then /usr/bin/chromium; ONLINE_DPO_CHROMIUM names a
Chromium binary elsewhere (it wins over both). With none, these tests skip and say how to get one.
"""

import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from online_dpo.report import build_report
from tests.report_helpers import copy_run, png_size, tiny_run

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    custom = os.environ.get("ONLINE_DPO_CHROMIUM")
    if custom:  # asked for by name: a wrong one is an error, not a reason to skip
        return shutil.which(custom) or pytest.fail(f"ONLINE_DPO_CHROMIUM={custom} is not an executable")
    path = shutil.which("chromium") or (os.access("/usr/bin/chromium", os.X_OK) and "/usr/bin/chromium")
    if not path:
        pytest.skip("no chromium: `make test-deps` (run by `make test`) installs it where apt-get can, or "
                    "`apt-get install chromium`; ONLINE_DPO_CHROMIUM names a Chromium binary elsewhere")
    return path


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


class DomSummary(HTMLParser):
    """What the rendered DOM shows: table rows per round, the image check, examples per round."""

    def __init__(self):
        super().__init__()
        self.table_rounds: list[str] = []
        self.image_check: dict = {}
        self.examples: dict[str, int] = {}
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "tr" and "round" in classes:
            self.table_rounds.append(a["data-round"])
        elif tag == "img":
            self.images += 1
        elif a.get("id") == "image-check":
            self.image_check = a
        elif tag == "div" and "example" in classes:
            self.examples[a["data-round"]] = self.examples.get(a["data-round"], 0) + 1


def rendered(chromium: str, page: Path, profile: Path) -> DomSummary:
    # --virtual-time-budget lets the page finish loading (and its load handler run) before the dump.
    proc = run_chromium(chromium, profile, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-3000:]
    dom = DomSummary()
    dom.feed(proc.stdout)
    return dom


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, shallow_model_path):
    root = copy_run(tiny_run(tmp_path_factory, shallow_model_path), tmp_path_factory.mktemp("html") / "tiny")
    build_report(root, console=Console(file=io.StringIO()))
    return root


def test_report_renders_in_headless_chromium(chromium, report_dir, tmp_path):
    dom = rendered(chromium, report_dir / "report.html", tmp_path / "profile")
    assert dom.table_rounds == ["0", "1"]
    assert dom.images == 4
    assert dom.image_check.get("data-loaded") == "4" and dom.image_check.get("data-total") == "4", dom.image_check
    assert dom.examples == {"0": 3, "1": 3}

    shot = tmp_path / "report.png"
    proc = run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                        "--virtual-time-budget=10000", "--hide-scrollbars", (report_dir / "report.html").as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    data = shot.read_bytes()
    assert len(data) > 10_000 and png_size(data) == (1280, 2000)
    shutil.copy(shot, report_dir / "screenshot.png")  # kept beside the report for a person to look at


def test_the_image_check_catches_a_broken_image(chromium, report_dir, tmp_path):
    # The in-page check must be able to fail: corrupt one plot's data and it counts 3 of 4.
    html = (report_dir / "report.html").read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + "AAAAbroken" + html[start + 200:])
    dom = rendered(chromium, broken, tmp_path / "profile")
    assert dom.image_check.get("data-loaded") == "3" and dom.image_check.get("data-total") == "4"
