"""Seed1.5-VL: SeedViT -> 2x2 pool + MLP adapter -> MoE LLM (paper §2, Figure 1).

The text side carries one placeholder token (``image_token_id``) per visual token; the placeholders'
embeddings are replaced, in order, by the adapter's outputs. Images and video frames of the whole
packed batch go through the ViT as one packed sequence, and their visual tokens fill the
placeholders in the same order, so the packer only has to keep both lists in the same order.

Shape legend:
    T      text-side tokens of the packed LLM batch (placeholders included); cu_seqlens (B+1,)
    Tv     ViT patches of all images/frames (2x2-window order); vit_cu_seqlens (I+1,) for I images
    Tv/4   visual tokens = number of placeholders in input_ids
    P      patch length (588), D LLM hidden, V vocab
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapter import PoolAdapter
from .config import VLMConfig
from .llm import LLMOutput, MoELLM
from .vit import SeedViT


class SeedVLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = SeedViT(cfg.vit)
        self.adapter = PoolAdapter(cfg.adapter)
        self.llm = MoELLM(cfg.llm)

    def encode_images(
        self,
        patches: torch.Tensor,
        pos_hw: torch.Tensor,
        vit_cu_seqlens: torch.Tensor,
        vit_max_seqlen: int,
    ) -> torch.Tensor:
        """(Tv, P) packed patches -> (Tv/4, D) visual tokens in the LLM's embedding space."""
        return self.adapter(self.vit(patches, pos_hw, vit_cu_seqlens, vit_max_seqlen))

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings (T, D) with the placeholder rows replaced by ``visual_tokens`` in order."""
        text = self.llm.embed(input_ids)
        if visual_tokens is None:
            return text
        is_image = (input_ids == self.cfg.image_token_id).unsqueeze(-1)
        # A count mismatch would silently misplace tokens; the check runs on the device (an async
        # assert on GPU, immediate on CPU), so it costs no host synchronisation.
        torch._assert_async(
            is_image.sum() == visual_tokens.shape[0],
            "SeedVLM.embed: number of image placeholder tokens in input_ids != number of visual tokens",
        )
        return text.masked_scatter(is_image, visual_tokens.to(text.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        *,
        patches: torch.Tensor | None = None,
        pos_hw: torch.Tensor | None = None,
        vit_cu_seqlens: torch.Tensor | None = None,
        vit_max_seqlen: int | None = None,
        visual_index: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        visual_route: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LLMOutput:
        """Logits (T, V) of a packed multimodal batch, plus the MoE losses.

        The images always go through the ViT when they are given, even none of them (Tv = 0): under
        data parallelism every rank must run every sharded module in step.

        Args:
            input_ids: (T,) int64, image placeholders at the visual tokens' positions.
            position_ids: (T,) positions restarting at 0 in each document.
            cu_seqlens, max_seqlen: LLM document boundaries (int32 (B+1,)) and the longest document.
            patches, pos_hw, vit_cu_seqlens, vit_max_seqlen: the packed images (model.preprocess);
                all None for a text-only batch.
            visual_index: optional (Nv,) int64, the rows of the encoded visual tokens that fill
                input_ids' placeholders, in order (None: all of them, in order). A context-parallel
                shard holds only some placeholders of its batch's images.
            token_mask: optional (T,) bool, the rows the MoE balance statistics count (padding rows
                of a context-parallel shard are False).
            visual_route: optional map from the visual tokens of the images passed here to those
                input_ids' placeholders take, in order (instead of ``visual_index``). Vision
                workload balancing (trainer.parallel.vit_balance) passes one: the images are then
                those this process encodes for others, and the map exchanges their tokens.
        """
        vision_args = (patches, pos_hw, vit_cu_seqlens, vit_max_seqlen)
        if any(a is None for a in vision_args) and not all(a is None for a in vision_args):
            raise ValueError("SeedVLM: pass all of patches, pos_hw, vit_cu_seqlens, vit_max_seqlen or none")
        visual = None if patches is None else self.encode_images(*vision_args)
        if visual is not None and visual_route is not None:
            visual = visual_route(visual)
        elif visual is not None and visual_index is not None:
            visual = visual.index_select(0, visual_index)
        embeds = self.embed(input_ids, visual)
        return self.llm(
            None, position_ids, cu_seqlens, max_seqlen, inputs_embeds=embeds, token_mask=token_mask
        )
