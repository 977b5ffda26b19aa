"""The package's structure: no import cycles, no reaching into other modules' private names, and
one list of settings shared by LoRAConfig, LoRACallback, the Hydra schema and the default preset."""

import ast
import dataclasses
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import lightning_lora
from lightning_lora import LoRACallback, LoRACallbackConf, LoRAConfig
from lightning_lora.callback import CALLBACK_ARGUMENTS
from lightning_lora.config import DEFAULTS, FIELDS

PACKAGE = Path(lightning_lora.__file__).parent
ROOT = PACKAGE.parent
MODULES = {path.stem: path for path in PACKAGE.glob("*.py")}
# Values the default preset chooses on purpose (the example's task); everything else is the default.
PRESET_CHOICES = {"alpha": 8.0, "trainable": ["model.head"]}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported lightning_lora module, names taken from it) for every import in ``path``, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_lora":
            names = [alias.name for alias in node.names]
            if node.module == "lightning_lora":  # `from lightning_lora import surgery` names submodules
                submodules = [name for name in names if name in MODULES]
                found += [(f"lightning_lora.{name}", []) for name in submodules]
                found += [("lightning_lora", [name for name in names if name not in submodules])]
            else:
                found.append((node.module, names))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "lightning_lora"]
    return [(module, names) for module, names in found if module != "lightning_lora" or names]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for stem, path in MODULES.items():
        name = "lightning_lora" if stem == "__init__" else f"lightning_lora.{stem}"
        graph[name] = {module for module, _ in _imports(path)} - {name}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
    assert graph["lightning_lora.patterns"] == set(), "name patterns depend on nothing in the package"
    inside = [module for module, deps in graph.items() if module != "lightning_lora" and "lightning_lora" in deps]
    assert inside == [], "no submodule imports the package itself (its __init__)"


def test_the_cycle_check_sees_nested_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from lightning_lora.callback import LoRACallback\n")
    assert _imports(path) == [("lightning_lora.callback", ["LoRACallback"])]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for stem, path in MODULES.items():
        for module, names in _imports(path):
            offenders += [f"{stem}.py: from {module} import {name}" for name in names if name.startswith("_")]
        tree = ast.parse(path.read_text())
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_lora"
            for alias in node.names
        }
        offenders += [
            f"{stem}.py: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
        ]
    assert offenders == []


def test_callback_arguments_are_the_config_fields_with_the_same_defaults():
    parameters = inspect.signature(LoRACallback.__init__).parameters
    arguments = [name for name in parameters if name != "self"]
    assert arguments == [*FIELDS, *CALLBACK_ARGUMENTS, "config"]
    for name in FIELDS:
        default = parameters[name].default
        assert type(default) is type(DEFAULTS[name]) and default == DEFAULTS[name], name
    assert parameters["config"].default is None


def test_hydra_schema_is_the_callback_signature():
    parameters = inspect.signature(LoRACallback.__init__).parameters
    schema = {field.name: field for field in dataclasses.fields(LoRACallbackConf)}
    assert list(schema) == ["_target_", *FIELDS, *CALLBACK_ARGUMENTS]
    assert schema["_target_"].default == "lightning_lora.LoRACallback"
    for name in [*FIELDS, *CALLBACK_ARGUMENTS]:
        field = schema[name]
        default = field.default_factory() if callable(field.default_factory) else field.default
        assert type(default) is type(parameters[name].default) and default == parameters[name].default, name


def test_default_preset_lists_every_setting_and_changes_only_its_choices():
    preset = yaml.safe_load((ROOT / "conf" / "lora" / "default.yaml").read_text())
    settings = {key: value for key, value in preset.items() if key not in ("defaults", "_target_")}
    parameters = inspect.signature(LoRACallback.__init__).parameters
    assert list(settings) == [*FIELDS, *CALLBACK_ARGUMENTS]
    for name, value in settings.items():
        expected = PRESET_CHOICES.get(name, parameters[name].default)
        if isinstance(expected, tuple):  # YAML has no tuples
            expected = list(expected)
        assert value == expected and type(value) is type(expected), name


@pytest.mark.parametrize("name", FIELDS)
def test_drift_is_detected(name, monkeypatch):
    """The pins above fail when one side changes a default, including only its form."""
    drifted = {"targets": [], "exclude": [], "rank_pattern": None, "alpha_pattern": None, "trainable": []}.get(name, "x")
    monkeypatch.setitem(DEFAULTS, name, drifted)
    with pytest.raises(AssertionError):
        test_callback_arguments_are_the_config_fields_with_the_same_defaults()


def test_version_comes_from_the_package_metadata():
    assert lightning_lora.__version__ == version("lightning-lora")


def test_every_module_says_what_it_owns():
    for stem, path in MODULES.items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{stem}.py has no module docstring"


def test_config_defaults_are_normalised_on_construction():
    config = LoRAConfig()
    assert LoRAConfig(rank_pattern=None).rank_pattern == {}  # None is accepted for "none"
    assert (config.targets, config.exclude, config.rank_pattern, config.alpha_pattern, config.trainable) == (
        None,
        [],
        {},
        {},
        [],
    )
