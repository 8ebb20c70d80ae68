"""HTML reports built from saved results (a report reads `Result`s only)."""

from circuitlab.report.html import render_report, write_index, write_report

__all__ = ["render_report", "write_index", "write_report"]
