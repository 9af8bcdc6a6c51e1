"""MkDocs hook: the docstrings write cross-references as Sphinx roles (:class:`~vtprune.engine.run.Run`),
which Markdown renders as the role's name followed by code. Keep the code, drop the role, and with a
leading ``~`` show the last dotted part only, as Sphinx would."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj):<code>(~?)([^<]+)</code>")


def _code(m: re.Match) -> str:
    name = m.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if m.group(1) else name}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(_code, html)
