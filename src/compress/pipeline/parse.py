"""Reading a pipeline config file into plain data: YAML (or JSON by the suffix), bounded and strict.

Bounded: at most :data:`MAX_CONFIG_BYTES`, nested at most
:data:`~compress.validate.MAX_DEPTH` deep, at most :data:`~compress.validate.MAX_NODES`
values with YAML aliases expanded; YAML is read with a SafeLoader (no object construction)
that also rejects duplicate and non-string keys. Every error is a ConfigError with the line.
"""

from __future__ import annotations

import json
from typing import Any

from compress.config import type_name
from compress.errors import ConfigError
from compress.validate import MAX_PARSE_DEPTH, check_document, clip, json_depth, shown, yaml_depth


def _no_duplicates_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # a list or mapping as a key is unhashable; a number is not a name
                what = type_name(key) if isinstance(key, list | dict) else shown(key)
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {what} is not a string",
                                  hint="keys are names: write them as plain words")
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{clip(key)}' appears twice",
                                  hint="give each key once")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


#: Largest pipeline config read, in bytes (the bundled ones are < 2 KB).
MAX_CONFIG_BYTES = 1 << 20


def parse_config_text(text: str, *, source: str) -> Any:
    """Parse YAML (or JSON, by the ``source`` suffix) into plain data; ConfigError with the line otherwise.

    Bounded: at most :data:`MAX_CONFIG_BYTES`, nested at most
    :data:`~compress.validate.MAX_DEPTH` deep, at most :data:`~compress.validate.MAX_NODES`
    values with YAML aliases expanded (nested anchors are refused, not expanded), string keys.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a pipeline config is at most {MAX_CONFIG_BYTES}",
                          hint="pass the pipeline config itself (deploy/README.md has the format)")
    data = _parse_config_text(text, source=source)
    check_document(data, source=source)
    return data


def _parse_config_text(text: str, *, source: str) -> Any:
    too_deep = ConfigError(f"{source}: nested too deeply to parse", hint="a pipeline config is a few levels deep")
    if source.endswith(".json"):
        if json_depth(text) > MAX_PARSE_DEPTH:
            raise too_deep
        try:
            return json.loads(text)
        except RecursionError:
            raise too_deep from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                              hint="fix the JSON there (deploy/README.md has the format)") from None
    try:
        import yaml
    except ImportError:
        from compress.errors import MissingDependencyError

        raise MissingDependencyError("pyyaml", purpose="YAML pipeline configs", extra="dev") from None
    loader = _no_duplicates_loader()  # a SafeLoader that also rejects duplicate keys
    try:
        deep = yaml_depth(text, loader) > MAX_PARSE_DEPTH
        data = None if deep else yaml.load(text, Loader=loader)
    except RecursionError:
        raise too_deep from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}", hint=exc.hint) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = clip(getattr(exc, "problem", None) or str(exc).splitlines()[0], 300)
        raise ConfigError(f"{source}: not valid YAML: {problem}{where}", hint="check the indentation and quoting") from None
    if deep:
        raise too_deep
    return data

