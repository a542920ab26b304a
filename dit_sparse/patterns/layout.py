"""Where each token of a self-attention sequence sits: video (f, h, w) in raster order, and text.

Token order of the video part is frame-major raster, ``index = f·H'·W' + h·W' + w`` (every diffusers family).
Text, in joint-attention models, sits either before the video (CogVideoX, FLUX, Qwen-Image) or after it
(HunyuanVideo, SD3, Mochi).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskLayout:
    grid: tuple[int, int, int]  # (F', H', W') latent tokens after patching; images have F' = 1
    num_text: int = 0  # text tokens inside the self-attention sequence (joint attention)
    text_first: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid must be three positive sizes (F', H', W'), got {self.grid}")
        if self.num_text < 0:
            raise ValueError(f"num_text must be >= 0, got {self.num_text}")

    @property
    def num_video(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        return self.num_video + self.num_text

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def video_offset(self) -> int:
        return self.num_text if self.text_first else 0

    def video_token_blocks(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Block id of each video token, in raster order: ``(F'·H'·W',)`` int64."""
        pos = torch.arange(self.num_video, device=device) + self.video_offset
        return torch.div(pos, self.block_size, rounding_mode="floor")

    def video_block_range(self) -> tuple[int, int]:
        """[first, last) block ids that hold at least one video token."""
        start = self.video_offset
        end = start + self.num_video
        return start // self.block_size, -(-end // self.block_size)

    def text_block_flags(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(nB,)`` bool: the block holds at least one text token."""
        flags = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        if self.num_text:
            start = 0 if self.text_first else self.num_video
            end = start + self.num_text
            flags[start // self.block_size : -(-end // self.block_size)] = True
        return flags

    def token_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(seq_len, 3)`` int64 (f, h, w) per token; text tokens get -1."""
        _, h, w = self.grid
        idx = torch.arange(self.num_video, device=device)
        video = torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=1)
        text = torch.full((self.num_text, 3), -1, dtype=torch.int64, device=device)
        return torch.cat([text, video] if self.text_first else [video, text], dim=0)
