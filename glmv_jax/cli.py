"""Command-line parsers whose --help shows the module docstring whole (summary, usage lines, notes)."""

from __future__ import annotations

import argparse


def doc_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser for `prog` whose description is `doc` as written (line breaks and indents kept)."""
    return argparse.ArgumentParser(prog=prog, description=doc.strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
