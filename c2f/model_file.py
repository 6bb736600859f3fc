"""The model-file format: atomic writes, safe loads, and model files that rebuild their module alone.

A model file (``best.pt``, or any ``save_model`` output) is a dict loadable with
``torch.load(weights_only=True)``::

    format: "c2f-model", version: 1
    model_class: "c2f.c2f_head.C2FHead"      the module's import path (only c2f classes are rebuilt)
    model_args: {dim, num_parts, ...}     constructor arguments (``model_args(module)``)
    model: state_dict
    ...meta                               e.g. epoch, metrics, config, class_names, attribute_names

Where ``safetensors`` is installed, ``save_model`` also writes ``<name>.safetensors`` with the same
tensors and ``format``/``model_class``/``model_args`` (JSON) in its metadata. Every load here uses
``weights_only=True``: a file holding pickled Python objects (a callable, a class instance) is refused
with one line and nothing in it runs.

Every file ``atomic_save`` writes (``last.pt``, ``best.pt``) carries two checksums, both checked by
``safe_load``: ``checksum``, the sha256 of all the dict holds (each tensor's dtype, shape and bytes, each
value, in order; ``content_digest``), and the sha256 of the file's own bytes, in the zip archive's comment
(``TRAILER``; ``torch.load`` reads the file as ever). A byte changed anywhere is refused with one line
instead of loading as a wrong number. ``best.safetensors`` holds its tensors' ``content_digest`` in its
metadata. Files written before c2f stored checksums load with a warning that they are unverified.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import struct

import numpy as np
import torch
from torch import nn

from .files import atomic_write

log = logging.getLogger(__name__)

MODEL_FORMAT = "c2f-model"
VERSION = 1
CHECKSUM = "checksum"   # the key of the content digest in every dict atomic_save writes
TRAILER = b"c2f-sha256:"   # the zip comment atomic_save ends each file with, then the hex sha256 of the bytes before
TRAILER_LEN = len(TRAILER) + 64


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe to load, or does not fit the model asked for."""


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{obj.dtype}{tuple(obj.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}|".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for value in obj:
            _feed(h, value)
    else:
        text = repr(obj)
        h.update(f"{type(obj).__name__}:{len(text)}:{text}|".encode())


def content_digest(obj) -> str:
    """``"sha256:<hex>"`` of everything ``obj`` holds: each tensor's dtype, shape and bytes (on the CPU), each
    plain value and container, in order. Equal before ``torch.save`` and after ``torch.load``."""
    h = hashlib.sha256()
    _feed(h, obj)
    return f"sha256:{h.hexdigest()}"


def _trailer_matches(data: bytes) -> bool | None:
    """Whether the file's bytes match its trailer; None when it has none."""
    if data[-TRAILER_LEN:-64] != TRAILER:
        return None
    head = data[:-TRAILER_LEN]
    return head[-2:] == struct.pack("<H", TRAILER_LEN) and hashlib.sha256(head).hexdigest().encode() == data[-64:]


def atomic_save(obj: dict, path: str) -> None:
    """``torch.save`` of ``obj`` plus its ``checksum`` (``content_digest``) and the file's own sha256 in the
    zip comment, written with ``files.atomic_write``: a killed writer leaves the old file whole."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    buf = io.BytesIO()
    torch.save({**body, CHECKSUM: content_digest(body)}, buf)
    archive = buf.getbuffer()
    if archive[-2:] != b"\0\0":   # the archive's comment length, the last field of a zip file
        raise RuntimeError("torch.save wrote a zip comment of its own; c2f cannot add its checksum")
    head = [archive[:-2], struct.pack("<H", TRAILER_LEN)]   # the comment length now covers the trailer
    h = hashlib.sha256()
    for part in head:
        h.update(part)
    atomic_write(path, lambda f: f.writelines([*head, TRAILER, h.hexdigest().encode()]))


def _changed(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: fails its checksum: it changed after c2f wrote it (a damaged or edited "
                           "file); restore it from a copy, or use another checkpoint")


def _unverified(path: str) -> None:
    log.warning("%s: no checksum: written before c2f stored one; loaded unverified", path)


def _verified(path: str, obj, trailer: bool | None) -> tuple:
    """``(obj without its checksum, verified)``; refuses a file that changed after it was written."""
    if not isinstance(obj, dict) or CHECKSUM not in obj:
        return obj, bool(trailer)
    body = {k: v for k, v in obj.items() if k != CHECKSUM}
    if trailer is None or obj[CHECKSUM] != content_digest(body):
        raise _changed(path)
    return body, True


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: it only rebuilds arrays (nested objects still pass this unpickler).

    ``last.pt`` files of earlier c2f versions hold numpy's RNG state as an array; these let them resume.
    """
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with its checksum checked and removed; refuses pickled code, a
    file that is not a checkpoint and a changed byte with one clear line each."""
    obj, verified = _load(path, map_location)
    if not verified and isinstance(obj, dict):
        _unverified(path)
    return obj


def _load(path: str, map_location="cpu") -> tuple:
    """``(what the file holds, whether a checksum verified it)``: ``safe_load`` without the warning."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        data = f.read()
    trailer = _trailer_matches(data)
    if trailer is False:
        raise _changed(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None and "Unsupported operand" in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save file)") from None
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise CheckpointError(f"{path}: refused to load: it holds {what}, not only tensors and plain "
                              "containers (loading it could run code); c2f writes no such files") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged or foreign file makes torch.load raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first}); c2f reads "
                              "the files torch.save writes (last.pt, best.pt)") from None
    return _verified(path, obj, trailer)


# ------------------------------------------------------------------------------- model files

def _attention_args(att: nn.Module) -> dict:
    return dict(dim=att.dim, num_parts=att.num_parts, num_heads=att.num_heads, qkv_bias=att.k.bias is not None,
                qk_scale=float(att.scale), eps=float(att.eps), head_reduce=getattr(att, "head_reduce", "mean"))


def model_args(module: nn.Module) -> dict:
    """Constructor arguments that rebuild ``module`` (a c2f ``C2FHead`` or ``PartAttention``, either kind).

    Only arguments of the class's own signature are returned; ``device``/``dtype`` factory arguments
    are never stored (a checkpoint loads onto any device). ``qk_scale`` is stored as the scale in use.
    """
    if hasattr(module, "attention") and hasattr(module, "classifier"):
        args = dict(_attention_args(module.attention), num_classes=module.classifier.out_features)
    elif hasattr(module, "queries") and hasattr(module, "k"):
        args = _attention_args(module)
    else:
        raise TypeError(f"model_args: {type(module).__name__} is not a c2f head or attention module")
    for name in ("materialize_parts", "backend", "formulation"):
        if hasattr(module, name):
            args[name] = getattr(module, name)
    accepted = inspect.signature(type(module).__init__).parameters
    return {k: v for k, v in args.items() if k in accepted}


def class_path(module_or_cls) -> str:
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules renamed since files were written: a model file names its class by import path.
RENAMED_MODULES = {"c2f.head": "c2f.c2f_head", "c2f.attention": "c2f.part_attention", "c2f.mixup": "c2f.part_mixup"}


def _resolve_class(name: str) -> type:
    """Imports a model class named in a checkpoint; only classes defined in c2f are accepted."""
    module_name, _, attr = name.rpartition(".")
    module_name = RENAMED_MODULES.get(module_name, module_name)
    if not module_name.split(".")[0] == "c2f":
        raise CheckpointError(f"the checkpoint names model class {name!r}, which is not a c2f class; "
                              "pass cls= to load it into a class of your choice")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise CheckpointError(f"the checkpoint names model class {name!r}, which this c2f does not have") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"the checkpoint names {name!r}, which is not an nn.Module class")
    return cls


def safetensors_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".safetensors"


def save_model(path: str, module: nn.Module, **meta) -> None:
    """Writes ``module``'s weights, class and constructor arguments (plus ``meta``) atomically.

    ``meta`` values must be tensors or plain containers of str/int/float/bool/None (so the file loads
    with ``weights_only=True``). Also writes ``<name>.safetensors`` where safetensors is installed.
    """
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    args = model_args(module)
    atomic_save(dict(format=MODEL_FORMAT, version=VERSION, model_class=class_path(module), model_args=args,
                     model=state, **meta), path)
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        return
    sidecar = safetensors_path(path)
    if sidecar == path:
        return
    # safetensors reads its tensors back in its own order: the digest is taken over the names sorted.
    metadata = dict(format=MODEL_FORMAT, version=str(VERSION), model_class=class_path(module),
                    model_args=json.dumps(args), checksum=content_digest(dict(sorted(state.items()))))
    for key in ("epoch", "metrics", "class_names", "attribute_names"):
        if key in meta:
            metadata[key] = json.dumps(meta[key])
    data = safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    atomic_write(sidecar, lambda f: f.write(data))


def _read_safetensors(path: str) -> tuple:
    """``(the model file as read_model_file returns it, whether its checksum verified it)``."""
    from .extras import require
    st = require("safetensors.torch", "safetensors", f"reading {path}")
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
        state = st.load_file(path)
        out = {k: (v if k in ("format", "model_class", CHECKSUM) else json.loads(v)) for k, v in raw.items()}
    except Exception as e:  # noqa: BLE001 - a damaged header or metadata
        raise CheckpointError(f"{path}: not a readable safetensors model file ({type(e).__name__}: {e})") from None
    stored = out.pop(CHECKSUM, None)
    if stored is not None and stored != content_digest(dict(sorted(state.items()))):
        raise _changed(path)
    out["version"] = int(out.get("version", 0))
    out["model"] = state
    return out, stored is not None


def _check_model_file(path: str, ckpt) -> None:
    """Refuses what is not a c2f model file, naming what it is where that is known."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a c2f model file (expected a dict with a 'model' state_dict)")
    if "optimizer" in ckpt and "format" not in ckpt:
        raise CheckpointError(f"{path} is a run's resume state (last.pt), not a model file: pass the run "
                              "directory or its best.pt")
    if ckpt.get("format", MODEL_FORMAT) != MODEL_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt.get('format')!r}, expected {MODEL_FORMAT!r}")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: its 'model' is not a state_dict (a dict of tensors)")
    for key, kind in (("model_class", str), ("model_args", dict)):
        if key in ckpt and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path}: its {key!r} must be a {kind.__name__}, got {type(ckpt[key]).__name__}")


def read_model_file(path: str) -> dict:
    """A model file as a dict (``format``, ``model_class``, ``model_args``, ``model`` and any meta).

    Reads ``.pt`` files with ``weights_only=True`` and ``.safetensors`` files (their JSON metadata decoded),
    each with its checksum checked; anything else (a run's ``last.pt``, a foreign file) is refused.
    """
    ckpt, verified = _read_safetensors(path) if path.endswith(".safetensors") else _load(path)
    _check_model_file(path, ckpt)
    if not verified:
        _unverified(path)
    return ckpt


def load_model(path: str, cls: type | None = None, map_location="cpu", **overrides) -> nn.Module:
    """Rebuilds the module saved by ``save_model`` from the file alone and loads its weights.

    ``cls`` overrides the class recorded in the file (e.g. ``c2f.reference.C2FHead`` for a fused
    head's checkpoint: the state_dicts match); ``overrides`` replace constructor arguments (e.g.
    ``backend="torch"``). Returns the module in training mode, on ``map_location``.
    """
    ckpt = read_model_file(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"{path}: has no model_args (written before c2f stored them); build the model "
                              "yourself and call load_state_dict(c2f.model_file.safe_load(path)['model'])")
    cls = cls or _resolve_class(ckpt["model_class"])
    accepted = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in {**ckpt["model_args"], **overrides}.items() if k in accepted}
    module = cls(**args)
    load_state(module, ckpt["model"], path)
    return module.to(map_location)


def load_state(module: nn.Module, state: dict, path: str) -> None:
    """``module.load_state_dict(state)`` with one clear line when the shapes or keys do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) or lines[0]
        raise CheckpointError(f"{path}: its weights do not fit this {type(module).__name__} ({detail})") from None
