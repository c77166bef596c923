"""Test helpers: tiny random Hugging Face models (the oracle) and GGUF files written from them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": ("mistral", dict(sliding_window=128)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}


def make_hf_model(variant: str, seed: int = 0):
    """A random tiny transformers model of one config variant, weights perturbed everywhere."""
    model_type, extra = VARIANTS[variant]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits norms at 1 and biases at 0: randomize them too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model


def save_hf_model(model, path: Path, shard: bool = False) -> Path:
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    return path


def hf_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long)).logits
    return torch.log_softmax(out.float(), dim=-1).numpy()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleave each head's rows as llama.cpp's converter stores Q and K."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def quantize_roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(model, path: Path, qtype=gguf.GGMLQuantizationType.F32, rope_freqs=None,
               arch: str = "llama", tokenizer_meta: dict | None = None) -> Path:
    """Write an HF llama model as llama.cpp would: permuted Q/K, 2-D weights in `qtype`."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for key, value in (tokenizer_meta or {}).items():
        w.add_key_value(key, value[0], value[1])

    def put(name, array, quantize=True):
        if quantize and array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        put("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if g_name == "attn_q":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            if g_name == "attn_k":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
            put(f"blk.{i}.{g_name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_peft_adapter(variant: str, path: Path, seed: int = 0, **lora_kwargs):
    """A PEFT adapter with random A and B (init_lora_weights=False) on a tiny model variant,
    saved to `path`; returns the PEFT model (the oracle)."""
    from peft import LoraConfig, get_peft_model
    base = make_hf_model(variant)
    torch.manual_seed(seed)
    lora_kwargs.setdefault("target_modules", "all-linear")
    config = LoraConfig(r=lora_kwargs.pop("r", 8), lora_alpha=lora_kwargs.pop("lora_alpha", 16),
                        init_lora_weights=False, **lora_kwargs)
    model = get_peft_model(base, config).eval()
    perturb_dora_magnitudes(model, seed)
    model.save_pretrained(path)
    return model


def perturb_dora_magnitudes(peft_model, seed: int = 0, spread: float = 1.0) -> None:
    """PEFT starts DoRA's magnitude at ||W + sBA||, making its scale exactly 1: move it (by a
    factor in 1 +- spread/2), so a test can tell DoRA from LoRA."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 - spread / 2 + spread * torch.rand(p.shape, generator=gen))


def random_tied_adapter(cfg, name: str = "tied", rank: int = 8, seed: int = 0,
                        targets=("q", "v", "down")):
    """A Tied-LoRA adapter: one A and one B per target shared by all layers, per-layer u, v."""
    from jlora.adapters import Adapter, ModuleAdapter, target_shapes
    rng = np.random.default_rng(seed)
    shapes = target_shapes(cfg)
    modules = {}
    for t in targets:
        n_in, n_out = shapes[t]
        a = (rng.normal(size=(rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.normal(size=(n_out, rank)) * 0.5).astype(np.float32)
        for layer in range(cfg.n_layers):
            modules[(layer, t)] = ModuleAdapter(
                a=a, b=b, scale=1.0, u=rng.uniform(0.5, 1.5, rank).astype(np.float32),
                w=rng.uniform(0.5, 1.5, n_out).astype(np.float32))
    return Adapter(name=name, variant="tied", modules=modules)


def random_lora_adapter(cfg, name: str, rank: int = 8, seed: int = 0, variant: str = "lora",
                        targets=("q", "k", "v", "o", "gate", "up", "down")):
    """A LoRA (or DoRA, with magnitudes away from their init) adapter with random A and B on
    every layer, big enough to change a tiny model's outputs."""
    from jlora.adapters import Adapter, ModuleAdapter, target_shapes
    rng = np.random.default_rng(seed)
    shapes = target_shapes(cfg)
    modules = {}
    for layer in range(cfg.n_layers):
        for t in targets:
            n_in, n_out = shapes[t]
            m = rng.uniform(0.5, 1.5, n_out).astype(np.float32) if variant == "dora" else None
            modules[(layer, t)] = ModuleAdapter(
                a=(rng.normal(size=(rank, n_in)) / np.sqrt(n_in)).astype(np.float32),
                b=(rng.normal(size=(n_out, rank)) * 0.5).astype(np.float32), scale=2.0, m=m)
    return Adapter(name=name, variant=variant, modules=modules)
