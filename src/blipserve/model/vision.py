"""EVA ViT image encoder, as BLIP-2 uses it (pre-LN transformer, no pre-LayerNorm).

Pixels go in, a normalised patch sequence comes out:

    (B, 3, 224, 224) --conv 14x14/14--> (B, 256, D) --prepend CLS, add positions--> (B, 257, D)
    --39 x [x + attn(ln1(x)); x + mlp(ln2(x))]--> post_layernorm --> (B, 257, D)

Parameter names match the Hugging Face checkpoints (``vision_model.*``) so weights load
without renaming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blipserve.model.common import activation


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower hyper-parameters; defaults are the reference's (EVA ViT-g/14)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, d: dict) -> VisionConfig:
        """Read a checkpoint's ``vision_config``; omitted fields take the defaults."""
        known = {name: d[name] for name in cls.__dataclass_fields__ if name in d}
        config = cls(**known)
        assert config.hidden_size % config.num_attention_heads == 0, "hidden not divisible by heads"
        return config

    def to_hf(self) -> dict:
        """The ``vision_config`` entry of a ``config.json`` (read by :meth:`from_hf` and the
        reference's ``Blip2VisionConfig``)."""
        return {"model_type": "blip_2_vision_model", **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 257 for 224 / 14."""
        return (self.image_size // self.patch_size) ** 2 + 1


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, d))
        self.patch_embedding = nn.Conv2d(
            3, d, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.empty(1, config.num_positions, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, D, 16, 16)
        patches = patches.flatten(2).transpose(1, 2)  # (B, 256, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype)
        x = torch.cat([cls, patches], dim=1)  # (B, 257, D)
        return x + self.position_embedding[:, : x.shape[1]].to(dtype)


class VisionAttention(nn.Module):
    """Bidirectional self-attention with one fused ``qkv`` projection."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # The checkpoint's qkv bias is cat(q_bias, zeros, v_bias): k has no learned bias.
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)
        self.projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.projection(out.transpose(1, 2).reshape(b, t, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """Holds ``layers`` under the checkpoint's ``encoder`` prefix."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, 257, D) normalised image sequence."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
