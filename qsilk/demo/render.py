"""Pictures for `qsilk compare`: a PNG writer, a bitmap font, a colour map and the grid layouts.

No imaging library is needed: PNG is zlib-compressed scanlines with CRCs (RFC 2083), written with
the standard library. Labels use a 5×7 bitmap font drawn here (upper case, digits, a few signs).
Arrays are ``(H, W, 3)`` uint8 tensors throughout.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

# 5×7 glyphs, one hex byte per row (bit 4 = leftmost column).
_FONT_HEX = {
    "A": "0E11111F111111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1E11111111111E",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "11110A04040404", "Z": "1F01020408101F",
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    " ": "00000000000000", ".": "00000000000C0C", ",": "000000000C0408", ":": "000C0C000C0C00",
    "=": "00001F001F0000", "-": "0000001F000000", "+": "0004041F040400", "%": "18190204081303",
    "(": "02040808080402", ")": "08040202020408", "/": "00010204081000", "_": "0000000000001F",
    "?": "0E110102040004", "<": "02040810080402", ">": "08040201020408", "*": "0004150E150400",
    "'": "04040800000000", ";": "000C0C000C0408", "|": "04040404040404", "#": "0A0A1F0A1F0A0A",
}
_GLYPHS: dict[str, torch.Tensor] = {}
for _ch, _hex in _FONT_HEX.items():
    _rows = bytes.fromhex(_hex.replace(" ", ""))
    _GLYPHS[_ch] = torch.tensor([[(r >> (4 - c)) & 1 for c in range(5)] for r in _rows], dtype=torch.bool)

GLYPH_W, GLYPH_H = 6, 8  # advance per character, line height (unscaled)


def text_size(text: str, scale: int = 2) -> tuple[int, int]:
    """``(width, height)`` in pixels of `text` drawn at `scale`."""
    return len(text) * GLYPH_W * scale, GLYPH_H * scale


def draw_text(canvas: torch.Tensor, text: str, y: int, x: int, colour=(20, 20, 20), scale: int = 2) -> None:
    """Draw `text` (upper-cased; unknown characters as '?') into `canvas` in place, clipped to it."""
    h, w = canvas.shape[:2]
    col = torch.tensor(colour, dtype=torch.uint8)
    for i, ch in enumerate(text.upper()):
        glyph = _GLYPHS.get(ch, _GLYPHS["?"])
        mask = glyph.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        gy, gx = y, x + i * GLYPH_W * scale
        y0, x0, y1, x1 = max(gy, 0), max(gx, 0), min(gy + mask.shape[0], h), min(gx + mask.shape[1], w)
        if y1 <= y0 or x1 <= x0:
            continue
        m = mask[y0 - gy:y1 - gy, x0 - gx:x1 - gx]
        canvas[y0:y1, x0:x1][m] = col


# -- PNG ------------------------------------------------------------------------------------
def encode_png(rgb: torch.Tensor) -> bytes:
    """PNG bytes of an ``(H, W, 3)`` uint8 image (8-bit truecolour).

    Each scanline gets the filter (None, Sub, Up, Average or Paeth; RFC 2083 §6) with the smallest
    sum of |filtered byte| (as signed), the usual heuristic; zlib level 9.
    """
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs (H, W, 3) uint8 (got {tuple(rgb.shape)} {rgb.dtype})")
    h, w, _ = rgb.shape
    raw = _filter_rows(rgb.contiguous().reshape(h, w * 3))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9)) + chunk(b"IEND", b""))


def _filter_rows(rows: torch.Tensor, bpp: int = 3) -> torch.Tensor:
    """``(H, N)`` uint8 scanlines → ``(H, N+1)`` with the per-row best PNG filter type byte prepended."""
    x = rows.to(torch.int16)
    a = torch.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]  # left
    b = torch.zeros_like(x)
    b[1:] = x[:-1]  # up
    c = torch.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]  # up-left
    p = a + b - c
    pa, pb, pc = (p - a).abs(), (p - b).abs(), (p - c).abs()
    paeth = torch.where((pa <= pb) & (pa <= pc), a, torch.where(pb <= pc, b, c))
    candidates = torch.stack([x, x - a, x - b, x - (a + b) // 2, x - paeth]) % 256  # (5, H, N)
    signed = torch.where(candidates > 127, 256 - candidates, candidates).sum(dim=2)  # (5, H)
    best = signed.argmin(dim=0)  # (H,)
    chosen = candidates.gather(0, best.view(1, -1, 1).expand(1, *x.shape))[0]
    return torch.cat([best.view(-1, 1), chosen], dim=1).to(torch.uint8)


def write_png(path: str | Path, rgb: torch.Tensor) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return path


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


# -- colour map -----------------------------------------------------------------------------
_CMAP = torch.tensor([[0.05, 0.03, 0.20], [0.20, 0.22, 0.56], [0.10, 0.50, 0.56],
                      [0.36, 0.74, 0.36], [0.98, 0.90, 0.15]])


def colormap(values: torch.Tensor, vmin: float = 0.0, vmax: float = 1.0) -> torch.Tensor:
    """``(H, W)`` → ``(3, H, W)`` RGB in [0, 1]: dark blue (vmin) … yellow (vmax), piecewise linear."""
    t = ((values.float().cpu() - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1) * (len(_CMAP) - 1)
    lo = t.floor().long().clamp(max=len(_CMAP) - 2)
    frac = (t - lo)[..., None]
    rgb = _CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac
    return rgb.permute(2, 0, 1)


def downscale_area(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(C, h, w)`` → ``(C, H, W)`` by area averaging (full images shown smaller in the grid)."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    return F.interpolate(img[None].float(), size=size, mode="area")[0]


def upscale_nearest(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(C, h, w)`` → ``(C, H, W)`` by nearest neighbour (maps keep their latent pixels visible)."""
    return F.interpolate(img[None].float(), size=size, mode="nearest")[0]


# -- crops ----------------------------------------------------------------------------------
def pick_crop(images: list[torch.Tensor], size: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the ``(ch, cw)`` window where the images differ most from the first one.

    Difference = box-filtered mean |ΔRGB| over the window; identical images → the centre.
    """
    _, h, w = images[0].shape
    ch, cw = min(size[0], h), min(size[1], w)
    diff = torch.zeros(h, w)
    for other in images[1:]:
        diff = torch.maximum(diff, (other.float().cpu() - images[0].float().cpu()).abs().mean(0))
    if float(diff.max()) == 0.0:
        return (h - ch) // 2, (w - cw) // 2
    stride = max(1, min(ch, cw) // 8)
    score = F.avg_pool2d(diff[None, None], (ch, cw), stride=stride)[0, 0]
    sy, sx = divmod(int(score.flatten().argmax()), score.shape[1])
    return min(sy * stride, h - ch), min(sx * stride, w - cw)


def crop_zoom(image: torch.Tensor, y: int, x: int, size: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """The ``(ch, cw)`` crop at (y, x), enlarged to `out` by nearest neighbour (pixels stay pixels)."""
    return upscale_nearest(image[:, y:y + size[0], x:x + size[1]], out)


def outline(image: torch.Tensor, y: int, x: int, size: tuple[int, int], colour=(1.0, 0.15, 0.6),
            width: int = 3) -> torch.Tensor:
    """A copy of ``(3, H, W)`` with a rectangle outline drawn around the ``(ch, cw)`` crop."""
    img = image.clone().float()
    c = torch.tensor(colour)[:, None, None]
    y1, x1 = y + size[0], x + size[1]
    img[:, y:y + width, x:x1] = c
    img[:, max(y1 - width, 0):y1, x:x1] = c
    img[:, y:y1, x:x + width] = c
    img[:, y:y1, max(x1 - width, 0):x1] = c
    return img


# -- layouts --------------------------------------------------------------------------------
def layout(cells: list[list[torch.Tensor]], col_labels: list[str], row_labels: list[str], *,
           title: str = "", gap: int = 6, scale: int = 2) -> torch.Tensor:
    """Place ``(3, h, w)`` cells (all the same size) in a labelled grid on a white canvas.

    Returns ``(H, W, 3)`` uint8. Column labels go above the first row, each row gets its label
    above it, the title (if any; lines split at newlines) on top.
    """
    rows, cols = len(cells), len(cells[0])
    ch, cw = cells[0][0].shape[1:]
    line = GLYPH_H * scale + 4
    title_lines = title.split("\n") if title else []
    top = line * len(title_lines) + (4 if title_lines else 0) + line
    height = top + rows * (line + ch + gap) + gap
    width = gap + cols * (cw + gap)
    canvas = torch.full((height, width, 3), 255, dtype=torch.uint8)
    ts = _common_scale(title_lines, width - gap, scale)
    for k, text in enumerate(title_lines):
        draw_text(canvas, _fit(text, width - gap, ts), 2 + k * line + (scale - ts) * GLYPH_H // 2, gap, scale=ts)
    ls = _common_scale(col_labels, cw, scale)
    for j, label in enumerate(col_labels):
        draw_text(canvas, _fit(label, cw, ls), top - line + 2 + (scale - ls) * GLYPH_H // 2,
                  gap + j * (cw + gap), scale=ls)
    for i, row in enumerate(cells):
        y = top + i * (line + ch + gap)
        draw_text(canvas, row_labels[i], y + 2, gap, colour=(90, 90, 90), scale=scale)
        for j, cell in enumerate(row):
            x = gap + j * (cw + gap)
            canvas[y + line:y + line + ch, x:x + cw] = to_uint8(cell)
    return canvas


def _common_scale(texts: list[str], width: int, scale: int) -> int:
    """`scale` if every text fits in `width`, else 1 (one size per block of labels)."""
    return scale if all(text_size(t, scale)[0] <= width for t in texts) else 1


def _fit(text: str, width: int, scale: int) -> str:
    n = max(1, width // (GLYPH_W * scale))
    return text if len(text) <= n else text[: n - 1] + "."
