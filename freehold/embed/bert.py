"""A BERT encoder in plain PyTorch (Hugging Face `BertModel`'s math and weight names), run on unpadded tokens.

    ids [T] (the batch's real tokens, one sequence after another) -> embeddings (word + position + type 0, LayerNorm)
    -> per layer (post-LN):  x = LN(x + Wo · attention(Wqkv · x))      attention: SDPA over each sequence's own tokens
                             x = LN(x + W2 · gelu(W1 · x))
    -> hidden [T, H]

Nothing is padded: the projections and the MLP (most of the FLOPs) run once over all T tokens of the batch, and
attention runs per sequence (one unmasked SDPA call each, on views of the packed q/k/v), so a short input batched
with a long one costs no more than alone, and no padding mask exists to get wrong. A sequence's attention is the
same call whatever else is in the batch. q/k/v are one [3H, H] matmul (joined at load time).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from freehold.errors import ModelLoadError, UnsupportedModelError

_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        """config.json of a BERT-family encoder; other architectures are an UnsupportedModelError."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("model_type") != "bert":
            raise UnsupportedModelError(f"{path}: model_type {raw.get('model_type')!r} is not supported for "
                                        "embeddings (Freehold runs BERT-family encoders: model_type 'bert')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not "
                                        "supported (absolute only)")
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise UnsupportedModelError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported "
                                        f"({', '.join(_ACTIVATIONS)})")
        try:
            config = cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                         num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
                         intermediate_size=raw["intermediate_size"],
                         max_position_embeddings=raw["max_position_embeddings"],
                         type_vocab_size=raw.get("type_vocab_size", 2),
                         layer_norm_eps=raw.get("layer_norm_eps", 1e-12), hidden_act=raw.get("hidden_act", "gelu"))
        except KeyError as exc:
            raise ModelLoadError(f"{path} has no {exc.args[0]!r}") from None
        if config.hidden_size % config.num_heads:
            raise ModelLoadError(f"{path}: hidden_size {config.hidden_size} is not a multiple of "
                                 f"num_attention_heads {config.num_heads}")
        return config


@dataclass(frozen=True)
class PackedBatch:
    """A bucket of sequences laid end to end, without padding."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, 0.. within each sequence
    lengths: torch.Tensor  # [B] int64, summing to T
    spans: list[tuple[int, int]]  # sequence b is tokens [start, end) of the T


def pack(sequences: list[list[int]], device: torch.device | str) -> PackedBatch:
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths])
    ends = torch.tensor(lengths).cumsum(0).tolist()
    spans = [(end - n, end) for n, end in zip(lengths, ends)]
    return PackedBatch(ids.to(device), positions.to(device), torch.tensor(lengths, device=device), spans)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.qkv = nn.Linear(h, 3 * h)  # query, key, value joined: one matmul
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:  # x: [T, H]
        x = self.attn_norm(x + self.attn_out(self._attention(self.qkv(x), batch)))
        return self.mlp_norm(x + self.down(self.act(self.up(x))))

    def _attention(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """qkv [T, 3H] -> per sequence: [3, 1, heads, l, d] view -> SDPA -> [l, H] -> [T, H]."""
        c = self.cfg
        out = qkv.new_empty(qkv.shape[0], c.hidden_size)
        for start, end in batch.spans:
            # 4-D q/k/v: the shape PyTorch's fused (flash) CPU kernel takes; 3-D ones fall back to the math path
            q, k, v = qkv[start:end].view(1, end - start, 3, c.num_heads, c.head_dim).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v)  # [1, heads, l, d]
            out[start:end] = attended[0].transpose(0, 1).reshape(end - start, c.hidden_size)
        return out


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """The last layer's hidden states of the batch's real tokens, [T, H] (single-segment inputs: type 0)."""
        x = self.word_embeddings(batch.input_ids) + self.token_type_embeddings.weight[0]
        x = self.embed_norm(x + self.position_embeddings(batch.positions))
        for layer in self.layers:
            x = layer(x, batch)
        return x


def load_bert(config_path: Path, weights_path: Path, device: torch.device | str, dtype: torch.dtype) -> BertEncoder:
    """The encoder with its safetensors weights (HF names, with or without a `bert.` prefix)."""
    cfg = BertConfig.from_file(config_path)
    tensors = _read_weights(weights_path)
    model = BertEncoder(cfg)
    model.load_state_dict(_renamed(tensors, cfg, weights_path), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:  # a truncated or corrupt file
        raise ModelLoadError(f"cannot read the weights {path}: {exc}") from None
    prefixed = all(name.startswith("bert.") for name in tensors if name.startswith(("bert.", "embeddings.")))
    return {name.removeprefix("bert.") if prefixed else name: t for name, t in tensors.items()}


def _renamed(t: dict[str, torch.Tensor], cfg: BertConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF BertModel names -> this module's names, q/k/v concatenated into qkv."""
    def get(name: str) -> torch.Tensor:
        if name not in t:
            raise ModelLoadError(f"{path} has no tensor {name!r} (is it a BERT encoder?)")
        return t[name].float()

    out = {"word_embeddings.weight": get("embeddings.word_embeddings.weight"),
           "position_embeddings.weight": get("embeddings.position_embeddings.weight"),
           "token_type_embeddings.weight": get("embeddings.token_type_embeddings.weight"),
           "embed_norm.weight": get("embeddings.LayerNorm.weight"), "embed_norm.bias": get("embeddings.LayerNorm.bias")}
    for i in range(cfg.num_layers):
        p, q = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[q + f"qkv.{kind}"] = torch.cat([get(p + f"attention.self.{n}.{kind}")
                                                for n in ("query", "key", "value")])
            out[q + f"attn_out.{kind}"] = get(p + f"attention.output.dense.{kind}")
            out[q + f"attn_norm.{kind}"] = get(p + f"attention.output.LayerNorm.{kind}")
            out[q + f"up.{kind}"] = get(p + f"intermediate.dense.{kind}")
            out[q + f"down.{kind}"] = get(p + f"output.dense.{kind}")
            out[q + f"mlp_norm.{kind}"] = get(p + f"output.LayerNorm.{kind}")
    return out
