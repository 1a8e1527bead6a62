"""Keyword options <-> launch variables.

Every option a meshpost node takes can be given as a keyword argument or through the
environment variable it maps to; keywords win. The list comes from the C++ option table
(``meshpost::OptionTable()``, the one source that also generates docs/configuration.md's
tables); validation happens in the C++ core too, so error messages name both the option
and its variable.

``python -m meshpost.options_doc --write-docs docs/configuration.md`` regenerates the
doc's tables from the table; ``--check-docs`` fails when they differ.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

from . import _meshpost


class OptionSpec(NamedTuple):
    """One launch variable: its Python keyword ("" for none), table group, default,
    accepted values (for "ignored" rows: why meshpost ignores it) and meaning."""

    variable: str
    keyword: str
    group: str
    default: str
    valid: str
    meaning: str


OPTION_TABLE: List[OptionSpec] = [OptionSpec(*row) for row in _meshpost.option_table()]

# keyword -> environment variable (see docs/python.md and docs/configuration.md)
OPTION_VARIABLES: Dict[str, str] = {o.keyword: o.variable for o in OPTION_TABLE if o.keyword}

GROUPS = ("launch", "meshpost", "rdma", "ignored")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def build_env(role: Optional[str], options: Mapping[str, Any],
              environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The variables a node of `role` sees: `environ` (default os.environ) plus `options`.

    Raises meshpost.InvalidTypeError for an unknown keyword.
    """
    from .errors import InvalidTypeError

    env = dict(os.environ if environ is None else environ)
    for name, value in options.items():
        if name not in OPTION_VARIABLES:
            raise InvalidTypeError(
                f"unknown option {name}={value!r}; expected one of "
                f"{', '.join(sorted(OPTION_VARIABLES))}")
        if value is None:
            continue
        env[OPTION_VARIABLES[name]] = _text(value)
        if name == "instance" and "gpu" not in options:
            # The keyword names this process's place in its group: the rank counts
            # STEPMESH_GPU, so a lone `instance=` sets both (StepMesh keeps them equal).
            env["STEPMESH_GPU"] = _text(value)
    if role is not None:
        env["DMLC_ROLE"] = role
    return env


def doc_block(group: str) -> str:
    """The generated markdown of one group, with the markers docs/configuration.md uses."""
    return (f"<!-- options:{group} -->\n{_meshpost.option_table_markdown(group)}"
            f"<!-- /options:{group} -->")


def rewrite_doc(doc: str) -> str:
    for group in GROUPS:
        start, end = f"<!-- options:{group} -->", f"<!-- /options:{group} -->"
        i, j = doc.find(start), doc.find(end)
        if i < 0 or j < i:
            raise ValueError(f"the doc has no '{start}' ... '{end}' block")
        doc = doc[:i] + doc_block(group) + doc[j + len(end):]
    return doc
