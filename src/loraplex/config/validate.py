"""Checks across fields of a training config, and the defaults that depend on other fields.

:func:`complete` takes a config whose fields passed the schema and returns a new, complete config (the input is
left as it was): a singular ``adapter:`` becomes adapter ``default``; each adapter gets its task (from
``model_type``) and column names (from the features); dataset paths resolve against the config's folder; merges
default to all adapters with weights normalised; the router's experts default to all adapters; ``active``
defaults to the first adapter; ``output_dir`` to ``runs/<config stem>``. Every problem found is reported at once,
as a :class:`~loraplex.config.explain.ConfigProblems`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraplex.compose.spec import NAME_RE, Auto, ComposeSpecError, MoE
from loraplex.compose.spec import parse as parse_spec
from loraplex.config.explain import ConfigProblems, Loc, hint
from loraplex.config.ludwig import TASK
from loraplex.config.schema import AdapterConfig, AdaptersBlock, MergeConfig, RouterConfig, TrainConfig, TrainerConfig

__all__ = ["DEFAULT_RUN_NAME", "complete", "problem_with_active"]

#: ``output_dir`` is ``runs/<config file stem>``, or ``runs/<DEFAULT_RUN_NAME>`` for a config given as a dict.
DEFAULT_RUN_NAME = "train"


def complete(config: TrainConfig, *, source: Path | None = None, base_dir: str | os.PathLike[str] | None = None,
             config_stem: str | None = None, check_files: bool = False,
             require_datasets: bool = False) -> TrainConfig:
    """The config with its cross-field defaults filled in; :class:`ConfigProblems` lists every cross-field problem.

    ``base_dir``: the folder relative dataset paths resolve against (None: left as given). ``check_files``: report
    dataset files that do not exist. ``require_datasets``: report adapters without a ``dataset``.
    """
    if config.adapter is not None and config.adapters is not None:
        raise ConfigProblems([(("adapters",), "use either 'adapter:' (one adapter, named 'default') or 'adapters:' "
                                              "(several), not both")])
    if config.adapter is None and config.adapters is None:
        raise ConfigProblems([(("adapters",), "required: give 'adapters: {adapters: {NAME: {...}}}', or 'adapter: "
                                              "{...}' for a single adapter; got neither")])
    single = config.adapter is not None
    if config.adapter is not None:
        block = AdaptersBlock.model_construct(adapters={"default": config.adapter}, merge=[], router=None, active=None)
    else:
        assert config.adapters is not None
        block = config.adapters
    names = list(block.adapters)
    problems: list[tuple[Loc, str]] = []

    def aloc(name: str) -> Loc:
        return ("adapter",) if single else ("adapters", "adapters", name)

    adapters: dict[str, AdapterConfig] = {}
    for name, a in block.adapters.items():
        adapters[name] = _complete_adapter(config, a, aloc(name), base_dir, check_files, require_datasets, problems)
        if a.stack_on is not None and a.stack_on not in block.adapters:
            problems.append((aloc(name) + ("stack_on",), f"unknown adapter {a.stack_on!r}; known adapters: "
                                                         f"{', '.join(names)}"))
    problems += [(aloc(first) + ("stack_on",), msg) for first, msg in _stack_cycles(adapters)]

    merges: list[MergeConfig] = []
    merge_names: list[str] = []
    for i, m in enumerate(block.merge):
        loc: Loc = ("adapters", "merge", i)
        if m.name in adapters:
            problems.append((loc + ("name",), f"merge name {m.name!r} is also an adapter name; pick another"))
        elif m.name in merge_names:
            problems.append((loc + ("name",), f"duplicate merge name {m.name!r}"))
        merge_names.append(m.name)
        merges.append(_complete_merge(m, loc, names, problems))

    router = _complete_router(config, block.router, names, problems) if block.router is not None else None

    if block.active is None:
        active = names[0]
    else:
        active = block.active
        problem = problem_with_active(active, names, list(dict.fromkeys(merge_names)), router is not None)
        if problem:
            problems.append((("adapters", "active"), problem))

    trainer = _complete_trainer(config.trainer, problems)
    if config.prompt is not None and config.prompt.template is not None and config.model_type != "llm":
        problems.append((("prompt", "template"), "a prompt template needs model_type llm"))

    if problems:
        raise ConfigProblems(problems)
    done = block.model_copy(update={"adapters": adapters, "merge": merges, "router": router, "active": active})
    output_dir = config.output_dir if config.output_dir is not None else f"runs/{config_stem or DEFAULT_RUN_NAME}"
    new = config.model_copy(update={"adapter": None, "adapters": done, "output_dir": output_dir, "trainer": trainer})
    return new.with_origin(source=source, single_adapter=single)


def _complete_trainer(t: TrainerConfig, problems: list[tuple[Loc, str]]) -> TrainerConfig:
    """Ludwig's ``train_steps`` / ``steps_per_checkpoint`` / ``warmup_fraction`` moved to
    ``max_steps`` / ``checkpoint_every`` / ``warmup_ratio`` (the same value twice is fine, two values a problem)."""
    loc: Loc = ("trainer",)
    update: dict[str, object] = {}
    for ours, theirs in (("max_steps", "train_steps"), ("checkpoint_every", "steps_per_checkpoint")):
        a, b = getattr(t, ours), getattr(t, theirs)
        if a is not None and b is not None and a != b:
            problems.append((loc + (theirs,), f"contradicts {ours} {a} (got {b}); set one of them"))
        elif b is not None:
            update[ours] = b
    s = t.learning_rate_scheduler
    if s is not None and "warmup_fraction" in s.model_fields_set:
        if "warmup_ratio" in t.model_fields_set and t.warmup_ratio != s.warmup_fraction:
            problems.append((loc + ("learning_rate_scheduler", "warmup_fraction"),
                             f"contradicts warmup_ratio {t.warmup_ratio:g} (got {s.warmup_fraction:g}); set one "
                             f"of them"))
        update["warmup_ratio"] = s.warmup_fraction
    elif s is not None:  # the scheduler's warmup is warmup_ratio
        update["learning_rate_scheduler"] = s.model_copy(update={"warmup_fraction": t.warmup_ratio})
    return t.model_copy(update=update)


def _complete_adapter(config: TrainConfig, a: AdapterConfig, loc: Loc, base_dir: str | os.PathLike[str] | None,
                      check_files: bool, require_datasets: bool, problems: list[tuple[Loc, str]]) -> AdapterConfig:
    """Task, column names, prompt template, resolved dataset paths and pretrained weights of one adapter."""
    in_col = config.input_features[0].column_name if config.input_features else None
    out_col = config.output_features[0].column_name if config.output_features else None
    update: dict[str, object] = {}
    if config.model_type == "llm":
        if a.task is None:
            update["task"] = "causal_lm"
        elif a.task != "causal_lm":
            problems.append((loc + ("task",), f"model_type llm trains causal_lm adapters, got {a.task!r} "
                                              f"(use model_type: encoder)"))
        update["prompt_column"] = a.prompt_column or in_col or "prompt"
        update["response_column"] = a.response_column or out_col or "response"
        p = config.prompt
        template = a.prompt_template or (p.template if p is not None else None)
        if template is not None and p is not None and p.task is not None:
            template = template.replace("{" + TASK + "}", p.task)
        update["prompt_template"] = template
    else:
        if a.task is None:
            update["task"] = "classification"
        elif a.task == "causal_lm":
            problems.append((loc + ("task",), "expected classification or token_classification for model_type "
                                              "encoder, got 'causal_lm'"))
        update["text_column"] = a.text_column or in_col or "text"
        update["label_column"] = a.label_column or out_col or "label"
    for fld in ("dataset", "eval_dataset"):
        p = getattr(a, fld)
        if p is None:
            continue
        p = os.path.expanduser(p)
        if base_dir is not None and not os.path.isabs(p):
            p = os.path.normpath(os.path.join(str(base_dir), p))
        update[fld] = p
        if check_files and not os.path.isfile(p):
            problems.append((loc + (fld,), f"file not found: {p}"))
    if a.pretrained_adapter_weights is not None:
        folder = os.path.expanduser(a.pretrained_adapter_weights)
        if base_dir is not None and not os.path.isabs(folder):
            folder = os.path.normpath(os.path.join(str(base_dir), folder))
        update["pretrained_adapter_weights"] = folder
        update.update(_pretrained_settings(a, folder, loc + ("pretrained_adapter_weights",), check_files, problems))
    if a.dataset is None and require_datasets:
        problems.append((loc + ("dataset",), "required for training (a .csv, .jsonl, .json or .parquet file), "
                                             "got nothing"))
    return a.model_copy(update=update)


#: adapter field -> adapter_config.json key, for settings an adapter takes from its pretrained weights
_PRETRAINED_FIELDS = {"r": "r", "alpha": "lora_alpha", "target_modules": "target_modules", "use_rslora": "use_rslora",
                      "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


def _pretrained_settings(a: AdapterConfig, folder: str, loc: Loc, check_files: bool,
                         problems: list[tuple[Loc, str]]) -> dict[str, object]:
    """The LoRA settings of the PEFT folder an adapter starts from, for the fields the config leaves unset (PEFT
    builds the adapter from the folder's ``adapter_config.json``); a set field that disagrees is a problem."""
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        if check_files:
            problems.append((loc, f"not a PEFT adapter folder (no adapter_config.json): {folder}"))
        return {}
    try:
        peft = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append((loc, f"cannot read {path}: {exc}"))
        return {}
    out: dict[str, object] = {}
    for ours, theirs in _PRETRAINED_FIELDS.items():
        if peft.get(theirs) is None:
            continue
        value = peft[theirs]
        if ours == "alpha":
            value = float(value)
        if ours in a.model_fields_set:
            mine = getattr(a, ours)
            if ours == "target_modules" and isinstance(mine, list) and isinstance(value, list):
                same = sorted(mine) == sorted(value)
            else:
                same = mine == value
            if not same:
                problems.append((loc, f"the folder's {theirs} is {value!r} but the config sets {ours} {mine!r}; "
                                      f"drop {ours} or make them agree"))
            continue
        out[ours] = value
    if "alpha" not in out and "r" in out and "alpha" not in a.model_fields_set:
        out["alpha"] = float(2 * int(out["r"]))  # type: ignore[call-overload]
    return out


def _stack_cycles(adapters: dict[str, AdapterConfig]) -> list[tuple[str, str]]:
    """``(first adapter of the cycle, message)`` for each ``stack_on`` cycle, once per cycle."""
    out: list[tuple[str, str]] = []
    reported: set[str] = set()
    for name in adapters:
        chain = [name]
        cur = adapters[name].stack_on
        while cur is not None and cur in adapters and cur not in chain:
            chain.append(cur)
            cur = adapters[cur].stack_on
        if cur is not None and cur in chain:
            cycle = chain[chain.index(cur):]
            if not reported.intersection(cycle):
                reported.update(cycle)
                out.append((cycle[0], f"stack_on cycle: {' -> '.join(cycle + [cur])}"))
    return out


def _complete_merge(m: MergeConfig, loc: Loc, names: list[str], problems: list[tuple[Loc, str]]) -> MergeConfig:
    """Sources default to every adapter; weights to 1 each, divided by ``sum |w|`` unless ``normalize`` is false
    (the rule of :func:`loraplex.merge.merge.resolve_weights`, so ``[1, -1]`` task subtraction is ``[0.5, -0.5]``)."""
    sources = list(m.sources) if m.sources is not None else list(names)
    unknown = [s for s in sources if s not in names]
    if not sources:
        problems.append((loc + ("sources",), "expected at least one adapter, got an empty list"))
    elif unknown:
        problems.append((loc + ("sources",), f"unknown adapter {unknown[0]!r}{hint(unknown[0], names)}; "
                                             f"known adapters: {', '.join(names)}"))
    elif len(set(sources)) != len(sources):
        dup = next(s for s in sources if sources.count(s) > 1)
        problems.append((loc + ("sources",), f"adapter {dup!r} is listed twice"))
    weights = list(m.weights) if m.weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources):
        problems.append((loc + ("weights",), f"expected {len(sources)} weights (one per source: "
                                             f"{', '.join(sources)}), got {len(weights)}"))
    elif m.normalize and weights:
        total = sum(abs(w) for w in weights)
        if total == 0:
            problems.append((loc + ("weights",), "all weights are 0; nothing to merge"))
        else:
            weights = [w / total for w in weights]
    return m.model_copy(update={"sources": sources, "weights": weights})


def _complete_router(config: TrainConfig, r: RouterConfig, names: list[str],
                     problems: list[tuple[Loc, str]]) -> RouterConfig:
    """Experts default to every adapter; at least two, each once, and ``top_k`` no more than there are."""
    loc: Loc = ("adapters", "router")
    experts = list(r.experts) if r.experts is not None else list(names)
    unknown = [e for e in experts if e not in names]
    if unknown:
        problems.append((loc + ("experts",), f"unknown adapter {unknown[0]!r}{hint(unknown[0], names)}; "
                                             f"known adapters: {', '.join(names)}"))
    elif len(set(experts)) != len(experts):
        problems.append((loc + ("experts",), "an adapter is listed twice"))
    elif len(experts) < 2:
        problems.append((loc + ("experts",), f"a router needs at least 2 experts, got {len(experts)}"))
    elif r.top_k > len(experts):
        problems.append((loc + ("top_k",), f"expected top_k <= {len(experts)} (the number of experts), "
                                           f"got {r.top_k}"))
    if r.training == "lm_loss" and config.model_type != "llm":
        problems.append((loc + ("training",), "lm_loss needs model_type llm; use supervised or joint"))
    return r.model_copy(update={"experts": experts})


def problem_with_active(active: str, adapters: list[str], merges: list[str], has_router: bool) -> str | None:
    """None if ``active`` (an adapter, a merge, ``router``/``auto`` or a composition spec) is usable, else what is
    wrong."""
    known = adapters + merges
    if active in known:
        return None
    if active in ("router", "auto"):
        return None if has_router else f"{active!r} needs an adapters.router block"
    expected = f"an adapter ({', '.join(adapters)})"
    if merges:
        expected += f", a merge ({', '.join(merges)})"
    expected += ", 'router'/'auto'" if has_router else ""
    expected += " or a composition spec such as blend(a=0.5,b=0.5)"
    if "(" not in active and NAME_RE.fullmatch(active):
        return f"expected {expected}; got unknown name {active!r}{hint(active, known)}"
    try:
        node = parse_spec(active)
    except ComposeSpecError as exc:
        return f"expected {expected}; got {active!r}: {exc.message}"
    if isinstance(node, (MoE, Auto)) and not has_router and not (isinstance(node, MoE) and "/" in node.router):
        return f"{active!r} needs an adapters.router block"
    unknown = [n for n in node.adapter_names() if n not in known]
    if unknown:
        return f"{active!r} uses unknown adapter {unknown[0]!r}{hint(unknown[0], known)}; known: {', '.join(known)}"
    return None
