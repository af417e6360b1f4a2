"""Generate ``src/salience/zoo/imagenet_classes.txt``: the 1,000 ImageNet-1k class names, one per line.

Line ``i`` (0-based) is the name of output ``i`` of ImageNet-1k classifiers (the classes in sorted
WordNet-id order, as every torch ImageNet model uses). The names come from two text files of the timm
wheel, which is downloaded with pip and read as a zip archive (timm is never installed or imported):

* ``timm/data/_info/imagenet_synsets.txt``: the 1,000 WordNet ids in index order;
* ``timm/data/_info/imagenet_synset_to_lemma.txt``: ``<wnid>\\t<lemma>, <lemma>, ...``.

Each class keeps its first lemma ("Egyptian cat", "espresso"). Two first lemmas occur twice in
ImageNet-1k (two "crane" and two "maillot" classes); :data:`DISAMBIGUATION` names those four
explicitly, so that every name is unique and maps back to one index.

Usage: ``python scripts/make_imagenet_classes.py [--wheel-dir DIR]`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "salience" / "zoo" / "imagenet_classes.txt"
SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
N_CLASSES = 1000

# wnid -> name, for the classes whose first lemma is shared with another class.
DISAMBIGUATION = {
    "n02012849": "crane (bird)",  # 134: "large long-necked wading bird"
    "n03126707": "crane (machine)",  # 517: "lifts and moves heavy objects"
    "n03710637": "maillot",  # 638: "maillot"
    "n03710721": "maillot (tank suit)",  # 639: "maillot, tank suit"
}


def class_names(synsets_text: str, lemmas_text: str) -> list[str]:
    """Return the class names in index order from the contents of the two timm files."""
    wnids = [line.strip() for line in synsets_text.splitlines() if line.strip()]
    lemmas = dict(line.split("\t", 1) for line in lemmas_text.splitlines() if line.strip())
    names = [DISAMBIGUATION.get(wnid, lemmas[wnid].split(",")[0].strip()) for wnid in wnids]
    if len(names) != N_CLASSES:
        raise SystemExit(f"expected {N_CLASSES} synsets, found {len(names)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SystemExit(f"class names are not unique: {duplicates}")
    return names


def _download_timm_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("timm-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "timm", "-d", str(folder)], check=True)
        wheels = sorted(folder.glob("timm-*.whl"))
    if not wheels:
        raise SystemExit(f"pip did not download a timm wheel into {folder}")
    return wheels[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, help="folder holding (or to receive) the timm wheel")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.wheel_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        wheel = _download_timm_wheel(folder)
        with zipfile.ZipFile(wheel) as archive:
            names = class_names(archive.read(SYNSETS).decode("utf-8"), archive.read(LEMMAS).decode("utf-8"))
    OUTPUT.write_text("\n".join(names) + "\n", encoding="utf-8")
    print(f"wrote {len(names)} class names from {wheel.name} to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
