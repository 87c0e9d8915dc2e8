"""Sequential composition, three meanings (each with its cost):

1. :class:`AdditiveStack` -- ``W + D_1 + D_2``: what an adapter trained on top of a frozen, active adapter needs at
   serving time (LoRA is additive per layer). One pass; it is the blend with weights 1, 1.
2. :class:`InLayerStack` -- AdapterHub-style product in each layer: ``y = W x + s_2 B_2 A_2 (s_1 B_1 A_1 x)``
   (more adapters chain the same way). **Rule**: the product is used in a layer when *every* stacked adapter adapts
   that layer and its input and output sizes are equal (q/o projections, square attention layers); in any other
   layer (d_in != d_out, e.g. MLP up/down or GQA k/v, or a layer only some adapters adapt) the adapters that adapt
   it are added, ``W x + sum_i D_i x`` (``fallback="additive"``, default; ``fallback="none"`` leaves such layers
   at the base weights). :meth:`InLayerStack.layer_rules` lists the rule used per layer. One pass; rows all stack.
3. :class:`Pipeline` -- across generations: stage 1 generates with adapter 1, its text goes through a prompt template
   (``{input}``: the original prompt, ``{output}``: the previous stage's output, ``{stage1}``...: any earlier
   stage's output) and becomes stage 2's prompt, and so on (rewrite-then-answer, retrieve-then-answer). Latency
   adds up per stage; every stage's prompts and outputs are returned.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from loraplex.api import Plex
from loraplex.compose import functional as F
from loraplex.compose.blend import FixedBlend
from loraplex.compose.features import decode_texts
from loraplex.compose.trainable import base_plan, check_experts, layer_hooks, slot_factors
from loraplex.errors import LoraplexError
from loraplex.layers import MultiLoraLinear
from loraplex.tokens import pad_batch, pad_id


class AdditiveStack(FixedBlend):
    """``stack(a, b)`` = W + D_a + D_b (the blend with every weight 1)."""

    def __init__(self, plex: Plex, names: Sequence[str]) -> None:
        if len(names) < 2:
            raise LoraplexError("a stack needs at least two adapters")
        if len(set(names)) != len(names):
            raise LoraplexError(f"an additive stack of the same adapter twice is a blend with weight 2: {names}")
        super().__init__(plex, {n: 1.0 for n in names})
        self.names = list(names)


class InLayerStack:
    """In-layer product stack; see the module docstring for the per-layer rule."""

    def __init__(self, plex: Plex, names: Sequence[str], *, fallback: str = "additive") -> None:
        if len(names) < 2:
            raise LoraplexError("a stack needs at least two adapters")
        if fallback not in ("additive", "none"):
            raise LoraplexError(f"fallback must be additive or none, got {fallback!r}")
        check_experts(plex, names, "in-layer stack")
        self.plex = plex
        self.names = list(names)
        self.fallback = fallback

    def layer_rules(self) -> dict[str, str]:
        """Per wrapped layer: ``product``, ``additive`` or ``none`` (no stacked adapter adapts it)."""
        out = {}
        mods = [set(self.plex.get_adapter(n).modules) for n in self.names]
        for name, layer in self.plex.layers.items():
            have = [name in m for m in mods]
            if all(have) and layer.d_in == layer.d_out:
                out[name] = "product"
            elif any(have) and self.fallback == "additive":
                out[name] = "additive"
            else:
                out[name] = "none"
        return out

    @contextmanager
    def active(self, n_rows: int) -> Iterator[None]:
        """Every forward in the block (this thread) runs the stack."""
        dora = [n for n in self.names if self.plex.get_adapter(n).is_dora]
        if dora:
            raise LoraplexError(f"a stack cannot compose DoRA adapter {dora[0]!r}: DoRA rescales the whole weight "
                                f"W + s*B*A per output feature, it is not a low-rank update to chain or add")
        rules = self.layer_rules()
        with self.plex.hold(self.names) as slots, base_plan(self.plex, n_rows):
            order = [slots[n] for n in self.names]

            def hook(name: str, layer: MultiLoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
                rule = rules.get(name, "none")
                if rule == "none":
                    return None
                factors = [f for f in (slot_factors(layer, s) for s in order) if f is not None]
                if not factors:
                    return None
                xa = x.to(factors[0][0].dtype)
                if rule == "product":
                    upd = F.chain_delta(xa, factors)
                else:
                    upd = sum(F.lora_delta(xa, A, B, s) for A, B, s in factors)
                return y + upd.to(y.dtype)

            with layer_hooks(self.plex, hook, [m for m, r in rules.items() if r != "none"]):
                yield

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.active(int(input_ids.shape[0])):
            return self.plex.model(input_ids=input_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with self.active(int(input_ids.shape[0])), torch.no_grad():
            return self.plex.model.generate(input_ids=input_ids, **kwargs)


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class Stage:
    """One pipeline stage's adapter choice, prompts and generated texts (one per row)."""

    adapter: Any
    prompts: list[str]
    outputs: list[str]


@dataclass
class PipelineResult:
    """Every stage in order; ``outputs`` are the last stage's texts."""

    stages: list[Stage] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return self.stages[-1].outputs if self.stages else []


def render_template(template: str, *, input: str, output: str, history: Sequence[str]) -> str:
    """Fill ``{input}``, ``{output}`` and ``{stage1}``, ``{stage2}``... (earlier stages' outputs)."""
    values = {"input": input, "output": output, **{f"stage{i + 1}": h for i, h in enumerate(history)}}
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise LoraplexError(f"pipeline template {template!r} uses {{{exc.args[0]}}}; available: "
                            f"{', '.join('{' + k + '}' for k in values)}") from None
    except (ValueError, IndexError) as exc:
        raise LoraplexError(f"pipeline template {template!r} is not a valid format string ({exc})") from None


class Pipeline:
    """Stage i generates with ``stages[i]`` (an adapter name, None for base, or a blend dict); each later stage's
    prompt is ``templates[i-1]`` filled with the earlier outputs (one template for all, or one per later stage)."""

    def __init__(self, plex: Plex, stages: Sequence[Any], templates: str | Sequence[str] = "{output}", *,
                 tokenizer: Any = None, max_new_tokens: int = 32, add_special_tokens: bool | None = None,
                 encode: Callable[[str], list[int]] | None = None, **generate_kwargs: Any) -> None:
        if len(stages) < 2:
            raise LoraplexError("a pipeline needs at least two stages")
        self.plex = plex
        self.stages = list(stages)
        for s in self.stages:
            plex.rows_for([s], 1)  # validates names
        tpls = [templates] * (len(stages) - 1) if isinstance(templates, str) else list(templates)
        if len(tpls) != len(stages) - 1:
            raise LoraplexError(f"a pipeline of {len(stages)} stages needs {len(stages) - 1} templates, got "
                                f"{len(tpls)}")
        self.templates = tpls
        self.tokenizer = tokenizer if tokenizer is not None else plex.tokenizer
        if self.tokenizer is None:
            raise LoraplexError("a pipeline needs a tokenizer (the Plex has none; pass tokenizer=)")
        self.max_new_tokens = max_new_tokens
        self.add_special_tokens = add_special_tokens
        self.encode = encode  # prompt text -> ids (e.g. the training data's "[bos] prompt"); default: the tokenizer
        self.generate_kwargs = generate_kwargs

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        dev = self.plex.device
        if self.encode is not None:  # the given ids
            seqs = [list(self.encode(p)) or [0] for p in prompts]
        else:
            kw: dict[str, Any] = {}
            if self.add_special_tokens is not None:
                kw["add_special_tokens"] = self.add_special_tokens
            seqs = [list(s) for s in tok(list(prompts), **kw)["input_ids"]]
        # left-padded: decoder-only generation continues the last real token
        ids, mask = pad_batch(seqs, pad_id(tok, self.plex.model), left=True, device=dev)
        return {"input_ids": ids, "attention_mask": mask}

    def _stage(self, adapter: Any, prompts: list[str], gen: dict[str, Any]) -> list[str]:
        enc = self._encode(prompts)
        gen.setdefault("pad_token_id", pad_id(self.tokenizer, self.plex.model))
        out = self.plex.generate(enc["input_ids"], attention_mask=enc["attention_mask"], adapters=adapter, **gen)
        seqs = out.sequences if hasattr(out, "sequences") else out
        new = seqs[:, enc["input_ids"].shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]

    def run(self, prompts: Sequence[str], **generate_kwargs: Any) -> PipelineResult:
        """Run every stage over ``prompts`` (all rows of a stage in one batched generation)."""
        prompts = list(prompts)
        gen = {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs, **generate_kwargs}
        result = PipelineResult()
        current = prompts
        history: list[list[str]] = []
        for i, adapter in enumerate(self.stages):
            if i > 0:
                tpl = self.templates[i - 1]
                current = [render_template(tpl, input=prompts[r], output=history[-1][r],
                                           history=[h[r] for h in history]) for r in range(len(prompts))]
            outs = self._stage(adapter, current, dict(gen))
            result.stages.append(Stage(adapter, list(current), outs))
            history.append(outs)
        return result

    def generate(self, input_ids: torch.Tensor | Sequence[str], attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> PipelineResult:
        """:meth:`run` on token ids (decoded first) or texts."""
        if isinstance(input_ids, torch.Tensor):
            texts = decode_texts(self.tokenizer, input_ids, attention_mask)
        else:
            texts = list(input_ids)
        return self.run(texts, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise LoraplexError("a pipeline stack produces text stage by stage; call .generate(...) or .run(prompts)")


def stack(plex: Plex, names: Sequence[str], mode: str = "additive", **options: Any) -> Any:
    """The stack object for ``mode`` (additive | inlayer | pipeline)."""
    if mode == "additive":
        return AdditiveStack(plex, names)
    if mode == "inlayer":
        return InLayerStack(plex, names, **options)
    if mode == "pipeline":
        return Pipeline(plex, names, **options)
    raise LoraplexError(f"unknown stack mode {mode!r}; expected additive, inlayer or pipeline")
