"""Command line → one validated `TrainConfig`: flags over a YAML file or a named strategy over a playbook's defaults.

Precedence: the playbook script's defaults < `--config FILE.yaml` (or `--strategy NAME` from such a file, see
strategies.py) < flags on the command line.
"""

from __future__ import annotations

from .config import TrainConfig, build_parser, load_yaml, validate, where, yaml_values
from .errors import UserError
from .strategies import check_export, read_strategy


def read_config_file(path: str, config_class: type) -> dict:
    """The settings of a `--config` YAML file (a flat mapping of option names to values)."""
    data, lines = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    if "strategies" in data:
        raise UserError(
            f"{where(path, lines, 'strategies')}: this file holds named strategies; pick one with --strategy NAME"
        )
    values = yaml_values(data, config_class, lambda key: where(path, lines, key))
    if "export" in values:
        values["export"] = check_export(
            values["export"], lambda key: where(path, lines, "export", *filter(None, [key]))
        )
    return values


def parse_config(
    argv: list[str] | None, *, prog: str, description: str, defaults: dict, config_class: type = TrainConfig
):
    """Parse flags (and an optional YAML file or strategy) on top of a playbook's defaults, then validate.

    `config_class` is TrainConfig or a subclass adding fields (and checks, in its `validate` method).
    """
    parser = build_parser(prog, description, defaults, config_class)
    given = vars(parser.parse_args(argv))
    values = dict(defaults)
    if given.get("strategy"):
        values.update(read_strategy(given.get("config", ""), given["strategy"], config_class))
    elif given.get("config"):
        values.update(read_config_file(given["config"], config_class))
    values.update(given)
    cfg = config_class(**values)
    validate(cfg)
    cfg.validate()
    return cfg
