"""Named choices of target modules for sweeps: ``qv``, ``qkvo``, ``mlp``, ``attention+mlp``, ``all-linear``.

A preset is a regular expression over module names (``target_modules`` takes one: it must match the
whole name), covering the names that common architectures give the same projection:

- q / k / v: Llama, Mistral, Qwen, Gemma, OPT (``q_proj``...), BERT (``query``, ``key``, ``value``),
  DistilBERT (``q_lin``...); models that compute q, k and v in one layer (GPT-2's ``c_attn``,
  GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``, MPT's ``Wqkv``) adapt that layer for any of them.
- o: ``o_proj``, ``out_proj``, ``out_lin``, GPT-2's ``attn.c_proj``, BERT's ``attention.output.dense``.
- mlp: ``gate_proj`` / ``up_proj`` / ``down_proj``, ``gate_up_proj``, ``fc1`` / ``fc2``, ``c_fc`` and
  GPT-2's ``mlp.c_proj``, BERT's ``intermediate.dense`` and ``output.dense``, ``dense_h_to_4h`` /
  ``dense_4h_to_h``, ``w1`` / ``w2`` / ``w3``, ``lin1`` / ``lin2``.

``all-linear`` is `target_modules`' own: every linear layer but the output head. On a Llama model
``attention+mlp`` and ``all-linear`` select the same modules. A preset that matches nothing in a
model fails that run with lorakit's usual "no module matched" error, listing the model's modules.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

_FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")
_Q = ("q_proj", "query", "q_lin")
_K = ("k_proj", "key", "k_lin")
_V = ("v_proj", "value", "v_lin")
_O = ("o_proj", "out_proj", "out_lin", r"attn\.c_proj", r"attention\.output\.dense")
_MLP = (
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "fc1",
    "fc2",
    "c_fc",
    r"mlp\.c_proj",
    r"intermediate\.dense",
    r"(?<!attention\.)output\.dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "w1",
    "w2",
    "w3",
    "lin1",
    "lin2",
)


def _regex(*names: str) -> str:
    return r"(?:.*\.)?(?:" + "|".join(names) + ")"


PRESETS: dict[str, str] = {
    "qv": _regex(*_Q, *_V, *_FUSED_QKV),
    "qkvo": _regex(*_Q, *_K, *_V, *_O, *_FUSED_QKV),
    "mlp": _regex(*_MLP),
    "attention+mlp": _regex(*_Q, *_K, *_V, *_O, *_FUSED_QKV, *_MLP),
    "all-linear": "all-linear",
}
# What a string that is a module list or regex, not a preset, looks like: a comma list or regex syntax.
_NOT_A_WORD = set(",.*^$()[]{}|?\\")


def resolve_targets(value: Any, where: str = "target_modules") -> Any:
    """``target_modules`` as train() takes it: a preset name becomes its regex; a list, a regex or a
    comma-separated list of names stays as it is. A single bare word that is no preset is refused
    (a typo of one, most likely): a single module name is written as a list, ``[q_proj]``."""
    if not isinstance(value, str) or value in ("none",):
        return value
    if value in PRESETS:
        return PRESETS[value]
    if set(value) & _NOT_A_WORD:
        return value
    raise ConfigError(
        f"{where}: unknown target-module preset {value!r}; presets: {', '.join(PRESETS)} "
        f"(a single module name goes in a list: [{value}])"
    )


def preset_name(value: Any) -> str:
    """How a target_modules value is shown in tables: the preset's name, or the value itself."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)
