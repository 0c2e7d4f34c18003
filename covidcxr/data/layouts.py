"""Recognise and walk the three dataset layouts.

1. ``kaggle``: COVID-19 Radiography Database. ``<Class>/images/`` with an
   optional ``<Class>/masks/`` (lung masks, same file names).
2. ``covid-qu-ex``: ``<Split>/<Class>/{images, lung masks, infection masks}/``
   with the dataset's own Train/Val/Test split.
3. ``folders``: one folder per class holding the images (any depth below it).

Wrapper folders with a single sub-folder (``COVID-19_Radiography_Dataset/``,
``Infection Segmentation Data/``) are descended into.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from covidcxr.data.imageio import IMAGE_EXTENSIONS, is_image_file
from covidcxr.errors import DataError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_DIRS = ("images",)
LUNG_MASK_DIRS = ("masks", "lung masks", "lung_masks", "lung-masks")
INFECTION_MASK_DIRS = ("infection masks", "infection_masks", "infection-masks")
MASK_DIRS = LUNG_MASK_DIRS + INFECTION_MASK_DIRS
IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass
class Record:
    path: str
    label: str
    lung_mask: str = ""
    infection_mask: str = ""
    official_split: str = ""


@dataclass
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Scan:
    root: str
    layout: str
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records})


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_child(path: Path, names: tuple[str, ...]) -> Path | None:
    lookup = {p.name.lower(): p for p in _subdirs(path)}
    for name in names:
        if name in lookup:
            return lookup[name]
    return None


def _is_kaggle_class(path: Path) -> bool:
    return _find_child(path, IMAGE_DIRS) is not None


def _is_split_dir(path: Path) -> bool:
    return path.name.lower() in SPLIT_NAMES and any(_is_kaggle_class(c) for c in _subdirs(path))


def _has_images(path: Path) -> bool:
    return any(p.is_file() and is_image_file(p) for p in path.iterdir())


def _unwrap(root: Path) -> Path:
    """Descend through wrapper folders that hold exactly one folder and no images."""
    for _ in range(4):
        subs = _subdirs(root)
        if len(subs) == 1 and not _has_images(root) and not _is_kaggle_class(subs[0]) \
                and not _is_split_dir(subs[0]):
            root = subs[0]
        else:
            break
    return root


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """Return (layout name, effective root). Raises DataError when unknown."""
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DataError(f"{root}: no such folder. Pass the dataset folder with --data, "
                        f"or run 'python -m covidcxr.data synth DIR' for demo data.")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder. Pass a dataset folder or a manifest .csv.")
    root = _unwrap(root)
    subs = _subdirs(root)
    split_dirs = [s for s in subs if _is_split_dir(s)]
    if split_dirs:
        return "covid-qu-ex", root
    # COVID-QU-Ex as downloaded holds two subsets side by side.
    nested = [s for s in subs if any(_is_split_dir(c) for c in _subdirs(_unwrap(s)))]
    if nested:
        names = ", ".join(f"'{s}'" for s in nested)
        raise DataError(f"{root}: holds several COVID-QU-Ex subsets ({names}); "
                        f"pass one of them with --data.")
    if subs and sum(_is_kaggle_class(s) for s in subs) >= max(1, len(subs) // 2 + 1):
        return "kaggle", root
    if subs:
        return "folders", root
    raise DataError(
        f"{root}: unknown dataset layout (no class folders found). Expected "
        f"<Class>/images/ (Kaggle COVID-19 Radiography), <Split>/<Class>/images/ "
        f"(COVID-QU-Ex) or one folder of images per class.")


def _list_images(folder: Path, problems: list[Problem], recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in sorted(it):
        if not p.is_file() or p.name.lower() in IGNORED_FILES or p.name.startswith("."):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            out.append(p)
        else:
            problems.append(Problem(str(p), f"not an image file (extension '{p.suffix or 'none'}'); skipped"))
    return out


def _match_masks(images: list[Path], mask_dir: Path | None, problems: list[Problem],
                 kind: str) -> dict[Path, str]:
    """Map image path -> mask path, matching by file name (then by stem)."""
    if mask_dir is None:
        return {}
    by_name = {p.name: p for p in images}
    by_stem = {p.stem: p for p in images}
    out: dict[Path, str] = {}
    for m in _list_images(mask_dir, problems):
        img = by_name.get(m.name) or by_stem.get(m.stem)
        if img is None:
            problems.append(Problem(str(m), f"{kind} mask has no matching image in {mask_dir.parent / 'images'}; skipped"))
        else:
            out[img] = str(m)
    return out


def _scan_class_dir(class_dir: Path, label: str, split: str, scan: Scan) -> None:
    img_dir = _find_child(class_dir, IMAGE_DIRS)
    if img_dir is None:
        scan.problems.append(Problem(str(class_dir), "class folder has no images/ folder; skipped"))
        return
    images = _list_images(img_dir, scan.problems)
    if not images:
        scan.problems.append(Problem(str(img_dir), f"class '{label}' has no images; class left out"))
        return
    lung = _match_masks(images, _find_child(class_dir, LUNG_MASK_DIRS), scan.problems, "lung")
    inf = _match_masks(images, _find_child(class_dir, INFECTION_MASK_DIRS), scan.problems, "infection")
    for p in images:
        scan.records.append(Record(str(p), label, lung.get(p, ""), inf.get(p, ""), split))


def walk_images(folder: str | Path) -> tuple[list[Path], dict[str, int]]:
    """(every image file under ``folder``, any depth; {mask folder: image files in it}) for inputs that
    are not a dataset (``predict``). The mask folders ``scan_dataset`` pairs with an ``images/`` folder
    (``masks/``, ``lung masks/``, ``infection masks/`` beside it) are not descended into: their files
    are masks, not X-rays, and are returned as counts so that the caller can say what it left out."""
    images: list[Path] = []
    masks: dict[str, int] = {}
    for top, dirs, files in os.walk(folder):
        if any(d.lower() in IMAGE_DIRS for d in dirs):
            for d in [d for d in dirs if d.lower() in MASK_DIRS]:
                dirs.remove(d)
                masks[os.path.join(top, d)] = sum(is_image_file(f) for _, _, fs in os.walk(os.path.join(top, d))
                                                  for f in fs)
        images += [Path(top) / f for f in files if is_image_file(f)]
    return images, masks


def scan_dataset(root: str | Path, min_classes: int = 2) -> Scan:
    """Walk a dataset folder. Files are listed, not decoded (see ``inspect_file``). Fewer than
    ``min_classes`` classes with images is refused (training needs two; scoring an external set
    of one class, e.g. only positives, passes 1)."""
    layout, eff_root = detect_layout(root)
    scan = Scan(str(eff_root), layout)
    if layout == "covid-qu-ex":
        for split_dir in _subdirs(eff_root):
            if not _is_split_dir(split_dir):
                continue
            split = SPLIT_NAMES[split_dir.name.lower()]
            for class_dir in _subdirs(split_dir):
                _scan_class_dir(class_dir, class_dir.name, split, scan)
    elif layout == "kaggle":
        for class_dir in _subdirs(eff_root):
            _scan_class_dir(class_dir, class_dir.name, "", scan)
    else:
        for class_dir in _subdirs(eff_root):
            images = _list_images(class_dir, scan.problems, recursive=True)
            if not images:
                scan.problems.append(Problem(str(class_dir), f"class '{class_dir.name}' has no images; class left out"))
                continue
            scan.records.extend(Record(str(p), class_dir.name) for p in images)
    if not scan.records:
        raise DataError(f"{eff_root}: no images found ({layout} layout). "
                        f"Check the folder holds the dataset's image files.")
    if len(scan.classes) < min_classes:
        raise DataError(f"{eff_root}: only one class with images ({scan.classes[0]}); "
                        f"at least two classes are needed.")
    return scan
