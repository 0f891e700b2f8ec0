"""TFDS builder of fixed-length byte windows: jaxml's offline text corpus and its packed views of TFDS text.

Configs are `<corpus>_<window>`:
  pystdlib_{64,128,256}   next-byte LM windows of the Python standard library's source (offline)
  tiny_shakespeare_{64,256}, lm1b_128   the same packing of TFDS text datasets (they must be
                          prepared as array_record first; see jaxml/data/sources.py)
  pymodules_128           sequence classification: which stdlib package a 128-byte window
                          comes from (7 classes; validation is a later, disjoint part of each package)
LM examples are {"tokens": uint8[window + 1]} (inputs [:-1], targets [1:]); classification
examples are {"tokens": uint8[window], "label"}.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxml.data import text


@dataclasses.dataclass
class WindowsConfig(tfds.core.BuilderConfig):
    """Which corpus and window length; `classify` makes package-labelled windows instead of LM rows."""

    corpus: str = "pystdlib"
    window: int = 64
    classify: bool = False


def _configs():
    lm = [("pystdlib", w) for w in (64, 128, 256)] + [("tiny_shakespeare", 64), ("tiny_shakespeare", 256),
                                                       ("lm1b", 128)]
    out = [WindowsConfig(name=f"{c}_{w}", corpus=c, window=w, description=f"{c} packed into {w}-byte LM windows")
           for c, w in lm]
    out.append(WindowsConfig(name="pymodules_128", corpus="pymodules", window=128, classify=True,
                             description="128-byte windows of stdlib packages labelled by package"))
    return out


class TextWindows(tfds.core.GeneratorBasedBuilder):
    """Byte windows packed from a text corpus (module docstring lists the configs)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte windows; stdlib files chosen by hashed name, split by file."}
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg.classify:
            features = {"tokens": tfds.features.Tensor(shape=(cfg.window,), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=list(text.MODULE_CLASSES))}
        else:
            features = {"tokens": tfds.features.Tensor(shape=(cfg.window + 1,), dtype=np.uint8)}
        return tfds.core.DatasetInfo(
            builder=self, description=cfg.description, features=tfds.features.FeaturesDict(features),
            homepage="https://docs.python.org/3/library/", disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # offline corpora are on disk; TFDS corpora are read from their prepared files
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        if cfg.classify:
            yield from self._classification_examples(split)
            return
        if cfg.corpus == "pystdlib":
            documents = text.read_documents(text.stdlib_files()[split])
        else:
            source = tfds.data_source(cfg.corpus, split=split, download=False,
                                      builder_kwargs={"file_format": tfds.core.FileFormat.ARRAY_RECORD})
            documents = (np.frombuffer(source[i]["text"], np.uint8) for i in range(len(source)))
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
