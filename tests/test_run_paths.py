"""Nothing a user types makes online-dpo delete or write over files it did not create: a run
name is one plain folder name wherever a config enters (YAML, overrides, a CampaignConfig given
to the Python API, resume), a failed start removes only the folder it made, and --overwrite
deletes only a folder that holds a run."""

import dataclasses
import json

import pytest

import online_dpo
from online_dpo import api
from online_dpo.config import ConfigError, load_config
from online_dpo.errors import DataError, RunDirError
from online_dpo.rundir import RunDir, atomic_path, remove_run
from tests.conftest import ROOT, run_python

BAD_NAMES = ["..", ".", "", "a/b", "../up", "/abs", "a\\b", "-rf", '"tab\\tname"', "'  '", "' x'"]


def user_folder(root):
    """A folder full of a user's files: what must survive every command below."""
    (root / "configs").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "configs" / "mine.yaml").write_text("rounds: 1\n")
    (root / "runs").mkdir()
    return listing(root)


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_one_plain_folder_name_is_refused_from_overrides(name):
    with pytest.raises(ConfigError, match="name=") as e:
        load_config("configs/quickstart.yaml", [f"name={name}"])
    assert "one plain folder name" in str(e.value)


def test_an_override_that_is_not_yaml_says_how_to_quote_it():
    with pytest.raises(ConfigError, match="not a YAML value.*quote it"):
        load_config("configs/quickstart.yaml", ["name=tab\tname"])


def test_a_bad_name_is_refused_from_yaml_from_a_config_built_in_python_and_at_resume(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: ..\nrounds: 1\n")
    with pytest.raises(ConfigError, match="names the output folder itself or its parent"):
        load_config(config)

    good = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    for changed in (dataclasses.replace(good, name=n) for n in ("..", "a/b", "  ", "x ")):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="name="):
                online_dpo.run(changed, overwrite=overwrite)
    mutated = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    mutated.name = ".."  # changed after it was loaded: checked again where it enters the API
    with pytest.raises(ConfigError, match="name="):
        online_dpo.run(mutated)
    mutated = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    mutated.rounds = "3"  # a wrong type set by hand gets the same message a YAML value would
    with pytest.raises(ConfigError, match="rounds: expected int"):
        online_dpo.run(mutated)
    assert listing(tmp_path) == ["c.yaml"]

    run = RunDir.create(tmp_path / "r", to_config(good), seeds={})
    with pytest.raises(ConfigError, match="name="):
        online_dpo.resume(run.root, ["name=.."])


def to_config(cfg):
    return dataclasses.asdict(cfg)


def test_the_reported_command_leaves_the_users_folder_as_it_was(tmp_path):
    """`cd work && online-dpo run configs/quickstart.yaml name=.. output_dir=runs
    data.source=/nonexistent.jsonl` once emptied work/. Now: exit 2 on the name, and with a name
    that points at the user's folder (output_dir=. name=work from its parent), exit 2 on the folder."""
    work = tmp_path / "work"
    user_folder(work)
    (work / "configs" / "quickstart.yaml").write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    before = listing(work)
    env = {"PYTHONPATH": str(ROOT)}
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", "name=..", "output_dir=runs",
                       "data.source=/nonexistent.jsonl"], timeout=300, env=env, cwd=work)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "name='..'" in proc.stderr and "Traceback" not in proc.stderr
    assert listing(work) == before and (work / "notes.txt").read_text() == "my notes"

    # (--overwrite refuses it too: test_overwrite_replaces_a_run_and_refuses_any_other_folder)
    proc = run_python(["-m", "online_dpo.cli", "run", "work/configs/quickstart.yaml", "name=work", "output_dir=.",
                       "data.source=/nonexistent.jsonl"], timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not a run directory" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert listing(work) == before and (work / "notes.txt").read_text() == "my notes"


def stop_with(monkeypatch, error):
    def stop(*args):
        raise error

    monkeypatch.setattr(api, "_campaign", stop)


def test_a_failed_start_removes_only_a_folder_it_made_and_only_its_own_files(tmp_path, monkeypatch):
    stop_with(monkeypatch, DataError("no such file: /nonexistent.jsonl"))
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "name=fresh"])
    with pytest.raises(DataError):
        online_dpo.run(cfg)
    assert not cfg.run_dir.exists()  # made by this start, holding only its own files: removed

    empty = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "name=made-by-user"])
    empty.run_dir.mkdir()
    with pytest.raises(DataError):
        online_dpo.run(empty)
    assert empty.run_dir.is_dir() and listing(empty.run_dir) == []  # the user's folder stays; the run's files go

    def stop_after_a_file_appears(*args):
        (cfg.run_dir / "user-file.txt").write_text("written while the run started")
        raise DataError("no such file")

    monkeypatch.setattr(api, "_campaign", stop_after_a_file_appears)
    with pytest.raises(DataError):
        online_dpo.run(cfg)
    assert (cfg.run_dir / "user-file.txt").read_text() == "written while the run started"


def test_overwrite_replaces_a_run_and_refuses_any_other_folder(tmp_path, monkeypatch):
    stop_with(monkeypatch, RuntimeError("stop after the run directory is made"))
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "name=r"])
    with pytest.raises(RuntimeError):
        online_dpo.run(cfg)
    first = json.loads((cfg.run_dir / "manifest.json").read_text())
    (cfg.run_dir / "round_000").mkdir()
    with pytest.raises(FileExistsError, match="already holds a run"):
        online_dpo.run(cfg)
    with pytest.raises(RuntimeError):
        online_dpo.run(cfg, overwrite=True)
    assert not (cfg.run_dir / "round_000").exists() and (cfg.run_dir / "manifest.json").exists()
    assert json.loads((cfg.run_dir / "manifest.json").read_text())["made_folder"] is True
    assert first["made_folder"] is True

    users = tmp_path / "users"
    before = user_folder(users)
    not_a_run = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "name=users"])
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="is not a run directory"):
            online_dpo.run(not_a_run, overwrite=overwrite)
        assert listing(users) == before
    (users / "manifest.json").write_text('{"not": "a run"}')  # a file of that name is not enough
    with pytest.raises(RunDirError, match="is not a run directory"):
        online_dpo.run(not_a_run, overwrite=True)
    with pytest.raises(RunDirError, match="refusing to delete"):
        remove_run(users)
    assert (users / "notes.txt").read_text() == "my notes"


def test_a_run_deletes_nothing_outside_itself(tmp_path):
    run = RunDir.create(tmp_path / "run", {"name": "run"}, seeds={})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    for path in (outside, run.root / ".." / "outside", tmp_path):
        with pytest.raises(RunDirError, match="refusing to delete"):
            run.remove(path)
    assert (outside / "keep.txt").read_text() == "keep"
    inside = run.root / "round_000" / "checkpoint"
    inside.mkdir(parents=True)
    (inside / "w.bin").write_bytes(b"x")
    run.remove(inside)
    assert not inside.exists()


def test_a_folder_written_atomically_replaces_the_old_one_and_leaves_no_temp(tmp_path):
    target = tmp_path / "pairs"
    for text in ("old", "new"):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "data.txt").write_text(text)
    assert (target / "data.txt").read_text() == "new"
    assert listing(tmp_path) == ["pairs", "pairs/data.txt"]
