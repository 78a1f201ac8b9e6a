"""HTML reports and plots."""

from engramlab.report.html import Section, esc, key_values, render, table, write_report

__all__ = ["Section", "esc", "key_values", "render", "table", "write_report"]
