"""JSON catalogs shipped with the package (backbones, classes) and their JSON schemas."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CatalogError


def load_json_resource(name: str) -> Any:
    """Parse a JSON file shipped in this folder."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def load_validated(source: str | os.PathLike | dict, schema_name: str) -> dict:
    """Load a catalog (shipped file name, a path, or an already parsed dict) and validate it
    against the shipped JSON schema ``schema_name``.

    Raises:
        CatalogError: unreadable JSON or a schema violation, naming the file and the JSON path.
    """
    import jsonschema

    where = "<dict>"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = str(path)
        try:
            # A path on disk, else the name of a catalog shipped in this folder.
            text = path.read_text(encoding="utf-8") if path.exists() else None
            data = json.loads(text) if text is not None else load_json_resource(str(source))
        except (OSError, json.JSONDecodeError) as exc:
            raise CatalogError(f"cannot read catalog {where}: {exc}") from None
    schema = load_json_resource(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        location = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise CatalogError(f"catalog {where} does not match {schema_name} at {location}: {first.message}")
    return data
