"""Draw the hand-made boxes of the imagenet-photos dataset on their photos, to check them by eye.

    python scripts/check_photo_boxes.py /tmp/boxes.png            # one contact sheet, every photo
    python scripts/check_photo_boxes.py /tmp/boxes --each         # one PNG per photo, full size
    python scripts/check_photo_boxes.py /tmp/boxes --each --grid 50

The box is drawn as its outermost pixel row/column inside it (right and bottom are exclusive), in
red, with the label above; ``--grid N`` adds a grid every N pixels (how the boxes were read off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from salience.datasets.photos import Photo, load_photos

THUMB = 320


def draw(photo: Photo, grid: int | None) -> Image.Image:
    image = Image.open(photo.path).convert("RGB")
    pen = ImageDraw.Draw(image)
    if grid:
        for x in range(0, image.width, grid):
            pen.line([(x, 0), (x, image.height)], fill=(0, 255, 255))
            pen.text((x + 2, 2), str(x), fill=(255, 255, 0))
        for y in range(0, image.height, grid):
            pen.line([(0, y), (image.width, y)], fill=(0, 255, 255))
            pen.text((2, y + 2), str(y), fill=(255, 255, 0))
    left, top, right, bottom = photo.box
    width = max(2, image.width // 200)
    pen.rectangle([left, top, right - 1, bottom - 1], outline=(255, 0, 0), width=width)
    pen.text((left + width + 2, top + width + 2), f"{photo.label_name} ({photo.label})", fill=(255, 0, 0))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="PNG file (contact sheet) or, with --each, a folder")
    parser.add_argument("--each", action="store_true", help="one full-size PNG per photo")
    parser.add_argument("--grid", type=int, help="draw a grid every N pixels")
    args = parser.parse_args()
    photos = load_photos()
    if args.each:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            draw(photo, args.grid).save(folder / f"{photo.id}.png")
        print(f"wrote {len(photos)} PNGs to {folder}")
        return
    columns = 4
    rows = (len(photos) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (THUMB + 10), rows * (THUMB + 10)), "white")
    for index, photo in enumerate(photos):
        image = draw(photo, args.grid)
        image.thumbnail((THUMB, THUMB))
        sheet.paste(image, ((index % columns) * (THUMB + 10), (index // columns) * (THUMB + 10)))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
