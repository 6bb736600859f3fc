"""A seeded synthetic feature cache whose classes, attributes and spatial parts can be learned.

Each of ``num_locations`` body parts sits at its own place on the grid (jittered per image) and has a
channel signature; each attribute belongs to one part and has a signature of its own, added with sign
+1 (present) or -1 (absent) at its part's place unless the attribute is "not visible" (certainty 1).
Each class has an attribute profile (each attribute likely present or likely absent), shared with the
other classes of its genus except for a fraction ``class_flip`` of the attributes (fine-grained: sibling
classes differ in a few attributes), and each image draws its attributes from its class's profile.
So: attention can find the parts (their signatures sit at a few tokens), the regressor can read the
attribute signs there, and the classifier can recognise the class from the attributes. Gaussian noise
covers every token.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import CacheWriter, lock_cache

CERTAINTY_PROBS = (0.05, 0.15, 0.3, 0.5)   # of certainty ids 1..4, about CUB's mix
PROFILE_PROB = 0.85                        # P(attribute present | class profile says present)


def _plan(num_classes, images_per_class, num_attributes, dim, grid, num_locations, test_fraction, seed,
          classes_per_genus, class_flip):
    """Everything but the features: labels, splits, attributes, certainty and the signatures."""
    rng = np.random.default_rng(seed)
    n = num_classes * images_per_class
    labels = np.repeat(np.arange(num_classes), images_per_class)
    order = rng.permutation(n)
    labels = labels[order]
    rank_in_class = np.empty(n, dtype=np.int64)
    for k in range(num_classes):
        rank_in_class[labels == k] = np.arange(images_per_class)
    n_test = int(round(images_per_class * test_fraction))
    is_train = rank_in_class >= n_test
    # Fine-grained: classes of one genus share its profile but for a fraction class_flip of attributes.
    genus = rng.random((-(-num_classes // classes_per_genus), num_attributes)) < 0.5
    flips = rng.random((num_classes, num_attributes)) < class_flip
    profile = genus[np.arange(num_classes) // classes_per_genus] ^ flips
    prob = np.where(profile, PROFILE_PROB, 1.0 - PROFILE_PROB)
    attributes = (rng.random((n, num_attributes)) < prob[labels]).astype(np.uint8)
    certainty = rng.choice(np.arange(1, 5), size=(n, num_attributes), p=CERTAINTY_PROBS).astype(np.uint8)
    margin = 2 if grid >= 7 else 0
    cells = np.stack(np.meshgrid(np.arange(margin, grid - margin), np.arange(margin, grid - margin),
                                 indexing="ij"), -1).reshape(-1, 2)
    centres = cells[rng.choice(len(cells), size=num_locations, replace=len(cells) < num_locations)]
    signatures = dict(
        part=rng.standard_normal((num_locations, dim)).astype(np.float32),
        attribute=rng.standard_normal((num_attributes, dim)).astype(np.float32),
        centres=centres.astype(np.float32),
        attribute_part=np.arange(num_attributes) % num_locations)
    class_attributes = prob.astype(np.float32)
    return labels, is_train, attributes, certainty, class_attributes, signatures


def _features(rows, attributes, certainty, sig, dim, grid, noise, seed, shard):
    """Features of one shard, ``[len(rows), dim, grid, grid]`` float32 (torch: fast seeded noise and bmm)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    n, n_loc = len(rows), len(sig["part"])
    sign = torch.from_numpy(np.where(attributes[rows] > 0, 1.0, -1.0).astype(np.float32))
    sign[torch.from_numpy(certainty[rows] == 1)] = 0.0    # not visible: nothing to see
    values = torch.from_numpy(sig["part"])[None].repeat(n, 1, 1)           # [n, L, C]
    attr_sig = torch.from_numpy(sig["attribute"])
    for loc in range(n_loc):
        members = torch.from_numpy(np.flatnonzero(sig["attribute_part"] == loc))
        values[:, loc] += sign[:, members] @ attr_sig[members] / max(len(members), 1) ** 0.5
    centres = torch.from_numpy(sig["centres"])[None] + torch.rand(n, n_loc, 2, generator=gen) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cells = torch.stack([yy.flatten(), xx.flatten()], -1).float()                  # [N, 2]
    bumps = torch.exp(-((centres[:, :, None, :] - cells[None, None]) ** 2).sum(-1))  # [n, L, N]
    x = torch.randn(n, dim, grid * grid, generator=gen) * noise
    x.baddbmm_(values.transpose(1, 2), bumps)
    return x.reshape(n, dim, grid, grid).numpy()


def synthesize(directory: str, num_classes: int = 200, images_per_class: int = 60, num_attributes: int = 312,
               dim: int = 2048, grid: int = 14, num_locations: int = 15, test_fraction: float = 0.5,
               noise: float = 1.0, classes_per_genus: int = 4, class_flip: float = 0.1, seed: int = 0,
               dtype: str = "float16", shard_size: int = 256,
               overwrite: bool = False, progress: bool = True) -> str:
    """Writes a synthetic cache (same format as ``extract``'s) to ``directory`` and returns it.

    Deterministic in its arguments; a partial cache with the same arguments is completed, not redone. Each
    shard's per-token statistics are written with it (``c2f.app.data.stats``).
    """
    for name, v in (("num_classes", num_classes), ("images_per_class", images_per_class),
                    ("num_attributes", num_attributes), ("dim", dim), ("grid", grid), ("num_locations", num_locations)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if classes_per_genus <= 0 or not 0.0 <= class_flip <= 1.0:
        raise ValueError(f"classes_per_genus must be positive and class_flip in [0, 1], got "
                         f"{classes_per_genus}, {class_flip}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    config = dict(source="synth", num_classes=num_classes, images_per_class=images_per_class,
                  num_attributes=num_attributes, dim=dim, grid=grid, num_locations=num_locations,
                  test_fraction=test_fraction, noise=noise, classes_per_genus=classes_per_genus,
                  class_flip=class_flip, seed=seed, backbone="synthetic",
                  image_size=None, preprocessing=None, split="all")
    labels, is_train, attributes, certainty, class_attributes, sig = _plan(
        num_classes, images_per_class, num_attributes, dim, grid, num_locations, test_fraction, seed,
        classes_per_genus, class_flip)
    with lock_cache(directory):
        writer = CacheWriter(
            directory, config, (dim, grid, grid),
            dict(labels=labels, is_train=is_train, attributes=attributes, certainty=certainty,
                 class_attributes=class_attributes),
            attribute_names=[f"attr{p:03d}::part{p % num_locations:02d}" for p in range(num_attributes)],
            class_names=[f"class{k:03d}" for k in range(num_classes)],
            dtype=dtype, shard_size=shard_size, overwrite=overwrite)
        todo = writer.missing_shards()
        bar = tqdm(total=sum(len(writer.shard_range(i)) for i in todo), unit="img", desc="synth",
                   disable=not progress or not todo)
        for i in todo:
            rows = np.arange(writer.shard_range(i).start, writer.shard_range(i).stop)
            writer.write_shard(i, _features(rows, attributes, certainty, sig, dim, grid, noise, seed, i))
            bar.update(len(rows))
        bar.close()
        writer.fill_stats(progress)   # the shards of a cache begun before statistics existed
    return directory
