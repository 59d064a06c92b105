"""LoRA on the language model (peft): r 8, α 16, on q_proj and v_proj, as the paper trains LLaVA-Med."""

from __future__ import annotations


def has_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def apply_lora(model, dropout: float = 0.05):
    """Wrap `model.language_model` with LoRA adapters (in place); returns the model."""
    from peft import LoraConfig, get_peft_model

    if has_lora(model):
        return model
    cfg = model.config
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                      lora_dropout=dropout, bias="none", task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, lora)
    return model


def base_language_model(model):
    """The underlying transformers model, with or without LoRA."""
    return model.language_model.get_base_model() if has_lora(model) else model.language_model
