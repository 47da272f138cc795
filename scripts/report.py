"""Write RUN_DIR/report.html with plots of metrics.jsonl and the eval grids over time.

python scripts/report.py logs/aesthetic_20240101_120000
"""

from __future__ import annotations

import argparse

from alignprop.report import write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))


if __name__ == "__main__":
    main()
