"""docs/api.md documents every route the server registers and every launch flag, and is what
`python -m tools.api_docs` generates from the code now (so a new route, flag or help text fails here
until the file is regenerated)."""

from __future__ import annotations

import dataclasses

from serving.server_args import ServerArgs
from tests.conftest import REPO
from tools import api_docs

API_MD = REPO / "docs" / "api.md"
STALE = f"docs/api.md is stale: regenerate it with `{api_docs.REGENERATE}` (from the repository root)."


def test_every_route_and_flag_is_in_api_md():
    text = API_MD.read_text()
    missing = [path for path in api_docs.route_table() if f"| `{path}` |" not in text]
    missing += [name for field in dataclasses.fields(ServerArgs) for name in api_docs.flag_names(field)
                if f"`{name}`" not in text]
    assert not missing, f"undocumented in docs/api.md: {', '.join(missing)}. {STALE}"


def test_every_route_says_what_it_does():
    bare = [path for path, operations in api_docs.route_table().items()
            if not api_docs.route_description(path, operations)]
    assert not bare, (f"routes without a description: {', '.join(bare)}; add a line to ROUTES in "
                      f"tools/api_docs.py (or a docstring to the handler), then `{api_docs.REGENERATE}`.")


def test_api_md_is_generated_from_the_code():
    assert API_MD.read_text() == api_docs.render(), STALE
