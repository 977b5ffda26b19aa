"""Tiny Hugging Face models built from configs (no download), without dropout, in eval mode."""


def llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def bert():
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).eval()


def gpt2():
    import transformers

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def qwen2():
    import transformers

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(config).eval()  # q, k and v projections with a bias


# model factory, targets for DoRA's tests (llama: plain nn.Linear, fused; bert: base biases; gpt2: transformers' Conv1D)
DORA_MODELS = {
    "llama": (llama, ["q_proj", "v_proj", "down_proj"]),
    "bert": (bert, ["query", "value"]),
    "gpt2": (gpt2, ["c_attn", "c_fc"]),
}


def logits(model, tokens):
    return model(input_ids=tokens).logits


def _routed(model, seed=0):
    """Random routers (transformers initialises some at zero) and biases, so that tokens take different experts."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name or name.endswith("mlp.gate.weight") or name.endswith("_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def qwen3_moe():
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=32)
    return _routed(transformers.Qwen3MoeForCausalLM(config))


def mixtral():
    import transformers

    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)
    return _routed(transformers.MixtralForCausalLM(config))


def gpt_oss():
    """gpt-oss holds its expert weights (experts, in, out), with expert biases."""
    import transformers

    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=32, head_dim=8,
                                       layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    return _routed(transformers.GptOssForCausalLM(config))


MOE_MODELS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "gpt_oss": gpt_oss}
