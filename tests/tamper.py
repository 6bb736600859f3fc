"""What a damaged disk or a hand edit does to c2f's files, for the tests that check c2f notices."""
import json
import os
import shutil

import numpy as np

from c2f.app.data import FeatureCache
from c2f.app.data.cache import sha256_file
from c2f.app.data.stats import write_stats


def nan_rows(cache: str, out: str, rows) -> str:
    """A copy of ``cache`` at ``out`` with the features of ``rows`` set to NaN and the manifest's sha256 of
    each changed shard updated, its statistics too (a version 3 cache), so that even a full verification
    passes: only the values are wrong."""
    shutil.copytree(cache, out)
    fc = FeatureCache(out, verify="size")
    manifest_path = os.path.join(out, "manifest.json")
    manifest = json.load(open(manifest_path))
    for row in rows:
        i = int(np.searchsorted(fc.starts, row, side="right") - 1)
        shard = manifest["shards"][i]
        path = os.path.join(out, shard["file"])
        data = np.load(path)
        data[row - shard["start"]] = np.nan
        np.save(path, data)
        shard["sha256"] = sha256_file(path)
        if "stats" in manifest:
            manifest["stats"]["shards"][i] = write_stats(out, shard, data)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return out


def flip_bytes(path: str, start: int, count: int = 1) -> None:
    """Inverts ``count`` bytes of the file from offset ``start`` (negative: from the end)."""
    data = bytearray(open(path, "rb").read())
    start = start % len(data)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
