"""Loading and saving the released diffusers-style folder layout (nothing is ever downloaded):

    model_index.json                         (optional) names the scheduler class
    scheduler/scheduler_config.json          (optional) configures it; without it the scheduler is a
                                             default, chosen with a warning (or refused on request)
    transformer/config.json                  the NOVAConfig fields
    transformer/diffusion_pytorch_model.safetensors
      or transformer/diffusion_pytorch_model-0000i-of-0000n.safetensors
         + transformer/diffusion_pytorch_model.safetensors.index.json  ({"weight_map": {key: file}})
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nova_fast.reference.config import NOVAConfig
from nova_fast.reference.model import NOVAModel, build_model

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


class WeightMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model built from its config."""


def _transformer_dir(folder: str) -> tuple[str, str]:
    """(root, transformer folder): ``folder`` may be the pipeline root or the transformer folder."""
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "transformer", "config.json")):
        return folder, os.path.join(folder, "transformer")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return os.path.dirname(os.path.abspath(folder)), folder
    raise FileNotFoundError(f"no transformer/config.json under {folder!r} (expected a diffusers-style folder)")


def read_scheduler_config(root: str) -> Optional[dict]:
    """scheduler/scheduler_config.json, with the class named by model_index.json when present."""
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    index_path = os.path.join(root, "model_index.json")
    config = None
    if os.path.isfile(sched_path):
        with open(sched_path) as f:
            config = json.load(f)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            entry = json.load(f).get("scheduler")
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            config = dict(config or {})
            config["_class_name"] = entry[1]
    return config


class SchedulerGuessWarning(UserWarning):
    """Loading chose a scheduler (or its fields) without a scheduler_config.json saying so."""


def _scheduler_argument(scheduler: Union[dict, str, os.PathLike]) -> tuple[dict, str]:
    """A scheduler= argument of load_pretrained: a config dict, a scheduler_config.json, or its folder."""
    if isinstance(scheduler, dict):
        return dict(scheduler), "the scheduler= argument"
    path = os.fspath(scheduler)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    with open(path) as f:
        return json.load(f), path


def resolve_scheduler(root: str, tdir: str, scheduler=None, require_scheduler: bool = False):
    """(scheduler config or None, where it came from, why it is a guess or None).

    In order: the ``scheduler`` argument; scheduler/scheduler_config.json (its class from
    model_index.json when named there); the class named by model_index.json alone (fields at the
    class defaults: a guess); a "scheduler" entry of transformer/config.json; else None, and the
    config's default of the model kind applies (a guess). ``require_scheduler``: a guess raises."""
    if scheduler is not None:
        config, source = _scheduler_argument(scheduler)
        return config, source, None
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    config = read_scheduler_config(root)
    guess = None
    if os.path.isfile(sched_path):
        source = sched_path
        if config.get("_class_name") and "_class_name" not in _read_json(sched_path):
            source += " (class from model_index.json)"
        elif not config.get("_class_name"):
            guess = (f"neither {sched_path} nor model_index.json names the scheduler class; the kind was "
                     f"read from its fields ({'a' if 'shift' in config else 'no'} 'shift' entry)")
    elif config is not None:
        source = os.path.join(root, "model_index.json")
        guess = (f"model_index.json names {config['_class_name']} but there is no {sched_path}: its fields "
                 f"are nova_fast's defaults for that class, not the checkpoint's")
    else:
        own = _read_json(os.path.join(tdir, "config.json")).get("scheduler")
        if own is not None:
            return dict(own), f"the 'scheduler' entry of {os.path.join(tdir, 'config.json')}", None
        source = None  # set by the caller from the config's kind
        guess = f"no {sched_path}, no scheduler in model_index.json or transformer/config.json"
    if guess is not None and require_scheduler:
        raise FileNotFoundError(f"require_scheduler=True: {guess}; add the checkpoint's scheduler/"
                                f"scheduler_config.json or pass scheduler=")
    return config, source, guess


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _weight_files(tdir: str) -> list[str]:
    index = os.path.join(tdir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(tdir, name) for name in weight_map.values()})
    single = os.path.join(tdir, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(tdir, n) for n in os.listdir(tdir) if n.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors weights in {tdir!r}")
    return found


def check_state_shapes(expected: dict, found: dict, where: str = "checkpoint") -> None:
    """expected/found: {key: shape}. Raises WeightMismatchError naming every offending key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or misshaped:
        lines = [f"{where} does not match the model built from its config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        for k in misshaped:
            lines.append(f"  wrong shape: {k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}")
        raise WeightMismatchError("\n".join(lines))


def load_pretrained(folder, dtype: Optional[torch.dtype] = None, device=None, *, scheduler=None,
                    require_scheduler: bool = False) -> NOVAModel:
    """Build the model from ``transformer/config.json`` (+ the scheduler files when present) and load
    its safetensors weights with strict key and shape checks.

    The scheduler (see ``resolve_scheduler``): ``scheduler`` (a scheduler_config dict, file or folder)
    overrides the folder's files. Which one was chosen and from where is in
    ``model.scheduler_source`` and logged; a choice the folder does not state (no
    scheduler_config.json: the default of the model kind, DDPM for video and flow matching for
    images) warns with SchedulerGuessWarning, or raises FileNotFoundError with ``require_scheduler``."""
    root, tdir = _transformer_dir(folder)
    sched_config, source, guess = resolve_scheduler(root, tdir, scheduler, require_scheduler)
    config = NOVAConfig.from_json(os.path.join(tdir, "config.json"), scheduler=sched_config)
    chosen = config.scheduler.get("_class_name") or f"a {config.scheduler_kind} scheduler"
    if sched_config is None:
        source = f"the default for a {'video' if config.is_video else 'image'} config"
    scheduler_source = f"{chosen} from {source}"
    if guess is not None:
        scheduler_source += f" (guessed: {guess})"
        warnings.warn(f"{os.fspath(folder)}: scheduler {scheduler_source}. Pass scheduler= (or add the file) "
                      f"to choose it, require_scheduler=True to refuse.", SchedulerGuessWarning, stacklevel=2)
    else:
        log.info("%s: scheduler %s", os.fspath(folder), scheduler_source)
    model = build_model(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = _weight_files(tdir)
    found, where = {}, {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in found:
                    raise WeightMismatchError(f"key {key} appears in both {where[key]} and {path}")
                found[key], where[key] = tuple(f.get_slice(key).get_shape()), path
    check_state_shapes(expected, found, where=f"checkpoint {tdir}")
    device = torch.device(device if device is not None else "cpu")
    state = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    if dtype is None:  # keep the checkpoint's dtype; a mixed-dtype checkpoint loads as fp32
        floats = {v.dtype for v in state.values() if v.is_floating_point()}
        dtype = floats.pop() if len(floats) == 1 else torch.float32
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.scheduler_source = scheduler_source
    return model.eval()


def save_pretrained(model: NOVAModel, folder, max_shard_size: Optional[int] = None) -> None:
    """Write the released layout. ``max_shard_size`` (bytes): split the weights into shards + index."""
    tdir = os.path.join(os.fspath(folder), "transformer")
    sdir = os.path.join(os.fspath(folder), "scheduler")
    os.makedirs(tdir, exist_ok=True)
    os.makedirs(sdir, exist_ok=True)
    config = model.config
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump(config.to_json_dict(), f, indent=2)
    sched = dict(config.scheduler)
    with open(os.path.join(sdir, "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "NOVAPipeline", "scheduler": ["diffusers", sched.get("_class_name", "")],
                   "transformer": ["nova_fast", "NOVATransformer3DModel"]}, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for name in os.listdir(tdir):  # stale weights from an earlier save would be picked up on load
        if name.endswith(".safetensors") or name == INDEX_NAME:
            os.remove(os.path.join(tdir, name))
    if max_shard_size is None:
        save_file(state, os.path.join(tdir, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tdir, name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(tdir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
