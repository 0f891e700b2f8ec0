"""GPT-2 import/export against Hugging Face transformers (an optional extra: skipped where absent)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxml.models import gpt2, transformer

torch = pytest.importorskip("torch", reason="the GPT-2 parity test needs torch (jaxml[hf], Python < 3.12 here)")
transformers = pytest.importorskip("transformers", reason="the GPT-2 parity test needs transformers (jaxml[hf])")
pytest.importorskip("safetensors", reason="GPT-2 import reads safetensors (jaxml[hf])")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and norms, so a dropped or transposed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_import_matches_transformers_logits(hf_gpt2, scan_layers):
    model_hf, directory = hf_gpt2
    config = gpt2.read_hf_config(str(directory))
    model = transformer.DecoderLM(**gpt2.model_kwargs(config), scan_layers=scan_layers)
    params = gpt2.import_params(str(directory / "model.safetensors"), scan_layers=scan_layers)
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, SMALL["vocab_size"])
    # The imported tree has exactly the model's paths and shapes.
    expected = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)))
    ours = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(ours, _hf_logits(model_hf, tokens), atol=2e-4, rtol=1e-4)


def test_export_round_trip_and_transformers_loads_it(hf_gpt2, tmp_path):
    model_hf, directory = hf_gpt2
    params = gpt2.import_params(str(directory), scan_layers=True)
    path = gpt2.export_params(params, str(tmp_path / "out"), num_heads=SMALL["n_head"])
    again = gpt2.import_params(path, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, params, again)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.arange(40).reshape(2, 20) * 7 % SMALL["vocab_size"]
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model_hf, tokens), atol=2e-4, rtol=1e-4)


def test_import_shorter_context_and_bad_input(hf_gpt2, tmp_path):
    _, directory = hf_gpt2
    params = gpt2.import_params(str(directory), max_len=16)
    assert params["embed"]["position"].shape == (16, SMALL["n_embd"])
    with pytest.raises(ValueError, match="exceeds"):
        gpt2.import_params(str(directory), max_len=65)
    with pytest.raises(ValueError, match="model_type"):
        gpt2.model_kwargs({"model_type": "llama"})
    model = transformer.DecoderLM(**gpt2.model_kwargs(gpt2.read_hf_config(str(directory))))
    assert model.norm_epsilon == 1e-5 and model.mlp_dim == 4 * SMALL["n_embd"]
