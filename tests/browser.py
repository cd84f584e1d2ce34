"""Pages checked in a real browser: headless Chromium (Debian's `chromium`,
installed by ci/setup-host.sh) renders a local HTML file to a PNG and dumps
the DOM it parsed; parse_dom makes that DOM a tree to query, png_colours
reads the PNG back with zlib alone."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--hide-scrollbars")


def chromium() -> str:
    """The chromium binary; a missing one fails the test (never a skip)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run ci/setup-host.sh "
                    "(or apt-get install -y --no-install-recommends chromium)", pytrace=False)
    return path


def render_in_chromium(html_path, png_path, timeout: float = 120) -> str:
    """Screenshot html_path into png_path and return the DOM Chromium built from it."""
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="xenlab-chromium-") as profile:
        common = [chromium(), *CHROMIUM_ARGS, f"--user-data-dir={profile}"]
        shot = subprocess.run([*common, f"--screenshot={Path(png_path).resolve()}", url],
                              capture_output=True, text=True, timeout=timeout)
        if shot.returncode != 0 or not Path(png_path).is_file():
            pytest.fail(f"chromium --screenshot of {url} failed (exit {shot.returncode}):\n{shot.stderr[-3000:]}", pytrace=False)
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        if dom.returncode != 0 or "<html" not in dom.stdout:
            pytest.fail(f"chromium --dump-dom of {url} failed (exit {dom.returncode}):\n{dom.stderr[-3000:]}", pytrace=False)
    return dom.stdout


class Node:
    """An element; find_all(tag, class, name=value) matches data-name="value" attributes."""

    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], ""

    @property
    def classes(self) -> set:
        return set((self.attrs.get("class") or "").split())

    def find_all(self, tag=None, cls=None, **data):
        found = []
        for child in self.children:
            if ((tag is None or child.tag == tag) and (cls is None or cls in child.classes)
                    and all(child.attrs.get(f"data-{k.replace('_', '-')}") == v for k, v in data.items())):
                found.append(child)
            found.extend(child.find_all(tag, cls, **data))
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class _Tree(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self, html: str):
        super().__init__()
        self.root = self.node = Node("#root", {})
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, attrs, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.text += data


def parse_dom(html: str) -> Node:
    """The page's elements as a tree: our own markup or the DOM Chromium dumped."""
    return _Tree(html).root


def png_colours(png_path) -> Counter:
    """How many pixels of each colour ('#rrggbb') an 8-bit RGB or RGBA PNG has."""
    data = Path(png_path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{png_path} is not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and not interlace, f"unsupported PNG {header}"
    channels = 4 if colour_type == 6 else 3
    stride = width * channels
    raw = zlib.decompress(b"".join(idat))
    counts: Counter = Counter()
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        pixels = bytes(line)
        counts.update(pixels[i:i + 3] for i in range(0, stride, channels))
        previous = line
    return Counter({"#" + k.hex(): n for k, n in counts.items()})


def _unfilter(kind: int, line: bytearray, up: bytearray, bpp: int) -> None:
    n = len(line)
    if kind == 1:
        for i in range(bpp, n):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:
        for i in range(n):
            line[i] = (line[i] + up[i]) & 0xFF
    elif kind == 3:
        for i in range(n):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + up[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(n):
            a = line[i - bpp] if i >= bpp else 0
            b, c = up[i], (up[i - bpp] if i >= bpp else 0)
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    elif kind != 0:
        raise AssertionError(f"unknown PNG filter {kind}")
