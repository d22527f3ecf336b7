#!/usr/bin/env python3
"""Checks that every relative link of the built book and of Markdown files resolves.

    python3 docs/check_links.py BOOK_DIR [FILE.md ...]

BOOK_DIR is mdBook's output (docs/book): every `href` and `src` in its HTML that is not an
absolute URL must name an existing file, and a `#fragment` must be an `id` (or `<a name>`) of
the HTML page it points to. Each Markdown file (README.md) is read as GitHub renders it: every
relative link target must exist in the repository (and not in BOOK_DIR, which a fresh clone does
not have), and a `#fragment` on a Markdown target must be one of GitHub's heading anchors there.
External links (http:, mailto:, ...) are not fetched: CI has no internet.

Prints each broken link and exits 1 when there is one. Only the standard library.
"""

import html.parser
import os
import re
import sys
import urllib.parse

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class Page(html.parser.HTMLParser):
    """The anchors a page defines, the links it makes, and its <base href>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids = set()
        self.links = []
        self.base = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "base" and attrs.get("href"):
            self.base = attrs["href"]
        for name in ("href", "src"):
            if attrs.get(name) is not None and tag != "base":
                self.links.append((self.getpos()[0], attrs[name]))


def is_external(target):
    return not target or target.startswith("//") or SCHEME.match(target) is not None


def parse_page(path, cache={}):
    if path not in cache:
        page = Page()
        with open(path, encoding="utf-8") as f:
            page.feed(f.read())
        cache[path] = page
    return cache[path]


def relative_links(path, links):
    """The relative links among `links` (`(line, target)` pairs of the file at `path`): each one's
    place for error messages (`path:line: target`), its parsed URL and its unquoted path."""
    for line, target in links:
        if is_external(target):
            continue
        url = urllib.parse.urlsplit(target)
        yield f"{os.path.relpath(path)}:{line}: {target}", url, urllib.parse.unquote(url.path)


def check_book(book):
    book = os.path.realpath(book)
    errors, count = [], 0
    for folder, _, files in os.walk(book):
        for name in sorted(files):
            if not name.endswith(".html"):
                continue
            path = os.path.join(folder, name)
            page = parse_page(path)
            # mdBook's 404 page resolves its links against <base href="/">: the book's root.
            start = folder
            if page.base is not None and page.base.startswith("/"):
                start = os.path.join(book, page.base.lstrip("/"))
            for where, url, rel in relative_links(path, page.links):
                count += 1
                dest = os.path.normpath(os.path.join(start, rel)) if rel else path
                if os.path.isdir(dest):
                    dest = os.path.join(dest, "index.html")
                if not os.path.isfile(dest):
                    errors.append(f"{where}: no file {os.path.relpath(dest)}")
                    continue
                if url.fragment and dest.endswith(".html"):
                    fragment = urllib.parse.unquote(url.fragment)
                    if fragment not in parse_page(dest).ids:
                        errors.append(f"{where}: no anchor #{fragment} in {os.path.relpath(dest)}")
    return errors, count


FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"`[^`]*`")


def markdown_lines(path):
    """(line number, text) of the lines outside code fences, inline code removed."""
    fence = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fence = not fence
                continue
            if not fence:
                yield number, line.rstrip("\n")


def github_anchors(path):
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors, seen = set(), {}
    for _, line in markdown_lines(path):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links: their text
        text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def check_markdown(path, book):
    book = os.path.realpath(book)
    errors, count, lines_blank = [], 0, {}
    folder = os.path.dirname(os.path.realpath(path))
    for number, line in markdown_lines(path):
        # A reference definition cannot interrupt a paragraph.
        after_blank = lines_blank.get(number - 1, True)
        line = CODE_SPAN.sub("", line)
        lines_blank[number] = not line.strip()
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        m = REFERENCE.match(line) if after_blank else None
        if m:
            targets.append(m.group(1))
        for where, url, rel in relative_links(path, [(number, t) for t in targets]):
            count += 1
            dest = os.path.normpath(os.path.join(folder, rel)) if rel else os.path.realpath(path)
            if dest == book or dest.startswith(book + os.sep):
                errors.append(f"{where}: points into the built book, which a clone does not have")
                continue
            if not os.path.exists(dest):
                errors.append(f"{where}: no file {os.path.relpath(dest)}")
                continue
            if url.fragment and dest.endswith(".md"):
                if url.fragment not in github_anchors(dest):
                    errors.append(f"{where}: no heading #{url.fragment} in {os.path.relpath(dest)}")
    return errors, count


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    book, markdown = argv[1], argv[2:]
    if not os.path.isfile(os.path.join(book, "index.html")):
        sys.exit(f"{book}: no index.html; build the book first")
    errors, count = check_book(book)
    for path in markdown:
        e, c = check_markdown(path, book)
        errors += e
        count += c
    for error in errors:
        print(f"broken link: {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} broken of {count} relative links", file=sys.stderr)
        return 1
    print(f"all {count} relative links resolve ({book} and {', '.join(markdown) or 'no Markdown'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
