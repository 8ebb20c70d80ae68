"""A run directory is replaced whole or not at all: staging, swap, --force, lock, leftovers, kill -9, umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from circuitlab.errors import OutputError
from circuitlab.runner.rundir import MARKER, RunDirectory


def write_run(out: Path, files: dict[str, str], *, force: bool = False) -> None:
    with RunDirectory(out, force=force) as rd:
        for name, text in files.items():
            (rd.path / name).write_text(text)


def hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_new_directory_appears_whole_with_marker(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"results.json": "{}", "a.png": "x"})
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "results.json", "a.png"])
    assert hidden_siblings(out) == []  # no staging, old copy or lock left behind


def test_occupied_out_needs_force_and_force_replaces_whole(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"results.json": "old", "old.png": "x"})
    with pytest.raises(OutputError, match="--force"):
        RunDirectory(out)
    assert (out / "results.json").read_text() == "old"
    write_run(out, {"results.json": "new"}, force=True)
    assert (out / "results.json").read_text() == "new"
    assert not (out / "old.png").exists()  # replaced whole: nothing of the old run survives
    assert hidden_siblings(out) == []


@pytest.mark.parametrize("force", [False, True])
def test_directory_of_other_files_is_never_replaced(tmp_path, force):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a circuitlab run"):
        RunDirectory(out, force=force)
    assert (out / "thesis.tex").read_text() == "precious"


def test_empty_existing_directory_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_run(out, {"results.json": "{}"})
    assert (out / "results.json").exists()


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        RunDirectory(blocker)
    with pytest.raises(OutputError, match="is a file"):
        RunDirectory(blocker / "sub")


def test_error_inside_keeps_old_run_and_removes_staging(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"results.json": "old"})
    with pytest.raises(RuntimeError), RunDirectory(out, force=True) as rd:
        (rd.path / "results.json").write_text("half")
        raise RuntimeError("computation failed")
    assert (out / "results.json").read_text() == "old"
    assert hidden_siblings(out) == []


def test_second_writer_gets_a_clear_error(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out) as first:
        (first.path / "results.json").write_text("1")
        with pytest.raises(OutputError, match="another circuitlab run"), RunDirectory(out):
            pass
    assert (out / "results.json").read_text() == "1"


def test_leftovers_of_killed_runs_are_cleaned_and_a_half_swapped_run_restored(tmp_path):
    out = tmp_path / "run"
    write_run(out, {"results.json": "old"})
    (tmp_path / ".run.staging-dead1").mkdir()
    (tmp_path / ".run.staging-dead1" / "results.json").write_text("partial")
    write_run(out, {"results.json": "new"}, force=True)
    assert hidden_siblings(out) == []
    # killed between the two renames of the fallback swap: out is gone, the old run is hidden
    os.rename(out, tmp_path / ".run.old-abc")
    write_run(tmp_path / "other", {"results.json": "unrelated"})
    with pytest.raises(OutputError, match="--force"), RunDirectory(out):
        pass  # the restored old run is a run: without --force it is kept
    assert (out / "results.json").read_text() == "new"


def test_files_follow_the_umask(tmp_path):
    from circuitlab.atomic import write_text_atomically

    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        write_run(out, {"a.txt": "x"})
        path = write_text_atomically(out / "b.json", "{}")
        assert oct(path.stat().st_mode & 0o777) == oct(0o640)
        assert oct(out.stat().st_mode & 0o777) == oct(0o750)
    finally:
        os.umask(old)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from circuitlab.runner.rundir import RunDirectory
    out = Path(sys.argv[1])
    with RunDirectory(out, force=True) as rd:
        print("started", flush=True)
        for i in range(40):
            (rd.path / f"part{i}.txt").write_text("new")
            time.sleep(0.005)
        (rd.path / "results.json").write_text("new")
        print("committing", flush=True)
    print("done", flush=True)
    time.sleep(5)
""")


@pytest.mark.parametrize("wait_for,delay", [("started", 0.0), ("started", 0.1), ("committing", 0.0),
                                            ("committing", 0.002), ("done", 0.0)])
def test_kill_9_at_any_moment_leaves_old_or_new_run_whole(tmp_path, wait_for, delay):
    out = tmp_path / "run"
    write_run(out, {"results.json": "old", "old.txt": "old"})
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while (line := proc.stdout.readline().strip()) != wait_for:
        assert line, f"writer ended before printing {wait_for!r}"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = {p.name for p in out.iterdir()}
    if (out / "results.json").read_text() == "old":
        assert names == {MARKER, "results.json", "old.txt"}
    else:
        assert names == {MARKER, "results.json", *(f"part{i}.txt" for i in range(40))}
    write_run(out, {"results.json": "next"}, force=True)  # the next run cleans whatever was left
    assert hidden_siblings(out) == []
