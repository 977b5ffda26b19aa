"""Crafted PEFT adapter folders, with PEFT itself as the oracle: every one refused cleanly or loaded as PEFT loads it.

Folders written by PEFT (plain LoRA, ``lora_bias``, DoRA) are mutated: each field of
``adapter_config.json`` given wrong types, ranges and contradictions, the JSON itself broken, the
files replaced by folders, pipes, devices and pickles, the tensors dropped, renamed, reshaped,
retyped and added. For each, ``import_peft`` must either raise ``ValueError``, ``TypeError`` or
``FileNotFoundError`` with the model unchanged, or load, and then PEFT must load the same folder and
compute the same logits. Nothing may hang (each import runs under an alarm) or raise anything else.
"""

import copy
import json
import math
import os
import signal
import struct

import peft
import pytest
import torch
from hf_models import llama
from safetensors.torch import load_file, save_file

from lightning_lora import import_peft

TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The base model's state and PEFT folders of it: plain LoRA, with lora_bias, and DoRA."""
    torch.manual_seed(0)
    base = llama().state_dict()
    folders = {}
    for name, settings in {"plain": {}, "bias": {"lora_bias": True}, "dora": {"use_dora": True}}.items():
        model = fresh(base)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **settings)
        peft_model = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            for module in peft_model.modules():
                if isinstance(module, peft.tuners.lora.Linear) and module.lora_B["default"].bias is not None:
                    module.lora_B["default"].bias.normal_()
        folders[name] = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(folders[name])
    return base, folders


def fresh(base):
    model = llama()
    model.load_state_dict(base)
    return model


def edit_config(change):
    def mutate(folder):
        path = folder / CONFIG
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
    return mutate


def set_field(field, value):
    return edit_config(lambda config: config.__setitem__(field, value))


def raw_config(text):
    def mutate(folder):
        (folder / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def edit_tensors(change):
    def mutate(folder):
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file(tensors, folder / WEIGHTS)
    return mutate


def first(tensors, suffix):
    return next(key for key in sorted(tensors) if key.endswith(suffix))


def replace_with(kind, which):
    def mutate(folder):
        path = folder / which
        path.unlink()
        if kind == "folder":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            path.symlink_to("/dev/zero")
        elif kind == "missing":
            pass
    return mutate


def raw_weights(transform):
    def mutate(folder):
        path = folder / WEIGHTS
        path.write_bytes(transform(path.read_bytes()))
    return mutate


def _header_edit(data, change):
    """A safetensors file's bytes with its JSON header changed (the tensor data left as it is)."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def pickled(folder):
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    torch.save(tensors, folder / "adapter_model.bin")


CASES = {}
for _value in [0, -4, 4.5, "4", True, None, [4], 100000, 8, 2]:
    CASES[f"r={_value!r}"] = ("plain", set_field("r", _value))
for _value in [0, -8, "8", True, None, [8], 1e308, 1e6, 4.0, 16]:
    CASES[f"lora_alpha={_value!r}"] = ("plain", set_field("lora_alpha", _value))
for _field in ["use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode"]:
    for _value in ["false", "true", 1, 0, [], {}]:
        CASES[f"{_field}={_value!r}"] = ("plain", set_field(_field, _value))
CASES["use_rslora=True"] = ("plain", set_field("use_rslora", True))
CASES["use_dora=True without magnitudes"] = ("plain", set_field("use_dora", True))
CASES["lora_bias=True without biases"] = ("plain", set_field("lora_bias", True))
CASES["lora_bias=False with biases"] = ("bias", set_field("lora_bias", False))
CASES["use_dora=False with magnitudes"] = ("dora", set_field("use_dora", False))
for _value in [-0.1, 1.0, "0.1", True, 2, [0.1], 0.05]:
    CASES[f"lora_dropout={_value!r}"] = ("plain", set_field("lora_dropout", _value))
for _value in [123, [1], "(", [], ["k_proj"], "q_proj", ".*\\.(q|v)_proj", None, ["q_proj"], "all-linear", [""]]:
    CASES[f"target_modules={_value!r}"] = ("plain", set_field("target_modules", _value))
for _value in ["lm_head", [1], {"a": 1}, 5]:
    CASES[f"modules_to_save={_value!r}"] = ("plain", set_field("modules_to_save", _value))
for _value in [[], {"(": 4}, {"q_proj": 0}, {"q_proj": "4"}, {"q_proj": 8}, {"q_proj": 4.0}, {"q_proj": True}, {"nothing": 2}, "q_proj"]:
    CASES[f"rank_pattern={_value!r}"] = ("plain", set_field("rank_pattern", _value))
for _value in [[], {"(": 4}, {"q_proj": -1}, {"q_proj": "x"}, {"q_proj": 1e300}, {"q_proj": 4}, {"q_proj": None}, {"q_proj": True}]:
    CASES[f"alpha_pattern={_value!r}"] = ("plain", set_field("alpha_pattern", _value))
for _value in ["LoRA", "ADALORA", None, 5, "IA3"]:
    CASES[f"peft_type={_value!r}"] = ("plain", set_field("peft_type", _value))
for _value in ["all", "lora_only", 5, None]:
    CASES[f"bias={_value!r}"] = ("plain", set_field("bias", _value))
for _field, _value in [("use_qalora", True), ("layer_replication", [[0, 1]]), ("layers_to_transform", [0]), ("layers_pattern", "layers"),
                       ("alora_invocation_tokens", [1]), ("use_bdlora", True), ("megatron_config", {"a": 1}), ("trainable_token_indices", [1])]:
    CASES[f"{_field}={_value!r}"] = ("plain", set_field(_field, _value))
for _field in ["task_type", "base_model_name_or_path", "revision"]:
    CASES[f"{_field}=5"] = ("plain", set_field(_field, 5))
CASES["r removed"] = ("plain", edit_config(lambda config: config.pop("r")))
CASES["lora_alpha removed"] = ("plain", edit_config(lambda config: config.pop("lora_alpha")))
CASES["target_modules removed"] = ("plain", edit_config(lambda config: config.pop("target_modules")))
for _name, _text in [("a list", "[]"), ("a string", '"x"'), ("null", "null"), ("a number", "5"), ("invalid", "{"), ("empty", ""),
                     ("NaN alpha", '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj", "v_proj"]}'),
                     ("Infinity alpha", '{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity, "target_modules": ["q_proj", "v_proj"]}'),
                     ("deeply nested", "[" * 100000 + "]" * 100000), ("not UTF-8", b"\xff\xfe{"), ("2 MiB", '{"x": "' + "a" * 2**21 + '"}')]:
    CASES[f"config {_name}"] = ("plain", raw_config(_text))
for _kind in ["folder", "fifo", "device", "missing"]:
    CASES[f"config {_kind}"] = ("plain", replace_with(_kind, CONFIG))
    CASES[f"weights {_kind}"] = ("plain", replace_with(_kind, WEIGHTS))
CASES["weights pickled (.bin)"] = ("plain", pickled)
CASES["weights truncated"] = ("plain", raw_weights(lambda data: data[: len(data) // 2]))
CASES["weights empty"] = ("plain", raw_weights(lambda data: b""))
CASES["weights random"] = ("plain", raw_weights(lambda data: bytes(range(256)) * 4))
CASES["weights huge header length"] = ("plain", raw_weights(lambda data: struct.pack("<Q", 2**62) + data[8:]))
CASES["weights header with a negative shape"] = ("plain", raw_weights(lambda data: _header_edit(data, lambda h: h.update(
    {k: {**v, "shape": [-4, 32]} for k, v in list(h.items())[:1] if k != "__metadata__"}))))
CASES["weights header with an absurd shape"] = ("plain", raw_weights(lambda data: _header_edit(data, lambda h: h.update(
    {k: {**v, "shape": [2**40, 2**40]} for k, v in list(h.items())[:1] if k != "__metadata__"}))))
CASES["lora_A dropped"] = ("plain", edit_tensors(lambda t: t.pop(first(t, "q_proj.lora_A.weight"))))
CASES["lora_B dropped"] = ("plain", edit_tensors(lambda t: t.pop(first(t, "v_proj.lora_B.weight"))))
CASES["every tensor dropped"] = ("plain", edit_tensors(lambda t: t.clear() or t.__setitem__("x", torch.zeros(1))))
CASES["stray key outside the prefix"] = ("plain", edit_tensors(lambda t: t.__setitem__("stray.weight", torch.zeros(2))))
CASES["tensor of a module the model lacks"] = ("plain", edit_tensors(
    lambda t: t.__setitem__("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", torch.zeros(4, 32))))
CASES["tensors of an untargeted module"] = ("plain", edit_tensors(lambda t: t.update({
    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32),
    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(16, 4)})))
CASES["lora_A transposed"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), t[first(t, "q_proj.lora_A.weight")].t().contiguous())))
CASES["lora_B transposed"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_B.weight"), t[first(t, "q_proj.lora_B.weight")].t().contiguous())))
CASES["lora_A with a rank more"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), torch.zeros(5, 32))))
CASES["lora_A and lora_B of rank 2"] = ("plain", edit_tensors(lambda t: t.update({
    first(t, "q_proj.lora_A.weight"): t[first(t, "q_proj.lora_A.weight")][:2].contiguous(),
    first(t, "q_proj.lora_B.weight"): t[first(t, "q_proj.lora_B.weight")][:, :2].contiguous()})))
CASES["lora_A of a wider layer"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), torch.zeros(4, 33))))
CASES["lora_A as int32"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), t[first(t, "q_proj.lora_A.weight")].int())))
CASES["lora_A as bool"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), t[first(t, "q_proj.lora_A.weight")] > 0)))
CASES["lora_A in float16"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), t[first(t, "q_proj.lora_A.weight")].half())))
CASES["lora_A 3-d"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), t[first(t, "q_proj.lora_A.weight")][None])))
CASES["lora_A scalar"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), torch.tensor(1.0))))
CASES["lora_A empty"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_A.weight"), torch.zeros(0, 32))))
CASES["lora_A with NaN"] = ("plain", edit_tensors(lambda t: t[first(t, "q_proj.lora_A.weight")].__setitem__((0, 0), math.nan)))
CASES["lora_B with inf"] = ("plain", edit_tensors(lambda t: t[first(t, "q_proj.lora_B.weight")].__setitem__((0, 0), math.inf)))
CASES["a bias without lora_bias"] = ("plain", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_B.weight").replace("weight", "bias"), torch.zeros(32))))
CASES["a bias dropped"] = ("bias", edit_tensors(lambda t: t.pop(first(t, "q_proj.lora_B.bias"))))
CASES["a bias of another length"] = ("bias", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_B.bias"), torch.zeros(31))))
CASES["a magnitude without use_dora"] = ("plain", edit_tensors(lambda t: t.__setitem__(
    first(t, "q_proj.lora_A.weight").replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(32))))
CASES["a magnitude dropped"] = ("dora", edit_tensors(lambda t: t.pop(first(t, "q_proj.lora_magnitude_vector"))))
CASES["a magnitude of another length"] = ("dora", edit_tensors(lambda t: t.__setitem__(first(t, "q_proj.lora_magnitude_vector"), torch.ones(7))))
CASES["a magnitude with NaN"] = ("dora", edit_tensors(lambda t: t[first(t, "q_proj.lora_magnitude_vector")].__setitem__(0, math.nan)))
CASES["modules_to_save without tensors"] = ("plain", set_field("modules_to_save", ["lm_head"]))
CASES["unchanged plain"] = ("plain", lambda folder: None)
CASES["unchanged bias"] = ("bias", lambda folder: None)
CASES["unchanged dora"] = ("dora", lambda folder: None)


def test_there_are_at_least_150_cases_and_the_docs_say_how_many():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert len(CASES) >= 150
    assert f"- {len(CASES)} crafted PEFT adapter folders" in (root / "README.md").read_text()
    assert f"mutates them {len(CASES)} ways" in (root / "docs" / "reliability.md").read_text()


def _inspected(folder):
    """``lightning-lora inspect FOLDER``: its exit status, after checking that an error is one line."""
    import contextlib
    import io

    from lightning_lora.cli import main

    out, err = io.StringIO(), io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["inspect", str(folder)])
    finally:
        signal.alarm(0)
    lines = [line for line in err.getvalue().splitlines() if "error" in line]
    assert code in (0, 1) and "Traceback" not in err.getvalue() and (code == 0 or len(lines) == 1), err.getvalue()
    return code


class Hung(Exception):
    pass


def _alarm(signum, frame):
    raise Hung()


def _peft_logits(base, folder):
    """PEFT's logits for the folder, or None where PEFT refuses it (or hangs)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        model = peft.PeftModel.from_pretrained(fresh(base), str(folder)).eval()
        with torch.no_grad():
            return model(input_ids=TOKENS).logits
    except Hung:
        return None
    except Exception:  # noqa: BLE001  (PEFT refusing in any way: the oracle says no)
        return None
    finally:
        signal.alarm(0)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="times each import out with SIGALRM")
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_peft_folder_is_refused_cleanly_or_loads_as_peft_loads_it(case, sources, tmp_path):
    base, folders = sources
    source, mutate = CASES[case]
    folder = tmp_path / "peft"
    folder.mkdir()
    for name in os.listdir(folders[source]):
        (folder / name).write_bytes((folders[source] / name).read_bytes())
    mutate(folder)
    model = fresh(base)
    before = copy.deepcopy(model.state_dict())
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        import_peft(model, folder)
    except (ValueError, TypeError, FileNotFoundError) as err:
        assert str(err), case
        _inspected(folder)  # one line, or the summary; never a traceback or a hang
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear", "refused, but adapted"
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        return
    finally:
        signal.alarm(0)
    with torch.no_grad():
        ours = model(input_ids=TOKENS).logits
    expected = _peft_logits(base, folder)
    assert _inspected(folder) == 0, f"{case}: loads, but inspect refuses it"
    assert expected is not None, f"{case}: loaded, but PEFT refuses it"
    assert torch.isfinite(ours).all() and torch.isfinite(expected).all(), f"{case}: loaded to non-finite outputs"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=f"{case}: loaded other than PEFT loads it")
