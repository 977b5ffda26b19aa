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


# model factory, targets for DoRA's tests (llama: plain nn.Linear, fused; bert: base biases; gpt2: transformers' Conv1D)
DORA_MODELS = {
    "llama": (llama, ["q_proj", "v_proj", "down_proj"]),
    "bert": (bert, ["query", "value"]),
    "gpt2": (gpt2, ["c_attn", "c_fc"]),
}


def logits(model, tokens):
    return model(input_ids=tokens).logits
