"""Random-access data sources: `tfds.data_source` over array_record files, one path for all.

jaxml's offline builders (imported here so TFDS knows them) are generated on first use;
any other TFDS dataset is downloaded and prepared by TFDS, or read from a data dir that
was prepared elsewhere. Reading never needs TensorFlow; generating most TFDS datasets does.
"""

import dataclasses
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
import PIL.Image  # noqa: F401  -- before tfds: its Image feature decodes with Pillow only if importable then
import tensorflow_datasets as tfds

from jaxml.data import digits  # registers the `digits` builder with TFDS
from jaxml.data import tabular  # registers `diabetes` and `breast_cancer`
from jaxml.data import arithmetic  # registers `addition` (generated seq2seq problems)
from jaxml.data import text_windows  # registers `text_windows` (stdlib source text)

OFFLINE_DATASETS = (digits.Digits.name, tabular.Diabetes.name, tabular.BreastCancer.name, text_windows.TextWindows.name,
                    arithmetic.Addition.name)
_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD  # the random-access format data_source reads
# TFDS retries a failed download 10 times with exponential backoff (about 3.5 minutes
# without a network), so one quick request decides first whether to try at all.
_PROBE_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a prepared dataset, from its TFDS info."""

    name: str
    num_classes: int | None  # None when the dataset has no ClassLabel `label` feature
    image_shape: tuple[int | None, ...] | None  # (H, W, C); None when there is no `image` feature
    num_examples: dict[str, int]  # per split


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A split held in host memory as one numpy array per feature: batches are gathered
    with one fancy index per feature instead of decoding records one by one."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def gather(self, indices) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked."""
        indices = np.asarray(indices)
        return {k: v[indices] for k, v in self.arrays.items()}


def load_source(name: str, split: str, data_dir: str | None = None,
                cache: bool = False) -> Sequence[dict[str, Any]]:
    """The random-access source (`len`, `[i]` -> dict of numpy values) of one split, prepared if needed.

    `cache=True` reads the whole split into host memory once (an `ArraySource`): much
    faster batches for datasets that fit in RAM (digits, mnist, cifar10).
    """
    _prepared_builder(name, data_dir)
    # TFDS checks the split (slices like "train[:10%]" work) and names the available ones.
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": _ARRAY_RECORD})
    if not cache:
        return source
    records = source.__getitems__(range(len(source)))  # one batched read of the array_record files
    return ArraySource({k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]})


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Classes, image shape and split sizes of `name`, prepared if needed."""
    info = _prepared_builder(name, data_dir).info
    features = info.features
    label = features["label"] if "label" in features else None
    return DatasetInfo(
        name=name,
        num_classes=label.num_classes if isinstance(label, tfds.features.ClassLabel) else None,
        image_shape=tuple(features["image"].shape) if "image" in features else None,
        num_examples={split: info.splits[split].num_examples for split in info.splits},
    )


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`, its array_record files generated or downloaded if missing."""
    # Without community datasets: listing those needs network access and TensorFlow.
    known = tfds.list_builders(with_community_datasets=False)
    base_name = name.split("/")[0].split(":")[0]  # TFDS names may carry a config and version
    if base_name not in known:
        raise ValueError(
            f"unknown dataset {name!r}: jaxml's offline datasets are {list(OFFLINE_DATASETS)}, and any "
            f"name in tfds.list_builders() is accepted ({len(known)} of them, e.g. mnist, "
            f"fashion_mnist, cifar10, cifar100, imagenet2012)")
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        if builder.info.file_format != _ARRAY_RECORD:
            raise ValueError(
                f"dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
                f"but random access needs {_ARRAY_RECORD.value}: prepare it again on a machine with "
                f"TensorFlow with `tfds build {name} --file_format={_ARRAY_RECORD.value} --data_dir=DIR`")
        return builder
    builder = tfds.builder(name, data_dir=data_dir, file_format=_ARRAY_RECORD)
    if base_name in OFFLINE_DATASETS:
        builder.download_and_prepare()
        return builder
    try:
        urls = list(builder.url_infos or ())
        if urls:
            _probe(urls[0])
        builder.download_and_prepare()
    except (OSError, ImportError) as e:  # no network; or TensorFlow, which most TFDS generators use
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {builder.data_dir} and could not be downloaded and "
            f"prepared here ({type(e).__name__}: {e}). Reading needs neither network nor TensorFlow, but "
            f"preparing most TFDS datasets needs both: on such a machine run `pip install tensorflow "
            f"tensorflow-datasets && tfds build {name} --file_format={_ARRAY_RECORD.value} "
            f"--data_dir=DIR`, then copy DIR/{base_name} into {builder.data_dir_root} or point "
            f"--config.data.data_dir at a copy of DIR") from e
    return builder


def _probe(url: str) -> None:
    """Raises OSError when `url`'s server cannot be reached within a few seconds."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # the server answered (some refuse HEAD): the network is there
