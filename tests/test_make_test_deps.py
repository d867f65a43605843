"""The Makefile's `test-deps` step, which gives tests/test_report_html.py its Chromium: it
installs Debian's `chromium` with apt-get where the machine allows it, never fails `make test`
where it cannot, runs no apt once a browser is there, and `make demo` does not run it.

Each case runs the real recipe with PATH holding only stand-ins (apt-get, id, sudo, chromium)
that record their calls, so nothing is installed and the machine's own state does not matter."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho \"{name} $*\" >> \"{bin_dir}/calls\"\n{body}\n")
    path.chmod(0o755)


def run_test_deps(bin_dir: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`make test-deps` with PATH = `bin_dir` alone; its output and the stand-ins' calls."""
    if not (bin_dir / "env").exists():
        (bin_dir / "env").symlink_to(shutil.which("env"))  # the recipe runs apt-get through env (or sudo env)
    proc = subprocess.run([MAKE, "--no-print-directory", "test-deps"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": str(bin_dir), **env})
    calls = (bin_dir / "calls").read_text().splitlines() if (bin_dir / "calls").exists() else []
    return proc, [c for c in calls if not c.startswith("id ")]


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin"


def test_without_apt_get_it_says_the_html_test_will_skip_and_succeeds(bin_dir):
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "apt-get is not available" in proc.stdout and "tests/test_report_html.py will be skipped" in proc.stdout
    assert calls == []


def test_without_root_or_sudo_it_does_not_try_apt(bin_dir):
    stub(bin_dir, "id", "echo 1000")
    stub(bin_dir, "apt-get", "exit 0")
    stub(bin_dir, "sudo", "exit 1")  # asks for a password: `sudo -n` fails
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "needs root or sudo without a password" in proc.stdout
    assert calls == ["sudo -n true"]


def test_as_root_it_installs_chromium_and_updates_the_lists_when_they_are_missing(bin_dir):
    stub(bin_dir, "id", "echo 0")
    lists = bin_dir / "lists"
    stub(bin_dir, "apt-get", f'[ "$DEBIAN_FRONTEND" = noninteractive ] || [ "$1" = update ] || exit 2\n'
                             f'[ "$1" = update ] && : > "{lists}" && exit 0\n'
                             f'[ -e "{lists}" ] || exit 100')
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0 and "will be skipped" not in proc.stdout, proc.stdout + proc.stderr
    install = "apt-get install -y -qq --no-install-recommends chromium"
    assert calls == [install, "apt-get update -qq", install]


def test_with_sudo_it_installs_through_sudo(bin_dir):
    stub(bin_dir, "id", "echo 1000")
    stub(bin_dir, "sudo", '[ "$1" = -n ] || exit 1\nshift\n[ "$1" = true ] && exit 0\nexec "$@"')
    stub(bin_dir, "apt-get", "exit 0")
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0 and "will be skipped" not in proc.stdout, proc.stdout + proc.stderr
    assert calls == ["sudo -n true", "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                     "--no-install-recommends chromium", "apt-get install -y -qq --no-install-recommends chromium"]


def test_a_failed_install_is_reported_and_does_not_fail_make(bin_dir):
    stub(bin_dir, "id", "echo 0")
    stub(bin_dir, "apt-get", "exit 100")
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install chromium failed" in proc.stdout and "will be skipped" in proc.stdout
    assert calls == ["apt-get install -y -qq --no-install-recommends chromium", "apt-get update -qq"]


def test_a_browser_already_there_runs_no_apt(bin_dir):
    stub(bin_dir, "id", "echo 0")
    stub(bin_dir, "apt-get", "exit 0")
    proc, calls = run_test_deps(bin_dir, ONLINE_DPO_CHROMIUM="/opt/my-chromium")
    assert proc.returncode == 0 and proc.stdout == "" and calls == []
    stub(bin_dir, "chromium", "exit 0")
    proc, calls = run_test_deps(bin_dir)
    assert proc.returncode == 0 and proc.stdout == "" and calls == []


def test_make_demo_does_not_install_a_browser():
    plan = subprocess.run([MAKE, "--dry-run", "--always-make", "demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert plan.returncode == 0 and "pip install" in plan.stdout, plan.stderr
    assert "chromium" not in plan.stdout and "apt-get" not in plan.stdout
    plan = subprocess.run([MAKE, "--dry-run", "--always-make", "test"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert "apt-get install" in plan.stdout  # the check above would see it, were demo to run the step
