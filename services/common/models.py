"""Locating and loading diffusers-format model directories.

A model directory holds `model_index.json` naming each component's library and class, and one folder per
component. Stages load only the components they need, with the real diffusers/transformers classes, from
local files only: nothing here may reach a model hub.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib

import torch

from services.common.errors import NotFound

MODEL_ENV = "DIFFMESH_MODEL"
_LIBRARIES = ("diffusers", "transformers")


@dataclasses.dataclass(frozen=True)
class ModelDir:
    path: pathlib.Path
    name: str                       # the id clients use in requests and GET /v1/models
    index: dict

    @property
    def pipeline_class_name(self) -> str:
        return str(self.index.get("_class_name", ""))

    def has(self, component: str) -> bool:
        """Whether model_index.json names a loadable class for `component` (absent ones are [null, null])."""
        entry = self.index.get(component)
        return bool(entry) and isinstance(entry, list) and entry[0] in _LIBRARIES

    def component_class(self, component: str) -> type:
        entry = self.index.get(component)
        if not entry or entry[0] not in _LIBRARIES:
            raise NotFound(f"model {self.name!r} has no {component!r} component in {self.path}/model_index.json")
        library, class_name = entry
        return getattr(importlib.import_module(library), class_name)

    def config(self, component: str) -> dict:
        """A component's config.json, without loading its weights."""
        return json.loads((self.path / component / "config.json").read_text())

    def load(self, component: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
        """Load one component with its own class from `<path>/<component>`, offline."""
        cls = self.component_class(component)
        folder = self.path / component
        if component in ("scheduler", "image_processor"):   # configs only, no weights
            return cls.from_pretrained(folder)
        if component.startswith("tokenizer"):              # tokenizer, tokenizer_2 (FLUX's T5)
            return cls.from_pretrained(folder, local_files_only=True)
        # Both transformers >= 5 and diffusers >= 0.42 take `dtype` (torch_dtype is deprecated in both).
        model = cls.from_pretrained(folder, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        return model.to(device).eval().requires_grad_(False)


def resolve_model_dir(path: str | os.PathLike | None = None, name: str | None = None) -> ModelDir:
    """Open a model directory: `path`, else $DIFFMESH_MODEL, else the tiny model (written on first use)."""
    from services.common.tiny_model import ensure_tiny_model

    chosen = path or os.environ.get(MODEL_ENV)
    model_path = pathlib.Path(chosen).expanduser().resolve() if chosen else ensure_tiny_model()
    default_name = default_model_name(chosen)
    index_file = model_path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{model_path} is not a diffusers model directory: no model_index.json")
    index = json.loads(index_file.read_text())
    return ModelDir(path=model_path, name=name or default_name, index=index)


def default_model_name(path: str | os.PathLike | None = None) -> str:
    """The id a model directory is served under: its folder name, or the tiny model's name by default."""
    from services.common.tiny_model import TINY_MODEL_NAME

    chosen = path or os.environ.get(MODEL_ENV)
    return pathlib.Path(chosen).expanduser().resolve().name if chosen else TINY_MODEL_NAME


def check_model(requested: str, served: str) -> None:
    """A request names the model it wants ('' means whatever this replica serves)."""
    if requested and requested != served:
        raise NotFound(f"model {requested!r} is not served here; available: [{served!r}]")
