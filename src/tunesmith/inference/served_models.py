"""`served_adapters`: several LoRA adapters served by one `tunesmith api`, chosen by a request's `model`.

The rule: a served adapter is one adapter on the bare base (model_name_or_path), as it was trained; the
default model stays what `adapter_name_or_path` makes it (its adapters added in order, as merging does),
and a request naming the default's id, the base's, or no model gets it. With served adapters the base
stays unmerged and each model is a set of low-rank updates beside it (model/adapter_sets.py); each row
of the decode scheduler adds its own request's set (sampling/slot_decoder.py), so rows of different
models share a batch and a request never sees another's weights. A server without served adapters answers any `model` as before.

Each model keeps the chat template it was trained with: the config's `template`, else the one its
folder's train_config.yaml records; when both are set and differ, a one-line warning names both.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.data.templates import get_template
from tunesmith.errors import TunesmithError
from tunesmith.inference.api_errors import ApiError
from tunesmith.inference.engine import DEFAULT_SET, Engine, trained_folder
from tunesmith.model.adapter_sets import add_adapter_set
from tunesmith.model.adapters import read_adapter_config
from tunesmith.model.reward_model import training_settings
from tunesmith.model.value_head import VALUE_HEAD_FILE

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

@dataclass
class ServedModel:
    """One model a request can name: its engine (shared weights, own template) and its adapter set."""

    name: str
    engine: Engine
    adapter_set: str | None = None
    """The adapter its requests' rows run; None: the engine's weights as loaded (no served adapters)."""


@dataclass
class ServedModels:
    """The default model, the other ids that mean it, and the served adapters by name."""

    default: ServedModel
    aliases: set[str]
    adapters: dict[str, ServedModel]

    @classmethod
    def single(cls, engine: Engine, name: str) -> ServedModels:
        """One model, answered whatever `model` a request names (as LLaMA-Factory's server does)."""
        return cls(ServedModel(name, engine), set(), {})

    def pick(self, requested: str | None) -> ServedModel:
        """The model a request's `model` field names; an unknown name is OpenAI's 404 model_not_found."""
        if requested in self.adapters:
            return self.adapters[requested]
        if not self.adapters or requested is None or requested == self.default.name or requested in self.aliases:
            return self.default
        names = ", ".join([self.default.name, *self.adapters])
        raise ApiError(404, f"The model `{requested}` does not exist; this server serves {names}.", param="model",
                       code="model_not_found")

    def listing(self) -> dict[str, Any]:
        """GET /v1/models: the default model, then every served adapter, in OpenAI's list shape."""
        created = int(time.time())
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                            "owned_by": "tunesmith"}
                                           for model in [self.default, *self.adapters.values()]]}


def load_served(config: RunConfig, say: Callable[[str], None] | None = None) -> ServedModels:
    """Load the base once with the default model and every served adapter, each with its template."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    default_folder = trained_folder(config.model)
    served = config.model.served_adapters or {}
    if served and (default_folder / VALUE_HEAD_FILE).is_file():
        raise TunesmithError(f"served_adapters needs a language model as the default, but {default_folder} is a "
                             "reward model (stage: rm); serve it on its own.")
    for name, folder in served.items():
        _named(name, folder, _check_base, folder, config.model.model_name_or_path)
    engine = Engine.load(config)
    default = ServedModel(default_folder.name, with_recorded_template(engine, config.data.template, default_folder,
                                                              default_folder.name, say),
                          DEFAULT_SET if served else None)
    adapters = {}
    for name, folder in served.items():
        _named(name, folder, add_adapter_set, engine.model, name, [folder])
        adapters[name] = ServedModel(name, with_recorded_template(engine, config.data.template, Path(folder), name, say), name)
    base = config.model.model_name_or_path
    return ServedModels(default, {base, Path(base).name}, adapters)


def _named(name: str, folder: str, step: Callable, *args: object) -> None:
    """Run one loading step; its error names the served adapter it is about."""
    try:
        step(*args)
    except TunesmithError as err:
        raise TunesmithError(f"served adapter `{name}` ({folder}): {err}") from None


def _check_base(folder: str, base: str) -> None:
    """A served adapter must be one LoRA adapter trained on `base` itself (its tensor shapes are checked
    when it loads; this catches a same-shaped model of another training)."""
    settings = training_settings(Path(folder))
    recorded = settings.get("model_name_or_path") or read_adapter_config(folder).get("base_model_name_or_path")
    if recorded and not _same_model(str(recorded), base):
        raise TunesmithError(f"it was trained on {recorded}, not on this config's model_name_or_path {base}; "
                             "serve it from a config whose model_name_or_path is its base.")
    chain = settings.get("adapter_name_or_path")
    if chain:
        raise TunesmithError(f"it was trained on top of {', '.join(map(str, chain))}, and a served adapter is one "
                             f"adapter on the bare base; serve it as the default (adapter_name_or_path: "
                             f"{','.join(map(str, [*chain, folder]))}) instead.")


def _same_model(recorded: str, base: str) -> bool:
    """The same folder or hub id. When one side is not here (a hub id against its download, or a folder that
    moved since training) the folder names decide; the tensor shapes are checked on top."""
    if recorded == base:
        return True
    here, there = Path(recorded).expanduser(), Path(base).expanduser()
    if here.exists() and there.exists():
        return here.resolve() == there.resolve()
    return here.name == there.name


def with_recorded_template(engine: Engine, configured: str | None, folder: Path, name: str,
                           say: Callable[[str], None]) -> Engine:
    """The engine with the model's template: the config's, else the one recorded at training (`tunesmith
    api`, `chat` and `do_predict` all follow this rule)."""
    recorded = training_settings(folder).get("template") if folder.is_dir() else None
    if configured and recorded and configured != recorded:
        say(f"[tunesmith] warning: {name} was trained with template {recorded}, but the config sets template "
            f"{configured}; serving it with {configured}.")
    chosen = configured or recorded
    return engine if chosen == configured else dataclasses.replace(engine, template=get_template(chosen, engine.tokenizer))
