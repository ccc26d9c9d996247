"""Rendered synthetic images: captchas, document pages, outdoor scenes, face crops (PIL ImageDraw)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = ("model data runtime target latency layer bundle report accuracy kernel tensor graph export "
         "calibration vector signal sample device memory channel output input batch weight table figure "
         "result method section value system network image audio").split()


def _font(size):
    return ImageFont.load_default(size=size)


def _color(rng, lo=0, hi=255):
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def captcha(text, rng, w=160, h=60):
    """Captcha-style text: tinted background, per-character jitter and rotation, noise lines and dots."""
    img = Image.new("RGB", (w, h), _color(rng, 200, 256))
    x = rng.integers(4, 14)
    for ch in text:
        size = int(rng.integers(26, 36))
        tile = Image.new("RGBA", (size + 8, size + 12), (0, 0, 0, 0))
        ImageDraw.Draw(tile).text((4, 0), ch, font=_font(size), fill=_color(rng, 0, 120) + (255,))
        tile = tile.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR, expand=True)
        img.paste(tile, (int(x), int(rng.integers(0, max(1, h - tile.height)))), tile)
        x += size * rng.uniform(0.55, 0.8)
    d = ImageDraw.Draw(img)
    for _ in range(3):
        d.line([tuple(rng.integers(0, (w, h))) for _ in range(2)], fill=_color(rng, 60, 200), width=2)
    for _ in range(60):
        d.point(tuple(rng.integers(0, (w, h))), fill=_color(rng))
    return img


def _text_line(d, rng, x, y, width, size, fill=(20, 20, 20)):
    words, text = [], ""
    while _font(size).getlength(text) < width * rng.uniform(0.6, 1.0):
        words.append(str(rng.choice(WORDS)))
        text = " ".join(words)
    d.text((x, y), text, font=_font(size), fill=fill)


def page(rng, w=608, h=800):
    """A document page: header, title, paragraphs, a figure with caption, a table, a footer."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    m, y = 40, 30
    _text_line(d, rng, m, y, w / 3, 10, (90, 90, 90))
    y += 30
    d.text((m, y), " ".join(rng.choice(WORDS, 3)).title(), font=_font(22), fill=(0, 0, 0))
    y += 50
    while y < h - 80:
        block = rng.choice(["para", "para", "figure", "table"])
        if block == "para":
            for _ in range(rng.integers(3, 8)):
                _text_line(d, rng, m, y, w - 2 * m, 11)
                y += 16
        elif block == "figure" and y + 180 < h - 60:
            fw, fh = int(rng.uniform(0.4, 0.8) * (w - 2 * m)), int(rng.uniform(100, 160))
            x0 = (w - fw) // 2
            d.rectangle([x0, y, x0 + fw, y + fh], outline=(0, 0, 0))
            pts = [(x0 + i * fw / 20, y + fh - fh * (0.1 + 0.8 * rng.random())) for i in range(21)]
            d.line(pts, fill=_color(rng, 0, 200), width=2)
            y += fh + 8
            _text_line(d, rng, x0, y, fw, 10, (60, 60, 60))
            y += 16
        elif block == "table" and y + 140 < h - 60:
            rows, cols = rng.integers(4, 7), rng.integers(3, 6)
            cw, rh = (w - 2 * m) // cols, 20
            for r in range(rows + 1):
                d.line([(m, y + r * rh), (m + cols * cw, y + r * rh)], fill=(0, 0, 0))
            for c in range(cols + 1):
                d.line([(m + c * cw, y), (m + c * cw, y + rows * rh)], fill=(0, 0, 0))
            for r in range(rows):
                for c in range(cols):
                    d.text((m + c * cw + 4, y + r * rh + 4), f"{rng.uniform(0, 100):.2f}", font=_font(10), fill=(0, 0, 0))
            y += rows * rh + 10
        y += 14
    _text_line(d, rng, w / 2 - 40, h - 30, 80, 10, (90, 90, 90))
    return img


def scene(rng, w=320, h=240):
    """An outdoor scene: sky gradient, sun, hills, houses, trees and a few people-like figures."""
    top, bottom = np.array(_color(rng, 60, 200)), np.array(_color(rng, 150, 256))
    grad = np.linspace(0, 1, h)[:, None, None] * (bottom - top) + top
    img = Image.fromarray(np.repeat(grad, w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    sx, sy, r = rng.integers(0, w), rng.integers(0, h // 3), rng.integers(10, 30)
    d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 230, 120))
    horizon = int(h * rng.uniform(0.45, 0.7))
    d.polygon([(0, h)] + [(x, horizon - 30 * np.sin(x / w * np.pi * rng.uniform(1, 3))) for x in range(0, w + 1, 16)]
              + [(w, h)], fill=_color(rng, 30, 140))
    for _ in range(rng.integers(1, 5)):
        x, s = rng.integers(0, w - 40), rng.integers(25, 60)
        d.rectangle([x, horizon - s, x + s, horizon], fill=_color(rng, 100, 230))
        d.polygon([(x - 5, horizon - s), (x + s // 2, horizon - s - s // 2), (x + s + 5, horizon - s)], fill=_color(rng, 80, 180))
    for _ in range(rng.integers(0, 6)):
        x, s = rng.integers(0, w), rng.integers(20, 50)
        d.rectangle([x - 3, horizon - s // 2, x + 3, horizon + 5], fill=(90, 60, 30))
        d.ellipse([x - s // 2, horizon - s, x + s // 2, horizon - s // 3], fill=(30, int(rng.integers(90, 160)), 40))
    for _ in range(rng.integers(0, 4)):
        x, s = rng.integers(10, w - 10), rng.integers(30, 80)
        skin = (int(rng.integers(150, 240)), int(rng.integers(100, 190)), int(rng.integers(80, 160)))
        d.ellipse([x - s // 6, horizon - s, x + s // 6, horizon - s + s // 3], fill=skin)
        d.rectangle([x - s // 5, horizon - s + s // 3, x + s // 5, horizon], fill=_color(rng))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def face(rng, size=48, is_face=True):
    """A face crop (skin oval, eyes, brows, nose, mouth) or, if not is_face, a crop of a scene."""
    if not is_face:
        return scene(rng, 96, 96).resize((size, size), Image.BILINEAR)
    img = Image.new("RGB", (size * 2, size * 2), _color(rng, 40, 220))
    d = ImageDraw.Draw(img)
    s = size * 2
    skin = (int(rng.integers(150, 240)), int(rng.integers(100, 190)), int(rng.integers(80, 160)))
    dx, dy = rng.integers(-6, 7, 2)
    d.ellipse([s * 0.18 + dx, s * 0.08 + dy, s * 0.82 + dx, s * 0.95 + dy], fill=skin)
    for ex in (0.36, 0.64):
        cx, cy = s * ex + dx, s * 0.42 + dy
        d.ellipse([cx - 6, cy - 4, cx + 6, cy + 4], fill=(250, 250, 250))
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(40, 30, 20))
        d.line([(cx - 8, cy - 10), (cx + 8, cy - 11)], fill=(60, 40, 30), width=3)
    d.line([(s / 2 + dx, s * 0.45 + dy), (s / 2 - 4 + dx, s * 0.62 + dy)], fill=(120, 80, 60), width=2)
    d.arc([s * 0.38 + dx, s * 0.66 + dy, s * 0.62 + dx, s * 0.8 + dy], 10, 170, fill=(150, 50, 50), width=3)
    return img.filter(ImageFilter.GaussianBlur(1)).resize((size, size), Image.BILINEAR)
