"""Data: TFDS random-access sources, grain pipelines with per-process sharding, device-side augmentation."""

from jaxml.data.augment import augment, random_crop, random_flip
from jaxml.data.pipeline import DeviceBatches, eval_batches, train_dataset
from jaxml.data.sources import OFFLINE_DATASETS, ArraySource, DatasetInfo, dataset_info, load_source

__all__ = [
    "OFFLINE_DATASETS",
    "ArraySource",
    "DatasetInfo",
    "DeviceBatches",
    "augment",
    "dataset_info",
    "eval_batches",
    "load_source",
    "random_crop",
    "random_flip",
    "train_dataset",
]
