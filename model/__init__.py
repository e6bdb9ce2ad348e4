"""slm.model: a Qwen3-compatible decoder (dense or MoE) and its Hugging Face round trip.

    from model import ModelConfig, Transformer, lm_loss, save_hf_dir, load_hf_dir

    cfg = ModelConfig(vocab_size=32000, hidden_size=512, num_layers=16, num_heads=8, num_kv_heads=2)
    model = Transformer(cfg)
    logits = model(input_ids, document_ids=doc_ids)          # (B, T, V)
    loss = lm_loss(logits, targets) + cfg.router_aux_loss_coef * model.aux_loss
    save_hf_dir(model, tokenizer_dir, "out/hf")              # loads with AutoModelForCausalLM
    model, cfg = load_hf_dir("out/hf")                       # or a stock Qwen2/Qwen3 directory

`cfg.num_params()` and `cfg.flops_per_token(seq_len)` give sizes and the
6N + attention FLOPs estimate used for MFU.
"""

from .config import ModelConfig
from .hf import load_hf_dir, save_hf_dir
from .transformer import Transformer, lm_loss

__all__ = ["ModelConfig", "Transformer", "lm_loss", "save_hf_dir", "load_hf_dir"]
