"""A horizontal bar chart of speedups as a PNG, with no plotting dependency: matplotlib is used where
installed; otherwise a small built-in renderer (3x5 pixel font, zlib-compressed PNG) draws it, so the
GPU machine, which has no package registry, still produces the plot."""

from __future__ import annotations

import struct
import zlib

# 3x5 glyphs, one string of 5 rows of 3 bits each ('#' = ink).
_FONT = {
    "0": "####.##.##.####", "1": ".#.##..#..#.###", "2": "###..#####..###", "3": "###..####..####",
    "4": "#.##.####..#..#", "5": "####..###..####", "6": "####..####.####", "7": "###..#..#..#..#",
    "8": "####.#####.####", "9": "####.####..####", "A": ".#.#.#####.##.#", "B": "##.#.###.#.###.",
    "C": "####..#..#..###", "D": "##.#.##.##.###.", "E": "####..####..###", "F": "####..####..#..",
    "G": "####..#.##.####", "H": "#.##.#####.##.#", "I": "###.#..#..#.###", "J": "..#..#..##.####",
    "K": "#.##.###.#.##.#", "L": "#..#..#..#..###", "M": "#.########.##.#", "N": "##.#.##.##.##.#",
    "O": "####.##.##.####", "P": "####.#####..#..", "Q": "####.##.####..#", "R": "##.#.###.#.##.#",
    "S": "####..###..####", "T": "###.#..#..#..#.", "U": "#.##.##.##.####", "V": "#.##.##.##.#.#.",
    "W": "#.##.########.#", "X": "#.##.#.#.#.##.#", "Y": "#.##.#.#..#..#.", "Z": "###..#.#.#..###",
    "-": "......###......", ".": ".............#.", "_": "............###", ":": "....#.....#....",
    "x": "...#.#.#.#.#...", "/": "..#..#.#.#..#..", " ": "...............", "(": ".#.#..#..#...#.",
    ")": ".#...#..#..#.#.", "+": "....#.###.#....", "=": "...###...###...", "%": "#.#..#.#.#..#.#",
}


def _text(canvas, x0, y0, text, color, scale=2):
    for i, ch in enumerate(text):
        glyph = _FONT.get(ch if ch == "x" and text[max(0, i - 1)].isdigit() else ch.upper(), _FONT[" "])
        for r in range(5):
            for c in range(3):
                if glyph[r * 3 + c] == "#":
                    for dy in range(scale):
                        for dx in range(scale):
                            _px(canvas, x0 + (i * 4 + c) * scale + dx, y0 + r * scale + dy, color)


def _px(canvas, x, y, color):
    h, w = len(canvas), len(canvas[0]) // 3
    if 0 <= x < w and 0 <= y < h:
        canvas[y][3 * x:3 * x + 3] = bytes(color)


def _rect(canvas, x0, y0, x1, y1, color):
    for y in range(y0, y1):
        for x in range(x0, x1):
            _px(canvas, x, y, color)


def _write_png(path, canvas):
    h, w = len(canvas), len(canvas[0]) // 3
    raw = b"".join(b"\x00" + bytes(row) for row in canvas)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def speedup_chart(path: str, labels: list[str], values: list[float], title: str) -> None:
    """Bars of ``values`` (speedup over eager) with ``labels``; a line marks 1.0x."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(10, 0.25 * len(labels) + 1.5))
        ax.barh(range(len(values)), values, color=["#2a9d8f" if v >= 1 else "#e76f51" for v in values])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speedup over eager (x)")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    scale, row_h, label_w, bar_w = 2, 14, 8 * max((len(s) for s in labels), default=1) + 20, 500
    vmax = max([1.5, *[v for v in values if v == v]])
    width, height = label_w + bar_w + 80, 40 + row_h * len(labels) + 20
    white, ink, good, bad = (255, 255, 255), (30, 30, 30), (42, 157, 143), (231, 111, 81)
    canvas = [bytearray(white * width) for _ in range(height)]
    _text(canvas, 10, 10, title[: (width - 20) // 8], ink, scale)
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 40 + i * row_h
        _text(canvas, 10, y + 2, label, ink, scale)
        if v == v:  # not NaN
            _rect(canvas, label_w, y + 1, label_w + int(bar_w * min(v, vmax) / vmax), y + row_h - 3,
                  good if v >= 1 else bad)
            _text(canvas, label_w + int(bar_w * min(v, vmax) / vmax) + 6, y + 2, f"{v:.2f}x", ink, scale)
    one = label_w + int(bar_w / vmax)
    _rect(canvas, one, 36, one + 1, height - 10, ink)
    _write_png(path, canvas)
