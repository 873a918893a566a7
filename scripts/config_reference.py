"""Print the config reference (Markdown table) from the config schema, for README.md.

    python scripts/config_reference.py
"""

from __future__ import annotations

import json

from keeneye.config import AnomalyConfig, EvaluationConfig, HeadConfig, ModelConfig, TrainingConfig, config_json_schema

SECTIONS = {"model": ModelConfig, "head": HeadConfig, "training": TrainingConfig, "evaluation": EvaluationConfig, "anomaly": AnomalyConfig}


def rows(schema: dict, definitions: dict, defaults: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    required = set(schema.get("required", []))
    for name, spec in schema.get("properties", {}).items():
        if name == "$schema":
            continue
        key = f"{prefix}{name}"
        ref = spec.get("$ref") or next((s.get("$ref") for s in spec.get("allOf", []) if "$ref" in s), None)
        if ref:
            out.extend(rows(definitions[ref.split("/")[-1]], definitions, defaults.get(name, {}), prefix=f"{key}."))
            continue
        default = "**required**" if name in required else json.dumps(spec.get("default", defaults.get(name)))
        description = " ".join(spec.get("description", "").split()).replace("|", "\\|")
        out.append((key, default, description))
    return out


def main() -> None:
    schema = config_json_schema()
    print("| key | default | meaning |\n|---|---|---|")
    # pydantic leaves default factories out of the schema: take defaults from the models themselves
    defaults = {name: model().model_dump(mode="json") for name, model in SECTIONS.items()}
    for key, default, description in rows(schema, schema.get("$defs", {}), defaults):
        print(f"| `{key}` | {default} | {description} |")


if __name__ == "__main__":
    main()
