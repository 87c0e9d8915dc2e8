"""Train the LoRA adapters of a config: all of them in ONE mixed-batch job (or one after another), continually.

Joint training
    Every adapter of a wave gets a device slot in one :class:`~loraplex.api.Plex`. Each adapter owns leaf tensors
    (``A`` [r, d_in] kaiming-uniform(a=sqrt(5)) as PEFT/nn.Linear, ``B`` [d_out, r] zeros, seeded per adapter),
    its own ``torch.optim.AdamW`` and its own transformers scheduler (linear warmup/decay). A step concatenates one
    micro-batch of every adapter into a single mixed batch, runs ONE forward of the frozen base with per-row
    adapters (the slot stacks are replaced by differentiable ``torch.stack``s of the leaf tensors through the
    training thread's :class:`~loraplex.plan.TrainOverrides`), computes each adapter's mean loss over its own rows, and back-propagates their
    sum. Adapters' parameters are disjoint and rows do not interact, so each adapter receives exactly the gradient
    of its own loss: joint and sequential training (``trainer.joint: false``) make the same updates, up to float
    rounding. ``batch_size`` is per adapter; an adapter with fewer micro-batches simply drops out of later steps.

Data order, initialisation and dropout do not depend on which other adapters train in the same job (seeds are
derived from ``trainer.seed`` and the adapter name, or ``init_seed``), so adding an adapter later never changes
the others, and they are not retrained at all (continual learning): the run's ``state.json``
(:class:`loraplex.run.TrainedRun`) records each adapter's config fingerprint and only new or changed adapters train;
the others' files are left untouched. After training, :mod:`loraplex.train.postbuild` (re)builds the merges and the
router whose inputs changed.

The frozen base runs in eval mode (no base dropout); LoRA dropout is applied per row with each adapter's rate.
``stack_on: other`` trains on top of the frozen, already trained ``other`` (rows carry ``[(self, 1), (other, 1)]``).

Checkpoints (``trainer.checkpoint_every`` optimizer steps) hold the adapters' tensors, optimizer, scheduler and
grad-scaler states, the RNG states (torch, CUDA, Python, numpy), the data position and the loss logs; ``resume``
continues from the newest one and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from loraplex import ops
from loraplex.adapters.io import LoraAdapter, LoraModule, atomic_write_text, load_adapter, save_adapter
from loraplex.adapters.spec import LoraSpec
from loraplex.api import Plex
from loraplex.config import ConfigError, TrainConfig, load_config
from loraplex.errors import LoraplexError
from loraplex.hostmem import tune_cpu_allocator
from loraplex.layers import MultiLoraLinear, SavedModuleSwitch
from loraplex.modules import base_weight, module_dims, stores_transposed
from loraplex.plan import TrainOverrides
from loraplex.run import ADAPTERS_DIR, TrainedRun, adapter_fingerprint, load_base_plex
from loraplex.tokens import pad_batch, pad_id
from loraplex.train import checkpoint as ckpt
from loraplex.train import postbuild
from loraplex.train.data import IGNORE, AdapterData, Example, epoch_order, load_adapter_data
from loraplex.train.plot import plot_losses

__all__ = ["AdapterRun", "TrainResult", "Trainer", "default_target_modules", "make_scheduler", "train",
           "tune_cpu_allocator"]

#: test hook: seconds to sleep after every micro-step (lets a test kill a run between checkpoints)
STEP_SLEEP_ENV = "LORAPLEX_TRAIN_STEP_SLEEP"

_FALLBACK_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
}


# ------------------------------------------------------------------------------------------------ results
@dataclass
class TrainResult:
    """What a ``train`` call did."""

    output_dir: Path
    trained: list[str]  # adapters trained in this call
    skipped: list[str]  # adapters left as they were (unchanged config and data)
    losses: dict[str, list[float]]  # per trained adapter: loss per optimizer step
    eval_losses: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # real (non-pad) tokens through the base model
    train_seconds: float = 0.0  # time in the training loops (model loading and saving excluded)
    train_cpu_seconds: float = 0.0  # process CPU time in the training loops (all threads; robust on a shared machine)
    merges: list[str] = field(default_factory=list)  # merges (re)built
    router: str | None = None  # router folder, when (re)built
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def adapter_dir(self, name: str) -> Path:
        return TrainedRun(self.output_dir).adapter_dir(name)


@dataclass
class AdapterRun:
    """One adapter's training state inside a group."""

    name: str
    task: str
    data: AdapterData
    spec: LoraSpec
    fingerprint: str
    seed: int
    row_spec: list[tuple[str, float]]
    dropout: float
    params: dict[str, tuple[nn.Parameter, nn.Parameter]]  # module -> (A [r, d_in], B [d_out, r]) fp32 leaves
    magnitudes: dict[str, nn.Parameter] = field(default_factory=dict)  # DoRA: module -> m [d_out] fp32 leaf
    head: list[nn.Parameter] = field(default_factory=list)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save: module -> params
    batches: list[list[int]] = field(default_factory=list)  # micro-batches (example indices), all epochs
    accum: int = 1
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    losses: list[float] = field(default_factory=list)  # per optimizer step
    window: list[float] = field(default_factory=list)  # micro losses of the current accumulation window
    eval_loss: float | None = None

    @property
    def n_micro(self) -> int:
        return len(self.batches)

    @property
    def n_steps(self) -> int:
        return math.ceil(self.n_micro / self.accum)

    def trainable(self) -> list[nn.Parameter]:
        return ([t for ab in self.params.values() for t in ab] + list(self.magnitudes.values()) + list(self.head)
                + self.saved_params())

    def saved_params(self) -> list[nn.Parameter]:
        """The trainable copies of the modules_to_save (installed by :meth:`Trainer._register`)."""
        return [t for sd in self.saved.values() for t in sd.values() if isinstance(t, nn.Parameter)]

    def param_groups(self, lr: float, loraplus_lr_ratio: float | None) -> list[dict[str, Any]]:
        """AdamW parameter groups: everything at ``lr``, or with LoRA+ the B matrices at ``lr * ratio``."""
        if loraplus_lr_ratio is None:
            return [{"params": self.trainable(), "lr": lr}]
        a = [ab[0] for ab in self.params.values()] + list(self.head) + self.saved_params()
        b = [ab[1] for ab in self.params.values()] + list(self.magnitudes.values())  # PEFT: 1-D params go with B
        return [{"params": a, "lr": lr}, {"params": b, "lr": lr * loraplus_lr_ratio}]

    def window_size(self, t: int) -> int:
        start = (t // self.accum) * self.accum
        return min(self.accum, self.n_micro - start)

    def is_boundary(self, t: int) -> bool:
        return (t + 1) % self.accum == 0 or t == self.n_micro - 1


# ------------------------------------------------------------------------------------------------ helpers
def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:6], "big")


def default_target_modules(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture (what ``LoraConfig()`` would use)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    mt = getattr(getattr(model, "config", None), "model_type", None)
    targets = mapping.get(mt) or _FALLBACK_TARGETS.get(mt or "")
    if not targets:
        raise LoraplexError(f"no default LoRA target modules for model_type {mt!r}; set target_modules "
                            f"(module names, a regex or 'all-linear')")
    return list(targets)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv1D modules of ``model`` by name, seeing through loraplex wrappers; task heads excluded."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(mod, (MultiLoraLinear, SavedModuleSwitch)):
            skip.append(name)
            mod = mod.base
        if name == "classifier" or name.startswith("classifier."):
            continue
        if module_dims(mod) is not None:
            out[name] = mod
    return out


def make_scheduler(optimizer: torch.optim.Optimizer, decay: str, warmup_fraction: float, n_steps: int, *,
                   decay_rate: float = 0.96, decay_steps: int = 10000, staircase: bool = False) -> Any:
    """The per-adapter learning-rate schedule: linear warmup over ``warmup_fraction`` of ``n_steps``, then
    ``linear`` / ``cosine`` decay to 0, ``exponential`` (``decay_rate ** (step / decay_steps)``, floored with
    ``staircase``) or ``constant``."""
    from transformers import get_scheduler

    warm = int(warmup_fraction * n_steps)
    total = max(n_steps, 1)
    if decay in ("linear", "cosine"):
        return get_scheduler(decay, optimizer, num_warmup_steps=warm, num_training_steps=total)
    if decay == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warm)

    def factor(step: int) -> float:
        if step < warm:
            return float(step) / float(max(1, warm))
        t = (step - warm) / decay_steps
        return decay_rate ** (math.floor(t) if staircase else t)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains the adapters of one config into ``output_dir`` (see the module docstring)."""

    def __init__(self, config: TrainConfig | str | os.PathLike[str], *, output_dir: str | os.PathLike[str] | None = None,
                 device: str | torch.device | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = None, joint: bool | None = None) -> None:
        if not isinstance(config, TrainConfig):
            config = load_config(config, check_files=True, require_datasets=True)
        self.config = config
        self.folder = TrainedRun.of(config, output_dir)
        self.output_dir = self.folder.root
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.joint = config.trainer.joint if joint is None else joint
        self.plex: Plex | None = None
        self.precision = config.trainer.precision
        if self.precision == "fp16" and self.device.type != "cuda":
            warnings.warn("precision fp16 needs CUDA; training in bf16 autocast on CPU instead", stacklevel=2)
        self._scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and self.device.type == "cuda" else None

    # -------------------------------------------------------------- planning
    @property
    def adapters_dir(self) -> Path:
        return self.folder.adapters_dir

    @property
    def checkpoints_dir(self) -> Path:
        return self.folder.checkpoints_dir

    def fingerprints(self) -> dict[str, str]:
        return {n: adapter_fingerprint(self.config, n) for n in self.config.adapter_names}

    def pending(self, only: Sequence[str] | None = None, force: bool = False) -> tuple[list[str], list[str]]:
        """(adapters to train, adapters up to date), in training order."""
        cfg = self.config
        if only:
            for n in only:
                cfg.get_adapter(n)  # UnknownAdapterError lists the known names
        state = self.folder.load_state()
        fps = self.fingerprints()
        todo, done = [], []
        for n in cfg.training_order():
            if only and n not in only:
                continue
            rec = state["adapters"].get(n) or {}
            fresh = rec.get("fingerprint") == fps[n] and self.folder.has_adapter(n)
            (done if fresh and not force else todo).append(n)
        # an adapter stacked on one that retrains has a new fingerprint already (it covers stack_on's)
        return todo, done

    def groups(self, todo: Sequence[str]) -> list[list[str]]:
        """Training groups: waves of adapters whose ``stack_on`` base is trained (joint: one group per wave)."""
        wave: dict[str, int] = {}
        for n in todo:  # todo is in training order: bases first
            below = self.config.get_adapter(n).stack_on
            wave[n] = wave[below] + 1 if below in wave else 0
        waves: list[list[str]] = []
        for n in todo:
            while len(waves) <= wave[n]:
                waves.append([])
            waves[wave[n]].append(n)
        if self.joint:
            return waves
        return [[n] for w in waves for n in w]

    # -------------------------------------------------------------- the run
    def run(self, *, resume: bool = False, only: Sequence[str] | None = None, force: bool = False,
            merges_and_router: bool = True) -> TrainResult:
        """Train new/changed adapters, then (``merges_and_router``) (re)build the merges and the router; returns what
        was done."""
        todo, done = self.pending(only, force)
        result = TrainResult(self.output_dir, [], done, {})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if todo:
            self.log(f"training {', '.join(todo)} ({'joint mixed-batch' if self.joint else 'sequential'})"
                     + (f"; up to date: {', '.join(done)}" if done else ""))
        elif not resume:
            self.log(f"all adapters are up to date ({', '.join(done)})")
        if not resume:
            ckpt.remove_checkpoints(self.checkpoints_dir)
        fps = self.fingerprints()
        groups = self.groups(todo)
        if groups:
            self._ensure_plex(max(len(g) + len({b for n in g for b in self.config.stack_chain(n)}) for g in groups))
        for group in groups:
            self._train_group(group, fps, result, resume=resume)
        if todo:
            ckpt.remove_checkpoints(self.checkpoints_dir)
        if merges_and_router:
            self.build_merges_and_router(result)
        self.write_state(result)
        return result

    # -------------------------------------------------------------- model
    def _ensure_plex(self, n_slots: int) -> Plex:
        if self.plex is None or self.plex.max_slots < n_slots:
            self.plex = load_base_plex(self.config, device=self.device, max_slots=max(n_slots, 2))
        return self.plex

    def _target_modules(self, name: str, model: nn.Module) -> tuple[list[str], list[str] | str]:
        """(module paths to adapt, target_modules as written to adapter_config.json)."""
        a = self.config.get_adapter(name)
        linear = _linear_modules(model)
        targets = a.target_modules
        if targets is None:
            targets = default_target_modules(model)
        if isinstance(targets, str) and targets == "all-linear":  # PEFT: every Linear but the output layer
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if isinstance(out_emb, (MultiLoraLinear, SavedModuleSwitch)):
                out_emb = out_emb.base
            written: list[str] | str = sorted({n.rsplit(".", 1)[-1] for n, m in linear.items() if m is not out_emb})
        else:
            written = targets
        probe = LoraSpec(r=a.r, target_modules=written, layers_to_transform=a.layers_to_transform)
        mods = sorted(n for n in linear if probe.matches(n))
        if not mods:
            loc = self.config.adapter_path(name)
            sample = ", ".join(sorted({n.rsplit('.', 1)[-1] for n in linear})[:12])
            raise ConfigError([(f"{loc}.target_modules", f"no Linear module of the base model matches {targets!r}; "
                                                         f"its linear layers are named: {sample}")],
                              str(self.config.source) if self.config.source else None)
        return mods, written

    def _new_run(self, name: str, fps: dict[str, str], model: nn.Module) -> AdapterRun:
        cfg = self.config
        a = cfg.get_adapter(name)
        task = cfg.task_of(name)
        data = load_adapter_data(cfg, name, self.plex.tokenizer)
        mods, written = self._target_modules(name, model)
        spec = cfg.lora_spec(name, target_modules=written,
                             fan_in_fan_out=any(stores_transposed(_linear_modules(model)[m]) for m in mods))
        seed = a.init_seed if a.init_seed is not None else _seed_of(cfg.trainer.seed, name, "init")
        gen = torch.Generator().manual_seed(seed)
        linear = _linear_modules(model)
        params: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        start = self._pretrained(name, mods) if a.pretrained_adapter_weights is not None else None
        for m in mods:
            d_in, d_out = module_dims(linear[m])  # type: ignore[misc]
            r = spec.rank_for(m)
            A = torch.empty(r, d_in)
            if a.init_lora_weights == "gaussian":  # PEFT's gaussian init
                nn.init.normal_(A, 0.0, 1.0 / r, generator=gen)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # PEFT's init of lora_A (nn.Linear's)
            B = torch.zeros(d_out, r)
            if start is not None:  # the adapter starts from its pretrained weights
                A, B = start.modules[m].A.float().clone(), start.modules[m].B.float().clone()
            params[m] = (nn.Parameter(A.to(self.device)), nn.Parameter(B.to(self.device)))
        magnitudes: dict[str, nn.Parameter] = {}
        for m in mods if spec.use_dora else ():  # DoRA's m starts at ||W + s B A|| per output feature (PEFT's)
            A, B = params[m]
            if start is not None and start.modules[m].magnitude is not None:
                mag = start.modules[m].magnitude.float().clone()
            else:
                mag = ops.dora_weight_norm(base_weight(linear[m]), A, B, spec.scaling_for(m))  # [d_out]
            magnitudes[m] = nn.Parameter(mag.to(self.device))
        rows = [(name, 1.0)] + [(b, 1.0) for b in reversed(cfg.stack_chain(name))]
        run = AdapterRun(name, task, data, spec, fps[name], seed, rows, float(a.dropout), params, magnitudes)
        if task == "causal_lm" and spec.modules_to_save:
            run.saved = self._saved_start(name, model, list(spec.modules_to_save), start)
        if task in ("classification", "token_classification"):
            hidden = model.config.hidden_size
            std = float(getattr(model.config, "initializer_range", 0.02))
            w = torch.empty(len(data.labels or []), hidden)
            nn.init.normal_(w, 0.0, std, generator=gen)
            run.head = [nn.Parameter(w), nn.Parameter(torch.zeros(len(data.labels or [])))]
        # data order: every epoch a permutation that depends on (seed, adapter, epoch) only
        tr = cfg.trainer
        data_seed = _seed_of(tr.seed, name, "data")
        batches: list[list[int]] = []
        for epoch in range(tr.epochs):
            order = epoch_order(len(data), data_seed, epoch)
            batches += [order[i:i + tr.batch_size] for i in range(0, len(order), tr.batch_size)]
        run.accum = tr.gradient_accumulation_steps
        if tr.max_steps is not None:
            batches = batches[: tr.max_steps * run.accum]
        run.batches = batches
        return run

    def _pretrained(self, name: str, mods: list[str]) -> LoraAdapter:
        """The PEFT adapter ``name`` starts from (``pretrained_adapter_weights``); it must adapt exactly ``mods``
        with the config's ranks."""
        a = self.config.get_adapter(name)
        loc = f"{self.config.adapter_path(name)}.pretrained_adapter_weights"
        where = str(self.config.source) if self.config.source else None
        folder = Path(str(a.pretrained_adapter_weights))
        try:
            start = load_adapter(folder, name)
        except (LoraplexError, OSError) as exc:
            raise ConfigError([(loc, f"cannot load the PEFT adapter {folder}: {exc}")], where) from None
        have, want = set(start.modules), set(mods)
        if have != want:
            diff = sorted(want - have) or sorted(have - want)
            raise ConfigError([(loc, f"{folder} adapts other modules than the config's target_modules "
                                     f"(e.g. {diff[0]}); drop target_modules to use the folder's")], where)
        spec = self.config.lora_spec(name)
        if start.is_dora and not spec.use_dora:
            raise ConfigError([(loc, f"{folder} is a DoRA adapter (use_dora: true) but the config says use_dora: "
                                     f"false; set use_dora: true to train it")], where)
        for m in mods:
            if start.modules[m].A.shape[0] != spec.rank_for(m):
                raise ConfigError([(loc, f"{folder} has rank {start.modules[m].A.shape[0]} at {m}, the config "
                                         f"{spec.rank_for(m)}; drop r to use the folder's")], where)
        return start

    def _saved_start(self, name: str, model: nn.Module, wanted: list[str],
                     start: LoraAdapter | None) -> dict[str, dict[str, torch.Tensor]]:
        """Initial state of each ``modules_to_save`` module (full module path -> parameters): the pretrained
        adapter's copy when it has one, else the base module's weights."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, mod in model.named_modules():
            if not any(path == w or path.endswith("." + w) for w in wanted):
                continue
            if any(path.startswith(p + ".") for p in out):
                continue  # inside a module already saved whole
            if isinstance(mod, (MultiLoraLinear, SavedModuleSwitch)):
                mod = mod.base
            if start is not None and path in start.saved_modules:
                out[path] = {k: v.float().clone() for k, v in start.saved_modules[path].items()}
            else:
                out[path] = {k: v.detach().float().cpu().clone() for k, v in mod.named_parameters()}
        if not out:
            raise ConfigError([(f"{self.config.adapter_path(name)}.modules_to_save",
                                f"no module of the base model is named {', '.join(wanted)}")],
                              str(self.config.source) if self.config.source else None)
        return out

    def _snapshot(self, run: AdapterRun, *, meta_extra: dict[str, Any] | None = None) -> LoraAdapter:
        """The run's current weights as a :class:`LoraAdapter` (CPU, fp32)."""
        mods = {m: LoraModule(A.detach().float().cpu().clone(), B.detach().float().cpu().clone(),
                              run.spec.scaling_for(m, int(A.shape[0])),
                              run.magnitudes[m].detach().float().cpu().clone() if m in run.magnitudes else None)
                for m, (A, B) in run.params.items()}
        saved: dict[str, dict[str, torch.Tensor]] = {
            mod: {k: t.detach().float().cpu().clone() for k, t in sd.items()} for mod, sd in run.saved.items()}
        meta: dict[str, Any] = {"task": run.task}
        if run.head:
            saved["classifier"] = {"weight": run.head[0].detach().float().cpu().clone(),
                                   "bias": run.head[1].detach().float().cpu().clone()}
            meta["labels"] = list(run.data.labels or [])
        if self.config.get_adapter(run.name).stack_on:
            meta["stack_on"] = self.config.stack_chain(run.name)
        meta.update(meta_extra or {})
        return LoraAdapter(run.name, run.spec, mods, saved, None, meta)

    def _register(self, run: AdapterRun) -> None:
        plex = self.plex
        ad = self._snapshot(run)
        plex.add_adapter(run.name, ad, replace=run.name in plex.adapters)
        if run.head:  # train the head the model uses: the bank installed a copy, make that copy the leaf
            head = plex.model.head(run.name)
            head.weight.requires_grad_(True)
            head.bias.requires_grad_(True)
            run.head = [head.weight, head.bias]
        for mod in run.saved:  # likewise the adapter's copies of its modules_to_save
            switch = plex.model.get_submodule(mod)
            copy = switch.copy_for(run.name) if isinstance(switch, SavedModuleSwitch) else None
            if copy is None:
                raise LoraplexError(f"adapter {run.name!r}: modules_to_save {mod!r} has no per-adapter copy")
            params = dict(copy.named_parameters())
            for t in params.values():
                t.requires_grad_(True)
            run.saved[mod] = params

    def _ensure_frozen(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.plex.adapters:
                folder = self.folder.adapter_dir(n)
                if not self.folder.has_adapter(n):
                    raise LoraplexError(f"adapter {n!r} is needed (stack_on) but {folder} does not exist; "
                                        f"train it first")
                self.plex.add_adapter(n, load_adapter(folder, n))

    # -------------------------------------------------------------- one group
    def _train_group(self, group: list[str], fps: dict[str, str], result: TrainResult, *, resume: bool) -> None:
        cfg = self.config
        frozen = sorted({b for n in group for b in cfg.stack_chain(n)})
        plex = self._ensure_plex(len(group) + len(frozen))
        model = plex.model
        runs = [self._new_run(n, fps, model) for n in group]
        for run in runs:
            self._register(run)
        self._ensure_frozen(frozen)
        tr = cfg.trainer
        decay, warmup = tr.scheduler
        sched = tr.learning_rate_scheduler
        for run in runs:
            groups = run.param_groups(tr.learning_rate, cfg.get_adapter(run.name).loraplus_lr_ratio)
            run.optimizer = torch.optim.AdamW(groups, lr=tr.learning_rate, weight_decay=tr.weight_decay)
            run.scheduler = make_scheduler(run.optimizer, decay, warmup, run.n_steps,
                                           **({"decay_rate": sched.decay_rate, "decay_steps": sched.decay_steps,
                                               "staircase": sched.staircase} if sched is not None else {}))
        key = {"group": list(group), "fingerprints": {n: fps[n] for n in group}, "joint": self.joint}
        start = 0
        tokens = 0
        seed = _seed_of(tr.seed, *group, "rng")
        torch.manual_seed(seed)
        random.seed(seed)
        _seed_numpy(seed)
        if resume:
            found = ckpt.latest_checkpoint(self.checkpoints_dir, accept=lambda s: s.get("key") == key)
            if found is not None:
                path, state = found
                start, tokens = self._load_checkpoint(state, runs)
                result.resumed_from = str(path)
                self.log(f"resumed {', '.join(group)} from {path} (micro-step {start})")
        slots = plex.acquire([n for n in group] + frozen)
        try:
            t_total, dt, cpu = self._loop(runs, slots, start, tokens, key)
            result.tokens += t_total
            result.train_seconds += dt
            result.train_cpu_seconds += cpu
        finally:
            plex.release(slots)
        # serve the trained weights from the bank, evaluate, save
        for run in runs:
            for p in run.head + run.saved_params():
                p.requires_grad_(False)
            self._register_trained(run)
            if cfg.get_adapter(run.name).eval_dataset:
                run.eval_loss = self._eval_loss(run)
                result.eval_losses[run.name] = run.eval_loss
            self._save_run(run)
            result.trained.append(run.name)
            result.losses[run.name] = list(run.losses)
        self.write_state(result)

    def _loop(self, runs: list[AdapterRun], slots: dict[str, int], start: int, tokens: int,
              key: dict[str, Any]) -> tuple[int, float, float]:
        """Micro-steps ``start``.. of the group; returns (tokens, wall seconds, process CPU seconds)."""
        tr = self.config.trainer
        n_micro = max(r.n_micro for r in runs)
        every = tr.checkpoint_every
        sleep = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
        runs = sorted(runs, key=lambda r: slots[r.name])  # rows in slot order
        bar = _progress(total=n_micro, initial=start, desc=", ".join(r.name for r in runs), enabled=self.progress)
        t0 = time.perf_counter()
        c0 = time.process_time()
        counted = 0
        try:
            for t in range(start, n_micro):
                active = [r for r in runs if t < r.n_micro]
                n_tok = self._micro_step(active, slots, t)
                tokens += n_tok
                counted += n_tok
                for r in active:
                    if r.is_boundary(t):
                        self._optimizer_step(r)
                if self._scaler is not None and any(r.is_boundary(t) for r in active):
                    self._scaler.update()
                elapsed = time.perf_counter() - t0
                if bar is not None:
                    post = {r.name: f"{(r.losses[-1] if r.losses else float('nan')):.3f}" for r in runs}
                    post["tok/s"] = f"{counted / max(elapsed, 1e-9):.0f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if sleep:
                    time.sleep(sleep)
                done = t + 1
                if every and done < n_micro and done % tr.gradient_accumulation_steps == 0 \
                        and (done // tr.gradient_accumulation_steps) % every == 0:
                    self._save_checkpoint(runs, done, tokens, key)
        finally:
            if bar is not None:
                bar.close()
        return counted, time.perf_counter() - t0, time.process_time() - c0

    # -------------------------------------------------------------- steps
    def _train_magnitudes(self, runs: Sequence[AdapterRun], slots: dict[str, int]
                          ) -> dict[str, dict[int, torch.Tensor]]:
        """The DoRA runs' magnitude leaves by module and slot (the layers recompute their gains from them)."""
        out: dict[str, dict[int, torch.Tensor]] = {}
        for run in runs:
            for mod, mag in run.magnitudes.items():
                out.setdefault(mod, {})[slots[run.name]] = mag
        return out

    def _train_stacks(self, runs: Sequence[AdapterRun], slots: dict[str, int]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Differentiable slot stacks for every wrapped layer, built from the runs' leaf tensors."""
        by_slot = {slots[r.name]: r for r in runs}
        top = max(slots.values()) + 1
        # under autocast the stacks take the compute dtype, so the runtime's LoRA path is in one dtype throughout
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16 if self.device.type == "cuda" else torch.bfloat16
                   }.get(self.precision)
        stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for mod, layer in self.plex.layers.items():
            r_max = layer.r_max
            dtype = compute or layer.lora_A.dtype
            As, Bs = [], []
            for s in range(top):
                run = by_slot.get(s)
                if run is not None and mod in run.params:
                    A, B = run.params[mod]
                    r = A.shape[0]
                    if r < r_max:
                        A = nn.functional.pad(A, (0, 0, 0, r_max - r))
                        B = nn.functional.pad(B, (0, r_max - r))
                    As.append(A.to(dtype))
                    Bs.append(B.to(dtype))
                else:
                    As.append(layer.lora_A[s].detach().to(dtype))
                    Bs.append(layer.lora_B[s].detach().to(dtype))
            stacks[mod] = (torch.stack(As), torch.stack(Bs))
        return stacks

    def _micro_step(self, active: list[AdapterRun], slots: dict[str, int], t: int) -> int:
        plex = self.plex
        exs: list[Example] = []
        rows: list[list[tuple[str, float]]] = []
        spans: list[tuple[AdapterRun, int, int]] = []
        for run in active:
            idx = run.batches[t]
            start = len(exs)
            exs += [run.data.examples[j] for j in idx]
            rows += [run.row_spec] * len(idx)
            spans.append((run, start, len(exs)))
        batch = pad_batch([e.input_ids for e in exs], pad_id(plex.tokenizer), device=self.device)
        ids, mask = batch
        rates = {run.dropout for run, _, _ in spans}
        if len(rates) == 1:  # one rate for every row: the runtime's fused dropout
            drop, rate = None, rates.pop()
        else:  # per-row rates (adapters with different lora_dropout in one batch)
            drop, rate = torch.tensor([run.dropout for run, s, e in spans for _ in range(e - s)],
                                      device=self.device), 0.0
        overrides = TrainOverrides(self._train_stacks(active, slots), rate, drop,
                                   self._train_magnitudes(active, slots))
        with plex.train_overrides(overrides), plex.using(rows, len(rows)), _autocast(self.device, self.precision):
            losses = self._losses(spans, exs, ids, mask)
        total = None
        for (run, _, _), loss in zip(spans, losses):
            run.window.append(float(loss.detach()))
            part = loss / run.window_size(t)
            total = part if total is None else total + part
        assert total is not None
        if self._scaler is not None:
            self._scaler.scale(total).backward()
        else:
            total.backward()
        return int(mask.sum())

    def _losses(self, spans: list[tuple[AdapterRun, int, int]], exs: list[Example], ids: torch.Tensor,
                mask: torch.Tensor) -> list[torch.Tensor]:
        model = self.plex.model
        length = ids.shape[1]
        out: list[torch.Tensor] = []
        if self.config.model_type == "llm":
            hidden, head, logits_all = _causal_forward(model, ids, mask)
            lab = _label_matrix(exs, length, self.device)[:, 1:]  # [N, L-1]: token t predicts label t+1
            sel = lab != IGNORE
            # the vocabulary projection only at labelled positions, one matmul for all adapters
            lg = logits_all[:, :-1][sel] if logits_all is not None else head(hidden[:, :-1][sel])  # [T, V]
            ce = nn.functional.cross_entropy(lg.float(), lab[sel], reduction="none")  # [T]
            counts = sel.sum(1).tolist()  # labelled tokens per row
            start = 0
            for run, s, e in spans:
                n = sum(counts[s:e])
                out.append(ce[start:start + n].mean())
                start += n
            return out
        res = model(input_ids=ids, attention_mask=mask)
        for run, s, e in spans:
            lg = torch.stack([res.logits[i] for i in range(s, e)])  # type: ignore[misc]
            if run.task == "classification":
                lab = torch.tensor([int(x.labels) for x in exs[s:e]], device=self.device)  # type: ignore[arg-type]
                out.append(nn.functional.cross_entropy(lg.float(), lab))
            else:
                lab = _label_matrix(exs[s:e], length, self.device)
                out.append(nn.functional.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), lab.reshape(-1),
                                                       ignore_index=IGNORE))
        return out

    def _optimizer_step(self, run: AdapterRun) -> None:
        assert run.optimizer is not None
        if self._scaler is not None:
            self._scaler.step(run.optimizer)
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.losses.append(sum(run.window) / len(run.window))
        run.window.clear()

    @torch.no_grad()
    def _eval_loss(self, run: AdapterRun) -> float:
        """Mean loss of the trained adapter (served by the bank) over its ``eval_dataset``."""
        cfg = self.config
        a = cfg.get_adapter(run.name)
        data = load_adapter_data(cfg, run.name, self.plex.tokenizer, dataset=a.eval_dataset, labels=run.data.labels)
        total, n = 0.0, 0
        bs = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
        for i in range(0, len(data.examples), bs):
            exs = data.examples[i:i + bs]
            ids, mask = pad_batch([e.input_ids for e in exs], pad_id(self.plex.tokenizer), device=self.device)
            with self.plex.using([run.row_spec] * len(exs), len(exs)), _autocast(self.device, self.precision):
                loss = self._losses([(run, 0, len(exs))], exs, ids, mask)[0]
            total += float(loss) * len(exs)
            n += len(exs)
        return total / max(n, 1)

    # -------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, runs: list[AdapterRun], done: int, tokens: int, key: dict[str, Any]) -> None:
        state = {
            "version": 1, "key": key, "next_micro_step": done, "tokens": tokens, "rng": ckpt.capture_rng(),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "runs": {r.name: {
                "params": {m: (A.detach().cpu().clone(), B.detach().cpu().clone()) for m, (A, B) in r.params.items()},
                "magnitudes": {m: t.detach().cpu().clone() for m, t in r.magnitudes.items()},
                "head": [p.detach().cpu().clone() for p in r.head],
                "saved": [p.detach().cpu().clone() for p in r.saved_params()],
                "optimizer": r.optimizer.state_dict() if r.optimizer is not None else None,
                "scheduler": r.scheduler.state_dict() if r.scheduler is not None else None,
                "losses": list(r.losses), "window": list(r.window),
            } for r in runs},
        }
        step = done // self.config.trainer.gradient_accumulation_steps
        ckpt.save_checkpoint(self.checkpoints_dir, step, state)

    def _load_checkpoint(self, state: dict[str, Any], runs: list[AdapterRun]) -> tuple[int, int]:
        with torch.no_grad():
            for r in runs:
                st = state["runs"][r.name]
                for m, (A, B) in st["params"].items():
                    r.params[m][0].copy_(A)
                    r.params[m][1].copy_(B)
                for m, t in st.get("magnitudes", {}).items():
                    r.magnitudes[m].copy_(t)
                for p, v in zip(r.head, st["head"]):
                    p.copy_(v)
                for p, v in zip(r.saved_params(), st.get("saved", [])):
                    p.copy_(v)
                r.optimizer.load_state_dict(st["optimizer"])  # type: ignore[union-attr]
                r.scheduler.load_state_dict(st["scheduler"])
                r.losses = list(st["losses"])
                r.window = list(st["window"])
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"])
        return int(state["next_micro_step"]), int(state["tokens"])

    # -------------------------------------------------------------- outputs
    def _save_run(self, run: AdapterRun) -> None:
        ad = self._snapshot(run)
        save_adapter(ad, self.folder.adapter_dir(run.name))
        log = {"adapter": run.name, "task": run.task, "fingerprint": run.fingerprint, "losses": run.losses,
               "steps": run.n_steps, "examples": len(run.data), "dataset": run.data.path,
               "columns": run.data.columns, "eval_loss": run.eval_loss, "joint": self.joint}
        atomic_write_text(self.folder.logs_dir / f"{run.name}.json", json.dumps(log, indent=2))
        try:
            plot_losses(self.folder.plots_dir / f"{run.name}_loss.png", f"{run.name} ({run.task})", run.losses)
        except Exception as exc:  # a plot must never fail a training run
            self.log(f"warning: could not draw the loss curve of {run.name!r}: {exc}")

    def _register_trained(self, run: AdapterRun) -> None:
        """Make the bank serve the trained weights (later groups may stack on them)."""
        self.plex.add_adapter(run.name, self._snapshot(run), replace=True)

    def write_state(self, result: TrainResult) -> None:
        """Record the adapters ``result`` trained (fingerprint, task, steps, losses) and the config's base model,
        model type and active choice in the run's ``state.json``."""
        cfg = self.config
        records: dict[str, dict[str, Any]] = {}
        for name in result.trained:
            rec: dict[str, Any] = {"fingerprint": adapter_fingerprint(cfg, name), "task": cfg.get_adapter(name).task,
                                   "steps": len(result.losses.get(name, [])), "path": f"{ADAPTERS_DIR}/{name}"}
            losses = result.losses.get(name) or []
            if losses:
                rec["first_loss"], rec["final_loss"] = losses[0], losses[-1]
            if name in result.eval_losses:
                rec["eval_loss"] = result.eval_losses[name]
            records[name] = rec
        fields: dict[str, Any] = {"base_model": cfg.base_model, "model_type": cfg.model_type, "active": cfg.active}
        if cfg.source is not None:
            fields["config"] = str(cfg.source)
        self.folder.update_state(adapters=records, **fields)

    # -------------------------------------------------------------- merges and router
    def build_merges_and_router(self, result: TrainResult) -> None:
        """(Re)build the config's merges and router whose inputs changed (see :mod:`loraplex.train.postbuild`)."""
        built = postbuild.build_merges(self.config, self.folder, log=self.log)
        result.merges += built.merges
        result.notes += built.notes
        built = postbuild.build_router(self.config, self.folder, lambda n_slots: self._ensure_plex(n_slots),
                                       log=self.log)
        result.router = built.router or result.router
        result.notes += built.notes


# ------------------------------------------------------------------------------------------------ functions
def _seed_numpy(seed: int) -> None:
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:
        pass


def _label_matrix(exs: Sequence[Example], length: int, device: torch.device) -> torch.Tensor:
    lab = torch.full((len(exs), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(exs):
        if isinstance(e.labels, list) and e.labels:
            lab[i, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return lab.to(device)


def _causal_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor | None, nn.Module | None, torch.Tensor | None]:
    """(hidden states, LM head, None) — or (None, None, logits) when the head cannot be applied to picked tokens.

    Computing the vocabulary projection only at labelled positions saves most of the head's work.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    special = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier"))
    inner = getattr(model, "base_model", None)
    if head is None or isinstance(head, (MultiLoraLinear, SavedModuleSwitch)) or special or inner is None \
            or inner is model:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        return None, None, out.logits
    out = inner(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state, head, None


def _progress(total: int, initial: int, desc: str, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc[:40], unit="step", dynamic_ncols=True,
                disable=None if enabled is None else not enabled, leave=True)


def train(config: TrainConfig | str | os.PathLike[str], *, resume: bool = False, only: Sequence[str] | None = None,
          force: bool = False, output_dir: str | os.PathLike[str] | None = None,
          device: str | torch.device | None = None, progress: bool | None = None, joint: bool | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the config's new/changed adapters into ``output_dir`` (default: the config's), then its merges and
    router. ``resume`` continues from the newest checkpoint; ``only`` limits training to these adapters;
    ``force`` retrains even up-to-date adapters; ``joint`` overrides ``trainer.joint``."""
    trainer = Trainer(config, output_dir=output_dir, device=device, progress=progress, log=log, joint=joint)
    return trainer.run(resume=resume, only=only, force=force)
