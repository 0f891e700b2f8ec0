"""GPT-2 weights from / to Hugging Face `safetensors` files, for `jaxml.models.transformer.DecoderLM`.

GPT-2 is a pre-norm decoder with learned positions, LayerNorm epsilon 1e-5, tanh-approximated
GELU, biases everywhere and a tied unembedding: `DecoderLM(**model_kwargs(hf_config))` is
that model. Hugging Face's Conv1D layers store weights as (in, out), so they are jaxml
kernels up to a reshape into heads; `c_attn` is split into query, key and value.

GPT-2's key bias is dropped on import: it adds q.b_k to every logit of a softmax row,
which the softmax cancels exactly, so the model computes the same function without it
(jaxml's attention has no key bias for that reason); export writes it as zeros.

    params = gpt2.import_params("model.safetensors", scan_layers=True)   # jaxml tree
    gpt2.export_params(params, "out_dir", num_heads=12)                  # model.safetensors + config.json
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np

# Buffers some transformers versions save beside the weights; no parameters.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _require_safetensors():
    try:
        import safetensors.numpy
    except ImportError as e:  # an optional extra
        raise ImportError("reading GPT-2 safetensors needs the `safetensors` package: "
                          "pip install 'jaxml[hf]' (or pip install safetensors)") from e
    return safetensors.numpy


def read_hf_config(path: str) -> dict:
    """The config.json next to a safetensors file (or in a model directory)."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json next to {path}: GPT-2's head count is not in the weights")
    with open(config_path) as f:
        return json.load(f)


def model_kwargs(hf_config: dict) -> dict:
    """DecoderLM keyword arguments that reproduce the GPT-2 of a Hugging Face config."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"expected a GPT-2 config (model_type 'gpt2'), got {hf_config.get('model_type')!r}")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"jaxml's DecoderLM uses the tanh GELU (gelu_new); this GPT-2 uses {activation!r}")
    features = hf_config["n_embd"]
    return dict(vocab_size=hf_config["vocab_size"], num_layers=hf_config["n_layer"], features=features,
                num_heads=hf_config["n_head"], mlp_dim=hf_config.get("n_inner") or 4 * features,
                max_len=hf_config["n_positions"], norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
                tied_embedding=True, rope=False)


def _path(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(path, "model.safetensors") if os.path.isdir(path) else path


def import_params(path: str, num_heads: int | None = None, scan_layers: bool = True,
                  max_len: int | None = None) -> dict:
    """DecoderLM params from a GPT-2 safetensors file (or a directory holding model.safetensors).

    `num_heads` defaults to config.json's n_head; `max_len` < n_positions keeps the first
    `max_len` learned positions (fine-tuning on shorter windows).
    """
    tensors = _require_safetensors().load_file(_path(path))
    weights = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}
    if num_heads is None:
        num_heads = read_hf_config(path)["n_head"]
    if "wte.weight" not in weights:
        raise ValueError(f"{path} does not look like GPT-2: no wte.weight among {sorted(weights)[:8]}")
    if "lm_head.weight" in weights and not np.array_equal(weights["lm_head.weight"], weights["wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight: jaxml's DecoderLM ties the unembedding")
    wte, wpe = weights["wte.weight"], weights["wpe.weight"]
    features = wte.shape[1]
    if features % num_heads:
        raise ValueError(f"width {features} is not divisible by num_heads={num_heads}")
    head_dim = features // num_heads
    num_layers = len({k.split(".")[1] for k in weights if k.startswith("h.")})
    if max_len is not None:
        if max_len > wpe.shape[0]:
            raise ValueError(f"max_len={max_len} exceeds GPT-2's {wpe.shape[0]} learned positions")
        wpe = wpe[:max_len]

    def layer(i):
        w = {k[len(f"h.{i}."):]: v for k, v in weights.items() if k.startswith(f"h.{i}.")}
        qkv_w, qkv_b = w["attn.c_attn.weight"], w["attn.c_attn.bias"]  # (D, 3D), (3D,)
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=1)
        q_b, _, v_b = np.split(qkv_b, 3)  # the key bias cannot change the output (module docstring)
        heads = (features, num_heads, head_dim)
        return {
            "norm_attention": {"scale": w["ln_1.weight"], "bias": w["ln_1.bias"]},
            "attention": {
                "query": {"kernel": q_w.reshape(heads), "bias": q_b.reshape(num_heads, head_dim)},
                "key": {"kernel": k_w.reshape(heads)},
                "value": {"kernel": v_w.reshape(heads), "bias": v_b.reshape(num_heads, head_dim)},
                # c_proj's input is the heads concatenated (n * H + h).
                "out": {"kernel": w["attn.c_proj.weight"].reshape(num_heads, head_dim, features),
                        "bias": w["attn.c_proj.bias"]},
            },
            "norm_mlp": {"scale": w["ln_2.weight"], "bias": w["ln_2.bias"]},
            "mlp_in": {"kernel": w["mlp.c_fc.weight"], "bias": w["mlp.c_fc.bias"]},
            "mlp_out": {"kernel": w["mlp.c_proj.weight"], "bias": w["mlp.c_proj.bias"]},
        }

    layers = [layer(i) for i in range(num_layers)]
    if scan_layers:
        decoder = {"layers": {"block": jax.tree.map(lambda *xs: np.stack(xs), *layers)}}
    else:
        decoder = {f"layer_{i}": {"block": b} for i, b in enumerate(layers)}
    return {
        "embed": {"token": {"embedding": wte}, "position": wpe},
        "decoder": decoder,
        "norm_final": {"scale": weights["ln_f.weight"], "bias": weights["ln_f.bias"]},
    }


def export_params(params: dict, directory: str, num_heads: int, norm_epsilon: float = 1e-5) -> str:
    """Write DecoderLM `params` as a Hugging Face GPT-2 (model.safetensors + config.json); returns the file."""
    params = jax.tree.map(np.asarray, nn.unbox(params))
    decoder = params["decoder"]
    if "layers" in decoder:
        stacked = decoder["layers"]["block"]
        num_layers = jax.tree.leaves(stacked)[0].shape[0]
        blocks = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]
    else:
        blocks = [decoder[f"layer_{i}"]["block"] for i in range(len(decoder))]
    wte, wpe = params["embed"]["token"]["embedding"], params["embed"]["position"]
    features = wte.shape[1]
    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": wpe,
           "transformer.ln_f.weight": params["norm_final"]["scale"],
           "transformer.ln_f.bias": params["norm_final"]["bias"]}
    for i, b in enumerate(blocks):
        a = b["attention"]
        flat = lambda k: k.reshape(features, -1)  # noqa: E731 -- (D, N, H) -> (D, N*H)
        h = f"transformer.h.{i}."
        out.update({
            h + "ln_1.weight": b["norm_attention"]["scale"], h + "ln_1.bias": b["norm_attention"]["bias"],
            h + "attn.c_attn.weight": np.concatenate([flat(a["query"]["kernel"]), flat(a["key"]["kernel"]),
                                                      flat(a["value"]["kernel"])], axis=1),
            h + "attn.c_attn.bias": np.concatenate([a["query"]["bias"].reshape(-1), np.zeros(features, np.float32),
                                                    a["value"]["bias"].reshape(-1)]),
            h + "attn.c_proj.weight": a["out"]["kernel"].reshape(-1, features),
            h + "attn.c_proj.bias": a["out"]["bias"],
            h + "ln_2.weight": b["norm_mlp"]["scale"], h + "ln_2.bias": b["norm_mlp"]["bias"],
            h + "mlp.c_fc.weight": b["mlp_in"]["kernel"], h + "mlp.c_fc.bias": b["mlp_in"]["bias"],
            h + "mlp.c_proj.weight": b["mlp_out"]["kernel"], h + "mlp.c_proj.bias": b["mlp_out"]["bias"],
        })
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.safetensors")
    _require_safetensors().save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, path,
                                     metadata={"format": "pt"})
    mlp_dim = blocks[0]["mlp_in"]["kernel"].shape[1]
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": wte.shape[0],
              "n_positions": wpe.shape[0], "n_embd": features, "n_layer": len(blocks), "n_head": num_heads,
              "n_inner": mlp_dim, "activation_function": "gelu_new", "layer_norm_epsilon": norm_epsilon,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
