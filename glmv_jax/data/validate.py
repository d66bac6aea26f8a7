"""Check manifests before training: every record parsed as the pipeline parses it, every image checked.

    python -m glmv_jax.data.validate examples/own_data/sft.jsonl [more.jsonl ...] [--data-root DIR]
        [--max-image-pixels N] [--header-only] [--show 20]

Per record: UTF-8 and JSON, the fields of its kind, placeholders (records.parse_record), image paths
inside the manifest's folder or --data-root, and each image file: found, within the pixel limit (read from
the header, before decoding), decodable (skipped with --header-only). Prints the bad records per reason
and the first ones (manifest:line (id=...), reason, message); exit code 1 when any record is bad, 2 when
a manifest cannot be read. Not checked here: token lengths and patch budgets (they depend on the stage's
tokenizer, seq_len and patch_budget) and whether a kind suits the stage (rl records are prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from typing import Sequence

from glmv_jax.cli import doc_parser
from glmv_jax.data.image_files import MAX_IMAGE_PIXELS, check_image
from glmv_jax.data.records import BadRecord, BadRecordError, parse_record
from glmv_jax.data.sources import as_source, manifest_list


@dataclasses.dataclass
class Report:
    records: int = 0
    kinds: Counter = dataclasses.field(default_factory=Counter)     # good records per kind
    bad: list = dataclasses.field(default_factory=list)             # BadRecord, in manifest order

    def reasons(self) -> Counter:
        return Counter(b.reason for b in self.bad)


def check_element(element: dict, data_root: str | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS,
                  decode: bool = True) -> dict | BadRecord:
    """One raw source element -> its normalized record, or the BadRecord the pipeline would count."""
    try:
        record = parse_record(element, data_root)
        frames = record["video"]["frames"] if record["video"] else []
        for ref in record["images"] + frames:
            check_image(ref, record["where"], max_image_pixels, decode)
    except BadRecordError as e:
        return BadRecord(e.reason, e.where, e.message)
    return record


def validate(manifests: Sequence[str], data_root: str | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS,
             decode: bool = True) -> Report:
    """Every record of every manifest (JSONL or ArrayRecord) checked; FileNotFoundError for a missing one."""
    report = Report()
    for path in manifest_list(manifests):
        source = as_source(path)
        for i in range(len(source)):
            result = check_element(source[i], data_root, max_image_pixels, decode)
            report.records += 1
            if isinstance(result, BadRecord):
                report.bad.append(result)
            else:
                report.kinds[result["kind"]] += 1
    return report


def format_report(report: Report, show: int = 20) -> str:
    good = report.records - len(report.bad)
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(report.kinds.items()))
    lines = [f"{report.records} records: {good} ok" + (f" ({kinds})" if kinds else "") + f", {len(report.bad)} bad"]
    if report.bad:
        lines.append("bad records by reason:")
        lines += [f"  {reason}: {n}" for reason, n in sorted(report.reasons().items())]
        lines.append(f"first {min(show, len(report.bad))} bad records (manifest:line (id), reason, message):")
        lines += [f"  {b.where}  {b.reason}  {b.message}" for b in report.bad[:show]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = doc_parser("python -m glmv_jax.data.validate", __doc__)
    ap.add_argument("manifests", nargs="+", help="JSONL / ArrayRecord manifests (also comma-separated)")
    ap.add_argument("--data-root", default=None, help="image paths must resolve inside it (default: each "
                                                       "manifest's folder), as data.data_root")
    ap.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="as data.max_image_pixels")
    ap.add_argument("--header-only", action="store_true", help="read image headers only (no full decode)")
    ap.add_argument("--show", type=int, default=20, help="bad records listed")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = validate(args.manifests, args.data_root, args.max_image_pixels, decode=not args.header_only)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, args.show))
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
