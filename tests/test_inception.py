"""Parity of jaxml.models.inception with pytorch-fid's FID Inception, on random weights (no download)."""

import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the fid extra, Python < 3.12 here) is needed for the parity test")
if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("pytorch_fid") is None:
    pytest.skip("pytorch-fid and torchvision (the fid extra in pyproject.toml, Python < 3.12 here) are needed",
                allow_module_level=True)

import jax

from jaxml import sample_quality
from jaxml.models import inception


def _import_pytorch_fid():
    """pytorch_fid.inception. torchvision's wheels are CUDA builds whose compiled ops (_C.so) do not
    load with the CPU-only torch here, which makes `import torchvision` fail in its op registrations;
    the Inception model is pure Python, so then the package is entered without its __init__."""
    try:
        import torchvision
    except (RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["torchvision"] = package
        try:
            import torchvision.models
            from torchvision import version
            package.__version__, package.models = version.__version__, torchvision.models
            from pytorch_fid import inception as fid
        finally:
            # pytorch_fid keeps its reference; later importers in this process see no half-package.
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
        return fid
    from pytorch_fid import inception as fid
    return fid


def _fid_inception_random(seed: int):
    """pytorch-fid's fid_inception_v3() with random weights in place of its download, and random
    BatchNorm running statistics so that a wrong eps or a mixed-up mean/var would show."""
    fid = _import_pytorch_fid()
    torch.manual_seed(seed)
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                # He-scaled so activations neither vanish nor blow up through ~90 layers.
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    # pytorch-fid's own InceptionV3 wrapper (resize, 2x-1, the blocks up to pool3) around this net
    # in place of the downloaded one.
    original = fid.fid_inception_v3
    fid.fid_inception_v3 = lambda: net
    try:
        wrapper = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid.fid_inception_v3 = original
    return net.eval(), wrapper.eval()


@pytest.fixture(scope="module")
def fid_nets():
    return _fid_inception_random(seed=0)


def test_features_match_pytorch_fid(fid_nets, tmp_path):
    net, wrapper = fid_nets
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)  # resized up to 299
    with torch.no_grad():
        want = wrapper(torch.from_numpy(images).permute(0, 3, 1, 2))[0].reshape(2, -1).numpy()

    # Through the weights file, as sample_quality's Inception-FID reads it (.npz: a conversion of the .pth).
    path = tmp_path / "fid_inception.npz"
    np.savez(path, **{k: v.numpy() for k, v in net.state_dict().items()})
    got = sample_quality.inception_features(str(path), batch_size=1)(images)

    assert got.shape == want.shape == (2, inception.FEATURES)
    assert np.std(want) > 1e-2  # the features are not degenerate, so agreement means something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_pth_npz_and_safetensors_load_alike(fid_nets, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    net, _ = fid_nets
    arrays = {k: v.numpy() for k, v in net.state_dict().items()}
    torch.save(net.state_dict(), tmp_path / "w.pth")
    np.savez(tmp_path / "w.npz", **arrays)
    safetensors_numpy.save_file(arrays, str(tmp_path / "w.safetensors"))
    a = inception.load_variables(str(tmp_path / "w.pth"))
    for other in ("w.npz", "w.safetensors"):
        b = inception.load_variables(str(tmp_path / other))
        same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and jax.tree_util.tree_all(same)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .pth"):
        inception.load_state_dict(str(tmp_path / "w.ckpt"))
    kernel = a["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, net.Mixed_6b.branch7x7_2.conv.weight.numpy().transpose(2, 3, 1, 0))
    assert kernel.shape == (1, 7, 128, 128)


def test_convert_rejects_a_foreign_state_dict(fid_nets):
    net, _ = fid_nets
    state = dict(net.state_dict())
    del state["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(ValueError, match="1 missing"):
        inception.convert_state_dict(state)
    with pytest.raises(ValueError, match="unexpected key"):
        inception.convert_state_dict({"Mixed_5b.branch1x1.linear.weight": np.zeros((1,))})


def test_inception_features_needs_a_weights_file(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXML_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="JAXML_INCEPTION_WEIGHTS"):
        sample_quality.inception_features()
    monkeypatch.setenv("JAXML_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        sample_quality.inception_features()
