"""Data for the C2F head: the CUB reader, the on-disk feature cache, extraction, synthetic data, loaders."""
from .cache import CacheError, CacheWriter, FeatureCache, read_manifest
from .cub import CUBFormatError, CUBRecord, TARGET_KINDS, attribute_targets, read_cub
from .extract import extract, load_backbone
from .loader import BatchPlan, CachedFeatures, make_loader
from .synth import synthesize

__all__ = ["CacheError", "CacheWriter", "FeatureCache", "read_manifest", "CUBFormatError", "CUBRecord",
           "TARGET_KINDS", "attribute_targets", "read_cub", "extract", "load_backbone", "BatchPlan",
           "CachedFeatures", "make_loader", "synthesize"]
