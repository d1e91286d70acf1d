#!/usr/bin/env python3
"""Writes N deterministic 640x480 JPEG "plate photos" for the seed-task benchmark.

    /root/venv/bin/python benches/seed_task/make_images.py --out /work/ckpt/images --count 12

Each is a noisy, textured background (a painted metal surface) with a light label carrying dark
text like a vehicle identification plate: serial number, engine number, model. Every image
differs (seed, label position, tilt of the lighting, text): the server caches vision output by
pixels, and a benchmark that hit that cache would not measure the vision tower.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

W, H = 640, 480
MODELS = ["SWIFT VXI", "ACTIVA 6G", "SPLENDOR+", "NEXON XZ", "PULSAR 150", "CRETA SX", "APACHE RTR"]


def font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except TypeError:
        return ImageFont.load_default()


def plate(i: int) -> Image.Image:
    rng = np.random.default_rng(1000 + i)
    # Background: a colour gradient whose direction varies, coarse blotches, fine sensor noise.
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / W + np.sin(angle) * y / H)[..., None]
    base = rng.uniform(40, 140, 3) + 60 * ramp * rng.uniform(-1, 1, 3)
    blotches = np.asarray(Image.fromarray(rng.integers(0, 255, (H // 16, W // 16), dtype=np.uint8))
                          .resize((W, H), Image.BICUBIC), dtype=np.float32)[..., None]
    img = base + 0.25 * (blotches - 128) + rng.normal(0, 12, (H, W, 3))
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    # The label: a light rectangle with a dark border, sized to fit three lines of text.
    d = ImageDraw.Draw(photo)
    serial = "MA3" + "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ0123456789"), 14))
    engine = "K" + "".join(rng.choice(list("0123456789ABCDEF"), 10))
    lines = [f"VEHICLE SR NO: {serial}", f"ENGINE NO: {engine}", f"MODEL: {MODELS[i % len(MODELS)]} {2015 + i % 10}"]
    f = font(int(rng.integers(20, 25)))
    text_w = max(d.textbbox((0, 0), line, font=f)[2] for line in lines)
    lw, lh = min(text_w + int(rng.integers(36, 90)), W - 40), int(rng.integers(170, 220))
    x0, y0 = int(rng.integers(20, W - lw - 19)), int(rng.integers(20, H - lh - 20))
    shade = tuple(int(v) for v in rng.integers(205, 245, 3))
    d.rectangle([x0, y0, x0 + lw, y0 + lh], fill=shade, outline=(30, 30, 30), width=3)
    ink = tuple(int(v) for v in rng.integers(10, 50, 3))
    for k, line in enumerate(lines):
        d.text((x0 + 18, y0 + 22 + k * (lh - 40) // 3), line, fill=ink, font=f)
    # A touch of blur, as from a phone camera.
    return photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=12)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        plate(i).save(args.out / f"img-{i:03d}.jpg", quality=90)
    print(f"wrote {args.count} images to {args.out}")


if __name__ == "__main__":
    main()
