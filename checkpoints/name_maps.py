"""Per-architecture maps between Hugging Face tensor names and our NNX param paths.

A model class declares how its checkpoint is named with a class attribute,

    class Qwen2MoeForCausalLM(nnx.Module):
        weight_name_map = WeightNameMap(..., experts=(ExpertRule("mlp.experts.{expert}.", "mlp.experts."),))

and `checkpoints.safetensors.load_params` reads it (`weight_name_map_for(model)`); a class without one
gets `DEFAULT_DECODER_MAP`, the Llama / Qwen2 / Qwen3 naming. A map is data, not code: prefix rules,
renames, which containers hold per-layer (stacked) params, which torch Linear weights are transposed
into our `kernel`, buffers to skip, and the names dropped for tied embeddings.

How one name is mapped (`WeightNameMap.to_param`), e.g. `model.layers.3.mlp.up_proj.weight`:
1. The first `PrefixRule` whose `hf` prefix matches replaces it by its `ours` prefix; `{layer}` in the
   prefix captures the layer index: `layers.mlp.up_proj.weight`, layer 3.
2. Then an `ExpertRule` may do the same inside the layer for `{expert}`.
3. `renames` maps a whole dotted name to another (`embed_tokens.weight` -> `embed_tokens`: our
   embedding table is a bare Param).
4. If the model has no such param but has one whose leaf is `kernel` instead of `weight`, the tensor
   is a torch Linear weight `[out, in]`, transposed into our `[in, out]` kernel.
The inverse (`to_hf_name`) names the tensor a param is read from, for "missing tensor" errors; it uses
the first rule whose `ours` prefix matches, so the rules are listed canonical spelling first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

_LAYER = "{layer}"
_EXPERT = "{expert}"


@dataclass(frozen=True)
class PrefixRule:
    """`hf` prefix (may contain `{layer}`) <-> `ours` prefix (dotted, "" for the top level)."""

    hf: str
    ours: str

    def __post_init__(self) -> None:
        if self.hf.count(_LAYER) > 1 or _EXPERT in self.hf:
            raise ValueError(f"prefix rule {self.hf!r}: at most one {_LAYER} and no {_EXPERT}")
        object.__setattr__(self, "_pattern", _compile(self.hf, _LAYER))

    @property
    def per_layer(self) -> bool:
        return _LAYER in self.hf


@dataclass(frozen=True)
class ExpertRule:
    """Per-expert tensors stacked into one `[E, ...]` param (after the layer axis when per-layer):
    `hf` (relative to the layer, containing `{expert}`) <-> `ours`, e.g.
    `ExpertRule("mlp.experts.{expert}.", "mlp.experts.")` reads `mlp.experts.5.gate_proj.weight` into
    row 5 of `mlp.experts.gate_proj.kernel`."""

    hf: str
    ours: str

    def __post_init__(self) -> None:
        if self.hf.count(_EXPERT) != 1 or _LAYER in self.hf:
            raise ValueError(f"expert rule {self.hf!r}: exactly one {_EXPERT} and no {_LAYER}")
        object.__setattr__(self, "_pattern", _compile(self.hf, _EXPERT))


def _compile(prefix: str, placeholder: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape(placeholder), r"(\d+)"))


class ParamTarget(NamedTuple):
    """Where one HF tensor goes: our param path, its index along the stacked axes (`(layer,)`,
    `(layer, expert)`, `(expert,)` or `()`), and whether it is transposed on the way."""

    path: tuple[str, ...]
    index: tuple[int, ...]
    transpose: bool


@dataclass(frozen=True)
class WeightNameMap:
    prefixes: tuple[PrefixRule, ...]
    stacked: tuple[str, ...] = ("layers",)  # our top-level containers whose params have a leading layer axis
    renames: tuple[tuple[str, str], ...] = ()  # (our dotted name after the prefix rule, the final one)
    linear_weight: tuple[str, str] = ("weight", "kernel")  # torch Linear leaf -> our transposed leaf
    ignored: tuple[str, ...] = ()  # regexes of HF names that are buffers, not params
    tied_embedding_names: tuple[str, ...] = ()  # HF names skipped when the config ties embeddings
    experts: tuple[ExpertRule, ...] = ()
    _ignored: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for rule in self.prefixes:
            top = rule.ours.split(".", 1)[0]
            if rule.per_layer != (top in self.stacked):
                raise ValueError(f"prefix rule {rule.hf!r} -> {rule.ours!r}: per-layer rules (and only they) "
                                 f"must map into a stacked container {self.stacked}")
        if self.ignored:
            object.__setattr__(self, "_ignored", re.compile("|".join(f"(?:{p})" for p in self.ignored)))

    # -- HF name -> our param --------------------------------------------------------------------
    def skips(self, hf_name: str, *, tie_word_embeddings: bool) -> bool:
        """True for tensors that are read and dropped: buffers, and the LM head of a tied model."""
        if self._ignored is not None and self._ignored.fullmatch(hf_name):
            return True
        return tie_word_embeddings and hf_name in self.tied_embedding_names

    def to_param(self, hf_name: str, param_paths) -> ParamTarget | None:
        """The param `hf_name` loads into, or None when no rule maps it onto one of `param_paths`
        (a set of our paths, tuples of str) consistently (a per-layer tensor onto a stacked param, a
        per-expert one onto an expert param)."""
        for rule in self.prefixes:
            m = rule._pattern.match(hf_name)
            if m:
                break
        else:
            return None
        index = (int(m.group(1)),) if rule.per_layer else ()
        rest = hf_name[m.end():]
        expert_rule = None
        for candidate in self.experts:
            e = candidate._pattern.match(rest)
            if e:
                expert_rule, index, rest = candidate, (*index, int(e.group(1))), candidate.ours + rest[e.end():]
                break
        dotted = rule.ours + rest
        dotted = dict(self.renames).get(dotted, dotted)
        path = tuple(dotted.split("."))
        transpose = False
        source, target = self.linear_weight
        if path not in param_paths and path[-1] == source:
            path, transpose = path[:-1] + (target,), True
        if path not in param_paths:
            return None
        if (path[0] in self.stacked) != rule.per_layer:
            return None
        if (expert_rule is not None) != self.is_expert_param(path):
            return None
        return ParamTarget(path, index, transpose)

    def is_expert_param(self, path: tuple[str, ...]) -> bool:
        """Whether `path` stacks per-expert tensors (its `[E]` axis after any layer axis)."""
        inner = ".".join(path[1:] if path[0] in self.stacked else path) + "."
        return any(inner.startswith(rule.ours) for rule in self.experts)

    # -- our param -> HF name and shape (for error messages) -------------------------------------
    def to_hf_shape(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one HF tensor read into param `path` of `shape`: without the stacked (layer,
        expert) axes, reversed for a transposed Linear weight."""
        axes = int(path[0] in self.stacked) + int(self.is_expert_param(path))
        inner = tuple(shape[axes:])
        renamed = ".".join(path) in {ours for _, ours in self.renames}
        return inner[::-1] if path[-1] == self.linear_weight[1] and not renamed else inner

    def to_hf_name(self, path: tuple[str, ...], index: tuple[int, ...] = ()) -> str:
        """The HF tensor `path` at `index` (as in `ParamTarget`) is read from."""
        dotted = ".".join(path)
        inverse = {ours: theirs for theirs, ours in self.renames}
        source, target = self.linear_weight
        if dotted in inverse:
            dotted = inverse[dotted]
        elif path[-1] == target:
            dotted = ".".join((*path[:-1], source))
        stacked = path[0] in self.stacked
        indices = list(index)
        layer = indices.pop(0) if stacked and indices else None
        for expert_rule in self.experts:
            inner = dotted.split(".", 1)[1] if stacked else dotted
            if indices and inner.startswith(expert_rule.ours):
                inner = expert_rule.hf.replace(_EXPERT, str(indices.pop(0))) + inner[len(expert_rule.ours):]
                dotted = f"{path[0]}.{inner}" if stacked else inner
                break
        for rule in self.prefixes:
            if rule.per_layer == stacked and dotted.startswith(rule.ours):
                prefix = rule.hf.replace(_LAYER, str(layer if layer is not None else 0))
                return prefix + dotted[len(rule.ours):]
        return dotted


def _decoder_prefixes() -> tuple[PrefixRule, ...]:
    # Canonical spellings first (they name missing tensors); the unprefixed forms that some
    # checkpoints of a bare `LlamaModel` use come after.
    return (
        PrefixRule("model.layers.{layer}.", "layers."),
        PrefixRule("lm_head.", "lm_head."),
        PrefixRule("model.", ""),
        PrefixRule("layers.{layer}.", "layers."),
        PrefixRule("", ""),
    )


DEFAULT_DECODER_MAP = WeightNameMap(
    prefixes=_decoder_prefixes(),
    stacked=("layers",),
    renames=(("embed_tokens.weight", "embed_tokens"),),
    ignored=(r".*rotary_emb\.inv_freq", r".*\.masked_bias", r".*\.attn\.bias"),
    tied_embedding_names=("lm_head.weight",),
)
"""transformers' Llama / Qwen2 / Qwen3 / SmolLM2 naming: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, `model.norm.weight`, `lm_head.weight`."""


def weight_name_map_for(model) -> WeightNameMap:
    """The map a model class declares (`weight_name_map` class attribute), else the decoder default."""
    return getattr(type(model), "weight_name_map", None) or DEFAULT_DECODER_MAP
