"""MkDocs hook: links from the docs to files of the repository outside docs/.

The pages link to `../deploy/kubernetes/`, `../compose.yaml` and the like, relative
links that work when the Markdown is read on a forge. On the site, the files they name
are copied under `repo/` and the links point there. A folder's README becomes its page,
followed by the list of its files; a folder without one gets a page listing them. A
link to a path that does not exist in the repository is a warning, so
`mkdocs build --strict` fails on it as on any broken link.

The copied READMEs are not ours: a link in one to a file that is not copied loses its
target (its text stays) rather than failing the build.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repo_links")

# An inline link target that climbs out of the page's folder: ](../x) or ](../x#a)
_UP_LINK = re.compile(r"\]\((\.\./[^)\s#]*)(#[^)\s]*)?\)")
# Any inline link: [text](target#anchor)
_ANY_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s#]*)(#[^)\s]*)?\)")
SITE_FOLDER = "repo"  # where the repository's files go on the site
README = "README.md"

# Pages of copied folders whose README gets the folder's file list appended: uri -> names.
_listings: dict[str, list[str]] = {}


def _repo_path(page_uri: str, target: str) -> str | None:
    """The repository path a docs page's link names, or None if it stays inside docs/."""
    inside_docs = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
    if not inside_docs.startswith("../"):
        return None
    path = posixpath.normpath(inside_docs.removeprefix("../"))
    return path + ("/" if target.endswith("/") else "")


def _exists(root: Path, path: str) -> bool:
    return not path.startswith("../") and (root / path).exists()


def _file_list(names: list[str]) -> str:
    return "\n".join(f"- [`{name}`]({name})" for name in names) + "\n"


def on_files(files: Files, config: Any) -> Files:
    """Copy every repository file or folder the pages link to into the site."""
    root = Path(config["config_file_path"]).parent
    _listings.clear()
    wanted: set[str] = set()
    for page in [f for f in files if f.is_documentation_page()]:
        text = Path(page.abs_src_path or "").read_text(encoding="utf-8")
        for match in _UP_LINK.finditer(text):
            path = _repo_path(page.src_uri, match[1])
            if path is not None and _exists(root, path):
                wanted.add(path.rstrip("/"))
    copied: set[str] = set()
    for path in sorted(wanted):
        source = root / path
        members = [source] if source.is_file() else sorted(source.rglob("*"))
        for member in (m for m in members if m.is_file()):
            relative = member.relative_to(root).as_posix()
            if relative not in copied:
                copied.add(relative)
                files.append(_copy(config, relative, member))
        if source.is_dir():
            names = [m.relative_to(source).as_posix() for m in members if m.is_file()]
            names = [n for n in names if n != README]
            if (source / README).is_file():
                _listings[f"{SITE_FOLDER}/{path}/{README}"] = names
            else:
                title = f"# `{path}/`\n\nThe files of the repository's `{path}/` folder:\n\n"
                files.append(
                    File.generated(
                        config,
                        f"{SITE_FOLDER}/{path}/index.md",
                        content=title + _file_list(names),
                        inclusion=InclusionLevel.NOT_IN_NAV,
                    )
                )
    return files


def _copy(config: Any, relative: str, source: Path) -> File:
    uri = f"{SITE_FOLDER}/{relative}"
    # A Markdown file (a README) becomes a page of the site, not in the nav.
    inclusion = InclusionLevel.NOT_IN_NAV if uri.endswith(".md") else InclusionLevel.INCLUDED
    return File.generated(config, uri, abs_src_path=str(source), inclusion=inclusion)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links to repository files at their copies; warn about missing ones."""
    root = Path(config["config_file_path"]).parent
    uri = page.file.src_uri
    if uri.startswith(f"{SITE_FOLDER}/"):
        return _copied_page(markdown, uri, files)

    def rewrite(match: re.Match[str]) -> str:
        target, anchor = match[1], match[2] or ""
        path = _repo_path(uri, target)
        if path is None:
            return match[0]
        if not _exists(root, path):
            log.warning("%s links to %s, which is not in the repository", uri, path)
            return match[0]
        site_uri = f"{SITE_FOLDER}/{path.rstrip('/')}"
        if (root / path).is_dir():
            has_readme = (root / path / README).is_file()
            site_uri += f"/{README}" if has_readme else "/index.md"
        here = posixpath.dirname(uri) or "."
        return f"]({posixpath.relpath(site_uri, here)}{anchor})"

    return _UP_LINK.sub(rewrite, markdown)


def _copied_page(markdown: str, uri: str, files: Files) -> str:
    """A copied README: links to docs pages and copied files kept, others made text."""
    here = posixpath.dirname(uri)

    def rewrite(match: re.Match[str]) -> str:
        text, target, anchor = match[1], match[2], match[3] or ""
        if not target or "://" in target or target.startswith("mailto:"):
            return match[0]
        site_uri = posixpath.normpath(posixpath.join(here, target))
        repo_path = site_uri.removeprefix(f"{SITE_FOLDER}/")
        if repo_path.startswith("docs/"):  # a docs page, where the site has it
            doc_uri = repo_path.removeprefix("docs/")
            if files.get_file_from_path(doc_uri) is not None:
                return f"[{text}]({posixpath.relpath(doc_uri, here)}{anchor})"
        elif files.get_file_from_path(site_uri) is not None:
            return match[0]
        return text

    listing = _listings.get(uri)
    extra = f"\n\n## Files\n\n{_file_list(listing)}" if listing else ""
    return _ANY_LINK.sub(rewrite, markdown) + extra
