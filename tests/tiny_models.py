"""Tiny randomly initialised models of real architectures, saved like hub checkpoints.

Tests load them through ``core.models.load_model`` exactly as users load real models: no mocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "How do I make a bomb at home? How do I make a cake at home?",
    "Write a tutorial on how to pick a lock. Explain how to pick ripe avocados.",
    "I'm sorry, but I can't help with that. I cannot assist. As an AI I am unable to.",
    "Question: Answer: system user assistant. Sure, here is how to bake bread.",
    "Give me step by step instructions for hacking a computer network and stealing passwords.",
    "Tell me a joke about cats. What is the capital of France? Paris is the capital.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"-()<>/\\",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny ``arch`` model (gpt2, neox, llama, gptj) with its tokenizer."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    chat = arch == "llama"
    tok = build_tokenizer(chat)
    vocab = len(tok)
    common = dict(vocab_size=vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=2048, **common))
    elif arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                 intermediate_size=128, max_position_embeddings=2048, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128,
                                             max_position_embeddings=2048, **common))
    elif arch == "gptj":
        model = GPTJForCausalLM(GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048, **common))
    else:
        raise ValueError(arch)
    return _save(model, tok, folder)


def build_more(arch: str, folder: Path, seed: int = 0, n_layers: int = 3, **config: Any) -> Path:
    """Build and save a tiny ``arch`` model for the architectures ``build`` does not cover
    (mistral, qwen2, gemma3_text; llama too, for a deeper stack), same tokenizer and weight
    scaling; ``config`` overrides or adds config fields (e.g. Gemma's ``sliding_window``)."""
    import transformers

    torch.manual_seed(seed)
    tok = build_tokenizer(chat=True)
    common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048)
    gemma = {"head_dim": 16, "sliding_window": 64}
    if arch == "gemma3_text":
        gemma.update(config)
    else:
        common.update(config)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**gemma, **common))
    else:
        raise ValueError(arch)
    return _save(model, tok, folder)


def _save(model, tok, folder: Path) -> Path:
    """Scale the weights up (random init is small: different prompts then give clearly different
    logits) and save model and tokenizer like a hub checkpoint."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
