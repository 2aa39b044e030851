"""mkdocs hook: the pages link repository files outside docs/ (the evaluate stage's figures under
data/, for instance) by their relative path, so the links work on GitHub too. mkdocs only serves
files under docs/, so each such file that exists is added to the site under _repo/ and the link is
rewritten to it; a link to a repository file that does not exist stays as it is and mkdocs reports it."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
PREFIX = "_repo"
LINK = re.compile(r"(\]\()((?:\.\./)+[^)\s#]+)")


def _outside(page_uri: str, target: str) -> str | None:
    """The repository path of a link that leaves docs/ and names an existing file, else None."""
    path = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_uri), target))
    if path.startswith("docs/") or path.startswith("..") or not (REPO / path).is_file():
        return None
    return path


def on_files(files, config):
    added = set()
    for page in files.documentation_pages():
        for match in LINK.finditer(Path(page.abs_src_path).read_text(encoding="utf-8")):
            path = _outside(page.src_uri, match.group(2))
            if path and path not in added:
                added.add(path)
                files.append(File.generated(config, f"{PREFIX}/{path}", abs_src_path=str(REPO / path)))
    return files


def on_page_markdown(markdown, page, config, files):
    def rewrite(match):
        path = _outside(page.file.src_uri, match.group(2))
        if path is None:
            return match.group(0)
        up = "../" * page.file.src_uri.count("/")
        return f"{match.group(1)}{up}{PREFIX}/{path}"
    return LINK.sub(rewrite, markdown)
