"""What a transformers model's class says about its task: PEFT's ``task_type`` and the new task head.

A transformers model is recognised without importing transformers: it has ``config`` and
``get_output_embeddings``. Its class name ends with the task (``LlamaForCausalLM``,
``BertForSequenceClassification``, ``GPT2LMHeadModel``). The task heads of :data:`HEADS` are what the base
checkpoint does not hold (a classifier of new labels): as PEFT's ``task_type`` does (its
``modules_to_save``), they are trained fully unless a config says otherwise.
"""

from __future__ import annotations

from torch import nn

#: Class name endings -> PEFT's ``task_type`` (``AutoPeftModelFor*`` loads the base model by it).
TASK_TYPES: dict[str, str] = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
#: Class name endings of models with a task head the base checkpoint lacks -> the head's attribute names,
#: those that PEFT's ``task_type`` trains (``SEQ_CLS``/``TOKEN_CLS``: classifier, score; ``QUESTION_ANS``:
#: qa_outputs), and the same heads of image and audio classifiers.
HEADS: dict[str, tuple[str, ...]] = {
    "ForSequenceClassification": ("classifier", "score"),
    "ForTokenClassification": ("classifier", "score"),
    "ForQuestionAnswering": ("qa_outputs",),
    "ForMultipleChoice": ("classifier",),
    "ForImageClassification": ("classifier",),
    "ForAudioClassification": ("classifier",),
}


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers model (it has ``config`` and ``get_output_embeddings``)."""
    return callable(getattr(module, "get_output_embeddings", None)) and hasattr(module, "config")


def task_type(module: nn.Module) -> str | None:
    """PEFT's ``task_type`` of a transformers model, from its class name (None if none fits).

    ``*ForConditionalGeneration`` is ``SEQ_2_SEQ_LM`` only for encoder-decoder models (T5, BART).
    """
    if not is_transformers_model(module):
        return None
    name = type(module).__name__
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(module.config, "is_encoder_decoder", False) else None
    return next((task for ending, task in TASK_TYPES.items() if name.endswith(ending)), None)


def task_heads(module: nn.Module) -> list[str]:
    """The attribute names of the task heads of a transformers model that its base checkpoint lacks."""
    if not is_transformers_model(module):
        return []
    name = type(module).__name__
    attributes = next((heads for ending, heads in HEADS.items() if name.endswith(ending)), ())
    return [attribute for attribute in attributes if isinstance(getattr(module, attribute, None), nn.Module)]


def name_or_path(module: nn.Module) -> str | None:
    """The hub name or folder a transformers model was loaded from (``from_pretrained``), None if built
    from a config."""
    if not is_transformers_model(module):
        return None
    return getattr(module.config, "_name_or_path", None) or None
