"""Print, or write into docs/scaling.md, the multi-GPU scaling tables of mythos_rt.costmodel.

    .venv/bin/python scripts/scaling_table.py            # print the tables
    .venv/bin/python scripts/scaling_table.py --write    # refresh docs/scaling.md

The tables are arithmetic on the presets (no device); tests/bench/test_costmodel.py
fails when the committed copy differs from what the code generates.
"""

import argparse
import pathlib
import re
import sys

from mythos_rt import costmodel

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED[^\n]*-->\n)(.*?)(<!-- END GENERATED -->)", re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"replace the tables in {DOC.name}")
    args = ap.parse_args(argv)
    tables = costmodel.scaling_markdown()
    if not args.write:
        sys.stdout.write(tables)
        return 0
    text = DOC.read_text()
    if not BLOCK.search(text):
        sys.exit(f"{DOC}: no '<!-- BEGIN GENERATED ... -->' / '<!-- END GENERATED -->' block")
    DOC.write_text(BLOCK.sub(lambda m: m.group(1) + tables + m.group(3), text, count=1))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
