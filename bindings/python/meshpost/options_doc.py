"""Regenerates (--write-docs) or checks (--check-docs) the option tables of
docs/configuration.md from the C++ option table:

    python -m meshpost.options_doc --write-docs docs/configuration.md
"""

from __future__ import annotations

import sys
from typing import List

from ._options import rewrite_doc


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("--write-docs", "--check-docs"):
        print("usage: python -m meshpost.options_doc --write-docs|--check-docs "
              "docs/configuration.md", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        doc = f.read()
    new = rewrite_doc(doc)
    if argv[0] == "--check-docs":
        if new != doc:
            print(f"{argv[1]}: option tables differ from the C++ option table; run "
                  f"python -m meshpost.options_doc --write-docs {argv[1]}", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        with open(argv[1], "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
