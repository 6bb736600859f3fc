"""Data for the C2F head: the CUB reader, the on-disk feature cache (with its features' per-token LayerNorm
statistics), extraction, synthetic data, loaders, and the images-through-the-backbone feature source."""
from .backbones import Backbone, ImageFolderDataset, load_backbone, open_backbone
from .cache import CacheError, CacheWriter, FeatureCache, read_manifest
from .cub import TARGET_KINDS, CUBFormatError, CUBRecord, attribute_targets, read_cub
from .extract import ImageCheckError, check_images, extract
from .images import Augment, ImageSource
from .loader import BatchPlan, CachedFeatures, make_loader, split_rows
from .stats import add_stats, rstd_from_var, token_stats
from .synth import synthesize

__all__ = ["Backbone", "ImageFolderDataset", "load_backbone", "open_backbone", "CacheError", "CacheWriter",
           "FeatureCache", "add_stats", "read_manifest", "rstd_from_var", "token_stats", "CUBFormatError",
           "CUBRecord", "TARGET_KINDS", "attribute_targets", "read_cub", "ImageCheckError", "check_images", "extract",
           "BatchPlan", "CachedFeatures", "make_loader", "split_rows", "synthesize", "Augment", "ImageSource"]
