"""What the flow-matching transformer families (SD3, FLUX) share.

A transformer predicting a velocity, sampled by the `flow` Euler solver; LoRA on the attention
projections; each transformer block checkpointed in the steps that carry gradient; prompts
encoded by CLIP + T5, optionally with the text encoders parked on the CPU between encodes.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from alignprop.families.base import Cond, Family

# The joint-attention projections of an MMDiT block (image stream, then text stream).
MMDIT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip


def calculate_shift(image_seq_len: int, config: Any, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the image tokens, as the diffusers pipelines compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + (base - m * base_len)


def t5_ids(tokenizer: Any, prompts: list[str], length: int, device: torch.device) -> torch.Tensor:
    """T5 token ids padded and cut to `length` tokens (with </s>)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.to(device)  # (B, L)


def qwen_chat_tokens(tokenizer: Any, prompts: list[str], length: int, thinking: bool) -> Any:
    """Each prompt as one user turn of the Qwen chat template with the generation prompt (thinking
    on: Z-Image; off: FLUX.2 [klein]), tokenized and padded / cut to `length`: input_ids and
    attention_mask, (B, length)."""
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        for p in prompts
    ]
    return tokenizer(
        chats, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )


class FlowFamily(Family):
    """A flow-matching transformer family; subclasses give `_encode` and `denoise`."""

    denoiser_name = "transformer"
    solver = "flow"
    lora_targets = MMDIT_LORA_TARGETS
    # T5 tokens per prompt when pretrained.max_sequence_length is 0
    default_max_sequence_length: ClassVar[int] = 256
    # components moved off the GPU between encodes with pretrained.offload_text_encoders
    text_encoder_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, components: dict[str, Any]):
        super().__init__(components)
        self.transformer = components["transformer"]
        self._cache: dict[str, Cond] = {}

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def max_sequence_length(self) -> int:
        return self.spec.max_sequence_length or self.default_max_sequence_length

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [m for n in self.text_encoder_names if (m := self.components.get(n)) is not None]

    def freeze(self, device: torch.device | str) -> Family:
        super().freeze(device)
        if self.spec.offload_text_encoders:
            for m in self._text_encoders():
                m.to("cpu")
        return self

    def _encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        """Prompt conditioning; with offload_text_encoders each new prompt is encoded once on the
        GPU (encoders moved there and back) and its embeddings kept on the CPU."""
        if not self.spec.offload_text_encoders:
            return self._encode(list(prompts))
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            encoders = self._text_encoders()
            for m in encoders:
                m.to(self.device)
            try:
                cond = self._encode(new)
            finally:
                for m in encoders:
                    m.to("cpu")
            for i, p in enumerate(new):
                self._cache[p] = cond.slice(i, i + 1).to("cpu")
        return Cond.cat([self._cache[p] for p in prompts]).to(self.device)

    @property
    def latent_multiple(self) -> int:
        return self.vae_factor * 2  # SD3 patches 2x2 latents, FLUX packs 2x2
