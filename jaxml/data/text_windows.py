"""TFDS builder of fixed-length byte windows: jaxml's offline text corpus and its packed views of TFDS text.

Configs are `<corpus>_<window>`:
  pystdlib_{64,128,256}   next-byte LM windows of the Python standard library's source (offline)
  tiny_shakespeare_{64,256}, lm1b_128   the same packing of TFDS text datasets (they must be
                          prepared as array_record first; see jaxml/data/sources.py)
  pymodules_128           sequence classification: which stdlib package a 128-byte window
                          comes from (7 classes; validation is a later, disjoint part of each package)
  imdb_reviews_512        sentiment classification: the first 512 bytes of each TFDS `imdb_reviews`
                          review, zero-padded, with its length (splits train / test, as TFDS's)
LM examples are {"tokens": uint8[window + 1]} (inputs [:-1], targets [1:]); classification
examples are {"tokens": uint8[window], "label"}, plus "length" (real bytes before the padding)
for corpora of variable-length documents.
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxml.data import text


@dataclasses.dataclass
class WindowsConfig(tfds.core.BuilderConfig):
    """Which corpus and window length; `classify` makes package-labelled windows instead of LM rows."""

    corpus: str = "pystdlib"
    window: int = 64
    classify: bool = False
    labels: tuple[str, ...] = text.MODULE_CLASSES  # classify: the class names
    splits: tuple[str, ...] = ("train", "validation")


def _configs():
    lm = [("pystdlib", w) for w in (64, 128, 256)] + [("tiny_shakespeare", 64), ("tiny_shakespeare", 256),
                                                       ("lm1b", 128)]
    out = [WindowsConfig(name=f"{c}_{w}", corpus=c, window=w, description=f"{c} packed into {w}-byte LM windows")
           for c, w in lm]
    out.append(WindowsConfig(name="pymodules_128", corpus="pymodules", window=128, classify=True,
                             description="128-byte windows of stdlib packages labelled by package"))
    out.append(WindowsConfig(name="imdb_reviews_512", corpus="imdb_reviews", window=512, classify=True,
                             labels=("neg", "pos"), splits=("train", "test"),
                             description="first 512 bytes of each IMDB review, zero-padded, with its length"))
    return out


def _documents(cfg: WindowsConfig, split: str, data_dir: str | None) -> Iterator[dict]:
    """The records of a prepared TFDS text dataset (`cfg.corpus`) in `data_dir`."""
    source = tfds.data_source(cfg.corpus, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": tfds.core.FileFormat.ARRAY_RECORD})
    return (source[i] for i in range(len(source)))


class TextWindows(tfds.core.GeneratorBasedBuilder):
    """Byte windows packed from a text corpus (module docstring lists the configs)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte windows; stdlib files chosen by hashed name, split by file."}
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg.classify:
            features = {"tokens": tfds.features.Tensor(shape=(cfg.window,), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=list(cfg.labels))}
            if cfg.corpus != "pymodules":
                features["length"] = tfds.features.Scalar(dtype=np.int32)
        else:
            features = {"tokens": tfds.features.Tensor(shape=(cfg.window + 1,), dtype=np.uint8)}
        return tfds.core.DatasetInfo(
            builder=self, description=cfg.description, features=tfds.features.FeaturesDict(features),
            homepage="https://docs.python.org/3/library/", disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # offline corpora are on disk; TFDS corpora are read from their prepared files
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        if cfg.classify and cfg.corpus == "pymodules":
            yield from self._classification_examples(split)
            return
        if cfg.classify:  # a labelled TFDS text dataset: one truncated, padded row per document
            for i, record in enumerate(_documents(cfg, split, self.data_dir_root)):
                row = np.frombuffer(record["text"], np.uint8)[:cfg.window]
                yield i, {"tokens": np.pad(row, (0, cfg.window - len(row))), "length": len(row),
                          "label": int(record["label"])}
            return
        if cfg.corpus == "pystdlib":
            documents = text.read_documents(text.stdlib_files()[split])
        else:
            documents = (np.frombuffer(r["text"], np.uint8) for r in _documents(cfg, split, self.data_dir_root))
        for i, row in enumerate(text.pack_windows(documents, cfg.window)):
            yield i, {"tokens": row}

    def _classification_examples(self, split: str):
        window = self.builder_config.window
        key = 0
        for label, paths in enumerate(text.module_files().values()):
            # Contiguous parts of the package's source (files in hashed order): training text
            # first, then validation, so no window is seen twice. Some packages have only three
            # files, too few to split by file.
            stream = np.concatenate(list(text.read_documents(paths)))
            cut = min(text.MODULE_MAX_BYTES, len(stream) * 4 // 5)
            part = stream[:cut] if split == "train" else stream[cut:cut + text.MODULE_MAX_BYTES // 4]
            for start in range(0, len(part) - window + 1, window):
                yield key, {"tokens": part[start:start + window], "label": label}
                key += 1
