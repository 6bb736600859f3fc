"""The feature cache's manifest: its format and versions, its schema (every field and what it must hold),
and ``read_manifest``, which checks a cache's ``manifest.json`` against them."""
from __future__ import annotations

import json
import os

FORMAT = "c2f-feature-cache"
VERSION = 1         # a cache of one (deterministic) view per image
VIEWS_VERSION = 2   # adds "views", "view_images" and "view_shards": augmented views of the training images
MANIFEST = "manifest.json"
META_FILES = ("labels", "is_train", "attributes", "certainty", "class_attributes", "image_ids")
DTYPES = ("float16", "bfloat16", "float32")
CACHE_DTYPES = ("float16", "float32")   # what a cache can be written in (numpy has no bfloat16)


class CacheError(RuntimeError):
    """A cache that is incomplete, corrupted, or was made with other settings than the ones asked for."""


# ------------------------------------------------------------------------------- the manifest's schema

def _count(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _file_name(v) -> bool:
    """A plain file name: the cache reads nothing outside its own directory."""
    return isinstance(v, str) and v not in ("", ".", "..") and os.path.basename(v) == v and "/" not in v \
        and "\\" not in v


# Every field the manifest must hold: (check, what is expected). Shard entries have their own table.
MANIFEST_FIELDS = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "config": (lambda v: isinstance(v, dict), "an object (the settings that made the cache)"),
    "num_images": (_count(0), "an integer >= 0"),
    "feature_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_count(1), v)),
                      "[C, H, W], three integers >= 1"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "shard_size": (_count(1), "an integer >= 1"),
    "attribute_names": (_names, "a list of strings"),
    "class_names": (_names, "a list of strings"),
    "meta": (lambda v: isinstance(v, dict) and set(v) <= set(META_FILES) and set(META_FILES[:4]) <= set(v)
             and all(isinstance(d, str) for d in v.values()),
             f"an object mapping {', '.join(META_FILES[:4])} (and optionally {', '.join(META_FILES[4:])}) to "
             "sha256 strings"),
    "shards": (lambda v: isinstance(v, list), "a list with an entry (null until written) per shard"),
}
SHARD_FIELDS = {
    "file": (_file_name, "a file name in the cache directory (no directory part)"),
    "start": (_count(0), "an integer >= 0"),
    "count": (_count(1), "an integer >= 1"),
    "sha256": (lambda v: isinstance(v, str), "a sha256 string"),
}


def _problems(where: str, entry: dict, fields: dict) -> list:
    out = []
    for name, (ok, expected) in fields.items():
        if name not in entry:
            out.append(f"{where}{name} is missing")
        elif not ok(entry[name]):
            out.append(f"{where}{name} is {json.dumps(entry[name])[:60]}, expected {expected}")
    return out


def manifest_problems(m: dict) -> list:
    """What in a parsed manifest breaks the schema above: missing, null or wrong-type fields, shard entries."""
    problems = _problems("", m, MANIFEST_FIELDS)
    if problems:
        return problems
    for i, entry in enumerate(m["shards"]):
        if entry is not None:
            problems += (_problems(f"shards[{i}].", entry, SHARD_FIELDS) if isinstance(entry, dict)
                         else [f"shards[{i}] is {json.dumps(entry)[:60]}, expected null or an object"])
    expected = -(-m["num_images"] // m["shard_size"])
    if len(m["shards"]) != expected:
        problems.append(f"shards lists {len(m['shards'])} entries; {m['num_images']} images in shards of "
                        f"{m['shard_size']} need {expected}")
    return problems + (_view_problems(m) if m.get("version") == VIEWS_VERSION else [])


def _view_problems(m: dict) -> list:
    """Version 2's fields: ``views`` >= 2, ``view_images`` (training images), a shard list per extra view."""
    problems = _problems("", m, dict(views=(_count(2), "an integer >= 2"), view_images=(_count(0), "an integer >= 0"),
                                     view_shards=(lambda v: isinstance(v, list), "a list of shard lists")))
    if problems:
        return problems
    expected = -(-m["view_images"] // m["shard_size"])
    if len(m["view_shards"]) != m["views"] - 1:
        return [f"view_shards lists {len(m['view_shards'])} views; views {m['views']} needs {m['views'] - 1}"]
    for v, shards in enumerate(m["view_shards"], 1):
        if not isinstance(shards, list) or len(shards) != expected:
            problems.append(f"view_shards[{v - 1}] must list {expected} shard entries")
            continue
        for i, entry in enumerate(shards):
            if entry is not None:
                problems += (_problems(f"view_shards[{v - 1}][{i}].", entry, SHARD_FIELDS)
                             if isinstance(entry, dict) else [f"view_shards[{v - 1}][{i}] is not an object"])
    return problems


def shard_groups(m: dict) -> list:
    """The shard lists of a manifest: view 0's (one entry per shard of rows), then one per extra view."""
    return [m["shards"], *m.get("view_shards", [])]


def read_manifest(directory: str) -> dict:
    """The cache's manifest, checked against the schema (``MANIFEST_FIELDS``); raises ``CacheError``."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"{path} not found: {directory} is not a c2f feature cache "
                         "(make one with `c2f extract` or `c2f synth`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise CacheError(f"{path} is not valid JSON ({e}): the cache is corrupted") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} must hold a JSON object, got {type(manifest).__name__}: the cache is corrupted")
    if manifest.get("format") != FORMAT or manifest.get("version") not in (VERSION, VIEWS_VERSION):
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION} or {VIEWS_VERSION}")
    problems = manifest_problems(manifest)
    if problems:
        raise CacheError(f"{path} does not fit the cache manifest's schema: {'; '.join(problems)}; the cache is "
                         "corrupted: rebuild it with the command that made it")
    return manifest
