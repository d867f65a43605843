"""A third-party judge, installed as a real package with an `online_dpo.judges` entry
point, is found by name from a config (in a fresh process that sees the install)."""

import subprocess
import sys
import textwrap

from tests.conftest import ROOT, last_json_line, run_python

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-judge-plugin"
version = "0.0.1"

[project.entry-points."online_dpo.judges"]
shortest = "tiny_judge_plugin:ShortestWins"
"""

PLUGIN_MODULE = '''
from judges import Score


class ShortestWins:
    """Pointwise: shorter responses score higher."""

    name = "shortest"

    def __init__(self, scale=1.0):
        self.scale = scale

    def score(self, items):
        return [Score(-self.scale * len(it.response)) for it in items]
'''

CHECK = textwrap.dedent("""
    import json
    from judges import PairwiseItem, as_pairwise, available_judges, load_judge
    from online_dpo.config import config_from_dict

    cfg = config_from_dict({"judge": {"name": "shortest", "options": {"scale": 2.0}}})
    judge = load_judge(cfg.judge.name, **cfg.judge.options)
    verdicts = as_pairwise(judge).compare([PairwiseItem("q", "a long answer", "short"), PairwiseItem("q", "x", "yy")])
    print(json.dumps({"known": available_judges(), "winners": [v.winner for v in verdicts], "scale": judge.scale}))
""")


def test_entry_point_plugin_is_usable_by_name(tmp_path):
    pkg = tmp_path / "plugin"
    (pkg / "tiny_judge_plugin").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "tiny_judge_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    proc = run_python(["-c", CHECK], timeout=120, env={"PYTHONPATH": f"{site}:{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    assert "shortest" in result["known"] and "arithmetic" in result["known"]
    assert result["winners"] == ["b", "a"] and result["scale"] == 2.0

    # without the install, the same name fails with the list of known judges
    proc = run_python(["-c", CHECK], timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and "unknown judge 'shortest'" in proc.stderr and "arithmetic" in proc.stderr
