"""The manifest under two writers: generation.async_rounds marks round r+1's generate from a
thread while the main thread marks round r's stages."""

from __future__ import annotations

import sys
import threading

from online_dpo.rundir import RunDir


def test_markers_written_from_two_threads_all_reach_the_manifest_on_disk(tmp_path):
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unguarded write races
    try:
        _mark_from_two_threads(tmp_path)
    finally:
        sys.setswitchinterval(interval)


def _mark_from_two_threads(tmp_path):
    run = RunDir.create(tmp_path / "run", config={"name": "x"}, seeds={})
    markers = 300
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def mark(round_: int) -> None:
        start.wait()
        try:
            for i in range(markers):
                run.mark_done(round_, f"stage-{i}", candidates=i)
        except BaseException as e:  # a dict changed during serialization would land here
            errors.append(e)

    threads = [threading.Thread(target=mark, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    on_disk = RunDir(run.root).manifest["rounds"]
    assert {r: len(on_disk.get(str(r), {})) for r in (0, 1)} == {0: markers, 1: markers}
