"""Data: image collections, benchmark protocols, two-view transforms and the frozen-backbone feature cache."""

from __future__ import annotations

from hihpq.data.feature_cache import (
    CacheEntry,
    ExtractedFeatures,
    FeatureCache,
    extract_clean_features,
    extract_view_features,
)
from hihpq.data.folders import (
    ArrayImageDataset,
    ImageDataset,
    ImageFolderDataset,
    ImageSource,
    SkipLog,
    scan_image_folder,
)
from hihpq.data.protocols import (
    Split,
    cifar10_protocol_indices,
    cifar10_split,
    default_cache_dir,
    find_cifar10,
    flickr25k_split,
    load_cifar10,
    nuswide_split,
    random_split_indices,
)
from hihpq.data.transforms import AugmentConfig, MultiViews, TwoViews, eval_transform, train_transform

__all__ = [
    "ArrayImageDataset",
    "AugmentConfig",
    "CacheEntry",
    "ExtractedFeatures",
    "FeatureCache",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageSource",
    "MultiViews",
    "SkipLog",
    "Split",
    "TwoViews",
    "cifar10_protocol_indices",
    "cifar10_split",
    "default_cache_dir",
    "eval_transform",
    "extract_clean_features",
    "extract_view_features",
    "find_cifar10",
    "flickr25k_split",
    "load_cifar10",
    "nuswide_split",
    "random_split_indices",
    "scan_image_folder",
    "train_transform",
]
