"""Moving weights between refgpt and Hugging Face GPT-2 (``GPT2LMHeadModel``).

Both store the four matrices of a block [in, out] (GPT-2's Conv1D layout; PyTorch's
nn.Linear would be [out, in] and need a transpose), and refgpt's names are Hugging Face's
without the ``transformer.`` prefix, so conversion is renaming plus the vocabulary padding:
refgpt's wte has ``padded_vocab`` rows, Hugging Face's ``vocab_size``. The LM head is tied
to wte in both (Hugging Face's ``lm_head.weight`` is not stored separately).

    hf_state_dict(params, cfg)      refgpt tensors -> {"transformer.wte.weight": ..., ...}
    refgpt_state_dict(sd, cfg)      Hugging Face tensors (either naming) -> refgpt tensors
    hf_config(cfg) / model_config(d)   config.json <-> ModelConfig
    export_hf(ckpt, outdir) / import_hf(hfdir, ckpt)   the files, used by refgpt.convert
    hf_gpt2()                       transformers' GPT2Config and GPT2LMHeadModel
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .checkpoint import load_checkpoint, write_tensors
from .cli import CheckpointError
from .config import ConfigError, ModelConfig

CHECKOUT = Path(__file__).resolve().parent.parent
PREFIX = "transformer."
GELU_NAMES = {"tanh": "gelu_new", "erf": "gelu"}
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}
BUFFERS = (".attn.bias", ".attn.masked_bias")      # causal-mask buffers in older files


def hf_config(cfg: ModelConfig, eos_token_id: int = 0) -> dict:
    if cfg.num_experts:
        raise ConfigError("a model with experts (--num-experts) has no Hugging Face GPT-2 "
                          "equivalent (python -m refgpt.convert --to consolidated writes a "
                          "checkpoint's whole tensors)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
            "n_inner": None, "activation_function": GELU_NAMES[cfg.gelu],
            "layer_norm_epsilon": cfg.layernorm_eps, "initializer_range": cfg.init_std,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}


def model_config(hf: dict, vocab_multiple: int = 64) -> ModelConfig:
    """ModelConfig of a Hugging Face GPT-2 config.json; refuses what refgpt does not model."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"not a GPT-2 config (model_type {hf.get('model_type')!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_GELU:
        raise ValueError(f"unsupported activation_function {act!r}")
    C = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * C):
        raise ValueError(f"n_inner {hf['n_inner']} != 4 * n_embd is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"{flag} is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("scale_attn_weights = false is not supported")
    return ModelConfig(num_layers=hf["n_layer"], hidden_size=C, num_attention_heads=hf["n_head"],
                       seq_length=hf["n_positions"], vocab_size=hf["vocab_size"],
                       vocab_multiple=vocab_multiple, gelu=HF_GELU[act],
                       layernorm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       init_std=hf.get("initializer_range", 0.02),
                       dropout=hf.get("resid_pdrop", 0.0))


def hf_state_dict(params: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {PREFIX + n: np.ascontiguousarray(v) for n, v in params.items()}
    out[PREFIX + "wte.weight"] = np.ascontiguousarray(params["wte.weight"][:cfg.vocab_size])
    return out


def refgpt_state_dict(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {}
    for name, value in sd.items():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if short == "lm_head.weight" or short.endswith(BUFFERS):
            continue
        out[short] = np.asarray(value)
    if "wte.weight" not in out:
        raise ValueError("no wte.weight among the tensors: not a GPT-2 state dict")
    wte = np.zeros((cfg.padded_vocab, cfg.hidden_size), out["wte.weight"].dtype)
    wte[:cfg.vocab_size] = out["wte.weight"]
    out["wte.weight"] = wte
    return out


def export_hf(ckpt_path, outdir) -> Path:
    """Write a refgpt checkpoint as a Hugging Face folder (config.json, model.safetensors)."""
    ckpt = load_checkpoint(ckpt_path, with_optimizer=False)
    cfg = ModelConfig.from_dict(ckpt.state["model"])
    config = hf_config(cfg)                             # refuses what GPT-2 cannot hold
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(hf_state_dict(ckpt.params, cfg), out / "model.safetensors",
                  metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if ckpt.tokenizer:
        shutil.copyfile(ckpt.tokenizer, out / "tokenizer.json")
    return out


def load_hf(hfdir) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, refgpt-named float tensors) of a Hugging Face GPT-2 folder."""
    folder = Path(hfdir)
    conf, weights = folder / "config.json", folder / "model.safetensors"
    if not conf.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} needs config.json and model.safetensors "
                                f"(pytorch_model.bin is not read; re-save with safetensors)")
    try:
        cfg = model_config(json.loads(conf.read_text()))
        sd = load_file(str(weights))
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"corrupt {conf}: {e}") from None
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"corrupt {weights}: {e}") from None
    return cfg, refgpt_state_dict(sd, cfg)


def import_hf(hfdir, ckpt_path, dtype: str = "float32") -> Path:
    """Write a Hugging Face GPT-2 folder as a refgpt checkpoint at iteration 0 (fresh optimizer)."""
    from .checkpoint import save_checkpoint
    from .config import TrainConfig
    from .nn import Params, param_specs
    cfg, tensors = load_hf(hfdir)
    params = Params(param_specs(cfg), np.dtype(dtype))
    try:
        params.load_state_dict(tensors)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{hfdir}: {e}") from None
    zeros = {n: np.zeros_like(v) for n, v in params.items()}   # a fresh AdamW state
    state = {"consumed_samples": 0, "dtype": dtype, "seed": 0, "model": cfg.to_dict(),
             "train": TrainConfig(dtype=dtype).to_dict()}
    tok = Path(hfdir) / "tokenizer.json"
    return save_checkpoint(ckpt_path, 0, dict(params.items()),
                           {"exp_avg": zeros, "exp_avg_sq": zeros}, 0, state,
                           tok if tok.is_file() else None)


def hf_gpt2():
    """(GPT2Config, GPT2LMHeadModel) from transformers. Recent transformers import Hugging
    Face's ``kernels`` package where it is installed (it is a dependency of theirs); run from
    a checkout of refgpt, where ``python -m`` puts the working directory first on sys.path,
    that name finds refgpt's own kernels/ folder instead (installed as refgpt.kernels). So
    the checkout's root is left out of sys.path while transformers loads."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT]
    wrong = sys.modules.get("kernels")
    if wrong is not None and Path(getattr(wrong, "__file__", None) or "/").parent == \
            CHECKOUT / "kernels":
        del sys.modules["kernels"]
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    finally:
        sys.path[:] = saved
    return GPT2Config, GPT2LMHeadModel
