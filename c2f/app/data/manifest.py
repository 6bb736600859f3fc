"""The feature cache's manifest: its format and versions, its schema (every field and what it must hold),
``read_manifest``, which checks a cache's ``manifest.json`` against them, and how the files it lists are
written (atomically, by one process at a time: ``lock_cache``) and checked (sha256)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ...files import DirLock, atomic_write, lock_directory

FORMAT = "c2f-feature-cache"
VERSION = 1         # a cache of one (deterministic) view per image
VIEWS_VERSION = 2   # adds "views", "view_images" and "view_shards": augmented views of the training images
STATS_VERSION = 3   # adds "stats": each shard's per-token LayerNorm statistics (c2f.app.data.stats), views or not
VERSIONS = (VERSION, VIEWS_VERSION, STATS_VERSION)
MANIFEST = "manifest.json"
META_FILES = ("labels", "is_train", "attributes", "certainty", "class_attributes", "image_ids")
DTYPES = ("float16", "bfloat16", "float32")
CACHE_DTYPES = ("float16", "float32")   # what a cache can be written in (numpy has no bfloat16)


class CacheError(RuntimeError):
    """A cache that is incomplete, corrupted, or was made with other settings than the ones asked for."""


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_npy_atomic(path: str, array: np.ndarray) -> str:
    """Writes ``array`` as ``.npy`` via a temporary file and returns its sha256."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


def write_json_atomic(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def lock_cache(directory: str) -> DirLock:
    """The cache's writer lock (``c2f.files.lock_directory``): one ``extract`` or ``synth`` fills it at a time."""
    return lock_directory(directory, "feature cache", "wait for it to end, or write another cache directory")


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
VIEW_FIELDS = {"views", "view_images", "view_shards"}   # version 2's, and version 3's with views
# A statistics entry: its own file and sha256, and the sha256 of the feature shard it was computed from.
STATS_FIELDS = {**SHARD_FIELDS, "features_sha256": (lambda v: isinstance(v, str), "a sha256 string")}


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
    if m.get("version") == VIEWS_VERSION or (m.get("version") == STATS_VERSION and VIEW_FIELDS & set(m)):
        problems += _view_problems(m)
    return problems + (_stats_problems(m) if m.get("version") == STATS_VERSION and not problems else [])


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


def _entry_problems(where: str, entries, length: int, fields: dict) -> list:
    """Problems of a list of ``length`` entries, each null or an object with ``fields``."""
    if not isinstance(entries, list) or len(entries) != length:
        return [f"{where} must list {length} entries (null or an object each)"]
    problems = []
    for i, entry in enumerate(entries):
        if entry is not None:
            problems += (_problems(f"{where}[{i}].", entry, fields) if isinstance(entry, dict)
                         else [f"{where}[{i}] is {json.dumps(entry)[:60]}, expected null or an object"])
    return problems


def _stats_problems(m: dict) -> list:
    """Version 3's ``stats``: ``shards`` (and, with views, ``view_shards``) shaped like the feature shards."""
    stats = m.get("stats")
    if not isinstance(stats, dict):
        return [f"stats is {json.dumps(stats)[:60]}, expected an object with the statistics' shard lists"]
    if ("view_shards" in stats) != ("view_shards" in m):
        return ["stats.view_shards must be there exactly when view_shards is"]
    problems = _entry_problems("stats.shards", stats.get("shards"), len(m["shards"]), STATS_FIELDS)
    if "view_shards" in m:
        if not isinstance(stats["view_shards"], list) or len(stats["view_shards"]) != len(m["view_shards"]):
            return problems + [f"stats.view_shards must list {len(m['view_shards'])} views"]
        for v, (mine, theirs) in enumerate(zip(stats["view_shards"], m["view_shards"], strict=True)):
            problems += _entry_problems(f"stats.view_shards[{v}]", mine, len(theirs), STATS_FIELDS)
    return problems


def shard_groups(m: dict) -> list:
    """The shard lists of a manifest: view 0's (one entry per shard of rows), then one per extra view."""
    return [m["shards"], *m.get("view_shards", [])]


def stats_groups(m: dict) -> list:
    """The statistics' entry lists of a version 3 manifest, parallel to ``shard_groups``."""
    return [m["stats"]["shards"], *m["stats"].get("view_shards", [])]


def add_stats_section(m: dict) -> dict:
    """``m`` brought to version 3 in place (an empty ``stats`` section where it has none) and returned."""
    if "stats" not in m:
        m["stats"] = dict(shards=[None] * len(m["shards"]))
        if "view_shards" in m:
            m["stats"]["view_shards"] = [[None] * len(group) for group in m["view_shards"]]
    m["version"] = STATS_VERSION
    return m


def features_manifest(m: dict) -> dict:
    """``m`` without its statistics, at the version it has without them: what the features alone are. A
    cache's identity hashes this, so that adding statistics to a cache does not make it another cache."""
    if m.get("version") != STATS_VERSION:
        return m
    base = {k: v for k, v in m.items() if k != "stats"}
    base["version"] = VIEWS_VERSION if "views" in m else VERSION
    return base


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
    if manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {', '.join(map(str, VERSIONS))}")
    problems = manifest_problems(manifest)
    if problems:
        raise CacheError(f"{path} does not fit the cache manifest's schema: {'; '.join(problems)}; the cache is "
                         "corrupted: rebuild it with the command that made it")
    return manifest
