"""The package's structure: no import cycles, no reaching into other modules' private names, sizes a
newcomer can read, a deliberate public surface, and one list of settings shared by LoRAConfig,
LoRACallback, the Hydra schema and the default preset."""

import ast
import dataclasses
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import lightning_lora
from lightning_lora import LoRACallback, LoRAConfig
from lightning_lora.config import DEFAULTS, FIELDS
from lightning_lora.lightning import LoRACallbackConf
from lightning_lora.lightning.settings import CALLBACK_ARGUMENTS

PACKAGE = Path(lightning_lora.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
# Values the default preset chooses on purpose (the example's task); everything else is the default.
PRESET_CHOICES = {"trainable": ["model.head"]}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
MAX_PUBLIC_NAMES = 25


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of import nodes inside ``if TYPE_CHECKING:`` blocks: for annotations only, never run."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            inside |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return inside


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported lightning_lora module, names taken from it) for every import in ``path`` that runs,
    nested ones too; ``from package import submodule`` counts as an import of the submodule."""
    found = []
    tree = ast.parse(path.read_text())
    annotations_only = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_lora":
            names = [alias.name for alias in node.names]
            submodules = [name for name in names if f"{node.module}.{name}" in MODULES]
            found += [(f"{node.module}.{name}", []) for name in submodules]
            rest = [name for name in names if name not in submodules]
            if rest or not submodules:
                found.append((node.module, rest))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "lightning_lora"]
    return [(module, names) for module, names in found if module != "lightning_lora" or names]


def _graph() -> dict[str, set[str]]:
    return {name: {module for module, _ in _imports(path)} - {name} for name, path in MODULES.items()}


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
    layers = ["lightning_lora.adapters", "lightning_lora.surgery", "lightning_lora.formats", "lightning_lora.lightning"]
    for lower, upper in zip(layers, layers[1:]):  # each subpackage builds on those before it, never on those after
        for module, deps in graph.items():
            if module.startswith(lower):
                assert not [dep for dep in deps if any(dep.startswith(later) for later in layers[layers.index(upper):])], module


def test_the_cycle_check_sees_through_type_checking_blocks_only(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lightning_lora.adapters.base import LoRABase\n"
        "from lightning_lora.adapters import registry\n"
    )
    assert _imports(path) == [("lightning_lora.adapters.registry", [])]


def test_the_cycle_check_sees_nested_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from lightning_lora.lightning.callback import LoRACallback\n")
    assert _imports(path) == [("lightning_lora.lightning.callback", ["LoRACallback"])]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for stem, path in MODULES.items():
        for module, names in _imports(path):
            offenders += [f"{stem}: from {module} import {name}" for name in names if name.startswith("_")]
        tree = ast.parse(path.read_text())
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_lora")
            for alias in node.names
            if f"{node.module}.{alias.name}" in MODULES
        }
        offenders += [
            f"{stem}: {node.value.id}.{node.attr}"
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
        assert ast.get_docstring(ast.parse(path.read_text())), f"{stem} has no module docstring"


def test_config_defaults_are_normalised_on_construction():
    config = LoRAConfig()
    assert LoRAConfig(rank_pattern=None).rank_pattern == {}  # None is accepted for "none"
    assert (config.targets, config.exclude, config.rank_pattern, config.alpha_pattern, config.trainable) == (
        None,
        [],
        {},
        {},
        None,  # automatic: a transformers model's new task head
    )
    assert LoRAConfig(trainable=()).trainable == []  # none


def test_modules_and_classes_stay_small():
    """A newcomer reads the design from the file names: no module over 600 lines, no class over 250."""
    large = {}
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            large[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                large[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert large == {}


def test_the_public_surface_is_small_and_documented_in_the_readme():
    names = [name for name in lightning_lora.__all__ if name != "__version__"]
    assert len(lightning_lora.__all__) <= MAX_PUBLIC_NAMES
    assert all(getattr(lightning_lora, name) is not None for name in lightning_lora.__all__)
    assert len({id(getattr(lightning_lora, name)) for name in names}) == len(names), "no aliases"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(?:lightning_lora\.)?([A-Za-z_]+)[`(]", section, re.M)
    top_level = [name for name in documented if hasattr(lightning_lora, name) and name in lightning_lora.__all__]
    assert sorted(top_level) == sorted(names), "the README's API table lists exactly the names in __all__"


def test_every_subpackage_module_is_named_in_its_package_docstring():
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "lightning_lora":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            children = [other.rsplit(".", 1)[1] for other in MODULES if other.rsplit(".", 1)[0] == name]
            assert [child for child in children if f"``{child}``" not in doc] == [], name
