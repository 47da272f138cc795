"""Write RUN_DIR/report.html with plots of metrics.jsonl and the eval grids over time.

python scripts/report.py logs/aesthetic_20240101_120000
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignprop import cli
from alignprop.errors import ConfigError, writing
from alignprop.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"RUN_DIR {args.run_dir!r}: no such folder (give a run folder)")
    with writing(f"the report of {args.run_dir}", args.run_dir, "free space, then run it again"):
        print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
