"""Draw the committed sample sources: small stylised renders of one hardware object family.

The story is the field note on copy-only data prep: a product-image team's training data arrives as
separate handoffs that are never edited, and every dataset version copies from them.

    curated-2026-10/              8 finished views (PNG), each with a literal sidecar caption
                                  -> hardware-design-aesthetic-v1
    turntable-renders-2026-11/    a raw turntable export: 3 colorways x 4 view angles (PNG) and the
                                  render tool's attributes.csv, no captions
                                  -> hardware-design-aesthetic-v2 (v1 plus these, captions built from attributes)
    promoted-candidates-2026-11/  6 generated candidates (JPEG) promoted after review, with sidecars
                                  -> hardware-promoted-merge-v1 (a deliberate merge)
    masked-closeups-2026-12/      3 close-ups, each with sidecar and `<stem>.mask.png` (white on
                                  the object: the loss counts only the object)
    class-images-2026-12/         3 plain class images (regularisation), no captions
                                  -> hardware-masked-reg-v1 (v1's batch, the close-ups with masks: file, and the
                                  class images with role: regularisation)

What it draws: a rounded body (an elliptic cylinder with rounded shoulders, a seam around it and a grip on
one side) on a plain studio background with a soft floor shadow. On its top deck sit a screen (round or wide,
lit or dark) and buttons, in front of the top component: a dome lid, a flat lid, or a transparent reservoir
with water in it. An orthographic camera looks from one of four view angles (front, side, three-quarter,
top). A matte finish is flat banded shading; a glossy finish adds a specular highlight and a rim reflection.
Framing (zoom, offset, which side the camera and the key light are on) varies from picture to picture, so no
two pictures are near-duplicates. Captions name only what the picture shows, trigger first, in one tag
schema (view, body color, finish, top component, screen, buttons) and with no category words.

Deterministic by construction: fixed tables, no randomness, and only IEEE-exact arithmetic (+ - * / sqrt;
no transcendental functions, no reductions), so the pixels are bit-identical on any CPU, and the files are
byte-identical from run to run (PNG bytes may differ under another zlib build, so the tests compare the
committed images by their pixels). Sources are immutable: an existing batch is refused unless
--force. A batch is written into a hidden folder beside it, renamed into place, and `_READY` is written last.

    python scripts/make_sample_data.py [--out DATA_ROOT/sources] [--force]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from sample_render import object_mask, render
from sample_shots import BATCHES, NUMBERS, Shot

from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.paths import READY_MARKER, DataRoot

ATTRIBUTE_COLUMNS = ["file", "view", "color", "finish", "top", "screen", "buttons", "background"]


def encode(image: Image.Image, suffix: str) -> bytes:
    buf = io.BytesIO()
    if suffix == ".jpg":
        image.save(buf, format="JPEG", quality=85, optimize=True)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def attributes_csv(shots: list[Shot]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ATTRIBUTE_COLUMNS)
    for s in shots:
        writer.writerow([s.file, s.view, s.color, s.finish, s.top, s.screen, NUMBERS[s.buttons], s.background])
    return buf.getvalue()


def write_batch(sources: Path, batch: str, shots: list[Shot], captions: str) -> None:
    """Build the batch in a hidden folder, rename it into place, then mark it `_READY`."""
    final, staging = sources / batch, sources / f".{batch}.staging"
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted run
    staging.mkdir(parents=True)
    for shot in shots:
        image = render(shot)
        (staging / shot.file).write_bytes(encode(image, Path(shot.file).suffix))
        if captions.startswith("sidecar"):
            (staging / shot.file).with_suffix(".txt").write_text(shot.caption + "\n", encoding="utf-8")
        if captions.endswith("+masks"):
            (staging / shot.file).with_suffix(".mask.png").write_bytes(encode(object_mask(shot, image), ".png"))
    if captions == "attributes":
        (staging / "attributes.csv").write_text(attributes_csv(shots), encoding="utf-8")
    if final.exists():  # --force: unmark the old batch first, so nothing reads it as ready while it goes
        (final / READY_MARKER).unlink(missing_ok=True)
        retired = sources / f".{batch}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired)
    else:
        staging.rename(final)
    atomic_write_text(final / READY_MARKER, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DataRoot.from_env().sources, help="the sources folder to fill")
    parser.add_argument("--force", action="store_true", help="replace batches that already exist")
    args = parser.parse_args(argv)
    existing = [b for b in BATCHES if (args.out / b).exists()]
    if existing and not args.force:
        print(f"{args.out / existing[0]}: batch already exists and sources are immutable; "
              "pass --force to regenerate it", file=sys.stderr)
        return 1
    for batch, (shots, captions) in BATCHES.items():
        write_batch(args.out, batch, shots, captions)
        print(f"wrote {args.out / batch} ({len(shots)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
