"""Every command explains itself (`--help` with an example, `--version`), and every table the terminal
prints stays within 80 columns without cutting the numbers a reader came for."""

from __future__ import annotations

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from circuitlab import __version__
from circuitlab.cli import app
from circuitlab.report.terminal import print_result, records_table, summary_table
from circuitlab.results import Result

runner = CliRunner()
WIDTH = 80


def _command_paths() -> list[list[str]]:
    """[[], ["eval"], ["tasks"], ["tasks", "show"], ...]: every command and sub-command of the app."""
    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        paths.append(path)
        # Duck-typed: typer ships its own copy of click, so isinstance(click.Group) does not hold.
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


COMMANDS = _command_paths()


def test_every_command_is_found():
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "eval", "patch", "demo", "tasks", "tasks show"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "circuitlab")
def test_help_exits_0_with_an_example(path):
    res = runner.invoke(app, [*path, "--help"], terminal_width=WIDTH)
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output
    assert any(line.strip().startswith("Example") for line in res.output.splitlines()), res.output
    assert max(map(len, res.output.splitlines())) <= WIDTH


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"circuitlab {__version__}"


# --- 80-column tables -----------------------------------------------------------------------------------
def _render(renderable: object) -> list[str]:
    console = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def _fits(lines: list[str]) -> None:
    too_long = [line for line in lines if len(line) > WIDTH]
    assert not too_long, "\n".join(too_long)


LONG_PROMPT = ("When Mary and John went to the store on a long and sunny afternoon in late September, "
               "John gave a drink to")
PATCH_SUMMARY = {
    "site": "resid_pre", "by": "layer,pos", "direction": "denoise", "metric": "logit_diff", "n_cells": 480,
    "n_prompts": 8, "clean_mean": 3.123456789, "corrupt_mean": -2.987654321,
    "max_abs_cell": {"layer": 12, "pos": 14, "head": None, "value": 0.9312345},
    "timing_s": 14.2345, "forward_passes": 123456, "rows_per_pass": 256, "peak_memory_mib": 1234.5678,
    "a_rather_long_summary_key_name_for_a_statistic": 0.000123456, "prompts": [LONG_PROMPT] * 3,
    "note": LONG_PROMPT,
}


def test_summary_table_fits_80_columns():
    lines = _render(summary_table(PATCH_SUMMARY, "patch: summary"))
    _fits(lines)
    text = "\n".join(lines)
    for value in ("3.123", "-2.988", "0.9312", "480", "123456", "1235", "0.0001235", "max_abs_cell.layer",
                  "a_rather_long_summary_key_name_for_a_statistic"):
        assert value in text, value
    assert "September," in text and "drink to" in text  # long text wraps; it is not cut
    assert "max_abs_cell.head" not in text  # an unset nested entry is not a row


def _records(n_columns: int) -> list[dict]:
    rows = []
    for i in range(30):
        row = {"example": i, "clean": LONG_PROMPT, "corrupt": LONG_PROMPT.replace("John gave", "Mary gave"),
               "answer": " Mary", "wrong": " John", "value": (i - 10) * 1.234567}
        row.update({f"extra_statistic_{k}": k * 0.5 for k in range(n_columns)})
        rows.append(row)
    return rows


@pytest.mark.parametrize("n_columns", [0, 4, 20])
def test_records_table_fits_80_columns_and_keeps_values(n_columns):
    table = records_table(_records(n_columns), "eval: 10 of 30 records (largest |value| first)")
    lines = _render(table)
    _fits(lines)
    text = "\n".join(lines)
    # The largest |value| rows come first and their values are printed whole.
    for value in ("23.46", "22.22", "20.99", "-12.35"):
        assert value in text, value
    assert "…" in text or "..." in text  # the long prompts are shortened, visibly


def test_records_table_with_explicit_wide_columns_fits():
    columns = ["clean", "corrupt", "answer", "wrong", "example", "value"]
    lines = _render(records_table(_records(0), "wide", columns=columns))
    _fits(lines)
    assert "23.46" in "\n".join(lines)


def test_print_result_fits_80_columns():
    result = Result("patch", {"spec": "smollm2-135m"}, {"name": "ioi", "n": 8}, {}, _records(8),
                    summary=PATCH_SUMMARY)
    console = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    print_result(result, console)
    lines = console.export_text().splitlines()
    _fits(lines)
    assert "23.46" in "\n".join(lines)
