"""Reader for the CUB-200-2011 directory tree and the attribute targets derived from it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

NUM_CERTAINTIES = 4
# CUB's certainty ids: 1 not visible, 2 guessing, 3 probably, 4 definitely. The calibrated soft label
# moves from 0.5 (no information) towards the stated value by this much.
CERTAINTY_CONFIDENCE = np.array([0.0, 0.0, 0.5, 0.75, 1.0], dtype=np.float32)  # indexed by certainty id
TARGET_KINDS = ("binary", "calibrated", "class")


class CUBFormatError(ValueError):
    """A CUB file that does not parse or whose counts do not add up; the message names file and line."""


@dataclass
class CUBRecord:
    """CUB-200-2011 annotations, one row per image in ``images.txt`` order."""
    root: str
    image_ids: np.ndarray          # [n] int64, the 1-based ids of images.txt
    image_paths: list              # [n] absolute paths
    labels: np.ndarray             # [n] int64, 0-based class
    is_train: np.ndarray           # [n] bool
    attributes: np.ndarray         # [n, A] float32, 0/1 is_present
    certainty: np.ndarray          # [n, A] int64, 1..4
    attribute_names: list          # [A]
    class_names: list              # [K]
    class_attributes: np.ndarray | None = field(default=None)  # [K, A] float32 in [0, 1], or None

    def __len__(self) -> int:
        return len(self.image_ids)


def _rows(path: str, min_fields: int):
    """Yields ``(line_number, fields)`` of the non-blank lines, checking the field count."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise CUBFormatError(f"{path}:{lineno}: expected at least {min_fields} fields, "
                                     f"got {len(fields)}: {line.strip()!r}")
            yield lineno, fields


def _int(path: str, lineno: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CUBFormatError(f"{path}:{lineno}: {what} must be an integer, got {text!r}") from None


def _id_table(path: str) -> dict:
    """``id value`` files (images.txt, classes.txt, attributes.txt): 1-based id to the rest of the line."""
    table = {}
    for lineno, fields in _rows(path, 2):
        i = _int(path, lineno, fields[0], "the id")
        if i in table:
            raise CUBFormatError(f"{path}:{lineno}: id {i} appears twice")
        table[i] = " ".join(fields[1:])
    return table


def _pair_table(path: str, ids: dict, what: str, allowed=None) -> dict:
    table = {}
    for lineno, fields in _rows(path, 2):
        i = _int(path, lineno, fields[0], "the image id")
        if i not in ids:
            raise CUBFormatError(f"{path}:{lineno}: image id {i} is not in images.txt")
        table[i] = _int(path, lineno, fields[1], what)
        if allowed is not None and table[i] not in allowed:
            raise CUBFormatError(f"{path}:{lineno}: {what} must be one of {', '.join(map(str, allowed))}, "
                                 f"got {table[i]}")
    missing = [i for i in ids if i not in table]
    if missing:
        raise CUBFormatError(f"{path}: no {what} for {len(missing)} image(s), first id {missing[0]}")
    return table


def _dense_ids(table: dict, path: str) -> None:
    if sorted(table) != list(range(1, len(table) + 1)):
        raise CUBFormatError(f"{path}: ids must be 1..{len(table)} without gaps")


def find_file(root: str, name: str) -> str:
    """``name`` at the root or under ``attributes/`` (releases differ on where attribute files live)."""
    for candidate in (os.path.join(root, name), os.path.join(root, "attributes", name)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{name} not found under {root} or {os.path.join(root, 'attributes')}")


def read_cub(root: str) -> CUBRecord:
    """Reads a CUB-200-2011 tree (the directory holding ``images.txt``) and checks its counts."""
    root = os.path.abspath(root)
    images_txt = os.path.join(root, "images.txt")
    if not os.path.isfile(images_txt):
        raise FileNotFoundError(f"{images_txt} not found: root must be the CUB_200_2011 directory")
    images = _id_table(images_txt)
    ids = np.array(sorted(images), dtype=np.int64)
    position = {int(i): k for k, i in enumerate(ids)}
    classes_txt = os.path.join(root, "classes.txt")
    classes = _id_table(classes_txt)
    _dense_ids(classes, classes_txt)
    labels_txt = os.path.join(root, "image_class_labels.txt")
    labels = _pair_table(labels_txt, images, "class id")
    split_txt = os.path.join(root, "train_test_split.txt")
    split = _pair_table(split_txt, images, "is_training_image flag", allowed=(0, 1))
    attributes_txt = find_file(root, "attributes.txt")
    attr_names = _id_table(attributes_txt)
    _dense_ids(attr_names, attributes_txt)
    n, a = len(ids), len(attr_names)

    label_arr = np.array([labels[int(i)] for i in ids], dtype=np.int64) - 1
    bad = np.flatnonzero((label_arr < 0) | (label_arr >= len(classes)))
    if bad.size:
        raise CUBFormatError(f"{labels_txt}: image id {ids[bad[0]]} has class {label_arr[bad[0]] + 1}, "
                             f"classes.txt has 1..{len(classes)}")

    present = np.zeros((n, a), dtype=np.float32)
    certainty = np.zeros((n, a), dtype=np.int64)
    seen = np.zeros((n, a), dtype=bool)
    labels_path = find_file(root, "image_attribute_labels.txt")
    # Some released lines carry extra fields (a trailing time, a stray column): the first four are
    # image id, attribute id, is_present and certainty id; the line is kept.
    for lineno, fields in _rows(labels_path, 4):
        img, att, pres, cert = (_int(labels_path, lineno, t, w) for t, w in
                                zip(fields[:4], ("the image id", "the attribute id", "is_present", "the certainty id"),
                                    strict=True))
        if img not in position:
            raise CUBFormatError(f"{labels_path}:{lineno}: image id {img} is not in images.txt")
        if not 1 <= att <= a:
            raise CUBFormatError(f"{labels_path}:{lineno}: attribute id {att} outside 1..{a}")
        if pres not in (0, 1) or not 1 <= cert <= NUM_CERTAINTIES:
            raise CUBFormatError(f"{labels_path}:{lineno}: is_present must be 0/1 and certainty 1..4, "
                                 f"got {pres}, {cert}")
        r, c = position[img], att - 1
        if seen[r, c]:
            raise CUBFormatError(f"{labels_path}:{lineno}: second label for image {img}, attribute {att}")
        seen[r, c] = True
        present[r, c], certainty[r, c] = pres, cert
    if not seen.all():
        r, c = np.argwhere(~seen)[0]
        raise CUBFormatError(f"{labels_path}: {int((~seen).sum())} (image, attribute) label(s) missing, "
                             f"first image {ids[r]}, attribute {c + 1}; expected {n} x {a} labels")

    class_attributes = None
    try:
        continuous = find_file(root, "class_attribute_labels_continuous.txt")
    except FileNotFoundError:
        continuous = None
    if continuous is not None:
        rows = []
        with open(continuous, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    values = line.split()
                    if len(values) != a:
                        raise CUBFormatError(f"{continuous}:{lineno}: expected {a} values, got {len(values)}")
                    rows.append([float(v) for v in values])
        if len(rows) != len(classes):
            raise CUBFormatError(f"{continuous}: expected {len(classes)} rows (one per class), got {len(rows)}")
        class_attributes = np.asarray(rows, dtype=np.float32) / 100.0   # the file holds percentages

    return CUBRecord(
        root=root, image_ids=ids,
        image_paths=[os.path.join(root, "images", images[int(i)]) for i in ids],
        labels=label_arr, is_train=np.array([split[int(i)] == 1 for i in ids]),
        attributes=present, certainty=certainty,
        attribute_names=[attr_names[i] for i in range(1, a + 1)],
        class_names=[classes[i] for i in range(1, len(classes) + 1)],
        class_attributes=class_attributes)


def attribute_targets(kind: str, attributes: np.ndarray, certainty: np.ndarray, labels: np.ndarray,
                      class_attributes: np.ndarray | None = None) -> np.ndarray:
    """Per-image attribute targets ``[n, A]`` float32 in [0, 1].

    ``binary``: is_present. ``calibrated``: ``0.5 + (is_present - 0.5) * confidence(certainty)``, so a
    "not visible" label says 0.5 and a "definitely" label says 0 or 1. ``class``: the class-level
    continuous vector of each image's class.
    """
    if kind == "binary":
        return np.asarray(attributes, dtype=np.float32)
    if kind == "calibrated":
        conf = CERTAINTY_CONFIDENCE[np.asarray(certainty, dtype=np.int64)]
        return (0.5 + (np.asarray(attributes, dtype=np.float32) - 0.5) * conf).astype(np.float32)
    if kind == "class":
        if class_attributes is None:
            raise ValueError("attribute targets 'class' need class_attribute_labels_continuous.txt, "
                             "which this dataset does not have")
        return np.asarray(class_attributes, dtype=np.float32)[np.asarray(labels)]
    raise ValueError(f"attribute target kind must be one of {TARGET_KINDS}, got {kind!r}")
