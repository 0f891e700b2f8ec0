"""jaxml.data: the digits builder, TFDS sources (offline and online), grain pipelines, augmentation."""

import json
import shutil
import socket
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from jaxml import data


def _id_source(n: int) -> list[dict]:
    """A list source whose examples carry their own position as `id`."""
    return [{"id": np.int64(i), "x": np.full((2, 3), i, np.float32)} for i in range(n)]


def _take(iterator, k: int) -> list[np.ndarray]:
    return [next(iterator)["id"] for _ in range(k)]


# --- sources ---------------------------------------------------------------------------


def test_digits_prepares_and_reads_without_tensorflow(data_dir):
    train = data.load_source("digits", "train", data_dir)
    test = data.load_source("digits", "test", data_dir)
    assert (len(train), len(test)) == (1500, 297)
    example = train[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8

    images = np.stack([train[i]["image"] for i in range(len(train))] + [test[i]["image"] for i in range(len(test))])
    labels = np.array([train[i]["label"] for i in range(len(train))] + [test[i]["label"] for i in range(len(test))])
    sk = sk_datasets.load_digits()
    assert images.min() == 0 and images.max() == 255
    # Same examples as scikit-learn's, rescaled: compare order-free summaries.
    expected = np.round(sk.images * 255 / 16).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(np.sort(images.reshape(len(images), -1).sum(1)),
                                  np.sort(expected.reshape(len(expected), -1).sum(1)))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(sk.target, minlength=10))
    assert "tensorflow" not in sys.modules, "reading array_record sources must not import TensorFlow"


def test_digits_split_is_the_fixed_permutation(data_dir):
    train = data.load_source("digits", "train", data_dir)
    test = data.load_source("digits", "test", data_dir)
    # Golden labels of the seeded split. Changing them changes every digits result: only
    # with a new builder VERSION (and then update experiments' expected numbers too).
    assert [int(train[i]["label"]) for i in range(10)] == [2, 8, 2, 6, 6, 7, 1, 9, 8, 5]
    assert [int(test[i]["label"]) for i in range(10)] == [2, 2, 9, 8, 8, 3, 6, 0, 4, 4]


def test_dataset_info_of_digits(data_dir):
    info = data.dataset_info("digits", data_dir)
    assert info.num_classes == 10
    assert info.image_shape == (8, 8, 1)
    assert info.num_examples == {"train": 1500, "test": 297}


def test_unknown_dataset_name_lists_the_choices(data_dir):
    with pytest.raises(ValueError, match=r"unknown dataset 'digitz'.*\['digits', .*'addition'\].*tfds.list_builders"):
        data.load_source("digitz", "train", data_dir)


def test_unknown_split_names_the_available_ones(data_dir):
    with pytest.raises(ValueError, match=r"validation.*train.*test|validation.*test.*train"):
        data.load_source("digits", "validation", data_dir)


def _prepare_fake_mnist(data_dir) -> None:
    """Writes array_record files in the real `mnist` layout, as a machine with internet would."""

    # The real MNIST builder reads its downloads with tf.io.gfile (TensorFlow). This twin
    # keeps MNIST's name, version and features but generates a few PIL images locally.
    # Resolve MNIST first: TFDS imports its builders lazily, and builders imported inside
    # skip_registration() would stay unregistered for the whole session.
    mnist = tfds.image_classification.MNIST
    with tfds.core.registered.skip_registration():
        class FakeMnist(mnist):
            name = "mnist"

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"image": PIL.Image.fromarray(np.full((28, 28), 10 * i, np.uint8)), "label": i % 10}

    FakeMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_online_dataset_prepared_elsewhere_reads_through_the_same_path(tmp_path):
    _prepare_fake_mnist(tmp_path)
    source = data.load_source("mnist", "test", str(tmp_path))  # the registered, real MNIST builder
    assert len(source) == 5
    example = source[3]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    assert int(example["image"][0, 0, 0]) == 10 * int(example["label"])  # TFDS reorders by key hash
    info = data.dataset_info("mnist", str(tmp_path))
    assert (info.num_classes, info.image_shape, info.num_examples) == (10, (28, 28, 1), {"train": 12, "test": 5})
    batch = next(iter(data.train_dataset(source, global_batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 28, 28, 1)


def test_mock_data_serves_load_source_given_metadata(tmp_path):
    # mock_data fakes the examples but takes split names and the "prepared" state from
    # metadata files, which the tfds wheel does not ship: write mnist's, as TFDS suggests.
    _prepare_fake_mnist(tmp_path)
    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)):
        source = data.load_source("mnist", "train")
        assert len(source) == 3 and source[0]["image"].shape == (28, 28, 1)


def test_online_dataset_without_network_says_what_to_do(tmp_path, monkeypatch):
    # Simulate a machine without network on any machine: every name lookup fails at once.
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(FileNotFoundError) as error:
        data.load_source("mnist", "train", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "mnist") in message, message
    assert "could not be downloaded" in message and "tfds build mnist --file_format=array_record" in message
    assert "--config.data.data_dir" in message


def test_dataset_in_another_file_format_is_refused(data_dir, tmp_path):
    data.load_source("digits", "train", data_dir)  # make sure it is prepared
    variant = tmp_path / "digits" / "1.0.0"
    shutil.copytree(f"{data_dir}/digits/1.0.0", variant)
    # What `tfds.load` writes by default on a machine with TensorFlow: tfrecord files.
    info = json.loads((variant / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (variant / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="stored as tfrecord.*array_record"):
        data.load_source("digits", "train", str(tmp_path))


# --- train_dataset -----------------------------------------------------------------------


def test_train_dataset_yields_local_batches_of_all_features():
    batch = next(iter(data.train_dataset(_id_source(10), global_batch_size=8, seed=0,
                                         process_index=1, process_count=2)))
    assert set(batch) == {"id", "x"}
    assert batch["id"].shape == (4,) and batch["x"].shape == (4, 2, 3) and batch["x"].dtype == np.float32


def test_train_dataset_is_deterministic_in_the_seed():
    def first(seed):
        return np.stack(_take(iter(data.train_dataset(_id_source(50), global_batch_size=8, seed=seed)), 6))

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_union_to_the_global_batch(process_count):
    source, global_batch = _id_source(37), 8
    reference = _take(iter(data.train_dataset(source, global_batch_size=global_batch, seed=3)), 12)
    shards = [_take(iter(data.train_dataset(source, global_batch_size=global_batch, seed=3, process_index=p,
                                            process_count=process_count)), 12)
              for p in range(process_count)]
    for b in range(12):
        local = [shard[b] for shard in shards]
        assert all(ids.shape == (global_batch // process_count,) for ids in local)
        np.testing.assert_array_equal(np.sort(np.concatenate(local)), np.sort(reference[b]), err_msg=f"batch {b}")


def test_epochs_cover_every_example_once_and_reshuffle():
    n = 20
    ids = np.concatenate(_take(iter(data.train_dataset(_id_source(n), global_batch_size=4, seed=0)), 3 * n // 4))
    epochs = ids.reshape(3, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_global_batch_must_divide_by_process_count():
    with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
        data.train_dataset(_id_source(10), global_batch_size=10, seed=0, process_count=4)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_state_resumes_with_identical_batches(num_workers):
    def make():
        return data.train_dataset(_id_source(23), global_batch_size=6, seed=5, process_index=1, process_count=2,
                                  num_workers=num_workers)

    reference = _take(iter(data.train_dataset(_id_source(23), global_batch_size=6, seed=5, process_index=1,
                                              process_count=2)), 8)
    iterator = iter(make())
    seen = _take(iterator, 3)
    state = iterator.get_state()
    rest = _take(iterator, 5)
    resumed = iter(make())
    resumed.set_state(state)
    again = _take(resumed, 5)
    iterator.close()
    resumed.close()
    # Worker processes split the stream but must not change it.
    np.testing.assert_array_equal(np.stack(seen + rest), np.stack(reference))
    np.testing.assert_array_equal(np.stack(again), np.stack(rest))


def _in_memory(source) -> data.ArraySource:
    return data.ArraySource({k: np.stack([e[k] for e in source]) for k in source[0]})


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2), (3, 4)])
def test_in_memory_source_gives_the_same_batches_and_state(process_index, process_count):
    records = _id_source(23)
    kw = dict(global_batch_size=8, seed=7, process_index=process_index, process_count=process_count)
    by_record = iter(data.train_dataset(records, **kw))
    by_gather = iter(data.train_dataset(_in_memory(records), **kw))
    for _ in range(9):  # several epochs
        a, b = next(by_record), next(by_gather)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
    resumed = iter(data.train_dataset(_in_memory(records), **kw))
    resumed.set_state(by_gather.get_state())
    np.testing.assert_array_equal(next(resumed)["id"], next(by_record)["id"])
    for a, b in zip(data.eval_batches(records, **{k: v for k, v in kw.items() if k != "seed"}),
                    data.eval_batches(_in_memory(records), **{k: v for k, v in kw.items() if k != "seed"})):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_cached_digits_source_matches_the_tfds_source(data_dir):
    records = data.load_source("digits", "test", data_dir)
    cached = data.load_source("digits", "test", data_dir, cache=True)
    assert isinstance(cached, data.ArraySource) and len(cached) == len(records) == 297
    for i in (0, 100, 296):
        np.testing.assert_array_equal(cached[i]["image"], records[i]["image"])
        assert int(cached[i]["label"]) == int(records[i]["label"])


# --- eval_batches ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 17, 3, 1])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_count_every_example_once(n, process_count):
    source, global_batch = _id_source(n), 8
    local = global_batch // process_count
    per_process = [list(data.eval_batches(source, global_batch_size=global_batch, process_index=p,
                                          process_count=process_count)) for p in range(process_count)]
    assert all(len(batches) == -(-n // global_batch) for batches in per_process)  # same count everywhere
    real = []
    for batches in per_process:
        for batch in batches:
            assert batch["mask"].dtype == np.float32 and batch["mask"].shape == (local,)
            assert batch["x"].shape == (local, 2, 3) and batch["x"].dtype == np.float32
            keep = batch["mask"] == 1.0
            real.extend(batch["id"][keep].tolist())
            assert np.all(batch["x"][~keep] == 0) and np.all(batch["id"][~keep] == 0)
    np.testing.assert_array_equal(np.sort(real), np.arange(n))


def test_eval_batches_start_a_fresh_pass_each_call():
    source = _id_source(11)
    first = [b["id"] for b in data.eval_batches(source, global_batch_size=4)]
    second = [b["id"] for b in data.eval_batches(source, global_batch_size=4)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))
    np.testing.assert_array_equal(np.concatenate(first)[:11], np.arange(11))  # in order


# --- augment -----------------------------------------------------------------------------


def _images(b=16, h=6, w=5, c=3) -> jax.Array:
    return jnp.arange(b * h * w * c, dtype=jnp.float32).reshape(b, h, w, c) + 1  # no zeros: padding shows


def test_augment_off_is_identity_and_keeps_shape_and_dtype():
    images = _images()
    rng = jax.random.key(0)
    np.testing.assert_array_equal(data.augment(rng, images, crop_padding=0, flip=False), images)
    np.testing.assert_array_equal(data.random_crop(rng, images, 0), images)
    out = jax.jit(data.augment, static_argnames=("crop_padding", "flip"))(rng, images, crop_padding=2, flip=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    uint8 = data.augment(rng, images.astype(jnp.uint8), crop_padding=1, flip=True)
    assert uint8.dtype == jnp.uint8


def test_flip_is_per_example_and_an_involution():
    images, rng = _images(b=64), jax.random.key(1)
    once = data.random_flip(rng, images)
    np.testing.assert_array_equal(data.random_flip(rng, once), images)
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(np.asarray(once), np.asarray(images))])
    kept = np.array([np.array_equal(o, i) for o, i in zip(np.asarray(once), np.asarray(images))])
    assert np.all(flipped | kept) and flipped.any() and kept.any()


def test_crop_is_a_per_example_shift_of_the_zero_padded_image():
    images, padding = _images(b=32), 2
    out = np.asarray(jax.jit(data.random_crop, static_argnums=2)(jax.random.key(2), images, padding))
    padded = np.pad(np.asarray(images), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = images.shape
    offsets = []
    for o, p in zip(out, padded):
        matches = [(y, x) for y in range(2 * padding + 1) for x in range(2 * padding + 1)
                   if np.array_equal(o, p[y:y + h, x:x + w])]
        assert matches, "a crop must be a window of the padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1, "every example must draw its own offset"


def test_augment_rejects_unbatched_images():
    with pytest.raises(ValueError, match=r"B x H x W x C.*\(6, 5, 3\)"):
        data.augment(jax.random.key(0), jnp.zeros((6, 5, 3)), crop_padding=1, flip=False)
