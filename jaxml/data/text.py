"""Text: the byte-level tokenizer, packing documents into fixed windows, and the corpora's documents.

The offline corpus is the Python standard library's own source (present on every machine
with Python), chosen deterministically by hashed file name and capped in size; the split
is by file, so validation text is never seen in training. Its content follows the Python
version, so numbers are comparable only on the same version (see `corpus_fingerprint`).
"""

import hashlib
import os
import sysconfig
from typing import Iterable, Iterator

import numpy as np

VOCAB_SIZE = 256  # bytes
SEPARATOR = 0  # NUL never occurs in source text: it separates documents in packed windows
STDLIB_MAX_BYTES = 2_000_000  # both splits together: minutes of CPU training see it a few times
VALIDATION_EVERY = 10  # every 10th chosen file (in hashed order) is validation
# Packages whose source windows the sequence classifier tells apart (present in 3.11-3.13).
MODULE_CLASSES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "xml")
MODULE_MAX_BYTES = 160_000  # per class, so the classes are balanced


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as uint8 token ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: Iterable[int]) -> str:
    """Token ids back to text; invalid UTF-8 (a sample cut mid-character) is replaced, separators dropped."""
    data = bytes(int(t) for t in tokens if int(t) != SEPARATOR)
    return data.decode("utf-8", errors="replace")


def pack_windows(documents: Iterable[np.ndarray], window: int) -> np.ndarray:
    """Documents joined by SEPARATOR, cut into (N, window + 1) rows that overlap by one token.

    A row holds inputs `row[:-1]` and next-token targets `row[1:]`; consecutive rows tile
    the stream, so every token is predicted exactly once.
    """
    if window < 1:
        raise ValueError(f"pack_windows: window must be >= 1, got {window}")
    parts = []
    for doc in documents:
        parts += [np.asarray(doc, np.uint8), np.array([SEPARATOR], np.uint8)]
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
    n = (len(stream) - 1) // window
    if n < 1:
        raise ValueError(f"pack_windows: {len(stream)} tokens do not fill one window of {window} + 1")
    starts = np.arange(n) * window
    return stream[starts[:, None] + np.arange(window + 1)[None, :]]


def unigram_entropy_nats(tokens: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Cross-entropy (nats/token) of `tokens` under the add-one unigram distribution of `reference` (default: tokens)."""
    reference = tokens if reference is None else reference
    counts = np.bincount(np.asarray(reference).ravel(), minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(tokens).ravel()].mean())


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _hashed_order(paths: list[str]) -> list[str]:
    """A fixed pseudo-random order that does not depend on the file system's listing order."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def stdlib_files() -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} absolute paths of top-level stdlib modules, capped in size."""
    root = _stdlib_dir()
    names = [f for f in os.listdir(root) if f.endswith(".py") and os.path.isfile(os.path.join(root, f))]
    chosen, total = [], 0
    for name in _hashed_order(names):
        size = os.path.getsize(os.path.join(root, name))
        if total + size > STDLIB_MAX_BYTES:
            continue
        chosen.append(name)
        total += size
    if len(chosen) < 2 * VALIDATION_EVERY:
        raise FileNotFoundError(f"the standard library at {root} has too few .py files ({len(chosen)} chosen)")
    splits = {"train": [], "validation": []}
    for i, name in enumerate(chosen):
        splits["validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"].append(os.path.join(root, name))
    return splits


def read_documents(paths: list[str]) -> Iterator[np.ndarray]:
    """Each file as uint8 tokens."""
    for path in paths:
        with open(path, "rb") as f:
            yield np.frombuffer(f.read(), np.uint8)


def module_files() -> dict[str, list[str]]:
    """Source files of each package in MODULE_CLASSES (tests excluded), hashed order."""
    root = _stdlib_dir()
    out = {}
    for package in MODULE_CLASSES:
        paths = []
        for directory, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if "test" not in d and d != "__pycache__")
            paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
        if not paths:
            raise FileNotFoundError(f"no source files for package {package!r} under {root}")
        out[package] = _hashed_order([os.path.relpath(p, root) for p in paths])
    return {k: [os.path.join(root, p) for p in v] for k, v in out.items()}


def corpus_fingerprint() -> str:
    """Short hash of the chosen stdlib files' names and sizes: equal fingerprints, equal corpus."""
    h = hashlib.sha256()
    for split, paths in sorted(stdlib_files().items()):
        for p in paths:
            h.update(f"{split}:{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    return h.hexdigest()[:12]
