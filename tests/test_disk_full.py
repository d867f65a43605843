"""A disk that fills mid-campaign stops the run with what to free and how to continue,
whichever way the writer reports it (safetensors' own error, or a plain OSError)."""

import errno

import pytest
from safetensors import SafetensorError

from online_dpo import cli, loop


def _run_with(monkeypatch, tmp_path, error):
    def fill_the_disk(cfg, run, judge=None):
        # round 0 finished its checkpoint; round 1's write is the one that hits the full disk
        checkpoint = run.round_dir(0) / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"\0" * (3 << 20))
        raise error

    monkeypatch.setattr(loop, "run_campaign", fill_the_disk)
    return cli.main(["run", "configs/quickstart.yaml", f"output_dir={tmp_path}", "name=full"])


@pytest.mark.parametrize("error", [
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.ENOSPC, "No space left on device", "eval_responses.jsonl"),
], ids=["safetensors", "oserror"])
def test_a_full_disk_says_what_to_free_and_how_to_resume(monkeypatch, tmp_path, capsys, error):
    rc = _run_with(monkeypatch, tmp_path, error)
    err = capsys.readouterr().err
    assert rc == 4, err
    root = tmp_path / "full"
    assert err.startswith(f"stopped: no space left on the disk that holds {root} (")
    assert "free)" in err and "No space left on device" in err  # the writer's own words stay
    assert "A round's checkpoint here takes 3 MiB" in err
    assert f"`online-dpo resume {root}`" in err and "save_checkpoints=last" in err


def test_other_failures_are_not_called_a_full_disk(monkeypatch, tmp_path):
    with pytest.raises(OSError, match="Permission denied"):
        _run_with(monkeypatch, tmp_path, OSError(errno.EACCES, "Permission denied"))
