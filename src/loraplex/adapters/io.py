"""Load and save PEFT-format LoRA adapters (safetensors by default), validate them against a base model."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from loraplex.adapters.spec import LoraSpec
from loraplex.errors import AdapterError, PathNotAllowedError
from loraplex.hostmem import page_buffer
from loraplex.modules import adapted_dims

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
META_NAME = "loraplex_meta.json"  # optional: task, labels, parents (PEFT ignores it)
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")
#: Names of loraplex's own write leftovers: ``.NAME.tmp-XXXX`` (a write in progress or killed) and ``.NAME.old-PID``
#: (the previous version during a replace).
LEFTOVER_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")
#: Leftovers older than this (seconds since their last change) are stale: :func:`clean_leftovers` removes them.
STALE_SECONDS = 3600.0

log = logging.getLogger("loraplex.adapters")


@dataclass
class LoraModule:
    """One target module's factors: ``delta = scaling * B @ A``.

    ``embedding``: the module is an ``nn.Embedding`` (file keys ``lora_embedding_A`` [r, num_embeddings] /
    ``lora_embedding_B`` [dim, r]; ``d_in`` is the vocabulary). ``magnitude``: DoRA's magnitude vector ``m``
    [d_out] (file key ``lora_magnitude_vector``): the layer computes ``g * (W + delta) x`` with
    ``g = m / ||W + delta||`` per output feature instead of adding ``delta``.
    """

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scaling: float
    magnitude: torch.Tensor | None = None  # [d_out], DoRA only
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def tensors(self) -> list[torch.Tensor]:
        """A, B and (DoRA) the magnitude."""
        return [self.A, self.B] + ([self.magnitude] if self.magnitude is not None else [])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoraModule":
        """A copy with every tensor moved/cast."""
        mag = self.magnitude.to(device=device, dtype=dtype) if self.magnitude is not None else None
        return LoraModule(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype), self.scaling,
                          mag, self.embedding)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``scaling * B @ A`` of shape [d_out, d_in] (an embedding's is [dim, num_embeddings], the transpose
        of what it adds to the embedding matrix)."""
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))

    def file_keys(self, module: str) -> dict[str, torch.Tensor]:
        """This module's tensors under PEFT's file key names (without the ``base_model.model.`` prefix)."""
        if self.embedding:
            out = {f"{module}.lora_embedding_A": self.A, f"{module}.lora_embedding_B": self.B}
        else:
            out = {f"{module}.lora_A.weight": self.A, f"{module}.lora_B.weight": self.B}
        if self.magnitude is not None:
            out[f"{module}.lora_magnitude_vector"] = self.magnitude
        return out


@dataclass
class LoraAdapter:
    """A named LoRA adapter in memory: per-module factors plus ``modules_to_save`` copies."""

    name: str
    spec: LoraSpec
    modules: dict[str, LoraModule]
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # loraplex_meta.json: task, labels, parents, ...
    #: copies of adapted modules' own base weights (``<module>.base_layer.weight``, which PEFT writes for embeddings
    #: with ``save_embedding_layers``): module -> {param: tensor}; they must equal the base model's
    #: (:func:`validate_against`), as every adapter is served over one shared base model
    base_copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        n = sum(t.numel() for m in self.modules.values() for t in m.tensors())
        return n + sum(t.numel() for sd in self.saved_modules.values() for t in sd.values())

    @property
    def nbytes(self) -> int:
        n = sum(t.nbytes for m in self.modules.values() for t in m.tensors())
        n += sum(t.nbytes for sd in self.base_copies.values() for t in sd.values())
        return n + sum(t.nbytes for sd in self.saved_modules.values() for t in sd.values())

    @property
    def is_dora(self) -> bool:
        """Some module has a DoRA magnitude vector."""
        return any(m.is_dora for m in self.modules.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoraAdapter":
        """A copy with every tensor moved/cast."""
        mods = {k: m.to(device, dtype) for k, m in self.modules.items()}

        def move(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
            return {k: {p: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for p, t in sd.items()}
                    for k, sd in groups.items()}

        return LoraAdapter(self.name, self.spec, mods, move(self.saved_modules), self.path, dict(self.meta),
                           move(self.base_copies))

    def with_prefix(self, add: str = "", strip: str = "") -> "LoraAdapter":
        """A copy whose module paths have ``strip`` removed from / ``add`` put in front of them."""
        def fix(k: str) -> str:
            if strip and k.startswith(strip):
                k = k[len(strip):]
            return add + k
        return LoraAdapter(self.name, self.spec, {fix(k): m for k, m in self.modules.items()},
                           {fix(k): sd for k, sd in self.saved_modules.items()}, self.path, dict(self.meta),
                           {fix(k): sd for k, sd in self.base_copies.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's file key names."""
        out: dict[str, torch.Tensor] = {}
        for mod, m in self.modules.items():
            out.update({_PREFIX + k: t for k, t in m.file_keys(mod).items()})
        for mod, sd in self.base_copies.items():
            for p, t in sd.items():
                out[f"{_PREFIX}{mod}.base_layer.{p}"] = t
        for mod, sd in self.saved_modules.items():
            for p, t in sd.items():
                out[f"{_PREFIX}{mod}.{p}"] = t
        return out


# --------------------------------------------------------------------------- locating files
def resolve_adapter_path(path_or_id: str | os.PathLike, *, roots: Iterable[str | os.PathLike] | None = None,
                         allow_hub: bool = True) -> Path:
    """Local folder of an adapter: a path (confined to ``roots`` when given) or a Hugging Face hub id."""
    p = Path(path_or_id).expanduser()
    if roots is not None:
        check_path_allowed(p, roots)
    if p.exists():
        if not p.is_dir():
            raise AdapterError(f"{p}: an adapter is a folder holding {CONFIG_NAME}, not a file")
        return p
    text = str(path_or_id)
    if allow_hub and roots is None and re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*/" + CONFIG_NAME,
                                                                 "*/" + WEIGHTS_NAME]))
        except Exception as exc:  # offline, unknown repo, ...
            raise AdapterError(f"adapter {text!r}: no such local folder, and the hub download failed: {exc}") from exc
    raise AdapterError(f"adapter folder not found: {p}")


def check_path_allowed(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """``path`` with every symlink resolved (``os.path.realpath``), or :class:`PathNotAllowedError` naming it when
    that real path lies outside every root (each root's real path; ``os.path.commonpath`` decides)."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    root_list = [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in roots]
    for root in root_list:
        if os.path.commonpath([real, root]) == root:
            return Path(real)
    shown = os.path.abspath(os.path.expanduser(os.fspath(path)))
    via = f" (a symlink to {real})" if real != shown else ""
    raise PathNotAllowedError(f"path {str(path)!r}{via} is outside the allowed adapter roots: "
                              f"{', '.join(root_list) or '(none configured)'}")


def confine(path: Path, roots: Iterable[str | os.PathLike] | None) -> Path:
    """The path to read for ``path``: itself without ``roots``, else its real path checked to lie inside them
    (:func:`check_path_allowed`). Every file an adapter load reads goes through this."""
    return path if roots is None else check_path_allowed(path, roots)


def is_hidden_or_leftover(name: str) -> bool:
    """Whether a folder name is hidden (``.x``), as loraplex's write leftovers (:data:`LEFTOVER_NAME`) all are:
    such a folder is never an adapter."""
    return name.startswith(".")


# --------------------------------------------------------------------------- loading
def read_config(folder: Path, *, roots: Iterable[str | os.PathLike] | None = None) -> LoraSpec:
    """Parse ``folder/adapter_config.json`` (confined to ``roots`` when given)."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: missing {CONFIG_NAME}")
    try:
        cfg = json.loads(confine(cfg_path, roots).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from exc
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise AdapterError(f"{cfg_path}: unreadable JSON ({type(exc).__name__}: {exc})") from exc
    except PathNotAllowedError:
        raise
    except OSError as exc:
        raise AdapterError(f"{cfg_path}: cannot read it ({exc})") from exc
    return LoraSpec.from_peft_config(cfg, source=str(cfg_path))


#: safetensors dtype names -> torch dtypes (the format's spec; F8 types where this torch has them)
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}
#: the largest safetensors header read (the format's own limit)
MAX_HEADER_BYTES = 100 << 20


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read with one ``readinto`` into one page-backed buffer
    (:func:`loraplex.hostmem.page_buffer`) and returned as views of it: no intermediate copy, and once the last
    tensor is dropped the memory goes back to the OS (a CPU tier that drops and re-reads adapters does not grow
    the heap). ``ValueError`` names what is wrong with a malformed file.

    Layout (the safetensors spec): u64 little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {...}}``, then the data, offsets
    relative to its start."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_len = size - 8 - n
        buf = page_buffer(data_len)  # uint8 [data_len]
        got = fh.readinto(memoryview(buf.numpy())) if data_len else 0
        if got != data_len:
            raise ValueError(f"read {got} of {data_len} data bytes (the file changed while it was read?)")
    out: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r}: bad header entry {entry!r}") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise ValueError(f"tensor {key!r}: negative dimension in shape {shape}")
            numel *= d
        itemsize = dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
            raise ValueError(f"tensor {key!r}: data_offsets {[begin, end]} do not hold {entry['dtype']} {shape} "
                             f"inside the {data_len} data bytes")
        raw = buf[begin:end]  # uint8 [end - begin]
        if begin % itemsize:  # a writer that did not align: this tensor gets its own copy
            raw = raw.clone()
        out[key] = raw.view(dtype).view(shape)  # [*shape]
    return out


def read_weights(folder: Path, *, trust_pickle: bool = False,
                 roots: Iterable[str | os.PathLike] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors by file key (the file confined to ``roots`` when given; safetensors read by
    :func:`read_safetensors`); pickle files only with ``trust_pickle``."""
    st = folder / WEIGHTS_NAME
    if st.is_file():
        real = confine(st, roots)
        try:
            return read_safetensors(real)
        except (OSError, RuntimeError, ValueError) as exc:
            raise AdapterError(f"{st}: corrupt or unreadable safetensors file ({exc})") from exc
    pkl = folder / PICKLE_NAME
    if pkl.is_file():
        if not trust_pickle:
            raise AdapterError(f"{pkl}: only a pickle weights file is present; pickle can run arbitrary code, so "
                               f"loraplex refuses it unless you pass trust_pickle=True (CLI: --trust-pickle), "
                               f"or convert it to {WEIGHTS_NAME}")
        real = confine(pkl, roots)
        try:
            return torch.load(str(real), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{pkl}: unreadable pickle weights ({exc})") from exc
    raise AdapterError(f"{folder}: missing {WEIGHTS_NAME}")


def adapter_from_state_dict(name: str, spec: LoraSpec, tensors: dict[str, torch.Tensor],
                            source: str = "<memory>") -> LoraAdapter:
    """Group PEFT file keys into per-module factors (Linear/Conv1D ``lora_A``/``lora_B``, Embedding
    ``lora_embedding_A``/``lora_embedding_B``, DoRA ``lora_magnitude_vector``), ``modules_to_save`` copies and
    copies of base weights (``base_layer.*``).

    Every key is classified before anything is reported, so the error for a file does not depend on its tensor order:
    unpaired or odd-shaped factors first, then tensors that are none of these (naming the first in sorted order)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A", "B", "embA", "embB", "m"}
    base_copies: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, t in tensors.items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.match(k)
        if m:
            factors.setdefault(m["module"], {})[m["which"]] = t
            continue
        m = _EMBEDDING_KEY.match(k)
        if m:
            factors.setdefault(m["module"], {})["emb" + m["which"]] = t
            continue
        m = _MAGNITUDE_KEY.match(k)
        if m:
            factors.setdefault(m["module"], {})["m"] = t
            continue
        owner = saved_owner(k, spec.modules_to_save or [])
        if owner is not None:
            mod, param = owner
            saved.setdefault(mod, {})[param] = t
            continue
        m = _BASE_LAYER_KEY.match(k)
        if m:
            base_copies.setdefault(m["module"], {})[m["param"]] = t
            continue
        stray.append(key)
    modules: dict[str, LoraModule] = {}
    for mod in sorted(factors):
        modules[mod] = _module_of(mod, factors[mod], spec, source)
    for mod in sorted(base_copies):
        if mod not in modules:
            stray.append(f"{_PREFIX}{mod}.base_layer.{sorted(base_copies[mod])[0]}")
    if stray:
        key = sorted(stray)[0]
        raise AdapterError(f"{source}: unexpected tensor {key!r} (neither LoRA factors lora_A/lora_B, "
                           f"lora_embedding_A/lora_embedding_B, a DoRA lora_magnitude_vector, nor in modules_to_save "
                           f"{spec.modules_to_save or []!r})" + (f"; {len(stray)} such tensors" if len(stray) > 1 else ""))
    return LoraAdapter(name=name, spec=spec, modules=modules, saved_modules=saved, path=None, base_copies=base_copies)


def _module_of(mod: str, parts: dict[str, torch.Tensor], spec: LoraSpec, source: str) -> LoraModule:
    """One module's :class:`LoraModule` from its file tensors (``A``/``B`` or ``embA``/``embB``, ``m``)."""
    linear, emb = ("A" in parts or "B" in parts), ("embA" in parts or "embB" in parts)
    if linear and emb:
        raise AdapterError(f"{source}: module {mod!r} has both lora_A/lora_B and lora_embedding_A/lora_embedding_B")
    if not linear and not emb:
        raise AdapterError(f"{source}: module {mod!r} has a lora_magnitude_vector (DoRA) but no LoRA factors")
    a_key, b_key = ("A", "B") if linear else ("embA", "embB")
    names = ("lora_A", "lora_B") if linear else ("lora_embedding_A", "lora_embedding_B")
    if a_key not in parts or b_key not in parts:
        have, miss = (names[0], names[1]) if a_key in parts else (names[1], names[0])
        raise AdapterError(f"{source}: lora_A and lora_B do not pair up for module {mod!r} ({have} without {miss})")
    A, B = parts[a_key], parts[b_key]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(f"{source}: module {mod!r}: {names[0]} {tuple(A.shape)} and {names[1]} {tuple(B.shape)} "
                           f"are not [r, d_in] and [d_out, r]")
    r = int(A.shape[0])
    expected = spec.rank_for(mod)
    if r != expected:
        raise AdapterError(f"{source}: module {mod!r} has rank {r} but the config says {expected} "
                           f"(r / rank_pattern)")
    mag = parts.get("m")
    config = source if source.startswith("<") else os.path.join(source, CONFIG_NAME)
    if mag is not None and not spec.use_dora:
        raise AdapterError(f"{config}: field 'use_dora' is false but the weights hold a DoRA lora_magnitude_vector "
                           f"for module {mod!r}")
    if mag is None and spec.use_dora:
        raise AdapterError(f"{config}: field 'use_dora' is true but the weights hold no lora_magnitude_vector for "
                           f"module {mod!r}")
    if mag is not None and tuple(mag.shape) != (int(B.shape[0]),):
        raise AdapterError(f"{source}: module {mod!r}: lora_magnitude_vector {tuple(mag.shape)} is not "
                           f"[d_out] = [{int(B.shape[0])}]")
    return LoraModule(A, B, spec.scaling_for(mod, r), mag, emb)


def saved_owner(key: str, modules_to_save: list[str]) -> tuple[str, str] | None:
    """(module path, param name) of a ``modules_to_save`` tensor key (without the ``base_model.model.`` prefix).

    PEFT's rule (``_set_trainable``): a module is saved when its name *ends with* an entry, so ``["norm"]`` covers
    ``model.norm`` and every ``*_layernorm``; the shortest such module path owns the key, whose rest is the
    parameter (``modules_to_save.<adapter>.`` wrappers skipped)."""
    best: tuple[str, str] | None = None
    for m in modules_to_save:
        hit = re.match(rf"^(?P<mod>.*?{re.escape(m)})\.(?:modules_to_save\.[^.]+\.)?(?P<param>.+)$", key)
        if hit and (best is None or len(hit["mod"]) < len(best[0])):
            best = hit["mod"], hit["param"]
    return best


def load_adapter(path: str | os.PathLike, name: str | None = None, *, trust_pickle: bool = False,
                 roots: Iterable[str | os.PathLike] | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
    """Read a PEFT adapter folder (or hub id) into a :class:`LoraAdapter`.

    With ``roots``, the folder and every file read from it (config, weights, meta) must resolve, symlinks
    followed, inside one of them (:class:`PathNotAllowedError` naming the file otherwise). An adapter whose
    weights adapt nothing (no LoRA factors, no ``modules_to_save`` tensors), or hold factors for a module its
    ``target_modules`` does not select, is refused."""
    roots = None if roots is None else list(roots)
    folder = resolve_adapter_path(path, roots=roots)
    spec = read_config(folder, roots=roots)
    tensors = read_weights(folder, trust_pickle=trust_pickle, roots=roots)
    label = name or folder.name
    adapter = adapter_from_state_dict(label, spec, tensors, source=str(folder))
    if not adapter.modules and not adapter.saved_modules:
        raise AdapterError(f"adapter {label!r} adapts nothing: {folder} holds no lora_A/lora_B factors and no "
                           f"modules_to_save tensors ({len(tensors)} tensors in the weights file)")
    check_targets(adapter, source=str(folder / CONFIG_NAME))
    adapter.path = str(folder)
    meta = folder / META_NAME
    if meta.is_file():
        try:
            adapter.meta = json.loads(confine(meta, roots).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterError(f"{meta}: not valid JSON ({exc})") from exc
    return adapter.to(dtype=dtype) if dtype is not None else adapter


def check_targets(adapter: LoraAdapter, *, source: str) -> None:
    """Refuse LoRA factors for a module the config's ``target_modules`` (with ``layers_to_transform``,
    ``exclude_modules``) does not select, as PEFT would not apply them; ``all-linear`` is checked against the
    base model instead (:func:`validate_against`)."""
    spec = adapter.spec
    targets = spec.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    stray = [m for m in adapter.modules if not spec.matches(m)]
    if stray:
        raise AdapterError(f"{source}: field 'target_modules' ({targets!r}"
                           + (f", layers_to_transform {spec.layers_to_transform!r}"
                              if spec.layers_to_transform is not None else "")
                           + f") does not select module {stray[0]!r}, which the weights file holds LoRA factors for"
                           + (f" ({len(stray)} such modules)" if len(stray) > 1 else ""))


def adapter_folders(folder: str | os.PathLike) -> list[Path]:
    """The adapter subfolders of ``folder`` (holding a config), sorted; hidden folders and loraplex's write
    leftovers (``.NAME.tmp-*``, ``.NAME.old-*``) are skipped."""
    return sorted(p for p in Path(folder).iterdir()
                  if not is_hidden_or_leftover(p.name) and (p / CONFIG_NAME).is_file())


def load_adapter_dir(path: str | os.PathLike, *, roots: Iterable[str | os.PathLike] | None = None,
                     **kw: Any) -> dict[str, LoraAdapter]:
    """All adapters of a folder: the folder itself if it is one, else each subfolder holding a config (hidden and
    temporary folders skipped, see :func:`adapter_folders`); ``roots`` confines every read (see
    :func:`load_adapter`)."""
    folder = Path(path)
    roots = None if roots is None else list(roots)
    if (folder / CONFIG_NAME).is_file():
        return {folder.name: load_adapter(folder, roots=roots, **kw)}
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    subs = adapter_folders(folder)
    if not subs:
        raise AdapterError(f"{folder}: no adapter here ({CONFIG_NAME} in it or in a subfolder)")
    return {p.name: load_adapter(p, p.name, roots=roots, **kw) for p in subs}


# --------------------------------------------------------------------------- saving
def save_adapter(adapter: LoraAdapter, path: str | os.PathLike, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``adapter`` as a PEFT folder atomically (temp folder + rename); returns the folder."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter.spec.to_peft_config(), indent=2, sort_keys=True))
        if adapter.meta:
            (tmp / META_NAME).write_text(json.dumps(adapter.meta, indent=2, sort_keys=True))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_adapters(adapters: dict[str, LoraAdapter], path: str | os.PathLike) -> Path:
    """Write several adapters, one subfolder per name."""
    root = Path(path)
    for name, ad in adapters.items():
        save_adapter(ad, root / name)
    return root


def replace_dir(tmp: Path, target: Path) -> None:
    """Move folder ``tmp`` to ``target``, replacing it; the old one survives until the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temp file and rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_leftovers(folder: str | os.PathLike, *, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the stale write leftovers in ``folder``; returns what was removed or restored.

    Only names of :data:`LEFTOVER_NAME`'s form that no process changed for ``older_than`` seconds are touched,
    never a symlink and never another file: a ``.NAME.tmp-*`` (an unfinished or abandoned write) is deleted; a
    ``.NAME.old-*`` is deleted when ``NAME`` exists, and else (a replace killed between its two renames) moved
    back to ``NAME``, as it is then the only complete copy. Errors (a concurrent clean, no write permission) are
    logged and skipped."""
    done: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return done
    for entry in entries:
        hit = LEFTOVER_NAME.match(entry.name)
        if hit is None or entry.is_symlink():
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            p = Path(entry.path)
            target = p.with_name(hit["name"])
            if hit["kind"] == "old" and not os.path.lexists(target):
                os.replace(p, target)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(p)
        except OSError as exc:
            log.warning("could not clean the write leftover %s: %s", entry.path, exc)
    return done


# --------------------------------------------------------------------------- validation
def align_prefix(adapter: LoraAdapter, model: torch.nn.Module) -> LoraAdapter:
    """Adapter whose module paths fit ``model``: adds or strips the model's ``base_model_prefix`` (e.g. ``bert.``)
    when an adapter trained on ``BertForSequenceClassification`` meets a bare ``BertModel`` or the reverse."""
    names = {n for n, _ in model.named_modules()}
    keys = list(adapter.modules) or list(adapter.saved_modules)
    if not keys or all(k in names for k in adapter.modules):
        return adapter
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [prefix] if prefix else []
    candidates += sorted({k.split(".", 1)[0] for k in keys if "." in k})
    for cand in candidates:
        for fixed in (adapter.with_prefix(strip=cand + "."), adapter.with_prefix(add=cand + ".")):
            if all(k in names for k in fixed.modules):
                return fixed
    return adapter


def validate_against(adapter: LoraAdapter, model: torch.nn.Module, *, check_saved: bool = True,
                     model_name: str | None = None) -> None:
    """Check every targeted module exists in ``model`` with matching shapes; errors name adapter and module."""
    mods = dict(model.named_modules())
    where = f"adapter {adapter.name!r}" + (f" ({adapter.path})" if adapter.path else "")
    base_name = model_name or type(model).__name__  # the bank validates through a view: it names the real class
    for name, m in adapter.modules.items():
        if name not in mods:
            said = adapter.spec.base_model_name_or_path
            raise AdapterError(f"{where} targets module {name!r}, which the base model ({base_name}) does not have; "
                               f"is this adapter for another base model"
                               + (f" (it says {said!r})?" if said else "?"))
        dims = adapted_dims(mods[name])
        if dims is None:
            raise AdapterError(f"{where}: module {name!r} is a {type(mods[name]).__name__}; loraplex adapts "
                               f"Linear, Conv1D and Embedding layers only")
        is_emb = isinstance(mods[name], torch.nn.Embedding)
        if is_emb != m.embedding:
            raise AdapterError(f"{where}: module {name!r} is a {type(mods[name]).__name__} but the adapter has "
                               + ("lora_embedding_A/lora_embedding_B" if m.embedding else "lora_A/lora_B")
                               + " factors for it (PEFT writes lora_embedding_* for embeddings only)")
        d_in, d_out = dims
        if m.A.shape[1] != d_in or m.B.shape[0] != d_out:
            raise AdapterError(f"{where}: module {name!r} expects d_in={d_in}, d_out={d_out} but the adapter has "
                               f"lora_A {tuple(m.A.shape)}, lora_B {tuple(m.B.shape)}: adapter for another base model?")
    for name, sd in adapter.base_copies.items():
        own = dict(mods[name].named_parameters()) if name in mods else {}
        for p, t in sd.items():
            if p not in own or tuple(own[p].shape) != tuple(t.shape) or not torch.equal(
                    t.to(device=own[p].device, dtype=own[p].dtype), own[p].detach()):
                raise AdapterError(
                    f"{where} carries its own copy of {name}.{p} ({name}.base_layer.{p}, which PEFT saves with "
                    f"save_embedding_layers, e.g. after adding tokens) and it differs from the base model's "
                    + (f"{tuple(own[p].shape)}" if p in own else "(none)")
                    + f": loraplex serves every adapter over one shared base model, so load a base model with "
                    f"these weights (resize its embeddings) instead")
    for name, sd in adapter.saved_modules.items() if check_saved else ():
        if name not in mods:
            raise AdapterError(f"{where}: modules_to_save entry {name!r} does not exist in the base model ({base_name})")
        own = dict(mods[name].named_parameters())
        own.update(dict(mods[name].named_buffers()))
        for p, t in sd.items():
            if p not in own:
                raise AdapterError(f"{where}: {name}.{p} is not a parameter of the base model's {name!r}")
            if tuple(own[p].shape) != tuple(t.shape):
                # different label counts are legal for heads; only the input side must agree
                if t.dim() == 2 and own[p].dim() == 2 and t.shape[1] == own[p].shape[1]:
                    continue
                if t.dim() == 1 and own[p].dim() == 1:
                    continue
                raise AdapterError(f"{where}: {name}.{p} has shape {tuple(t.shape)}, base model has "
                                   f"{tuple(own[p].shape)}")
